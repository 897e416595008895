"""ExitTrace: every exit's outputs over a dataset, stored once, replayed by any policy.

``collect`` runs the model with all exits over a dataloader; ``replay`` runs a policy's own
``decide`` over the stored trace, exit by exit, exactly as the online engine does (same rows, same
order of calls, rows removed once they exit). So the exits a sweep picks on a trace are the exits
``EarlyExitModel.predict`` takes on the same inputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from offramp.engines.rows import RunningRows
from offramp.modeling.state_cache import pooled_batches
from offramp.policies import ExitPolicy, ExitSignals, make_policy, require_signals
from offramp.policies.base import row_keys
from offramp.utils import atomic_dir, load_safetensors, read_json, readable_dir
from offramp.utils import progress as bar

if TYPE_CHECKING:
    from offramp.modeling import EarlyExitModel

TRACE_TENSORS = "trace.safetensors"
TRACE_META = "trace.json"


def write_trace(directory: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """A trace folder (``trace.safetensors`` + ``trace.json`` marked complete), swapped in atomically:
    a partial write is never visible as a trace."""
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / TRACE_TENSORS))
        (tmp / TRACE_META).write_text(json.dumps({**meta, "complete": True}, indent=2))


@dataclass
class ExitTrace:
    """All exits' outputs over n inputs.

    Attributes:
        logits: (E, n, c) float32 exit logits.
        labels: (n,) true labels (long; float for regression), or None.
        exit_layers: 1-based layer of each exit.
        num_layers: layers of the backbone.
        halting: (n, E) halting probabilities lambda, if the model has a halting layer.
        gate: (n, E) gate values, if the model has gates.
        hidden: (E, n, d) pooled hidden states, if collected (for saturation).
        row_key: (n,) int64 hash of each row's token ids (``offramp.policies.base.row_keys``), which
            ``ponder_sample`` keys its random draws on.
        layer_flops: FLOPs of running up to each exit (E,), if known.
        meta: free-form metadata (model, data, split, ...).
    """

    logits: Tensor
    labels: Tensor | None
    exit_layers: list[int]
    num_layers: int
    halting: Tensor | None = None
    gate: Tensor | None = None
    hidden: Tensor | None = None
    layer_flops: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    row_key: Tensor | None = None

    @property
    def num_exits(self) -> int:
        return self.logits.shape[0]

    def __len__(self) -> int:
        return self.logits.shape[1]

    def subset(self, rows: slice | Sequence[int] | Tensor) -> "ExitTrace":
        """The trace of some of its examples (e.g. ``trace.subset(slice(0, 250))`` to calibrate on
        one part and measure on the rest); exits, FLOPs and metadata are kept."""
        if isinstance(rows, slice):
            rows = range(len(self))[rows]
        index = torch.as_tensor(list(rows) if not isinstance(rows, Tensor) else rows, dtype=torch.long)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= len(self)):
            raise ValueError(f"rows out of range for a trace of {len(self)} examples")

        def pick(t: Tensor | None, dim: int) -> Tensor | None:
            return None if t is None else t.index_select(dim, index)

        return ExitTrace(logits=pick(self.logits, 1), labels=pick(self.labels, 0), exit_layers=list(self.exit_layers),
                         num_layers=self.num_layers, halting=pick(self.halting, 0), gate=pick(self.gate, 0),
                         hidden=pick(self.hidden, 1), layer_flops=self.layer_flops, meta=dict(self.meta),
                         row_key=pick(self.row_key, 0))

    def save(self, directory: str | os.PathLike) -> None:
        """Write the trace folder atomically (a partial write is never visible as a trace)."""
        tensors = {"logits": self.logits.contiguous()}
        for name in ("labels", "halting", "gate", "hidden", "row_key"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.contiguous()
        write_trace(directory, tensors, {"exit_layers": self.exit_layers, "num_layers": self.num_layers,
                                         "layer_flops": self.layer_flops, "meta": self.meta})

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "ExitTrace":
        directory = readable_dir(directory)
        meta_path, tensor_path = directory / TRACE_META, directory / TRACE_TENSORS
        if not meta_path.is_file() or not tensor_path.is_file():
            raise ValueError(f"{directory} is not a complete exit trace ({TRACE_META} and {TRACE_TENSORS} "
                             "are written together at the end of `offramp collect`); collect it again")
        fix = "collect it again (offramp collect)"
        meta = read_json(meta_path, "trace metadata", fix, {"meta": dict, "layer_flops": list, "exit_layers": list})
        if meta.get("kind") == "tokens":
            raise ValueError(f"{directory} is a token trace (generation), not a classification trace: load it with "
                             "offramp.evaluation.token_trace.TokenTrace.load (offramp sweep / calibrate take both)")
        if not meta.get("complete"):
            raise ValueError(f"{directory} is an incomplete trace; collect it again")
        t = load_safetensors(tensor_path, "trace", fix)
        if "logits" not in t or t["logits"].dim() != 3:
            raise ValueError(f"{tensor_path} has no (exits, n, classes) 'logits' tensor (it holds "
                             f"{sorted(t)}); {fix}")
        logits = t["logits"]
        try:
            exit_layers, num_layers = [int(x) for x in meta["exit_layers"]], int(meta["num_layers"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_path}: exit_layers / num_layers missing or not numbers ({e}); {fix}") from None
        if len(exit_layers) != logits.shape[0]:
            raise ValueError(f"{directory}: {len(exit_layers)} exit layers in {TRACE_META} but logits for "
                             f"{logits.shape[0]} exits in {TRACE_TENSORS}; {fix}")
        n = logits.shape[1]
        for name, dim in (("labels", 0), ("halting", 0), ("gate", 0), ("hidden", 1), ("row_key", 0)):
            if name in t and t[name].shape[dim] != n:
                raise ValueError(f"{tensor_path}: '{name}' covers {t[name].shape[dim]} examples, logits {n}; {fix}")
        return cls(logits=logits, labels=t.get("labels"), exit_layers=exit_layers,
                   num_layers=num_layers, halting=t.get("halting"), gate=t.get("gate"),
                   hidden=t.get("hidden"), layer_flops=meta.get("layer_flops"), meta=meta.get("meta") or {},
                   row_key=t.get("row_key"))


@torch.no_grad()
def collect(model: "EarlyExitModel", batches: Iterable[dict[str, Tensor]], *, keep_hidden: bool = False,
            progress: bool = False, state_cache: bool | str = False) -> ExitTrace:
    """Run every exit over ``batches`` (dicts with input_ids, attention_mask[, token_type_ids, labels]).

    ``state_cache`` (True or a folder) reads the backbone's pooled states from the cache of
    ``offramp.modeling.state_cache`` when this backbone has run over these inputs before (a frozen
    ``offramp train`` stores them), and stores them otherwise; the heads always run."""
    model.eval()

    logits, labels, halting, gate, hidden, keys = [], [], [], [], [], []
    device = model.device
    pooled = None
    if state_cache:
        batches = list(batches)
        pooled = pooled_batches(model, batches, desc="collect", show=progress, cache=state_cache)
    for i, batch in enumerate(batches if pooled is not None else bar(batches, desc="collect", enabled=progress)):
        if pooled is not None:
            out = model.forward_pooled(pooled[i].to(device), output_pooled=keep_hidden)
        else:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "token_type_ids")
                      if k in batch}
            out = model(**inputs, output_pooled=keep_hidden)
        logits.append(out.exit_logits.float().cpu())
        if "input_ids" in batch:
            keys.append(row_keys(batch["input_ids"], batch.get("attention_mask")).cpu())
        if "labels" in batch:
            labels.append(batch["labels"].cpu())
        if out.halting_logits is not None:
            halting.append(torch.sigmoid(out.halting_logits).float().cpu())
        if out.gate_logits is not None:
            gate.append(torch.sigmoid(out.gate_logits).float().cpu())
        if keep_hidden:
            hidden.append(out.pooled.float().cpu())
    if not logits:
        raise ValueError("no batches to collect: the data split is empty")
    return ExitTrace(
        logits=torch.cat(logits, dim=1), labels=torch.cat(labels) if labels else None,
        exit_layers=list(model.exit_layers), num_layers=model.num_layers,
        halting=torch.cat(halting) if halting else None, gate=torch.cat(gate) if gate else None,
        hidden=torch.cat(hidden, dim=1) if hidden else None,
        row_key=torch.cat(keys) if len(keys) == len(logits) else None)


def trace_signals(trace: ExitTrace) -> set[str]:
    """The ``ExitSignals`` a classification trace supplies to a policy."""
    return {"logits", "labels"} | {n for n in ("halting", "gate", "hidden", "row_key") if getattr(trace, n, None) is not None}


def replay(policy: ExitPolicy | str | dict, trace: ExitTrace, labels: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Run ``policy`` over a stored trace: (exit_index (n,), logits (n, c)) per row.

    The same ``decide`` calls as the online engine, with exited rows removed from the running
    set. ``labels`` overrides the trace's labels for the oracle; an oracle with mode
    "consistent" uses the last exit's predictions as labels (the consistency oracle).
    """
    policy = make_policy(policy)
    e, n, _ = trace.logits.shape
    if "labels" in policy.needs:
        if getattr(policy, "mode", "correct") == "consistent":
            labels = trace.logits[-1].argmax(-1)
        elif labels is None:
            labels = trace.labels
        if labels is None:
            raise ValueError(f"policy {policy.type!r} needs labels and the trace has none")
    require_signals(policy, trace_signals(trace), "this trace",
                    "collect it from a model that has them (hidden states with keep_hidden=True)")
    policy.check_exits(trace.exit_layers)
    running = RunningRows(n)
    out_index = torch.full((n,), e - 1, dtype=torch.long)
    carried = {"state": policy.start(n, e)}
    for k in range(e - 1):
        rows = running.index
        sig = ExitSignals(logits=trace.logits[k, rows], layer=trace.exit_layers[k],
                          halting=trace.halting[rows, k] if trace.halting is not None else None,
                          gate=trace.gate[rows, k] if trace.gate is not None else None,
                          hidden=trace.hidden[k, rows] if (trace.hidden is not None and "hidden" in policy.needs)
                          else None,
                          labels=labels[rows] if labels is not None else None,
                          row_key=trace.row_key[rows] if getattr(trace, "row_key", None) is not None else None)
        exits, carried["state"] = policy.decide(k, sig, carried["state"])
        carried = running.leave(exits, lambda local, original, k=k: out_index.index_fill_(0, original, k), carried)
        if not len(running):
            break
    logits = trace.logits[out_index, torch.arange(n)]
    return out_index, logits
