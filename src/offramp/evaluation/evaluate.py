"""One exit rule at one setting over a split, with real per-row early exit and measured time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from offramp.evaluation.sweep import metric_fn
from offramp.evaluation.timing import time_model
from offramp.flops import model_exit_flops
from offramp.policies import make_policy
from offramp.policies.base import warn_first_exit
from offramp.utils import progress as bar


@torch.no_grad()
def run_policy(model: Any, batches: Sequence[dict], policy: Any, *,
               progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``model.predict`` over ``batches``: (logits (n, c), exit_index (n,), labels (n,))."""
    model.eval()
    logits, index, labels = [], [], []
    for b in bar(batches, desc="early exit", unit="batch", enabled=progress):
        pred = model.predict(b["input_ids"].to(model.device), b["attention_mask"].to(model.device), policy,
                             token_type_ids=b["token_type_ids"].to(model.device) if "token_type_ids" in b else None,
                             labels=b["labels"].to(model.device) if "labels" in policy.needs else None)
        logits.append(pred.logits.float().cpu())
        index.append(pred.exit_index.cpu())
        labels.append(b["labels"])
    return torch.cat(logits).numpy(), torch.cat(index).numpy(), torch.cat(labels).numpy()


def evaluate_policy(model: Any, batches: Sequence[dict], policy: Any, *, lengths: np.ndarray | None = None,
                    metric: str | None = None, timing: bool = True, repeats: int = 1,
                    progress: bool = False, clock: str = "wall") -> dict[str, Any]:
    """Metric, mean exit layer, exit histogram, FLOPs and (optionally) wall-clock vs the full model;
    beside them, the full model's metric on the same rows and (classification) the share of rows
    whose early prediction differs from the full model's: the risk ``offramp calibrate`` bounds.

    Args:
        model: an EarlyExitModel.
        batches: padded batches with labels.
        policy: the exit policy (an ExitPolicy).
        lengths: (n,) real token counts of the examples, for FLOPs (default: from the masks).
        metric: default accuracy (classification) / pearson (regression).
        timing: also time the full HF forward against ``predict``, interleaved, in this run.
        repeats: timed passes (the median is kept).
        progress: progress bars on stderr.
        clock: "wall" or "cpu" (this process's CPU time; steadier on a shared machine).
    """
    if not batches:
        raise ValueError("the split is empty: nothing to evaluate")
    metric = metric or ("pearson" if model.config.is_regression else "accuracy")
    logits, index, labels = run_policy(model, batches, policy, progress=progress)
    full_logits, _, _ = run_policy(model, batches, make_policy("never"), progress=progress)
    layers = np.asarray(model.exit_layers)
    if lengths is None:
        lengths = torch.cat([b["attention_mask"].sum(1) for b in batches]).numpy()
    flops = model_exit_flops(model, lengths)
    mean_flops = flops.mean(index)
    out: dict[str, Any] = {
        "policy": policy.to_dict(), "n": int(len(labels)), "metric": metric,
        metric: metric_fn(metric)(logits, labels),
        "full_model": {metric: metric_fn(metric)(full_logits, labels)},
        **({} if model.config.is_regression else
           {"disagreement": float((logits.argmax(-1) != full_logits.argmax(-1)).mean())}),
        "mean_exit_layer": float(layers[index].mean()),
        "num_layers": int(model.num_layers), "exit_layers": layers.tolist(),
        "exit_histogram": {int(layer): int((index == k).sum()) for k, layer in enumerate(layers)},
        "speedup_layers": float(model.num_layers / layers[index].mean()),
        "flops": {"mean": mean_flops, "full": flops.full, "speedup": flops.full / mean_flops}}
    warn_first_exit(index, layers.tolist(), f"policy {policy.to_dict()}",
                    "if that loses too much accuracy, use a stricter --value (or another --policy)")
    if timing:
        out["timing"] = time_model(model, policy, batches, repeats=repeats, progress=progress,
                                   clock=clock).to_dict()
    return out
