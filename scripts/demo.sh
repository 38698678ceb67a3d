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
mkdir -p "$db_dir"

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
