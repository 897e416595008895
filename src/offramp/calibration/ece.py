"""Expected calibration error (equal-width confidence bins) and reliability-diagram data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from offramp.utils import atomic_write_bytes


@dataclass(frozen=True)
class Reliability:
    """Per-bin statistics of a reliability diagram (all arrays are (n_bins,)).

    Attributes:
        edges: (n_bins + 1,) bin edges over [0, 1]; bin i holds confidences in (edges[i], edges[i+1]]
            (the first bin also holds 0).
        confidence: mean confidence of the points in each bin (nan for an empty bin).
        accuracy: accuracy of the points in each bin (nan for an empty bin).
        count: number of points in each bin.
        ece: sum_i count_i / n * |accuracy_i - confidence_i|.
    """

    edges: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    ece: float

    def to_dict(self) -> dict:
        """JSON-ready dict (nan bins as None)."""
        out = {}
        for key, value in asdict(self).items():
            if isinstance(value, np.ndarray):
                value = [None if (isinstance(v, float) and np.isnan(v)) else v for v in value.tolist()]
            out[key] = value
        return out


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> Reliability:
    """Reliability-diagram statistics and ECE of the predictions ``argmax probs``.

    Args:
        probs: (n, c) predicted probabilities.
        labels: (n,) true classes.
        n_bins: equal-width confidence bins over [0, 1] (15 in JEI-DNN).
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or labels.size == 0:
        raise ValueError(f"probs must be (n, c) with n >= 1 and labels (n,), got {probs.shape} and {labels.shape}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)  # (lo, hi]
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(bins, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    gaps = np.where(count > 0, np.abs(accuracy - mean_conf), 0.0)
    ece = float((count / labels.size * gaps).sum())
    return Reliability(edges, mean_conf, accuracy, count, ece)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE with ``n_bins`` equal-width bins of the top-class confidence."""
    return reliability(probs, labels, n_bins).ece


def plot_reliability(curves: dict[str, Reliability], path: str | Path) -> Path:
    """Draw reliability diagrams (one line per rule) to a PNG, written to a temp name then renamed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect")
    for name, rel in curves.items():
        keep = rel.count > 0
        ax.plot(rel.confidence[keep], rel.accuracy[keep], marker="o", label=f"{name} (ECE {rel.ece:.3f})")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=120)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
