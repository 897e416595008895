"""The JEI-DNN training schedule: warm-up with per-exit freezing, then alternating phases.

1. Warm-up: CE at every exit; after each epoch, an exit whose validation accuracy has not improved
   for ``patience`` epochs is frozen; the warm-up ends when every exit is frozen (or after
   ``warmup_epochs``).
2. Alternation, every ``phase_batches`` batches, starting with the gates: gate phase (IMs frozen,
   BCE towards the cumulative targets; with ``pos_weight`` "balanced" or "exact" the positive
   weights are measured on the validation split at the start of each phase) and IM phase (gates
   frozen, the reweighted IM loss).

With a frozen backbone the pooled states of every exit are computed once and cached, so the
phases train only the heads and gates (exact: the backbone and its pooler do not change).

```python
cfg = OfframpConfig(num_labels=3, **jei_config(cost_weight=0.2))
model = EarlyExitModel.from_backbone(path, cfg)
history = train_jei(model, train_batches, val_batches, JEIArgs(output_dir="runs/jei"))
model.predict(ids, mask, "gate")
```
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from offramp.evaluation.collect import ExitTrace, replay
from offramp.modeling.base import load_hf_model
from offramp.modeling.state_cache import pooled_batches
from offramp.objectives.jei import (
    ce_per_exit,
    check_jei_options,
    exit_costs,
    exit_probabilities,
    gate_loss,
    gate_pos_weights,
    gate_targets,
    im_loss,
)
from offramp.policies.base import warn_first_exit
from offramp.policies.gate import GatePolicy
from offramp.training.processes import average_gradients, make_accelerator, shard_rows
from offramp.utils import atomic_dir, atomic_write_json, load_torch_state, note, readable_dir

if TYPE_CHECKING:
    from offramp.modeling import EarlyExitModel

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def jei_config(cost_weight: float = 0.1, **options: Any) -> dict[str, Any]:
    """The ``OfframpConfig`` fields of a JEI-DNN model: ``OfframpConfig(..., **jei_config(0.2))``."""
    objective = {"type": "jei", **check_jei_options({"cost_weight": cost_weight, **options})}
    return {"gate": {"type": "uncertainty"}, "objective": objective, "policy": {"type": "gate", "threshold": 0.5}}


@dataclass
class JEIArgs:
    """Hyperparameters of ``train_jei`` (None: take the value from ``model.config.objective``).

    Args:
        output_dir: where ``checkpoint/`` and ``metrics.json`` go.
        cost_weight: lambda, the CE / cost trade-off.
        pos_weight: the gates' positive-class weight, "none" | "balanced" | "exact"
            (``offramp.objectives.jei``).
        epochs: passes over the training batches in the alternating stage.
        warmup_epochs: most warm-up epochs.
        patience: warm-up freezing patience (epochs without validation-accuracy gain).
        phase_batches: batches per phase before switching.
        lr: learning rate of the IMs (and backbone when trained); gate_lr: of the gates.
        frozen_backbone: train heads and gates only (pooled states cached).
        save_backbone: store the backbone in the checkpoint (else by reference to its path).
        seed: seed of the batch order and initialisation.
        progress: print a line per epoch.
        seq_len: tokens per example for the FLOPs-based exit costs (default: the mean of the
            training batches' attention masks; give the patch count + 1 for images).
        resume: continue from ``output_dir/checkpoint`` (written atomically after the warm-up and
            after every epoch of the alternating stage).
        state_cache: keep the frozen backbone's pooled states across runs (see ``TrainingArgs``).
        device / dtype: where training runs (``auto``: the GPUs when there are any, else the CPU)
            and its mixed precision (float32: none; bfloat16 / float16: autocast; ``make_accelerator``).
    """

    output_dir: str
    cost_weight: float | None = None
    pos_weight: str | None = None
    epochs: int = 5
    warmup_epochs: int | None = None
    patience: int | None = None
    phase_batches: int | None = None
    lr: float = 1e-3
    gate_lr: float = 1e-2
    frozen_backbone: bool = True
    save_backbone: bool = True
    seed: int = 0
    progress: bool = False
    seq_len: float | None = None
    resume: bool = False
    state_cache: bool | str = False
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.lr <= 0 or self.gate_lr <= 0:
            raise ValueError("lr and gate_lr must be > 0")


class _Batches:
    """Exit logits for each batch: from cached pooled states (frozen backbone) or a forward pass."""

    def __init__(self, model: "EarlyExitModel", batches: list[dict], cache: bool,
                 state_cache: bool | str = False, weights: list[float] | None = None) -> None:
        self.model, self.batches, self.pooled = model, batches, None
        self.weights = weights or [1.0] * len(batches)  # this process's share of each global batch
        self.accelerator = None  # set on the training batches: their gradients are averaged over processes
        given = ["pooled" in b for b in batches]
        if any(given) and not (cache and all(given)):
            raise ValueError("batches with precomputed 'pooled' states need frozen_backbone=True and a "
                             "'pooled' entry in every batch")
        if cache and all(given):
            self.pooled = [b["pooled"].to(model.device) for b in batches]  # (E, b, d) each
        elif cache:
            self.pooled = [p.to(model.device) for p in pooled_batches(model, batches, desc="backbone states",
                                                                      show=False, cache=state_cache)]

    def __len__(self) -> int:
        return len(self.batches)

    def logits(self, i: int) -> Tensor:  # (E, b, c)
        if self.pooled is not None:
            return self.model.classifiers.all_exits(self.pooled[i])
        return self.model(**_inputs(self.batches[i])).exit_logits

    def labels(self, i: int) -> Tensor:  # (b,)
        return self.batches[i]["labels"].to(self.model.device)

    @torch.no_grad()
    def all_logits(self) -> tuple[Tensor, Tensor]:
        """(E, n, c) eval-mode logits and (n,) labels of every batch."""
        was = self.model.training
        self.model.eval()
        out = torch.cat([self.logits(i) for i in range(len(self))], dim=1), torch.cat(
            [self.labels(i) for i in range(len(self))])
        self.model.train(was)
        return out


def _inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in INPUT_KEYS}


def _warmup(model, train: _Batches, val: _Batches, opts: dict, args: JEIArgs, log: list) -> None:
    """CE at every exit; freeze each exit when its validation accuracy stops improving."""
    linears = model.classifiers.linears
    best = [-1.0] * model.num_exits
    stale = [0] * model.num_exits
    frozen = [False] * model.num_exits
    gate_params = list(model.gates.parameters())
    params = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in gate_params)]
    opt = torch.optim.AdamW(params, lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    for epoch in range(int(opts["warmup_epochs"])):
        model.train()
        for i in torch.randperm(len(train), generator=g).tolist():
            loss = ce_per_exit(train.logits(i), train.labels(i)).mean()
            _step(opt, loss * train.weights[i], params, train.accelerator)
        logits, labels = val.all_logits()
        acc = (logits.argmax(-1) == labels[None]).float().mean(1).tolist()  # (E,)
        for e, a in enumerate(acc):
            if frozen[e]:
                continue
            stale[e] = 0 if a > best[e] else stale[e] + 1
            best[e] = max(best[e], a)
            if stale[e] >= int(opts["patience"]):
                frozen[e] = True
                if not model.classifiers.shared:
                    linears[e].requires_grad_(False)
        log.append({"stage": "warmup", "epoch": epoch + 1, "val_accuracy_per_exit": acc, "frozen": list(frozen)})
        if args.progress:
            note(f"warm-up {epoch + 1}: val acc {[round(a, 3) for a in acc]} frozen {frozen}")
        if all(frozen):
            break
    model.classifiers.requires_grad_(True)  # the IM phases train them again


def _val_pos_weights(model, val: _Batches, costs: Tensor, opts: dict) -> Tensor:
    if opts["pos_weight"] == "none":  # no validation pass: the weights do not depend on it
        return gate_pos_weights(torch.zeros(1, model.num_exits - 1), mode="none")
    logits, labels = val.all_logits()
    targets, _ = gate_targets(ce_per_exit(logits, labels), costs, float(opts["cost_weight"]))
    return gate_pos_weights(targets, float(opts["pos_weight_clip"]), str(opts["pos_weight"]))


@torch.no_grad()
def evaluate_gates(model: "EarlyExitModel", logits: Tensor, labels: Tensor, costs: Tensor,
                   threshold: float = 0.5) -> dict[str, Any]:
    """Accuracy, mean exit layer and mean cost of the gate rule over (E, n, c) logits."""
    gates = torch.sigmoid(model.gates(logits)).float()  # (n, E)
    trace = ExitTrace(logits=logits.float(), labels=labels, exit_layers=list(model.exit_layers),
                      num_layers=model.num_layers, gate=gates)
    index, chosen = replay(GatePolicy(threshold), trace)
    layers = torch.tensor(model.exit_layers, dtype=torch.float32)
    return {"accuracy": float((chosen.argmax(-1) == labels).float().mean()),
            "mean_exit_layer": float(layers[index].mean()), "mean_cost": float(costs[index].mean()),
            "exit_counts": torch.bincount(index, minlength=model.num_exits).tolist()}


def train_jei(model: "EarlyExitModel", train_batches: list[dict], val_batches: list[dict],
              args: JEIArgs) -> dict[str, Any]:
    """Train a gated model with the JEI-DNN schedule; writes ``output_dir/checkpoint`` atomically.

    Returns ``{"history": [...], "costs": [...], "checkpoint": path}``.
    """
    if model.gates is None:
        raise ValueError("train_jei needs a model with exit gates: build it with OfframpConfig(**jei_config(...))")
    if not train_batches or not val_batches:
        raise ValueError("train_jei needs non-empty training and validation batches (the gates' "
                         "positive weights and the warm-up freezing are measured on the validation split)")
    obj = {k: v for k, v in (model.config.objective or {}).items() if k != "type"} \
        if model.config.objective.get("type") == "jei" else {}
    overrides = {k: getattr(args, k) for k in ("cost_weight", "pos_weight", "warmup_epochs", "patience",
                                                "phase_batches")
                 if getattr(args, k) is not None}
    opts = check_jei_options({**obj, **overrides})
    model.config.objective = {"type": "jei", **opts}
    torch.manual_seed(args.seed)
    model.freeze_backbone(args.frozen_backbone)
    seq_len = args.seq_len or sum(float(b["attention_mask"].sum()) for b in train_batches
                                  if "attention_mask" in b) / max(1, sum(int(b["labels"].shape[0]) for b in train_batches))
    costs = exit_costs(model, seq_len or None)
    acc = make_accelerator(args.device, args.dtype)
    model.to(acc.device)
    shards = [shard_rows(b, acc.process_index, acc.num_processes) for b in train_batches]
    shards = [(b, w) for b, w in shards if b is not None]  # every process skips the same too-small batches
    train = _Batches(model, [b for b, _ in shards], cache=args.frozen_backbone, state_cache=args.state_cache,
                     weights=[w for _, w in shards])
    train.accelerator = acc
    val = _Batches(model, val_batches, cache=args.frozen_backbone, state_cache=args.state_cache)
    state = _load_state(model, args) if args.resume else None
    history: list[dict] = state["history"] if state else []
    costs = costs.to(acc.device)
    with acc.autocast():  # the mixed precision of args.dtype (none for float32)
        if state is None:
            _warmup(model, train, val, opts, args, history)
            _save(model, costs, args, {"epoch": 0, "history": history, "rng": torch.get_rng_state()}, acc)
        _alternate(model, train, val, costs, opts, args, history, state)
    last = next((h for h in reversed(history) if h.get("stage") == "alternate"), None)
    if last is not None:
        counts = torch.tensor(last["exit_counts"])
        warn_first_exit(torch.repeat_interleave(torch.arange(len(counts)), counts).numpy(), list(model.exit_layers),
                        f"the gates at cost weight {opts['cost_weight']:g} (validation split)",
                        "a lower cost weight (--cost-weight) makes later exits worth their cost")
    return _finish(model, history, costs, args, acc)


def _alternate(model, train: _Batches, val: _Batches, costs: Tensor, opts: dict, args: JEIArgs,
               history: list, state: dict | None = None) -> None:
    """Alternate gate and IM phases every ``phase_batches`` batches for ``args.epochs`` epochs."""
    gate_params = list(model.gates.parameters())
    im_params = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in gate_params)]
    im_opt = torch.optim.AdamW(im_params, lr=args.lr)
    gate_opt = torch.optim.AdamW(gate_params, lr=args.gate_lr)
    lam, every = float(opts["cost_weight"]), int(opts["phase_batches"])
    g = torch.Generator().manual_seed(args.seed + 1)
    step, pos_weight, start = 0, None, 0
    if state is not None:
        torch.set_rng_state(state["rng"])
    if state is not None and state["epoch"] > 0:
        im_opt.load_state_dict(state["im_opt"])
        gate_opt.load_state_dict(state["gate_opt"])
        g.set_state(state["generator"])
        step, pos_weight, start = state["step"], state["pos_weight"], state["epoch"]
    for epoch in range(start, args.epochs):
        model.train()
        for i in torch.randperm(len(train), generator=g).tolist():
            gate_phase = (step // every) % 2 == 0
            if gate_phase and (pos_weight is None or step % every == 0):
                pos_weight = _val_pos_weights(model, val, costs, opts)
            labels = train.labels(i)
            if gate_phase:
                with torch.no_grad():
                    model.eval()
                    logits = train.logits(i)
                    model.train()
                targets, _ = gate_targets(ce_per_exit(logits, labels), costs, lam)
                loss, opt = gate_loss(model.gates(logits), targets, pos_weight), gate_opt
            else:
                logits = train.logits(i)
                with torch.no_grad():
                    probs = exit_probabilities(torch.sigmoid(model.gates(logits)))
                loss = im_loss(ce_per_exit(logits, labels), probs, reweight_detach=bool(opts["reweight_detach"]))
                opt = im_opt
            _step(opt, loss * train.weights[i], [p for g in opt.param_groups for p in g["params"]],
                  train.accelerator)
            step += 1
        logits, labels = val.all_logits()
        metrics = {"stage": "alternate", "epoch": epoch + 1, **evaluate_gates(model, logits, labels, costs)}
        history.append(metrics)
        if args.progress:
            note(f"epoch {epoch + 1}: val acc {metrics['accuracy']:.4f} cost {metrics['mean_cost']:.3f} "
                  f"exits {metrics['exit_counts']}")
        _save(model, costs, args, {"epoch": epoch + 1, "history": history, "step": step, "pos_weight": pos_weight,
                                   "im_opt": im_opt.state_dict(), "gate_opt": gate_opt.state_dict(),
                                   "generator": g.get_state(), "rng": torch.get_rng_state()}, train.accelerator)
    model.eval()


STATE_NAME = "jei_state.pt"



def _step(opt, loss: Tensor, params: list, acc) -> None:
    """One optimizer step, the gradients averaged over the processes of a multi-process run."""
    opt.zero_grad()
    loss.backward()
    if acc is not None:
        average_gradients(acc, params)
    opt.step()


def _save(model, costs: Tensor, args: JEIArgs, state: dict, acc=None) -> None:
    """Model + schedule state into ``output_dir/checkpoint`` in one atomic directory swap (by the
    main process of a multi-process run; the others wait for it)."""
    model.config.policy = {"type": "gate", "threshold": 0.5}
    model.config.extra = {**(model.config.extra or {}), "jei": {"costs": costs.tolist(), "args": asdict(args)}}
    if acc is None or acc.is_main_process:
        with atomic_dir(Path(args.output_dir) / "checkpoint") as tmp:
            model.write_files(tmp, save_backbone=args.save_backbone or not args.frozen_backbone)
            torch.save(state, tmp / STATE_NAME)
        atomic_write_json(Path(args.output_dir) / "metrics.json", state["history"])
    if acc is not None:
        acc.wait_for_everyone()


def _load_state(model, args: JEIArgs) -> dict:
    ckpt = readable_dir(Path(args.output_dir) / "checkpoint")  # .checkpoint.old after a save killed mid-swap
    if not (ckpt / STATE_NAME).is_file():
        raise ValueError(f"resume: no JEI checkpoint at {ckpt} to continue from; start without resume")
    model.load_heads(ckpt)
    if (ckpt / "backbone").is_dir() and not args.frozen_backbone:
        from transformers import AutoModel

        saved = load_hf_model(AutoModel, ckpt / "backbone", "JEI checkpoint's backbone")
        model.backbone.load_state_dict(saved.state_dict())
    return load_torch_state(ckpt / STATE_NAME, "JEI training state",
                            "start the run again without resume, into a new output folder")


def _finish(model, history: list, costs: Tensor, args: JEIArgs, acc=None) -> dict[str, Any]:
    ckpt = Path(args.output_dir) / "checkpoint"
    if not (ckpt / STATE_NAME).is_file():  # epochs already done: still write the final model
        _save(model, costs, args, {"epoch": args.epochs, "history": history}, acc)
    return {"history": history, "costs": costs.tolist(), "checkpoint": str(ckpt)}
