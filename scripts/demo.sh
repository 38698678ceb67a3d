#!/usr/bin/env bash
# The main job end to end on the bundled sample videos, with the embedded default storage
# (SQLite file + FAISS index files under data/demo/):
#   ingest clip 1 as camera 1 and clip 2 as camera 2, then search for a person cut from clip 1.
# It uses the FA-Net shipped in weights/ (see weights/README.md); REID_DEMO_WEIGHTS=FILE runs it
# with other weights (REID_DEMO_WEIGHTS=untrained: a seeded random-init model, pipeline only).
set -euo pipefail
cd "$(dirname "$0")/.."

db_dir=data/demo
db="sqlite:///${db_dir}/reid.db"
weights=()
[ -z "${REID_DEMO_WEIGHTS-}" ] || weights=(--weights "$REID_DEMO_WEIGHTS")

# data/demo belongs to the demo: when the re-ID weights changed since it was built (a new shipped
# model after a pull, or REID_DEMO_WEIGHTS), the database would refuse the other model's vectors,
# so the demo starts it again instead.
default_weights=$(python -c "from reid_app.embed import DEFAULT_EMBEDDER_WEIGHTS as w; print(w)")
weights_file=${REID_DEMO_WEIGHTS:-weights/$default_weights}
built_with=untrained
[ ! -f "$weights_file" ] || built_with=$(sha256sum "$weights_file" | cut -d' ' -f1)
if [ -d "$db_dir" ] && [ "$(cat "$db_dir/.built_with" 2>/dev/null)" != "$built_with" ]; then
    echo "== $db_dir was built with other re-ID weights: starting it again"
    rm -rf "$db_dir"
fi
mkdir -p "$db_dir"
printf '%s\n' "$built_with" > "$db_dir/.built_with"

echo "== ingest sample_videos/cam1_square_left.mp4 as camera 1"
reid-app ingest sample_videos/cam1_square_left.mp4 --camera 1 --db "$db" "${weights[@]}" --quiet
echo "== ingest sample_videos/cam2_square_right.mp4 as camera 2"
reid-app ingest sample_videos/cam2_square_right.mp4 --camera 2 --db "$db" "${weights[@]}" --quiet
echo "== what is stored"
reid-app stats --db "$db"
echo "== search: sample_videos/query_cam1_red_jacket.jpg (a person crop from camera 1)"
reid-app search sample_videos/query_cam1_red_jacket.jpg --db "$db" "${weights[@]}" --top-k 5 \
    --report "${db_dir}/search_report.html"
echo "== report written to ${db_dir}/search_report.html"
