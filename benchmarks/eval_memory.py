"""Peak memory and wall time of ``fanet.evaluation.evaluate_features`` at MSMT17 size.

Defaults are the MSMT17 test split (11,659 queries, 82,161 gallery images, 3,060 identities,
15 cameras) with FA-Net's 3840-d features. Features are random: a gaussian centre per identity plus
gaussian noise, so ranking is non-trivial and every query has valid matches. Each mode (plain
cosine, re-ranked) runs in its own subprocess so the two peak-RSS figures are independent.

    .venv/bin/python benchmarks/eval_memory.py                      # full size, both modes
    .venv/bin/python benchmarks/eval_memory.py --queries 1000 --gallery 8000 --dim 512
    .venv/bin/python benchmarks/eval_memory.py --mode rerank        # one mode, in this process

Peak RSS is the kernel's high-water mark (``ru_maxrss``) of the measuring process, which includes
the features themselves; the RSS just before evaluation is printed too.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def current_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def make_split(
    num_queries: int, num_gallery: int, dim: int, num_ids: int, num_cams: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random query/gallery features, pids and camids with valid (other-camera) matches."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    q_pids = rng.integers(0, num_ids, num_queries)
    g_pids = np.concatenate([np.arange(num_ids), rng.integers(0, num_ids, max(num_gallery - num_ids, 0))])
    g_pids = rng.permutation(g_pids[:num_gallery])
    q_camids = rng.integers(0, num_cams, num_queries)
    g_camids = rng.integers(0, num_cams, num_gallery)

    def features(pids: np.ndarray) -> np.ndarray:
        # Filled in place, block by block, so no float64 or full-size temporary is created.
        out = np.empty((pids.shape[0], dim), dtype=np.float32)
        for start in range(0, pids.shape[0], 8192):
            block = out[start : start + 8192]
            rng.standard_normal(block.shape, dtype=np.float32, out=block)
            block *= noise
            block += centres[pids[start : start + 8192]]
        return out

    return features(q_pids), features(g_pids), q_pids, g_pids, q_camids, g_camids


def run_one(args: argparse.Namespace) -> dict[str, float | int | str]:
    from fanet.evaluation import evaluate_features

    query, gallery, q_pids, g_pids, q_camids, g_camids = make_split(
        args.queries, args.gallery, args.dim, args.ids, args.cams, args.noise, args.seed
    )
    rss_before = current_rss_bytes()
    started = time.perf_counter()
    metrics = evaluate_features(
        query, gallery, q_pids, g_pids, q_camids, g_camids, rerank=args.mode == "rerank", chunk_size=args.chunk_size
    )
    elapsed = time.perf_counter() - started
    return {
        "mode": args.mode,
        "queries": args.queries,
        "gallery": args.gallery,
        "dim": args.dim,
        "features_gib": (query.nbytes + gallery.nbytes) / 2**30,
        "rss_before_eval_gib": rss_before / 2**30,
        "peak_rss_gib": peak_rss_bytes() / 2**30,
        "eval_seconds": elapsed,
        "mAP": metrics.mAP,
        "rank1": metrics.rank1,
        "num_valid_queries": metrics.num_valid_queries,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=11_659)
    parser.add_argument("--gallery", type=int, default=82_161)
    parser.add_argument("--dim", type=int, default=3840)
    parser.add_argument("--ids", type=int, default=3060, help="number of identities")
    parser.add_argument("--cams", type=int, default=15, help="number of cameras")
    parser.add_argument("--noise", type=float, default=4.0, help="std of per-image noise around id centres")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=["both", "plain", "rerank"], default="both")
    args = parser.parse_args()

    if args.mode != "both":
        print(json.dumps(run_one(args)), flush=True)
        return
    for mode in ("plain", "rerank"):
        command = [sys.executable, __file__, "--mode", mode]
        for flag in ("queries", "gallery", "dim", "ids", "cams", "noise", "chunk_size", "seed"):
            command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            print(f"{mode}: failed (exit {completed.returncode})\n{completed.stderr}", flush=True)
            continue
        result = json.loads(completed.stdout.strip().splitlines()[-1])
        print(
            f"{mode:>6}: Q={result['queries']} G={result['gallery']} dim={result['dim']} "
            f"features={result['features_gib']:.2f} GiB, RSS before eval={result['rss_before_eval_gib']:.2f} GiB, "
            f"peak RSS={result['peak_rss_gib']:.2f} GiB, eval time={result['eval_seconds']:.1f} s, "
            f"mAP={result['mAP']:.4f}, rank-1={result['rank1']:.4f}, valid queries={result['num_valid_queries']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
