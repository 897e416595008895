"""Batched per-row early exit for classification: rows that exit leave the running batch.

The loop runs the backbone one layer at a time. After each exit, the policy decides per row; the
rows that exit are written to the output and dropped (``index_select`` on the hidden states, the
attention mask, the layer context, the halting state and the policy state). The loop ends when
no row is left, so the compute of a batch is the compute its rows asked for. There is one
host sync per exit (to know how many rows remain), none per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from offramp.backbones.base import check_ids
from offramp.engines.rows import RunningRows
from offramp.outputs import Prediction
from offramp.policies import ExitPolicy, ExitSignals, require_signals
from offramp.policies.base import row_keys

if TYPE_CHECKING:
    from offramp.modeling import EarlyExitModel


SIGNALS = ("logits", "labels", "hidden", "halting", "gate", "row_key")  # what the classify engine can supply


def model_signals(model: "EarlyExitModel") -> set[str]:
    """The ``ExitSignals`` ``model`` gives its policy: logits, labels (oracle), hidden, and halting /
    gate when it has a halting layer / gates."""
    return {"logits", "labels", "hidden", "row_key"} | ({"halting"} if model.halting is not None else set()) \
        | ({"gate"} if model.gates is not None else set())


def _exit_signals(model: "EarlyExitModel", k: int, layer: int, hidden: Tensor, carried: dict[str, Any],
                  reads: set[str]) -> ExitSignals:
    """What exit ``k`` gives the policy for the running rows. What the policy reads decides what
    runs: the pooled state (logits, hidden, halting, gate), the head (logits; gates read the
    logits), the halting layer, the gates; rows that leave at an exit whose head did not run get it
    then, for those rows only. The halting and gate states in ``carried`` move on to this exit."""
    cls = model.classifiers
    pooled = cls.pool(hidden, carried["mask"]) if reads & {"logits", "hidden", "halting", "gate"} else None  # (r, d)
    logits = cls(k, pooled) if reads & {"logits", "gate"} else None  # (r, c)
    signals = ExitSignals(logits=logits, layer=layer, hidden=pooled if "hidden" in reads else None,
                          labels=carried["labels"], row_key=carried["row_key"])
    if "halting" in reads:
        if carried["halt_prev"] is None:
            carried["halt_prev"] = model.halting.start(pooled)
        z, carried["halt_prev"] = model.halting.step(k, pooled, carried["halt_prev"])
        signals.halting = torch.sigmoid(z)
    if "gate" in reads:
        signals.gate, carried["gate_state"] = model.gates.step(k, logits, carried["gate_state"])
    if signals.logits is None and signals.hidden is None and signals.halting is None:
        signals.hidden = hidden[:, 0]  # rows are counted from some tensor: (r, d), not read
    return signals


def on_device(device: torch.device, input_ids: Tensor, attention_mask: Tensor,
              token_type_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """A batch's tensors where the model is (callers may pass them on the CPU)."""
    return (input_ids.to(device), attention_mask.to(device),
            None if token_type_ids is None else token_type_ids.to(device))


def early_exit_predict(model: "EarlyExitModel", input_ids: Tensor, attention_mask: Tensor | None,
                       policy: ExitPolicy, *, token_type_ids: Tensor | None = None,
                       labels: Tensor | None = None) -> Prediction:
    """Run ``model`` with real per-row early exit under ``policy``."""
    attention_mask = check_ids(input_ids, attention_mask)
    if "labels" in policy.needs and labels is None:
        raise ValueError(f"policy {policy.type!r} needs labels: pass labels=...")
    require_signals(policy, model_signals(model), "this classifier",
                    "train a model with a halting layer (PonderNet, PALBERT) for halting, with gates (JEI-DNN) "
                    "for gate, or choose another policy")
    policy.check_exits(model.exit_layers)
    a, cls = model.adapter, model.classifiers
    b, device = input_ids.shape[0], next(cls.parameters()).device
    input_ids, attention_mask, token_type_ids = on_device(device, input_ids, attention_mask, token_type_ids)
    num_exits, last = model.num_exits, model.num_exits - 1
    hidden = a.embed(input_ids, token_type_ids)  # (b, t, d)
    running = RunningRows(b, device)
    # every per-row tensor of the running batch (the gates' state is None or tensors); RunningRows.leave
    # cuts them all to the rows that stay
    carried = {"hidden": hidden, "mask": attention_mask, "ctx": a.context(hidden, attention_mask),
               "state": policy.start(b, num_exits, device), "labels": None if labels is None else labels.to(device),
               "halt_prev": None, "gate_state": None,
               "row_key": row_keys(input_ids, attention_mask) if "row_key" in policy.needs else None}
    reads = set(policy.needs)
    decides = policy.type != "never"  # the never policy exits nowhere: only the last exit runs
    out_logits = torch.empty(b, model.config.num_labels, device=device, dtype=next(cls.parameters()).dtype)
    out_index = torch.full((b,), last, dtype=torch.long, device=device)
    for i in range(model.exit_layers[-1]):
        carried["hidden"] = hidden = a.run_layer(i, carried["hidden"], carried["ctx"])
        k = model.exit_index_of.get(i + 1)
        if k is None or (k != last and not decides):
            continue
        if k == last:
            out_logits[running.index] = cls(k, cls.pool(hidden, carried["mask"]))
            break
        signals = _exit_signals(model, k, i + 1, hidden, carried, reads)
        logits = signals.logits
        exits, carried["state"] = policy.decide(k, signals, carried["state"])

        def write(local: Tensor, original: Tensor, logits: Tensor | None = logits, k: int = k,
                  hidden: Tensor = hidden, mask: Tensor = carried["mask"]) -> None:
            if logits is None:
                rows_out = cls(k, cls.pool(hidden.index_select(0, local), mask.index_select(0, local)))
            else:
                rows_out = logits[local]
            out_logits.index_copy_(0, original, rows_out)
            out_index[original] = k

        carried = running.leave(exits, write, carried)
        if not len(running):
            break
    layers = torch.tensor(model.exit_layers, device=device)
    return Prediction(logits=out_logits, exit_index=out_index, exit_layer=layers[out_index])

