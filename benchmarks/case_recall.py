"""Recall of one person's tracks after 0, 1 and 2 confirmations in a case (issue 22).

An operator's loop, simulated with the product's own functions: a search with a photo
(:func:`reid_app.search.run_search`), then a case (:mod:`reid_app.cases`) in which the operator
confirms the best-ranked true track among the candidates and rejects the wrong ones ranked above
it, and searches again with the confirmed tracks (``search_case``: their mean vector, decided
tracks left out). After each step: how many of the person's ``--truth`` tracks are found (confirmed,
or among the ``--top-k`` candidates), and the precision of what would be drawn as the person's
trajectory before any confirmation (every result above the search threshold).

    python benchmarks/case_recall.py --db data/demo/reid.db \\
        --query sample_videos/query_cam1_red_jacket.jpg --truth 3,15

``--db`` is a SQLite file; the benchmark works on a copy of its folder (the case it makes stays there).

``--query-track ID`` searches with that track's best stored crop instead of a photo (the track is
then among the results). ``--truth`` lists the person's track ids, labelled by eye (benchmarks/RESULTS.md says which).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from reid_app.cases import create_case, mark_track, search_case
from reid_app.config import AppConfig
from reid_app.index import IndexManager
from reid_app.ingest import load_detector, load_embedder
from reid_app.search import SearchOptions, best_detections, run_search
from reid_app.store import Database
from reid_app.thumbnails import thumbnail_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, required=True, help="A SQLite database file.")
    parser.add_argument("--query", type=Path, help="The photo to search with.")
    parser.add_argument("--query-track", type=int, help="Or: search with this track's best stored crop.")
    parser.add_argument("--truth", required=True, help="The person's track ids, comma-separated.")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--reject-all-shown", action="store_true",
                        help="The operator also rejects every wrong track shown, not only those above the pick.")
    args = parser.parse_args()

    truth = {int(t) for t in args.truth.split(",")}
    work = Path(tempfile.mkdtemp(prefix="case_recall_")) / "data"
    shutil.copytree(args.db.parent, work)
    config = AppConfig(db_url=f"sqlite:///{work / args.db.name}", backend=args.backend)
    db = Database(config)
    indexes = IndexManager(db, config)
    embedder, detector = load_embedder(config), load_detector(None, config.device, config.backend)
    query = args.query
    if args.query_track is not None:  # the crop an operator would save from the page
        with db.read() as session:
            detection = best_detections(session, [args.query_track])[args.query_track]
        query = work / "query.jpg"
        query.write_bytes(thumbnail_bytes(db, detection.id) or b"")
    result = run_search(config, query, SearchOptions(top_k=args.top_k), embedder=embedder, detector=detector,
                        db=db, indexes=indexes)  # fmt: skip
    ranked = [(hit.track_id, hit.score) for hit in result.persons[0].hits]

    def shown(pairs: list[tuple[int, float]]) -> str:
        return " ".join(f"{t}{'*' if t in truth else ''}:{score:.2f}" for t, score in pairs)

    drawn = {t for t, score in ranked if score >= config.search_threshold}
    precision = len(truth & drawn) / max(1, len(drawn))
    print(f"{len(truth)} true tracks (* below); the photo search's top {args.top_k}: {shown(ranked)}")
    print(f"before any confirmation the trajectory (score >= {config.search_threshold}) draws {len(drawn)} tracks, "
          f"{len(truth & drawn)} of them the person's: precision {precision:.2f}")  # fmt: skip

    confirmed: list[int] = []
    case_id = None
    for step in range(3):
        found = truth & (set(confirmed) | {t for t, _ in ranked})
        recall = len(found) / len(truth)
        print(f"after {step} confirmations: {len(found)} of {len(truth)} found (recall {recall:.2f}); {shown(ranked)}")
        pick = next((i for i, (t, _) in enumerate(ranked) if t in truth), None)
        if pick is None or step == 2:
            break
        track = ranked[pick][0]
        if case_id is None:
            case_id = create_case(db, "case recall benchmark", confirmed=[track])
        else:
            mark_track(db, case_id, track, "confirmed")
        shown_wrong = ranked if args.reject_all_shown else ranked[:pick]
        for wrong, _ in shown_wrong:
            if wrong not in truth:
                mark_track(db, case_id, wrong, "rejected")
        confirmed.append(track)
        candidates = search_case(db, indexes, case_id, top_k=args.top_k)["candidates"]
        ranked = [(hit["track_id"], hit["score"]) for hit in candidates]


if __name__ == "__main__":
    main()
