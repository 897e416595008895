"""Batched per-row early exit for classification: rows that exit leave the running batch.

The loop runs the backbone one layer at a time. After each exit, the policy decides per row; the
rows that exit are written to the output and dropped (``index_select`` on the hidden states, the
attention mask, the layer context, the halting state and the policy state). The loop ends when
no row is left, so the compute of a batch is the compute its rows asked for. There is one
host sync per exit (to know how many rows remain), none per row.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from offramp.backbones.base import check_ids
from offramp.policies import ExitPolicy, ExitSignals

if TYPE_CHECKING:
    from offramp.modeling import EarlyExitModel, Prediction


def early_exit_predict(model: "EarlyExitModel", input_ids: Tensor, attention_mask: Tensor | None,
                       policy: ExitPolicy, *, token_type_ids: Tensor | None = None,
                       labels: Tensor | None = None) -> "Prediction":
    """Run ``model`` with real per-row early exit under ``policy``."""
    from offramp.modeling import Prediction

    attention_mask = check_ids(input_ids, attention_mask)
    if "labels" in policy.needs and labels is None:
        raise ValueError(f"policy {policy.type!r} needs labels: pass labels=...")
    if "halting" in policy.needs and model.halting is None:
        raise ValueError(f"policy {policy.type!r} needs a halting layer; this model has none")
    if "gate" in policy.needs and model.gates is None:
        raise ValueError(f"policy {policy.type!r} needs exit gates; this model has none")
    policy.check_exits(model.exit_layers)
    a, cls = model.adapter, model.classifiers
    b, device = input_ids.shape[0], input_ids.device
    num_exits, last = model.num_exits, model.num_exits - 1
    hidden = a.embed(input_ids, token_type_ids)  # (b, t, d)
    ctx = a.context(hidden, attention_mask)
    mask = attention_mask
    rows = torch.arange(b, device=device)  # original row of each running row
    state = policy.start(b, num_exits, device)
    halt_prev = gate_state = None
    if labels is not None:
        labels = labels.to(device)
    out_logits = out_index = None
    for i in range(model.exit_layers[-1]):
        hidden = a.run_layer(i, hidden, ctx)
        k = model._exit_at.get(i + 1)
        if k is None:
            continue
        pooled = cls.pool(hidden, mask)  # (r, d)
        logits = cls(k, pooled)  # (r, c)
        if out_logits is None:
            out_logits = logits.new_empty(b, logits.shape[-1])
            out_index = torch.full((b,), last, dtype=torch.long, device=device)
        signals = ExitSignals(logits=logits, layer=i + 1, hidden=pooled if "hidden" in policy.needs else None,
                              labels=labels)
        if model.halting is not None:
            if halt_prev is None:
                halt_prev = model.halting.start(pooled)
            z, halt_prev = model.halting.step(k, pooled, halt_prev)
            signals.halting = torch.sigmoid(z)
        if model.gates is not None:
            signals.gate, gate_state = model.gates.step(k, logits, gate_state)
        if k == last:
            out_logits[rows] = logits
            break
        exits, state = policy.decide(k, signals, state)
        leave = exits.nonzero().squeeze(1)
        if leave.numel():
            out_logits.index_copy_(0, rows[leave], logits[leave])
            out_index[rows[leave]] = k
        keep = (~exits).nonzero().squeeze(1)
        n_keep = keep.numel()
        if n_keep == 0:
            break
        if n_keep < rows.numel():
            rows, hidden, mask = rows[keep], hidden[keep], mask[keep]
            ctx = a.select(ctx, keep)
            state = state.select(keep)
            if labels is not None:
                labels = labels[keep]
            if halt_prev is not None:
                halt_prev = halt_prev[keep]
            if gate_state is not None:
                gate_state = model.gates.select(gate_state, keep)
    layers = torch.tensor(model.exit_layers, device=device)
    return Prediction(logits=out_logits, exit_index=out_index, exit_layer=layers[out_index])
