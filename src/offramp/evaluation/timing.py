"""Wall-clock of the full model vs early-exit ``predict``, measured in the same run.

The full model is the plain Hugging Face backbone forward (every layer, no exit heads: the fastest
way to run the model without exits, so the speed-up is not flattered). Runs are interleaved batch
by batch (full, early exit, full, early exit, ...) so that both see the same machine load, and
the median over ``repeats`` passes is kept. ``clock="cpu"`` measures this process's CPU time
instead of wall-clock. It counts every thread's CPU time, so it compares the work, not the
latency. On one thread, other processes' load then barely moves the ratio. On several threads,
waiting threads burn CPU time under load too, and it moves about as much as wall-clock.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from offramp.devices import synchronize
from offramp.utils import progress as bar

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass(frozen=True)
class Timing:
    """Measured seconds for one pass over the batches.

    Attributes:
        full_s: median seconds of the plain full-model forward over all batches.
        early_s: median seconds of early-exit ``predict`` over the same batches.
        speedup: full_s / early_s.
        repeats: passes measured; rows: examples per pass.
        clock: "wall" (wall-clock) or "cpu" (this process's CPU time).
    """

    full_s: float
    early_s: float
    speedup: float
    repeats: int
    rows: int
    clock: str = "wall"

    def to_dict(self) -> dict:
        return asdict(self)


def _inputs(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: batch[k].to(device) for k in INPUTS if k in batch}


def full_forward(model: Any) -> Callable[[dict[str, Tensor]], Any]:
    """The plain full model: the HF backbone forward over every layer."""
    def run(inputs: dict[str, Tensor]) -> Any:
        return model.backbone(**inputs)
    return run


def early_predict(model: Any, policy: Any) -> Callable[[dict[str, Tensor]], Any]:
    """Real per-row early exit under ``policy``."""
    def run(inputs: dict[str, Tensor]) -> Any:
        return model.predict(inputs["input_ids"], inputs.get("attention_mask"), policy,
                             token_type_ids=inputs.get("token_type_ids"))
    return run


@torch.no_grad()
def time_pair(full: Callable, early: Callable, batches: Sequence[dict[str, Tensor]], *,
              device: torch.device | str = "cpu", repeats: int = 3, warmup: int = 1,
              progress: bool = False, clock: str = "wall") -> Timing:
    """Time two callables over the same batches: whole passes, alternating which goes first from
    one repeat to the next; the median pass of each.

    A pass runs one callable over every batch, as a deployment runs one model: interleaving the two
    batch by batch would start each early-exit batch with its first layers' weights evicted by the
    full model's last ones, which at batch 1 on a CPU cost the early exit 10-15% that no user of it
    pays (measured with `offramp evaluate` at batch 1, frozen MiniLM on tweets, entropy at 2.3x
    ideal: realised / ideal 0.81 interleaved per batch, 0.89 per pass, same rows and run)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {sorted(CLOCKS)}, got {clock!r}")
    now = CLOCKS[clock]
    if not batches:
        raise ValueError("no batches to time: the split is empty")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    prepared = [_inputs(b, device) for b in batches]
    for inputs in prepared[:warmup]:
        full(inputs)
        early(inputs)

    def one_pass(fn: Callable) -> float:
        synchronize(device)
        t0 = now()
        for inputs in prepared:
            fn(inputs)
        synchronize(device)
        spent = now() - t0
        shown.update(len(prepared))
        return spent

    times: dict[str, list[float]] = {"full": [], "early": []}
    shown = bar(None, desc="timing full model vs early exit", unit="batch", total=2 * repeats * len(prepared),
                enabled=progress)
    for r in range(repeats):
        for name in (("full", "early") if r % 2 == 0 else ("early", "full")):
            times[name].append(one_pass(full if name == "full" else early))
    shown.close()
    full_times, early_times = times["full"], times["early"]
    f, e = statistics.median(full_times), statistics.median(early_times)
    rows = sum(int(b["input_ids"].shape[0]) for b in prepared)
    return Timing(f, e, f / e if e > 0 else float("inf"), repeats, rows, clock)


def time_model(model: Any, policy: Any, batches: Sequence[dict[str, Tensor]], *, repeats: int = 3,
               warmup: int = 1, progress: bool = False, clock: str = "wall") -> Timing:
    """Full HF forward vs ``model.predict(policy)`` over ``batches``, measured in the same run."""
    model.eval()
    return time_pair(full_forward(model), early_predict(model, policy), batches, device=model.device,
                     repeats=repeats, warmup=warmup, progress=progress, clock=clock)


def time_policies(model: Any, policies: dict[str, Any], batches: Sequence[dict[str, Tensor]], *,
                  repeats: int = 3, warmup: int = 1) -> dict[str, Timing]:
    """:func:`time_model` for several policies (each against its own interleaved full-model runs)."""
    return {name: time_model(model, pol, batches, repeats=repeats, warmup=warmup)
            for name, pol in policies.items()}
