"""Classification speed benchmark: per-row early exit against the plain HF forward, same run.

Measures, at each batch size:
- overhead: time of ``predict`` with the never-exit policy / time of the plain HF forward + head;
- realised speed-up / ideal speed-up with rows assigned known mixed exit depths, where ideal =
  layers / mean exit layer and realised = plain time / early-exit time;
- the same for a "shallow" assignment, where most rows leave at the first or second exit (what
  a good rule does on easy data, and where what an early exit still pays weighs most).
Timings interleave the variants and take medians, so drift of a noisy machine hits all alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from offramp.config import CONFIG_NAME, OfframpConfig
from offramp.data.assets import minilm_path, mpnet_path
from offramp.devices import describe_device, module_device, resolve_device, resolve_dtype, synchronize
from offramp.modeling import EarlyExitModel
from offramp.policies import ExitPolicy, ExitSignals, PolicyState
from offramp.utils import atomic_write_json


@dataclass(frozen=True)
class AssignedDepthPolicy(ExitPolicy):
    """Benchmark-only: row r exits at the first exit at or after layer ``labels[r]``."""

    type = "assigned_depth"
    needs = ("labels",)

    def decide(self, index: int, signals: ExitSignals, state: PolicyState) -> tuple[Tensor, PolicyState]:
        return signals.layer >= signals.labels, state


def _plain_forward(model: EarlyExitModel) -> Callable[[Tensor, Tensor], Tensor]:
    backbone, cls = model.backbone, model.classifiers

    @torch.no_grad()
    def run(ids: Tensor, mask: Tensor) -> Tensor:
        out = backbone(input_ids=ids, attention_mask=mask)
        pooled = cls.pool(out.last_hidden_state, mask) if cls.pooling == "mean" or cls._pooler[0] is None \
            else out.pooler_output
        return cls(model.num_exits - 1, pooled)

    return run


def steady_allocator() -> bool:
    """Fix glibc malloc's trim and mmap thresholds (``mallopt``) for the rest of the process.

    By default glibc moves its mmap threshold with the sizes freed and returns memory to the OS at
    a trim threshold, so a variant's speed depends on what ran before it: measured here, the
    never-exit engine ran 7% slower at batch 1 right after the mixed-exit variant (which frees many
    differently sized tensors) and 1% faster in isolation. Fixed thresholds remove that order effect
    for every variant alike (the plain forward gets faster too). Same effect as starting Python with
    ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` set. False where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def _time(fn: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, the device's queued work included."""
    synchronize(device)
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - w0, time.process_time() - c0


def _inputs(model: EarlyExitModel, n: int, seq_len: int, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    vocab = model.backbone.config.vocab_size
    ids = torch.randint(1000 if vocab > 2000 else 3, vocab, (n, seq_len), generator=g)
    device = module_device(model)
    return ids.to(device), torch.ones_like(ids, device=device)


SHALLOW = (0.6, 0.3)  # the shares of rows that leave at the first and at the second exit; the rest at the last


def assigned_depths(layers: list[int], num_rows: int, kind: str, seed: int) -> Tensor:
    """Each row's exit layer: "mixed" spreads rows evenly over the exits, "shallow" sends most to the
    first two (``SHALLOW``), the rest to the last; shuffled so depths do not come in blocks."""
    exits = torch.tensor(layers)
    if kind == "mixed":
        depth = exits[torch.arange(num_rows) % len(layers)]
    elif kind == "shallow":
        first, second = round(SHALLOW[0] * num_rows), round(SHALLOW[1] * num_rows)
        depth = torch.cat([exits[:1].repeat(first), exits[1:2].repeat(second),
                           exits[-1:].repeat(num_rows - first - second)])
    else:
        raise ValueError(f"depths must be 'mixed' or 'shallow', got {kind!r}")
    return depth[torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))]


def measure(model: EarlyExitModel, batch_size: int, *, num_rows: int = 64, seq_len: int = 64,
            repeats: int = 5, seed: int = 0, clock: str = "wall", depths: str = "mixed") -> dict[str, float]:
    """Overhead and realised/ideal speed-up at one batch size (rows processed in batches).

    ``clock="wall"`` uses wall-clock time; ``clock="cpu"`` the CPU time of this process, which a
    machine shared with other jobs disturbs far less (exact for one thread). Both are recorded. On a
    GPU only wall-clock time measures the work (the CPU waits for the device).
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    model.eval()
    device = module_device(model)
    if clock == "cpu" and device.type != "cpu":
        raise ValueError(f"--clock cpu measures this process's CPU time, not the work on {device}: use --clock wall")
    plain = _plain_forward(model)
    ids, mask = _inputs(model, num_rows, seq_len, seed)
    depth = assigned_depths(model.exit_layers, num_rows, depths, seed).to(device)
    assigned = AssignedDepthPolicy()
    batches = [(ids[i:i + batch_size], mask[i:i + batch_size], depth[i:i + batch_size])
               for i in range(0, num_rows, batch_size)]
    variants = {
        "plain": lambda: [plain(a, m) for a, m, _ in batches],
        "never": lambda: [model.predict(a, m, "never") for a, m, _ in batches],
        "mixed": lambda: [model.predict(a, m, assigned, labels=d) for a, m, d in batches],
    }
    taken = torch.cat([model.predict(a, m, assigned, labels=d).exit_layer for a, m, d in batches])
    assert torch.equal(taken, depth), "assigned depths were not taken"
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(_time(fn, device))
    mean_exit = float(depth.float().mean())
    ideal = model.num_layers / mean_exit
    out: dict[str, float] = {"ideal_speedup": ideal, "mean_exit_layer": mean_exit}
    for j, name in enumerate(("wall", "cpu")):
        med = {k: statistics.median(t[j] for t in v) for k, v in times.items()}
        realised = med["plain"] / med["mixed"]
        vals = {"overhead": med["never"] / med["plain"], "realised_speedup": realised,
                "realised_over_ideal": realised / ideal, "plain_s": med["plain"], "never_s": med["never"],
                "mixed_s": med["mixed"]}
        out.update({f"{k}_{name}": v for k, v in vals.items()})
        if name == clock:
            out.update(vals)
    return out


def load_model(name: str, device: str | torch.device = "cpu", dtype: str = "float32") -> EarlyExitModel:
    """"minilm" / "mpnet" (offline packages), an offramp checkpoint folder, or any HF encoder, on
    ``device`` in ``dtype``."""
    from pathlib import Path

    if (Path(name) / CONFIG_NAME).is_file() or (Path(name) / "checkpoint" / CONFIG_NAME).is_file():
        return EarlyExitModel.from_pretrained(name, device=device, dtype=dtype).eval()
    path = {"minilm": minilm_path, "mpnet": mpnet_path}.get(name, lambda: name)()
    torch.manual_seed(0)
    dev = resolve_device(device)
    return EarlyExitModel.from_backbone(path, OfframpConfig(num_labels=3)).to(dev, resolve_dtype(dtype, dev)).eval()


def run(model: str = "minilm", *, batch_sizes: tuple[int, ...] = (1, 32), num_rows: int = 64, seq_len: int = 64,
        repeats: int = 5, threads: int | None = None, clock: str = "wall",
        json_path: str | None = None, default_allocator: bool = False, device: str = "cpu",
        dtype: str = "float32") -> dict[str, Any]:
    """The benchmark's JSON: ``overhead_bs{N}``, ``realised_over_ideal_bs{N}``, ... per batch size."""
    if threads:
        torch.set_num_threads(threads)
    steady = False if default_allocator else steady_allocator()
    m = load_model(model, device, dtype)
    dev = module_device(m)
    result: dict[str, Any] = {"model": model, "num_layers": m.num_layers, "seq_len": seq_len, "num_rows": num_rows,
                              "threads": torch.get_num_threads(), "clock": clock, "device": describe_device(dev),
                              "dtype": str(next(m.parameters()).dtype).removeprefix("torch."),
                              "allocator": "fixed malloc thresholds" if steady else "default"}
    for bs in batch_sizes:
        r = measure(m, bs, num_rows=num_rows, seq_len=seq_len, repeats=repeats, clock=clock)
        result[f"overhead_bs{bs}"] = r["overhead"]
        result[f"realised_over_ideal_bs{bs}"] = r["realised_over_ideal"]
        result[f"realised_speedup_bs{bs}"] = r["realised_speedup"]
        result["ideal_speedup"] = r["ideal_speedup"]
        result["mean_exit_layer"] = r["mean_exit_layer"]
        result[f"detail_bs{bs}"] = {k: r[k] for k in r if k.endswith(("_wall", "_cpu"))}
        s = measure(m, bs, num_rows=num_rows, seq_len=seq_len, repeats=repeats, clock=clock, depths="shallow")
        shallow = result.setdefault("shallow", {"shares": {"first_exit": SHALLOW[0], "second_exit": SHALLOW[1]},
                                                "ideal_speedup": s["ideal_speedup"],
                                                "mean_exit_layer": s["mean_exit_layer"]})
        shallow[f"realised_over_ideal_bs{bs}"] = s["realised_over_ideal"]
        shallow[f"realised_speedup_bs{bs}"] = s["realised_speedup"]
        shallow[f"overhead_bs{bs}"] = s["overhead"]
    if json_path:
        atomic_write_json(json_path, result)
    return result
