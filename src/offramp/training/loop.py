"""One training loop on Accelerate: single CPU to multi-GPU (`accelerate launch`) unchanged.

Each epoch ends with an evaluation (accuracy or MSE of every exit on the validation batches) and an
atomic checkpoint: the model folder and the training state are written under a temporary name and
swapped in, so an interrupted run leaves the last good checkpoint intact; ``resume=True``
continues from it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from offramp.evaluation.halting import degenerate_message, halting_report
from offramp.modeling import EarlyExitModel
from offramp.modeling.state_cache import INPUT_KEYS, pooled_batches
from offramp.training.processes import make_accelerator, shard_rows
from offramp.utils import atomic_dir, atomic_write_json, load_torch_state, note, progress, readable_dir

CHECKPOINT_DIR = "checkpoint"
STATE_NAME = "training_state.pt"


@dataclass
class TrainingArgs:
    """Hyperparameters of ``train``.

    Args:
        output_dir: where the checkpoint (``output_dir/checkpoint``) and metrics go.
        epochs: passes over the training batches: the most, when ``patience`` stops earlier.
        patience: stop once this many epochs in a row have not raised the validation score (the
            exits' mean accuracy, or minus their mean squared error for regression) above its best
            so far; None or 0: train every epoch. Needs validation batches.
        lr: learning rate of the exits (and of the backbone when not frozen).
        backbone_lr: learning rate of the backbone in full fine-tuning (default ``lr``).
        weight_decay: AdamW weight decay.
        frozen_backbone: train the exits only.
        warmup_ratio: linear warm-up fraction of the steps, then linear decay.
        max_grad_norm: gradient clipping.
        seed: seed of torch, numpy and random.
        save_backbone: store the backbone in the checkpoint (False: by reference; frozen only).
        resume: continue from ``output_dir/checkpoint`` if it exists.
        progress: show a progress bar.
        cache_backbone: with a frozen backbone, run it once over the training batches and train
            the exits on the stored pooled states every epoch (same result, far faster).
        state_cache: where those pooled states are also kept across runs, keyed by the backbone's
            weights and the exact inputs (``offramp.modeling.state_cache``): False (not kept), True
            (``~/.cache/offramp/states``) or a folder.
        device / dtype: where training runs (``auto``: the GPUs when there are any, else the CPU)
            and its mixed precision (float32: none; bfloat16 / float16: autocast; ``make_accelerator``).
    """

    output_dir: str
    epochs: int = 3
    patience: int | None = None
    lr: float = 1e-3
    backbone_lr: float | None = None
    weight_decay: float = 0.0
    frozen_backbone: bool = True
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    seed: int = 0
    save_backbone: bool = True
    resume: bool = False
    progress: bool = True
    cache_backbone: bool = False
    state_cache: bool | str = False
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.patience is not None and self.patience < 0:
            raise ValueError(f"patience must be >= 0 (0: no early stopping), got {self.patience}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _param_groups(model: "EarlyExitModel", args: TrainingArgs) -> list[dict[str, Any]]:
    groups: dict[float, list] = {}
    halting_lr = (model.config.halting or {}).get("lr") or args.lr
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            lr = args.backbone_lr or args.lr
        elif name.startswith("halting."):
            lr = halting_lr
        else:
            lr = args.lr
        groups.setdefault(lr, []).append(p)
    if not groups:
        raise ValueError("nothing to train: every parameter is frozen")
    return [{"params": ps, "lr": lr, "weight_decay": args.weight_decay} for lr, ps in groups.items()]


@torch.no_grad()
def evaluate_exits(model: "EarlyExitModel", batches: Sequence[dict], accelerator: Accelerator | None = None
                   ) -> dict[str, Any]:
    """Per-exit accuracy (classification) or MSE (regression) over ``batches``; with a halting layer
    also ``halting``, the spread of lambda across inputs (``offramp.evaluation.halting``)."""
    model.eval()
    correct = err = None
    n = 0
    lambdas = []
    for batch in batches:
        inputs = {k: v for k, v in _as_inputs(batch).items() if k in ("input_ids", "attention_mask",
                                                                         "token_type_ids", "pooled")}
        out = model(**inputs)
        logits = out.exit_logits  # (E, b, c)
        if out.halting_logits is not None:
            lam = torch.sigmoid(out.halting_logits.float())
            lambdas.append(accelerator.gather_for_metrics(lam) if accelerator is not None else lam)
        labels = batch["labels"]
        if accelerator is not None:
            logits, labels = accelerator.gather_for_metrics((logits.transpose(0, 1), labels))
            logits = logits.transpose(0, 1)
        if model.config.is_regression:
            e = ((logits[..., 0] - labels[None].float()) ** 2).sum(1)
            err = e if err is None else err + e
        else:
            c = (logits.argmax(-1) == labels[None]).sum(1)
            correct = c if correct is None else correct + c
        n += labels.shape[0]
    if n == 0:
        raise ValueError("the validation split is empty")
    halting = {}
    if lambdas:
        report = halting_report(torch.cat(lambdas).cpu(), model.config.objective.get("lambda_p", 0.1))
        halting = {"halting": report.to_dict()}
    if model.config.is_regression:
        per_exit = (err / n).tolist()
        return {"mse_per_exit": per_exit, "mse_last": per_exit[-1], "n": n, **halting}
    per_exit = (correct.float() / n).tolist()
    return {"accuracy_per_exit": per_exit, "accuracy_last": per_exit[-1], "n": n, **halting}


def train(model: "EarlyExitModel", train_batches: Sequence[dict], eval_batches: Sequence[dict] | None,
          args: TrainingArgs, *, on_epoch_end: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Train ``model``'s exits with its config's objective; returns the history of metrics.

    ``train_batches`` is a list of batches (dicts of tensors with ``labels``); their order is
    shuffled each epoch with ``seed + epoch`` (so a resumed run sees the same order). Under
    ``accelerate launch`` every process takes its share of the rows of each batch, so a batch is
    one global batch and N processes train as one process on the same batches would (the tests
    hold the two equal within float tolerance); only the main process writes checkpoints.
    """
    from transformers import get_linear_schedule_with_warmup

    _seed_all(args.seed)
    out = Path(args.output_dir)
    ckpt = out / CHECKPOINT_DIR
    accelerator = make_accelerator(args.device, args.dtype)
    model.freeze_backbone(args.frozen_backbone)
    state = _resume(model, args, ckpt) if args.resume else None
    start_epoch, history = (state["epoch"] + 1, state["history"]) if state is not None else (0, [])
    if args.cache_backbone:
        if not args.frozen_backbone:
            raise ValueError("cache_backbone needs a frozen backbone (frozen_backbone=True)")
        train_batches = _cache_pooled(model, train_batches, args.progress, args.state_cache)
        if eval_batches:
            eval_batches = _cache_pooled(model, eval_batches, False, args.state_cache)
    optimizer = torch.optim.AdamW(_param_groups(model, args))
    if not len(train_batches):
        raise ValueError("the training split is empty: no batches to train on")
    steps = max(1, len(train_batches) * args.epochs)  # one step per global batch, on any number of processes
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * steps), steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
    pmodel, optimizer = accelerator.prepare(model, optimizer)  # the scheduler steps once per global batch
    for epoch in range(start_epoch, args.epochs):
        if args.patience and stalled(history, args.patience):
            note(f"early stop: no better validation score in the last {args.patience} epochs "
                 f"(best at epoch {best_epoch(history)} of {epoch})")
            break
        pmodel.train()
        if args.frozen_backbone:  # a frozen backbone is a fixed feature extractor: no dropout in it
            model.backbone.eval()
        metrics: dict[str, Any] = {"epoch": epoch + 1, "train_loss": _train_epoch(
            pmodel, accelerator, optimizer, scheduler, train_batches, epoch, args)}
        if eval_batches:  # every process evaluates the whole split (the same numbers everywhere)
            batches = [{k: v.to(accelerator.device) for k, v in b.items()} for b in eval_batches]
            metrics.update(evaluate_exits(accelerator.unwrap_model(pmodel), batches))
        history.append(metrics)
        if accelerator.is_main_process:
            _checkpoint(accelerator.unwrap_model(pmodel), optimizer, scheduler, epoch, history, args, ckpt)
            atomic_write_json(out / "metrics.json", history)
        accelerator.wait_for_everyone()
        if on_epoch_end is not None:
            on_epoch_end(epoch, metrics)
    model.eval()
    last = history[-1].get("halting") if history else None
    if last and last["degenerate"] and accelerator.is_main_process:
        import warnings

        warnings.warn(degenerate_message("train (validation split)", last["reason"]), stacklevel=2)
    return {"history": history, "checkpoint": str(ckpt)}


def validation_score(metrics: dict[str, Any]) -> float | None:
    """What early stopping watches: the exits' mean validation accuracy (minus their mean squared
    error for regression); None for an epoch without validation."""
    if "accuracy_per_exit" in metrics:
        return float(np.mean(metrics["accuracy_per_exit"]))
    if "mse_per_exit" in metrics:
        return -float(np.mean(metrics["mse_per_exit"]))
    return None


def best_epoch(history: Sequence[dict[str, Any]]) -> int | None:
    """The (1-based) epoch of the best validation score so far (the first of equal ones)."""
    scored = [(validation_score(m), m["epoch"]) for m in history if validation_score(m) is not None]
    return max(scored, key=lambda s: (s[0], -s[1]))[1] if scored else None


def stalled(history: Sequence[dict[str, Any]], patience: int) -> bool:
    """Whether the last ``patience`` epochs all failed to beat the best validation score before them."""
    best = best_epoch(history)
    return best is not None and history[-1]["epoch"] - best >= patience


def _resume(model: "EarlyExitModel", args: TrainingArgs, ckpt: Path) -> dict[str, Any]:
    """Load the heads (and a fine-tuned backbone) of the checkpoint in ``ckpt``; its training state
    (epoch, history, optimizer, scheduler, RNG). A save killed between its two renames left the
    checkpoint in ``.checkpoint.old``: it is read from there (the next save puts it back)."""
    ckpt = readable_dir(ckpt)
    if not (ckpt / STATE_NAME).is_file():
        raise ValueError(f"--resume: no checkpoint at {ckpt} to continue from; start without --resume")
    model.load_heads(ckpt)
    if not args.frozen_backbone:  # fine-tuned weights live in the checkpoint's backbone/
        model.backbone.load_state_dict(EarlyExitModel.from_pretrained(ckpt).backbone.state_dict())
    return load_training_state(ckpt)


def load_training_state(ckpt: Path) -> dict[str, Any]:
    """The training state saved in ``ckpt`` (epoch, history, optimizer, ...), its epoch and history
    checked (a damaged or edited one is a ValueError, not extra or missing epochs)."""
    fix = "start the run again without --resume, into a new --out"
    state = load_torch_state(Path(ckpt) / STATE_NAME, "training state", fix)
    epoch, history = (state.get("epoch"), state.get("history")) if isinstance(state, dict) else (None, None)
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0 or not isinstance(history, list) or \
            len(history) != epoch + 1 or not all(isinstance(h, dict) and "epoch" in h for h in history):
        raise ValueError(f"{Path(ckpt) / STATE_NAME}: its epoch ({epoch!r:.40}) and history (a list of one record per "
                         f"epoch, got {type(history).__name__}) do not agree: the training state is damaged; {fix}")
    return state


def _train_epoch(pmodel: Any, accelerator: Accelerator, optimizer: Any, scheduler: Any,
                 train_batches: Sequence[dict], epoch: int, args: TrainingArgs) -> float:
    """One epoch over the batches, in the order seeded by ``seed + epoch`` (each process takes its
    rows of every global batch); the mean training loss."""
    rank, world = accelerator.process_index, accelerator.num_processes
    total, count = 0.0, 0
    order = torch.randperm(len(train_batches), generator=torch.Generator().manual_seed(args.seed + epoch))
    bar = progress([train_batches[i] for i in order.tolist()], desc=f"epoch {epoch + 1}/{args.epochs}",
                   enabled=args.progress and accelerator.is_local_main_process)
    for batch in bar:
        batch, weight = shard_rows(batch, rank, world)
        if batch is None:
            continue  # fewer rows than processes: every process skips it
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        loss = pmodel(**_as_inputs(batch)).loss
        accelerator.backward(loss * weight)
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(pmodel.parameters(), args.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        total, count = total + loss.item(), count + 1
        bar.set_postfix(loss=f"{total / count:.4f}")
    return total / max(count, 1)


def _cache_pooled(model: "EarlyExitModel", batches: Sequence[dict], show: bool,
                  state_cache: bool | str = False) -> list[dict]:
    """Replace each batch's token inputs by the frozen backbone's pooled states (E, b, d)."""
    pooled = pooled_batches(model, batches, desc="caching backbone states", show=show, cache=state_cache)
    return [{"pooled": p.to(model.device).transpose(0, 1), **{k: v for k, v in b.items() if k not in INPUT_KEYS}}
            for p, b in zip(pooled, batches)]  # pooled stored (b, E, d) so that batch-dim splitting works


def _as_inputs(batch: dict) -> dict:
    if "pooled" in batch:
        return {**batch, "pooled": batch["pooled"].transpose(0, 1)}
    return batch


def _checkpoint(model: "EarlyExitModel", optimizer, scheduler, epoch: int, history: list, args: TrainingArgs,
                ckpt: Path) -> None:
    """Write model + training state into ``ckpt`` in one atomic directory swap."""
    with atomic_dir(ckpt) as tmp:
        model.write_files(tmp, save_backbone=args.save_backbone or not args.frozen_backbone)
        torch.save({"epoch": epoch, "history": history, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
                    "args": asdict(args)}, tmp / STATE_NAME)
        (tmp / "history.json").write_text(json.dumps(history, indent=2))
