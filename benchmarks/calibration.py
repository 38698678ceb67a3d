"""Score calibration shared by the reports: how cosine similarities of same-person pairs and of
different-person pairs are spread, the thresholds that follow from them, and what the app's
current defaults let through. Figures only (no pass/fail)."""

from __future__ import annotations

import numpy as np

from reid_app.config import AppConfig

PERCENTILES = (1, 5, 10, 25, 50, 75, 90, 95, 99)


def pair_score_summary(positive: np.ndarray, negative: np.ndarray) -> dict[str, object]:
    """``positive``: scores of same-person pairs, ``negative``: of different-person pairs."""
    out: dict[str, object] = {
        "same_person": {f"p{p}": float(np.percentile(positive, p)) for p in PERCENTILES} | {"n": int(positive.size)},
        "different_person": {f"p{p}": float(np.percentile(negative, p)) for p in PERCENTILES}
        | {"p99.9": float(np.percentile(negative, 99.9)), "n": int(negative.size)},
    }
    # Thresholds: the score keeping 95 % of true matches (search), and the one that lets 0.1 % of
    # different-person pairs through (merging tracks into identities must be precise).
    grid = np.linspace(-1, 1, 2001)
    tpr = np.array([(positive >= t).mean() for t in grid])
    fpr = np.array([(negative >= t).mean() for t in grid])
    best = int(np.argmax(tpr - fpr))
    equal_error = int(np.argmin(np.abs((1 - tpr) - fpr)))
    out["equal_error_rate_point"] = {"threshold": float(grid[equal_error]), "rate": float(fpr[equal_error])}
    out["youden_best"] = {"threshold": float(grid[best]), "tpr": float(tpr[best]), "fpr": float(fpr[best])}
    out["keep_95pct_true_matches"] = float(np.percentile(positive, 5))
    strict = float(np.percentile(negative, 99.9))
    out["false_match_rate_0.1pct"] = {"threshold": strict, "tpr": float((positive >= strict).mean())}
    # What the app's current defaults do on these pairs, and a few round similarities beside them,
    # so a new checkpoint shows at once whether the defaults still fit it.
    defaults = AppConfig()
    at = {
        "search_threshold": defaults.search_threshold,
        "identity_similarity": 1.0 - defaults.identity_threshold,
    } | {f"similarity_{t:.2f}": t for t in (0.25, 0.3, 0.35, 0.4, 0.5, 0.55, 0.6, 0.65, 0.7)}
    out["rates_at"] = {
        name: {
            "similarity": round(t, 4),
            "same_person_pass": float((positive >= t).mean()),
            "different_person_pass": float((negative >= t).mean()),
        }
        for name, t in at.items()
    }
    return out


def print_summary(title: str, summary: dict[str, object]) -> None:
    same, different = summary["same_person"], summary["different_person"]
    print(f"{title}: same person median {same['p50']:.3f} (p5 {same['p5']:.3f}, n {same['n']}); "
          f"different people median {different['p50']:.3f} (p95 {different['p95']:.3f}, "
          f"p99.9 {different['p99.9']:.3f}, n {different['n']})")
    eer = summary["equal_error_rate_point"]
    print(f"  equal-error point {eer['threshold']:.3f} at {eer['rate']:.1%}; 95 % of true matches kept at "
          f"{summary['keep_95pct_true_matches']:.3f}")
    for name, rates in summary["rates_at"].items():
        print(f"  {name:<22} similarity {rates['similarity']:.2f}: same person pass {rates['same_person_pass']:.1%}, "
              f"different people pass {rates['different_person_pass']:.2%}")
