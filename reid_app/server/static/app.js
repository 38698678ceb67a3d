// The reid-app page: plain DOM code over the /api/v1 endpoints, no framework and no build step.
// Every value that comes from the server is shown with textContent or as an attribute set through
// the DOM, never parsed as HTML: database rows are data, not markup.
"use strict";

const API = "/api/v1";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

const state = { file: null, result: null, chosen: 0, cameras: [], caseId: null };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("data-")) node.setAttribute(key, String(value));
    else node[key] = value;
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function svg(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = String(text);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(API + path, { credentials: "same-origin", ...options });
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.error) || `HTTP ${response.status}`);
  return body;
}

const clock = (iso) => iso.slice(11, 19);
const stamp = (iso) => iso.slice(0, 19).replace("T", " ");
const thumbUrl = (detectionId) => `${API}/detections/${encodeURIComponent(detectionId)}/thumbnail`;

// ---------------------------------------------------------------- status, tabs
async function loadStatus() {
  const status = await api("/status");
  const model = status.embedder;
  const stored = status.database_model ? ` · database uses ${status.database_model.name}` : "";
  const adapted = model.adapted ? ` · ${model.adapted}` : "";
  $("model-line").textContent =
    `model ${model.name} (${model.trained ? "trained" : "UNTRAINED"})${adapted}${stored} · detector ${status.detector}`;
  $("threshold").value = status.defaults.threshold;
  $("identity-threshold").value = status.defaults.identity_threshold;
  setWarning(status.warning);
}

function setWarning(text) {
  // Kept on screen as long as it applies: the status warning, or one that a search answer carries.
  $("warning").textContent = text ? `Warning: ${text}` : "";
  $("warning").hidden = !text;
}

function showTab(name) {
  for (const button of document.querySelectorAll("nav button")) button.classList.toggle("active", button.dataset.tab === name);
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `tab-${name}`;
  if (name === "cameras") loadCameras().catch((e) => showError(e.message));
  if (name === "identities") loadIdentities().catch((e) => showError(e.message));
  if (name === "cases") loadCases().catch((e) => showError(e.message));
  if (name === "audit") loadAudit().catch((e) => showError(e.message));
}

// ---------------------------------------------------------------- cameras
async function loadCameras() {
  const stats = await api("/cameras");
  state.cameras = stats.cameras.map((c) => c.camera);
  const body = $("cameras-table").tBodies[0];
  body.replaceChildren();
  for (const cam of stats.cameras) {
    const videos = cam.incomplete_videos ? `${cam.videos} (${cam.incomplete_videos} unfinished)` : cam.videos;
    body.append(el("tr", {}, el("td", {}, cam.camera), el("td", {}, videos), el("td", {}, cam.tracks),
      el("td", {}, cam.detections), el("td", {}, cam.first_seen ? stamp(cam.first_seen) : "-"),
      el("td", {}, cam.last_seen ? stamp(cam.last_seen) : "-")));
  }
  const idx = stats.indexes;
  $("index-line").textContent = `index: tracks ${idx.tracks.type} (${idx.tracks.vectors} vectors), ` +
    `detections ${idx.detections.type} (${idx.detections.vectors} vectors) · database ${stats.database}`;
  renderCameraFilter();
}

function renderCameraFilter() {
  const box = $("camera-filter");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => Number(i.value)));
  box.replaceChildren("cameras: ");
  for (const camera of state.cameras) {
    const input = el("input", { type: "checkbox", value: camera, checked: checked.size === 0 || checked.has(camera) });
    box.append(el("label", {}, input, ` ${camera} `));
  }
}

// ---------------------------------------------------------------- search
function chooseFile(file) {
  if (!file) return;
  state.file = file;
  $("search-button").disabled = false;
  const image = $("query-image");
  if (image.src) URL.revokeObjectURL(image.src);
  image.src = URL.createObjectURL(file);
  $("query-area").hidden = false;
  $("query-overlays").replaceChildren();
  $("query-note").textContent = file.name;
  runSearch();
}

async function runSearch() {
  if (!state.file) return;
  showError("");
  const form = new FormData();
  form.append("image", state.file, state.file.name || "query.jpg");
  form.append("top_k", $("top-k").value);
  form.append("threshold", $("threshold").value);
  form.append("level", $("level").value);
  form.append("all_persons", "true"); // every person of a frame: the operator then picks one
  const boxes = [...$("camera-filter").querySelectorAll("input")];
  const checked = boxes.filter((b) => b.checked);
  if (checked.length && checked.length < boxes.length) for (const b of checked) form.append("camera", b.value);
  $("search-button").disabled = true;
  $("results-title").textContent = "Searching…";
  try {
    state.result = await api("/search", { method: "POST", body: form });
    state.chosen = 0;
    setWarning(state.result.warning);
    drawQueryBoxes();
    await renderResults();
  } catch (error) {
    state.result = null;
    $("results-area").hidden = true;
    $("query-overlays").replaceChildren();
    showError(error.message);
  } finally {
    $("search-button").disabled = false;
  }
}

function drawQueryBoxes() {
  const image = $("query-image");
  const overlays = $("query-overlays");
  overlays.replaceChildren();
  const persons = state.result ? state.result.persons : [];
  const place = () => {
    const sx = image.clientWidth / image.naturalWidth;
    const sy = image.clientHeight / image.naturalHeight;
    overlays.replaceChildren();
    persons.forEach((person, index) => {
      const [x1, y1, x2, y2] = person.bbox;
      const box = el("div", { class: "qbox" + (index === state.chosen ? " chosen" : ""), title: `person ${person.person}` },
        el("span", {}, person.person));
      Object.assign(box.style, { left: `${x1 * sx}px`, top: `${y1 * sy}px`, width: `${(x2 - x1) * sx}px`, height: `${(y2 - y1) * sy}px` });
      box.addEventListener("click", () => { state.chosen = index; drawQueryBoxes(); renderResults(); });
      overlays.append(box);
    });
  };
  if (image.complete && image.naturalWidth) place(); else image.onload = place;
  $("query-note").textContent = persons.length > 1
    ? `${persons.length} people found: click a box to choose whom to search for (person ${state.chosen + 1} shown).`
    : persons.length === 1 ? `query: ${persons[0].how}` : "";
}

async function renderResults() {
  const person = state.result.persons[state.chosen];
  const grid = $("results");
  grid.replaceChildren();
  $("results-area").hidden = false;
  $("results-title").textContent =
    `${person.results.length} matches for person ${person.person} (${state.result.level}, score = cosine similarity)`;
  for (const hit of person.results) {
    const figure = el("figure", { class: "hit", "data-camera": hit.camera, "data-track": hit.track_id, "data-rank": hit.rank },
      el("img", { src: thumbUrl(hit.detection_id), alt: `match ${hit.rank}` }),
      el("figcaption", {}, `#${hit.rank} · ${hit.score.toFixed(3)}`, el("br"), `camera ${hit.camera}`, el("br"), stamp(hit.time)));
    figure.addEventListener("click", () => openDetail(hit.detection_id, hit.track_id, `#${hit.rank} camera ${hit.camera}, score ${hit.score.toFixed(3)}`));
    const start = el("button", { type: "button", class: "start-case", title: "open a case with this track confirmed" }, "start case");
    start.addEventListener("click", (e) => { e.stopPropagation(); startCase(hit.track_id).catch((error) => showError(error.message)); });
    figure.append(start);
    grid.append(figure);
  }
  if (!person.results.length) grid.append(el("p", {}, "No match above the threshold."));
  // The timeline: each matched track's time span, one lane per camera.
  const rankOf = new Map();
  const scoreOf = new Map();
  for (const hit of person.results) {
    if (!rankOf.has(hit.track_id)) { rankOf.set(hit.track_id, hit.rank); scoreOf.set(hit.track_id, hit.score); }
  }
  let tracks = [];
  if (rankOf.size) {
    const query = [...rankOf.keys()].map((id) => `ids=${encodeURIComponent(id)}`).join("&");
    tracks = (await api(`/tracks?${query}&limit=1000`)).tracks;
  }
  drawTimeline($("timeline"), $("trajectory"), tracks, (t) => `#${rankOf.get(t.track_id)}`,
    (t) => `score ${scoreOf.get(t.track_id).toFixed(3)}, rank ${rankOf.get(t.track_id)}`);
}

// ---------------------------------------------------------------- timeline
function drawTimeline(container, list, tracks, label, describe) {
  container.replaceChildren();
  list.replaceChildren();
  if (!tracks.length) { container.append(el("p", {}, "Nothing to show.")); return; }
  const cameras = [...new Set(tracks.map((t) => t.camera))].sort((a, b) => a - b);
  const times = tracks.flatMap((t) => [Date.parse(t.start), Date.parse(t.end)]);
  let t0 = Math.min(...times), t1 = Math.max(...times);
  const pad = Math.max((t1 - t0) * 0.05, 1000);
  t0 -= pad; t1 += pad;
  const width = 760, left = 90, right = 30, row = 22, top = 10, axis = 26;
  const x = (ms) => left + ((ms - t0) / (t1 - t0)) * (width - left - right);
  // Tracks of one camera that overlap in time go on separate rows of its lane, so none hides another.
  const rowOf = new Map(), rowsOf = new Map();
  for (const camera of cameras) {
    const ends = [];
    for (const t of tracks.filter((u) => u.camera === camera).sort((a, b) => a.start.localeCompare(b.start))) {
      const start = x(Date.parse(t.start));
      let r = ends.findIndex((end) => end + 30 < start);
      if (r < 0) { r = ends.length; ends.push(0); }
      ends[r] = Math.max(x(Date.parse(t.end)), start + 30);
      rowOf.set(t, r);
    }
    rowsOf.set(camera, ends.length);
  }
  const laneTop = new Map();
  let y = top;
  for (const camera of cameras) { laneTop.set(camera, y); y += rowsOf.get(camera) * row + 8; }
  const height = y + axis;
  const chart = svg("svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "where this person was seen: one lane per camera, time across" });
  cameras.forEach((camera, i) => {
    const lane = laneTop.get(camera);
    chart.append(svg("rect", { x: left, y: lane, width: width - left - right, height: rowsOf.get(camera) * row + 4, fill: i % 2 ? "#f1f5f9" : "#e2e8f0" }));
    chart.append(svg("text", { x: 6, y: lane + row / 2 + 6, class: "lane-label" }, `camera ${camera}`));
  });
  for (const t of tracks) {
    const by = laneTop.get(t.camera) + 3 + rowOf.get(t) * row;
    const x1 = x(Date.parse(t.start)), x2 = Math.max(x(Date.parse(t.end)), x1 + 4);
    const group = svg("g", { class: "bar-group", "data-camera": t.camera, "data-track": t.track_id });
    group.append(svg("rect", { x: x1, y: by, width: x2 - x1, height: row - 4, rx: 3, class: "bar" }));
    const inside = x2 - x1 > 26; // else the label goes just after the bar
    group.append(svg("text", { x: inside ? x1 + 3 : x2 + 2, y: by + row / 2 + 3, class: inside ? "bar-label" : "bar-label outside" }, label(t)));
    group.append(svg("title", {}, `camera ${t.camera}, track ${t.track_id}: ${stamp(t.start)} – ${clock(t.end)} UTC`));
    chart.append(group);
  }
  for (let i = 0; i <= 4; i++) {
    const ms = t0 + ((t1 - t0) * i) / 4;
    chart.append(svg("text", { x: x(ms), y: height - 8, "text-anchor": "middle", class: "axis" }, clock(new Date(ms).toISOString())));
  }
  container.append(chart);
  // The same, in order of time, readable as a list.
  for (const t of [...tracks].sort((a, b) => a.start.localeCompare(b.start))) {
    list.append(el("li", { "data-camera": t.camera, "data-track": t.track_id },
      `${stamp(t.start)} – ${clock(t.end)} UTC · camera ${t.camera} · track ${t.track_id} · ${describe(t)}`));
  }
}

// ---------------------------------------------------------------- detail dialog
async function openDetail(detectionId, trackId, title) {
  $("detail-title").textContent = title;
  $("detail-note").textContent = "";
  const frame = $("detail-frame");
  frame.hidden = false;
  frame.onerror = () => { frame.hidden = true; $("detail-note").textContent = "The video frame cannot be read (stream, or file moved)."; };
  frame.src = `${API}/detections/${encodeURIComponent(detectionId)}/frame`;
  const crops = $("detail-crops");
  crops.replaceChildren();
  $("detail").showModal();
  try {
    const track = await api(`/tracks/${encodeURIComponent(trackId)}`);
    $("detail-note").textContent = `camera ${track.camera} · track ${track.track_id} · ${stamp(track.start)} – ${clock(track.end)} UTC · ${track.video}`;
    for (const d of track.detections) {
      crops.append(el("figure", {}, el("img", { src: thumbUrl(d.detection_id), alt: `crop ${d.detection_id}` }),
        el("figcaption", {}, clock(d.time))));
    }
  } catch (error) {
    $("detail-note").textContent = error.message;
  }
}

// ---------------------------------------------------------------- identities
async function loadIdentities() {
  const data = await api("/identities");
  renderIdentities(data, data.computed_at
    ? `${data.identities.length} identities (distance ≤ ${data.threshold}, computed ${stamp(data.computed_at)} UTC).`
    : "Identities have not been computed yet.");
}

function renderIdentities(data, note) {
  $("identities-note").textContent = note + (data.matches_are_meaningful ? " " : " UNTRAINED MODEL: not meaningful. ");
  const body = $("identities-table").tBodies[0];
  body.replaceChildren();
  for (const identity of data.identities) {
    const spans = identity.appearances.map((a) => `cam ${a.camera}: ${clock(a.start)}–${clock(a.end)}`).join("; ");
    const row = el("tr", { "data-identity": identity.identity_id }, el("td", {}, identity.identity_id),
      el("td", {}, identity.cameras.join(", ")), el("td", {}, identity.track_ids.length), el("td", {}, spans));
    row.addEventListener("click", () => showIdentity(identity.identity_id).catch((e) => showError(e.message)));
    body.append(row);
  }
}

async function showIdentity(identityId) {
  const tracks = (await api(`/tracks?identity=${encodeURIComponent(identityId)}&limit=1000`)).tracks;
  $("identity-area").hidden = false;
  $("identity-title").textContent = `Identity ${identityId}: where this person was seen`;
  drawTimeline($("identity-timeline"), $("identity-trajectory"), tracks, (t) => `${t.track_id}`, (t) => `${t.num_crops} crops`);
  const crops = $("identity-crops");
  crops.replaceChildren();
  for (const t of tracks) {
    const detail = await api(`/tracks/${encodeURIComponent(t.track_id)}`);
    const first = detail.detections[0];
    if (!first) continue;
    const figure = el("figure", {}, el("img", { src: thumbUrl(first.detection_id), alt: `track ${t.track_id}` }),
      el("figcaption", {}, `camera ${t.camera}`, el("br"), stamp(t.start)));
    figure.addEventListener("click", () => openDetail(first.detection_id, t.track_id, `camera ${t.camera}, track ${t.track_id}`));
    crops.append(figure);
  }
}

async function recomputeIdentities() {
  showError("");
  const threshold = encodeURIComponent($("identity-threshold").value);
  const data = await api(`/identities?threshold=${threshold}`, { method: "POST" });
  renderIdentities(data, `${data.identities.length} identities (distance ≤ ${data.threshold}, just computed).`);
}

// ---------------------------------------------------------------- cases
async function loadWatchlist(entries) {
  const list = $("watchlist");
  list.replaceChildren();
  for (const entry of entries || (await api("/watchlist")).watchlist) {
    const remove = el("button", { type: "button" }, "remove");
    remove.addEventListener("click", () => api(`/watchlist/${encodeURIComponent(entry.watch_id)}`, { method: "DELETE" })
      .then((data) => loadWatchlist(data.watchlist)).catch((e) => showError(e.message)));
    list.append(el("li", { "data-watch": entry.watch_id },
      `${entry.name} (similarity ≥ ${entry.threshold}${entry.webhook ? ", webhook" : ""}) `, remove));
  }
  if (!list.children.length) list.append(el("li", {}, "Nobody is watched."));
}

async function watchCase() {
  const data = await api("/watchlist", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ case_id: state.caseId, name: $("case-title").textContent.replace(/^Case \d+: /, ""),
      threshold: Number($("watch-threshold").value), webhook: $("watch-webhook").value }) });
  await loadWatchlist(data.watchlist);
}

async function loadCases() {
  loadWatchlist().catch((e) => showError(e.message));
  const body = $("cases-table").tBodies[0];
  body.replaceChildren();
  for (const c of (await api("/cases")).cases) {
    const row = el("tr", { "data-case": c.case_id }, el("td", {}, c.case_id), el("td", {}, c.name),
      el("td", {}, c.confirmed), el("td", {}, stamp(c.updated_at)));
    row.addEventListener("click", () => showCase(c.case_id).catch((e) => showError(e.message)));
    body.append(row);
  }
}

async function startCase(trackId) {
  showError("");
  const created = await api("/cases", { method: "POST", headers: { "content-type": "application/json" },
    body: JSON.stringify({ name: $("case-name").value || "new case", track_ids: [trackId] }) });
  showTab("cases");
  await showCase(created.case_id);
  await searchCase();
}

function caseFigure(track, caption) {
  return el("figure", { "data-camera": track.camera, "data-track": track.track_id },
    el("img", { src: thumbUrl(track.detection_id), alt: `track ${track.track_id}` }), el("figcaption", {}, ...caption));
}

async function showCase(caseId) {
  state.caseId = caseId;
  const detail = await api(`/cases/${encodeURIComponent(caseId)}`);
  $("case-area").hidden = false;
  $("case-title").textContent = `Case ${detail.case_id}: ${detail.name}`;
  $("case-notes").value = detail.notes;
  $("case-export-html").href = `${API}/cases/${encodeURIComponent(caseId)}/export?format=html`;
  $("case-export-json").href = `${API}/cases/${encodeURIComponent(caseId)}/export?format=json`;
  drawTimeline($("case-timeline"), $("case-trajectory"), detail.trajectory, (t) => `${t.track_id}`,
    (t) => `confirmed${t.decided_by ? " by " + t.decided_by : ""}`);
  const rejected = $("case-rejected");
  rejected.replaceChildren();
  for (const t of detail.rejected) {
    const figure = caseFigure(t, [`camera ${t.camera}`]);
    figure.append(verdictButton(t.track_id, "undecided", "undo"));
    rejected.append(figure);
  }
}

function verdictButton(trackId, verdict, label) {
  const button = el("button", { type: "button", "data-verdict": verdict }, label);
  button.addEventListener("click", (e) => { e.stopPropagation(); markTrack(trackId, verdict).catch((error) => showError(error.message)); });
  return button;
}

async function markTrack(trackId, verdict) {
  await api(`/cases/${encodeURIComponent(state.caseId)}/tracks/${encodeURIComponent(trackId)}`, {
    method: "PUT", headers: { "content-type": "application/json" }, body: JSON.stringify({ verdict }) });
  await showCase(state.caseId);
  await searchCase();
}

async function searchCase() {
  const grid = $("case-candidates");
  grid.replaceChildren(el("p", {}, "Searching…"));
  const result = await api(`/cases/${encodeURIComponent(state.caseId)}/search?top_k=${encodeURIComponent($("top-k").value)}`, { method: "POST" });
  grid.replaceChildren();
  for (const hit of result.candidates) {
    const figure = caseFigure(hit, [`${hit.score.toFixed(3)} · camera ${hit.camera}`, el("br"), stamp(hit.time)]);
    figure.classList.add("candidate");
    figure.append(verdictButton(hit.track_id, "confirmed", "same person"), verdictButton(hit.track_id, "rejected", "not this person"));
    grid.append(figure);
  }
  if (!result.candidates.length) grid.append(el("p", {}, "No other candidate."));
}

async function saveNotes() {
  await api(`/cases/${encodeURIComponent(state.caseId)}`, { method: "PATCH", headers: { "content-type": "application/json" },
    body: JSON.stringify({ notes: $("case-notes").value }) });
}

// ---------------------------------------------------------------- audit
async function loadAudit() {
  const body = $("audit-table").tBodies[0];
  body.replaceChildren();
  const rows = (await api("/audit?limit=1000")).entries.reverse();
  for (const entry of rows) {
    body.append(el("tr", { "data-action": entry.action }, el("td", {}, stamp(entry.at)), el("td", {}, entry.actor),
      el("td", {}, entry.action), el("td", {}, entry.target), el("td", {}, JSON.stringify(entry.details))));
  }
}

// ---------------------------------------------------------------- live watchlist alerts
async function watchAlerts() {
  const past = (await api("/alerts")).alerts;
  const after = past.length ? past[past.length - 1].alert_id : 0;
  const source = new EventSource(`${API}/alerts/stream?after=${encodeURIComponent(after)}`);
  source.addEventListener("alert", (event) => {
    const alert = JSON.parse(event.data);
    $("alerts").hidden = false;
    $("alert-list").prepend(el("li", { "data-alert": alert.alert_id, "data-track": alert.track_id },
      `${stamp(alert.time)} UTC · ${alert.name} · camera ${alert.camera} · score ${alert.score.toFixed(3)} · track ${alert.track_id}`));
  });
}

// ---------------------------------------------------------------- wiring
function init() {
  for (const button of document.querySelectorAll("nav button")) button.addEventListener("click", () => showTab(button.dataset.tab));
  const drop = $("drop");
  $("image-input").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); chooseFile(e.dataTransfer.files[0]); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
  $("recompute").addEventListener("click", () => recomputeIdentities().catch((e) => showError(e.message)));
  $("case-search").addEventListener("click", () => searchCase().catch((e) => showError(e.message)));
  $("case-save").addEventListener("click", () => saveNotes().catch((e) => showError(e.message)));
  $("case-watch").addEventListener("click", () => watchCase().catch((e) => showError(e.message)));
  window.addEventListener("resize", () => state.result && drawQueryBoxes());
  loadStatus().catch((e) => showError(e.message));
  loadCameras().catch((e) => showError(e.message));
  watchAlerts().catch((e) => showError(e.message));
}

document.addEventListener("DOMContentLoaded", init);
