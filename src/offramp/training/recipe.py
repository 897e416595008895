"""The early-exit recipe (LayerSkip's) as a Hugging Face ``Trainer``: continue training any causal LM
so that its own head reads the middle layers, and save a model folder that is both a normal HF
model and an offramp token-exits folder.

    from transformers import TrainingArguments
    from offramp.training.recipe import EarlyExitRecipe, EarlyExitTrainer

    trainer = EarlyExitTrainer(model=model, args=TrainingArguments("runs/smollm2-ls", max_steps=600),
                               train_dataset=blocks, recipe=EarlyExitRecipe(exit_layers=[12, 18, 24]))
    trainer.train()
    trainer.save_model("runs/smollm2-ls")   # AutoModelForCausalLM and DecoderExitModel both load it

The recipe: layer dropout rising with depth (its curriculum over the run), the early-exit loss on
the model's own final norm and LM head at each exit (LayerSkip's depth weighting or uniform, the
rotational or gradual curriculum choosing the exits of a step), token dropout for Mamba
(``dropout_unit="token"``), and exit-head distillation (``distill``: the exit's distribution pulled
towards the last layer's, at ``temperature``). ``EarlyExitTrainerMixin`` puts the same loss into
any ``Trainer`` subclass (TRL's trainers included: ``class T(EarlyExitTrainerMixin, SFTTrainer)``).

Every save (checkpoints and ``save_model``) writes, beside the weights, ``offramp_config.json`` and
``offramp_heads.safetensors``: token exits on the model's own head (``head="tied"``) whose base
model is the folder itself and whose default rule is ``never`` until ``offramp calibrate``
certifies one. ``continue_training`` is the whole run behind ``offramp train-lm --model``: text to
blocks, resumable from the last checkpoint, a wall-clock budget.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from offramp.backbones import adapter_for
from offramp.modeling.decoder import SELF, DecoderExitModel
from offramp.objectives.layerskip import (
    curriculum_mask,
    early_exit_loss,
    exit_loss_scales,
    layer_dropout_rates,
)
from offramp.training.layerskip import LayerTaps, check_recipe
from offramp.utils import note


@dataclass
class EarlyExitRecipe:
    """LayerSkip's recipe, for ``EarlyExitTrainer`` (every option is checked before training).

    Args:
        exit_layers: the exits the early-exit loss trains (layers run, 1-based; the last layer is
            added); None: every layer. These are also the exits saved with the model.
        e_scale: the early-exit loss scale (0: the last layer only, a plain run with the same data).
        weighting: "depth" (LayerSkip's scale, growing with depth) or "uniform".
        curriculum: which exits are on at a step: "rotational", "gradual" or "none".
        rotation: the rotational curriculum's period in steps.
        p_max: the deepest layer's layer-dropout rate (0: no layer dropout).
        dropout_unit: "row" (a layer dropped for whole rows) or "token" (Mamba: single tokens leave
            the model at a depth, as the ``freeze`` cache does at inference).
        dropout_curriculum: "exp" (rising from 0 over the run) or "constant".
        distill: weight of the exit's KL divergence from the last layer's distribution (detached),
            added to its cross-entropy; 0: none.
        temperature: the distillation temperature.
        positions: the share of each batch's positions the early exits' losses read (a fresh draw
            each step; the last layer always reads all): below 1 it cuts the LM head's cost at every
            exit, which on a large vocabulary is most of the recipe's cost.
        seed: seed of the layer-dropout and position draws (with the step: a resumed run draws the same).
    """

    exit_layers: list[int] | None = None
    e_scale: float = 1.0
    weighting: str = "depth"
    curriculum: str = "rotational"
    rotation: int = 2
    p_max: float = 0.1
    dropout_unit: str = "row"
    dropout_curriculum: str = "exp"
    distill: float = 0.0
    temperature: float = 1.0
    positions: float = 1.0
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self, num_layers: int) -> list[int]:
        """Check every option against a ``num_layers``-layer model; return the exits (last included)."""
        if int(self.rotation) < 1:
            raise ValueError(f"rotation must be >= 1, got {self.rotation}")
        for name in ("e_scale", "distill"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, got {value}")
        if not 0.0 < self.positions <= 1.0:
            raise ValueError(f"positions must be in (0, 1], got {self.positions}")
        if not math.isfinite(self.temperature) or self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        return check_recipe(num_layers, self.exit_layers, weighting=self.weighting, curriculum=self.curriculum,
                            dropout_curriculum=self.dropout_curriculum, dropout_unit=self.dropout_unit,
                            p_max=self.p_max)


class EarlyExitObjective:
    """A recipe bound to one model: its layer taps (hooks), exits and loss scales.

    ``set_step(step, total)`` turns the curricula to a step; ``__call__(model, inputs)`` is one
    forward pass and the recipe's loss (``(loss, outputs, per-exit losses)``). Layer dropout acts
    only while the model is in training mode. ``close()`` removes the hooks."""

    def __init__(self, model: nn.Module, recipe: EarlyExitRecipe) -> None:
        self.adapter = adapter_for(model, role="decoder")
        self.recipe = recipe
        self.exits = recipe.validate(self.adapter.num_layers)
        if recipe.dropout_unit == "token" and self.adapter.kind != "ssm":
            raise ValueError("dropout_unit='token' takes tokens out of a layer's recurrence (Mamba's freeze cache); "
                             "this model has attention layers: use dropout_unit='row'")
        self.scales = exit_loss_scales(self.exits, self.adapter.num_layers, recipe.e_scale, recipe.weighting)
        self.taps = LayerTaps(self.adapter.layers(), unit=recipe.dropout_unit)
        self.active = torch.ones(len(self.exits), dtype=torch.bool)
        self.rates: Tensor | None = None
        self.step = 0

    def set_step(self, step: int, total: int) -> None:
        r, total = self.recipe, max(int(total), 1)
        self.step = step
        self.active = (curriculum_mask(self.exits, self.adapter.num_layers, step, total, r.curriculum, r.rotation)
                       if r.e_scale > 0 else torch.tensor([k == self.exits[-1] for k in self.exits]))
        self.rates = (layer_dropout_rates(self.adapter.num_layers, r.p_max, step, total, r.dropout_curriculum)
                      if r.p_max > 0 else None)

    def __call__(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[Tensor, Any, Tensor]:
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        labels = inputs.get("labels")
        if labels is None:
            labels = input_ids if mask is None else input_ids.masked_fill(mask == 0, -100)
        target = labels[:, 1:].reshape(-1)
        training = model.training and self.rates is not None
        self.taps.rates = self.rates if training else None
        self.taps.generator = torch.Generator().manual_seed(10_000_019 + self.recipe.seed * 100_003 + self.step)
        self.taps.outputs.clear()
        try:
            out = model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        finally:
            self.taps.rates = None
        last = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
        # the positions the early exits read: the labelled ones, a random share of them when asked
        picked = (target != -100).nonzero().squeeze(1)
        if self.recipe.positions < 1.0 and len(picked) > 1:
            count = max(1, round(len(picked) * self.recipe.positions))
            picked = picked[torch.randperm(len(picked), generator=self.taps.generator)[:count].to(picked.device)]
        t = self.recipe.temperature
        teacher = (nn.functional.softmax(last.detach()[picked].float() / t, dim=-1)
                   if self.recipe.distill > 0 else None)
        losses = []
        for e, k in enumerate(self.exits):
            if not bool(self.active[e]) or (k != self.adapter.num_layers and picked.numel() == 0):
                losses.append(last.new_zeros((), dtype=torch.float32))  # off, or no labelled position to read
                continue
            if k == self.adapter.num_layers:
                losses.append(nn.functional.cross_entropy(last.float(), target, ignore_index=-100))
                continue
            hidden = self.taps.outputs[k - 1][:, :-1].reshape(-1, self.taps.outputs[k - 1].shape[-1])
            flat = self.adapter.logits(hidden[picked][None])[0].float()
            loss = nn.functional.cross_entropy(flat, target[picked])
            if teacher is not None:
                student = nn.functional.log_softmax(flat / t, dim=-1)
                loss = loss + self.recipe.distill * nn.functional.kl_div(student, teacher, reduction="batchmean") * t * t
            losses.append(loss)
        losses_t = torch.stack(losses)
        self.taps.outputs.clear()
        return early_exit_loss(losses_t, self.scales, self.active), out, losses_t.detach()

    def close(self) -> None:
        self.taps.close()


def save_exits(model: nn.Module, folder: str | Path, recipe: EarlyExitRecipe | None = None,
               extra: dict[str, Any] | None = None) -> DecoderExitModel:
    """Write token exits on ``model``'s own head into ``folder`` (the model's own folder): base model
    ``"."`` (the folder), the recipe's exits (every layer but the last when it names none), default
    rule ``never`` (no exit until ``offramp calibrate`` certifies a rule)."""
    adapter = adapter_for(model, role="decoder")
    layers = (recipe.validate(adapter.num_layers) if recipe is not None else range(1, adapter.num_layers + 1))
    layers = [k for k in layers if k < adapter.num_layers]
    info = {"recipe": {k: v for k, v in asdict(recipe).items() if k != "extra"}} if recipe is not None else {}
    exits = DecoderExitModel.from_backbone(model, exit_layers=layers, head="tied", policy={"type": "never"},
                                           base_model_name_or_path=SELF, extra={**info, **(extra or {})})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".offramp-exits.") as tmp:
        exits.write_files(Path(tmp))
        for f in sorted(Path(tmp).iterdir()):  # each file lands whole, beside the model's own files
            os.replace(f, folder / f.name)
    return exits


class EarlyExitTrainerMixin:
    """The early-exit recipe's loss for any ``transformers.Trainer`` subclass (first in the bases):
    ``recipe=EarlyExitRecipe(...)`` as a keyword; every save also writes the model's token exits."""

    def __init__(self, *args: Any, recipe: EarlyExitRecipe | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recipe = recipe if recipe is not None else EarlyExitRecipe()
        unwrapped = getattr(self.model, "module", self.model)
        self.objective = EarlyExitObjective(unwrapped, self.recipe)  # checks the recipe before training
        self.model_accepts_loss_kwargs = False  # our loss is a mean: the Trainer scales for accumulation
        self.exit_losses: list[float] = []

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        self.objective.set_step(self.state.global_step, self.state.max_steps or 1)
        loss, outputs, per_exit = self.objective(model, inputs)
        if model.training:
            self.exit_losses = per_exit.tolist()
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log, with the last layer's own loss beside the recipe's objective."""
        if "loss" in logs and self.exit_losses:
            logs = {**logs, "last_layer_loss": round(self.exit_losses[-1], 4)}
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)  # type: ignore[misc]
        folder = output_dir if output_dir is not None else self.args.output_dir
        unwrapped = getattr(self.model, "module", self.model)
        save_exits(unwrapped, folder, self.recipe, {"steps": self.state.global_step})


class EarlyExitTrainer(EarlyExitTrainerMixin, Trainer):
    """``transformers.Trainer`` with the early-exit recipe's loss (``recipe=``) and exits saved."""


class TimeBudget(TrainerCallback):
    """Stop (and save) once ``minutes`` of wall-clock time have passed in this run."""

    def __init__(self, minutes: float | None) -> None:
        self.minutes, self.start = minutes, time.time()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.minutes is not None and time.time() - self.start > self.minutes * 60:
            note(f"the {self.minutes:g}-minute budget is spent at step {state.global_step}: saving and stopping")
            control.should_training_stop = True
            control.should_save = True
        return control


class TextBlocks(torch.utils.data.Dataset):
    """Consecutive ``length``-token blocks of 1-D token ids (the last partial block dropped)."""

    def __init__(self, tokens: Tensor, length: int) -> None:
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        n = len(tokens) // length
        if n < 1:
            raise ValueError(f"{len(tokens)} tokens are fewer than one block of {length}: give more text or a "
                             f"shorter --seq-len")
        self.blocks = tokens[: n * length].view(n, length)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def token_stream(tokenizer: Any, texts: Sequence[str]) -> Tensor:
    """``texts`` tokenized and joined, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    return torch.tensor(ids, dtype=torch.long)


def continue_training(model: nn.Module, tokenizer: Any, tokens: Tensor, recipe: EarlyExitRecipe,
                      training_args: TrainingArguments, *, seq_len: int = 256, minutes: float | None = None,
                      resume: bool = True) -> dict[str, Any]:
    """Continue training ``model`` on ``seq_len`` blocks of ``tokens`` with the recipe; the last
    checkpoint in ``training_args.output_dir`` is resumed from (``resume``); the model and its exits
    are saved to ``output_dir``. Returns the run's summary (steps, tokens seen, seconds, losses)."""
    from transformers.trainer_utils import get_last_checkpoint

    recipe.validate(adapter_for(model, role="decoder").num_layers)
    data = TextBlocks(tokens, seq_len)
    out = Path(training_args.output_dir)
    last = get_last_checkpoint(str(out)) if resume and out.is_dir() else None
    if last is not None:
        note(f"resuming from {last}")
    trainer = EarlyExitTrainer(model=model, args=training_args, train_dataset=data, processing_class=tokenizer,
                               callbacks=[TimeBudget(minutes)], recipe=recipe)
    start = time.time()
    try:  # the Trainer prints its logs on stdout: they are progress, so stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = trainer.train(resume_from_checkpoint=last)
            trainer.save_model(str(out))
    finally:
        trainer.objective.close()
    state = trainer.state
    per_step = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    losses = [round(h["loss"], 4) for h in state.log_history if "loss" in h]
    return {"steps": state.global_step, "max_steps": state.max_steps,
            "tokens_seen": state.global_step * per_step * seq_len * max(training_args.world_size, 1),
            "seconds_this_run": round(time.time() - start, 1), "train_loss": round(result.training_loss, 4),
            "losses": losses, "blocks": len(data), "output_dir": str(out)}


def training_texts(data: str, held_out: int = 100) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) of ``data``: ``bbc`` (offline BBC News; its first 100
    shuffled articles held out, as ``offramp train-lm`` always has) or a UTF-8 text file (blank-line
    separated documents; the last 5% held out)."""
    if data == "bbc":
        from offramp.data.assets import bbc_articles

        texts = bbc_articles()
        return texts[held_out:], texts[:held_out]
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"--data {data!r} is neither `bbc` nor a text file: give a UTF-8 file of documents "
                         f"separated by blank lines")
    from offramp.data.sources import read_user_text

    docs = [d.strip() for d in read_user_text(path).split("\n\n") if d.strip()]
    if len(docs) < 2:
        raise ValueError(f"{path} holds {len(docs)} document(s): separate documents by blank lines (the last 5% "
                         f"are held out for the report)")
    cut = max(1, len(docs) // 20)
    return docs[:-cut], docs[-cut:]


def train_to_exit(model_name: str, out: str | Path, recipe: EarlyExitRecipe, *, data: str = "bbc",
                  max_steps: int = 600, batch_size: int = 4, grad_accum: int = 1, seq_len: int = 256,
                  lr: float = 2e-5, warmup_steps: int = 20, save_every: int = 25, minutes: float | None = None,
                  device: str = "auto", dtype: str = "float32", seed: int = 0,
                  report_windows: int = 8) -> dict[str, Any]:
    """``offramp train-lm --model``: continue training ``model_name`` (a folder, Hub id or offline
    alias) on ``data`` with the recipe through ``EarlyExitTrainer`` (AdamW, warm-up then cosine
    decay, ``dtype`` as mixed precision), resuming from ``out``'s last checkpoint; then every exit's
    held-out perplexity and agreement with the last layer, written to ``out/exit_report.json`` and
    returned with the run's summary."""
    from offramp.modeling.causal_lm import load_causal_lm
    from offramp.training.layerskip import exit_report
    from offramp.utils import atomic_write_json

    if dtype == "float16" and device == "cpu":
        raise ValueError("float16 mixed precision needs a GPU: use --dtype bfloat16 or float32 on the CPU")
    model, tok = load_causal_lm(model_name)  # float32 weights; dtype is the autocast precision
    exits = recipe.validate(adapter_for(model, role="decoder").num_layers)
    train, held = training_texts(data)
    tokens = token_stream(tok, train)
    note(f"{model_name}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, {len(tokens)} "
         f"training tokens, exits {exits}, out={out}")
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=grad_accum, learning_rate=lr, warmup_steps=warmup_steps,
        lr_scheduler_type="cosine", weight_decay=0.0, adam_beta2=0.95, max_grad_norm=1.0,
        save_steps=save_every, save_total_limit=1, logging_steps=5, report_to=[], seed=seed,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=device == "cpu", dataloader_num_workers=0)
    model.train()
    summary = continue_training(model, tok, tokens, recipe, args, seq_len=seq_len, minutes=minutes)
    model.eval()
    if not args.should_save:  # the other processes of a multi-process launch: one report
        return summary
    report = exit_report(model, token_stream(tok, held), exit_layers=exits, seq_len=seq_len,
                         max_windows=report_windows)
    report.update(summary, model=model_name, data=data, recipe={k: v for k, v in asdict(recipe).items()
                                                               if k != "extra"})
    atomic_write_json(Path(out) / "exit_report.json", report)
    return report
