"""Train a decoder to exit early: LayerSkip's recipe (``offramp.objectives.layerskip``) on Accelerate.

``train_lm`` trains any causal LM that offramp has a decoder adapter for (Llama-family, Gemma 3,
GPT-2, Mamba), from scratch or continued, on a stream of token ids: random windows, AdamW with
warm-up and cosine decay, and, with ``LayerSkipArgs.recipe="layerskip"``, layer dropout rising
with depth and the early-exit loss on the model's own final norm and LM head. ``recipe="plain"``
is next-token cross-entropy on the last layer only, the baseline with the same data and steps.

Layer dropout drops a layer for whole rows (``dropout_unit="row"``, LayerSkip's), or, on Mamba
models, for single tokens (``dropout_unit="token"``): a token leaves the model at a depth and is
taken out of every deeper layer's recurrence, which is exactly what the decoding engine's
``freeze`` cache strategy does to the layers an exited token skips. A model trained so has deep
layers that do without the tokens that exited, so frozen states keep the agreement that the
``update`` strategy (which pays for the skipped layers' state updates) keeps otherwise.

The same function runs on one CPU or under ``accelerate launch`` on several devices. Checkpoints
are plain Hugging Face model folders (``output_dir``: ``config.json``, ``model.safetensors``, the
tokenizer when given) written atomically every ``save_every`` steps, with ``layerskip_state.json``
and ``optimizer.pt`` beside them; a run finds them and resumes. Exits of a model trained this way
are the backbone's own head (``DecoderExitModel.from_backbone(model, head="tied")``): nothing
else to train.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from offramp.backbones import adapter_for
from offramp.objectives.layerskip import (
    CURRICULA,
    DROPOUT_CURRICULA,
    WEIGHTINGS,
    curriculum_mask,
    early_exit_loss,
    exit_loss_scales,
    layer_dropout_rates,
)
from offramp.training.processes import make_accelerator
from offramp.utils import atomic_dir, load_safetensors, load_torch_state, note, read_json

STATE_NAME = "layerskip_state.json"
OPTIMIZER_NAME = "optimizer.pt"
RECIPES = ("layerskip", "plain")


@dataclass
class LayerSkipArgs:
    """Options of ``train_lm``.

    Args:
        output_dir: the checkpoint folder (a HF model folder; resumed from when it holds a state).
        recipe: "layerskip" (layer dropout + early-exit loss) or "plain" (last-layer loss only).
        max_steps: optimizer steps; the LR schedule and both curricula are laid over them.
        batch_size / seq_len: windows per step (per process) and their length in tokens.
        lr / warmup_steps / weight_decay / max_grad_norm: AdamW (betas 0.9, 0.95), linear warm-up
            then cosine decay to 0, gradient clipping.
        exit_layers: the exits the early-exit loss trains (layers run, 1-based; the last layer is
            added); None: every layer.
        e_scale: the early-exit loss scale (0 trains the last layer only, like "plain").
        weighting: how the exits' losses weigh: "depth" (LayerSkip's scale, growing with depth)
            or "uniform" (every early exit ``e_scale``, the last layer 1).
        curriculum: which exits are on at a step: "rotational", "gradual" or "none".
        rotation: the rotational curriculum's period.
        p_max: the deepest layer's dropout rate.
        dropout_unit: what layer dropout drops: "row" (LayerSkip's: a layer for whole rows) or
            "token" (Mamba models: single tokens leave the model at a depth and are taken out of
            every deeper layer's recurrence, as the ``freeze`` cache strategy does at inference;
            see ``LayerTaps``).
        dropout_curriculum: "exp" (rising from 0, for training from scratch) or "constant".
        max_minutes: stop (and save) after this much wall-clock time, even before ``max_steps``.
        save_every: steps between checkpoints.
        seed: the model-independent seed of the windows and of the layer-dropout draws.
        resume: continue from ``output_dir`` when it holds a state of this recipe.
        progress: a line on stderr every ``log_every`` steps.
        device / dtype: where training runs (``auto``: the GPUs when there are any, else the CPU)
            and its mixed precision (float32: none; bfloat16 / float16: autocast; ``make_accelerator``).
    """

    output_dir: str
    recipe: str = "layerskip"
    max_steps: int = 2000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    exit_layers: list[int] | None = None
    e_scale: float = 1.0
    weighting: str = "depth"
    curriculum: str = "rotational"
    rotation: int = 2
    p_max: float = 0.1
    dropout_unit: str = "row"
    dropout_curriculum: str = "exp"
    max_minutes: float | None = None
    save_every: int = 100
    seed: int = 0
    resume: bool = True
    progress: bool = True
    log_every: int = 10
    device: str = "auto"
    dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the state (data, model size, ...)

    def validate(self, num_layers: int) -> list[int]:
        """Check every option before any work; return the exits the loss trains."""
        if self.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {self.recipe!r}; choose one of {RECIPES}")
        for name in ("max_steps", "batch_size", "seq_len", "save_every", "log_every", "rotation"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.warmup_steps < 0 or self.e_scale < 0:
            raise ValueError("lr must be > 0, warmup_steps and e_scale >= 0")
        return check_recipe(num_layers, self.exit_layers, weighting=self.weighting, curriculum=self.curriculum,
                            dropout_curriculum=self.dropout_curriculum, dropout_unit=self.dropout_unit,
                            p_max=self.p_max)


def check_recipe(num_layers: int, exit_layers: Sequence[int] | None, *, weighting: str, curriculum: str,
                 dropout_curriculum: str, dropout_unit: str, p_max: float) -> list[int]:
    """The checks every form of the early-exit recipe shares (``LayerSkipArgs``, the Trainer's
    ``EarlyExitRecipe``), against a ``num_layers``-layer model; the exits the loss trains (the last
    layer added; None: every layer)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown early-exit loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
    if curriculum not in CURRICULA:
        raise ValueError(f"unknown early-exit curriculum {curriculum!r}; choose one of {CURRICULA}")
    if dropout_curriculum not in DROPOUT_CURRICULA:
        raise ValueError(f"unknown layer-dropout curriculum {dropout_curriculum!r}; "
                         f"choose one of {DROPOUT_CURRICULA}")
    if not 0.0 <= p_max < 1.0:
        raise ValueError(f"p_max must be in [0, 1), got {p_max}")
    if dropout_unit not in LayerTaps.UNITS:
        raise ValueError(f"unknown layer-dropout unit {dropout_unit!r}; choose one of {LayerTaps.UNITS}")
    exits = sorted(set(exit_layers or range(1, num_layers + 1)) | {num_layers})
    bad = [k for k in exits if not 1 <= k <= num_layers]
    if bad:
        raise ValueError(f"exit layers {bad} are outside 1..{num_layers} (the model has {num_layers} layers)")
    return exits


class LayerTaps:
    """Forward hooks on every decoder layer: record each layer's output and, while ``rates`` is
    set, drop layer ``i`` with probability ``rates[i]``.

    ``unit="row"`` (LayerSkip's layer dropout) drops a layer for whole rows: their output is the
    layer's input. ``unit="token"`` drops it for single tokens and takes them out of the layer:
    the layer runs on the row's other tokens only (their order kept), so the dropped tokens leave
    no trace in its recurrence, and their output is their input. One draw per token and forward
    pass decides every layer (a token is dropped where the draw is below the layer's rate), so with
    rates rising with depth a token dropped at one layer is dropped at every deeper one: the token
    left the model at an exit, as it does at inference. On a Mamba model this is what the decoding
    engine's ``freeze`` cache strategy does to the layers a token skips.

    With ``unit="token"``, ``depths`` (a (b, T) tensor: the layers each token runs) replaces the
    random draws, to replay the exits a decoding took.

    Works on any HF decoder whose layers take the hidden state first and return it (alone or first
    in a tuple): every adapter's ``layers()`` (``unit="token"``: layers that do not see positions,
    i.e. Mamba blocks). Remove with ``close()`` (or use as a context).
    """

    UNITS = ("row", "token")

    def __init__(self, layers: Sequence[nn.Module], unit: str = "row") -> None:
        if unit not in self.UNITS:
            raise ValueError(f"unknown layer-dropout unit {unit!r}; choose one of {self.UNITS}")
        self.unit = unit
        self.outputs: dict[int, Tensor] = {}
        self.rates: Tensor | None = None
        self.depths: Tensor | None = None
        self.generator: torch.Generator | None = None
        self._draw: Tensor | None = None  # (b, T) per-token draws of the current forward pass
        self._taken: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # layer -> (input, dropped, inverse order)
        self._handles = [layer.register_forward_hook(self._hook(i), with_kwargs=True)
                         for i, layer in enumerate(layers)]
        if unit == "token":
            self._handles += [layer.register_forward_pre_hook(self._take_out(i), with_kwargs=True)
                              for i, layer in enumerate(layers)]

    def _take_out(self, index: int):
        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:  # a new forward pass: new draws
                self._draw = None
            if self.depths is not None:
                dropped = self.depths.to(hidden.device) <= index
            elif self.rates is not None and float(self.rates[index]) > 0:
                if self._draw is None or self._draw.shape != hidden.shape[:2]:
                    self._draw = torch.rand(hidden.shape[:2], generator=self.generator).to(hidden.device)
                dropped = self._draw < float(self.rates[index])
            else:
                return None
            if not bool(dropped.any()):
                return None
            t = hidden.shape[1]
            # the kept tokens first, in their order, then the dropped ones (causal: they cannot reach back)
            order = torch.argsort(dropped.long() * t + torch.arange(t, device=hidden.device), dim=1)
            self._taken[index] = (hidden, dropped, torch.argsort(order, dim=1))
            compact = hidden.gather(1, order[..., None].expand_as(hidden))
            mask = kwargs.get("attention_mask")
            if isinstance(mask, Tensor) and mask.dim() == 2:
                kwargs = {**kwargs, "attention_mask": mask.gather(1, order)}
            if args:
                return (compact, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": compact}

        return pre_hook

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            taken = self._taken.pop(index, None)
            if taken is not None:  # back to the tokens' own places; the dropped ones pass unchanged
                hidden_in, dropped, inverse = taken
                out = out.gather(1, inverse[..., None].expand_as(out))
                out = torch.where(dropped[..., None], hidden_in.to(out.dtype), out)
            elif self.unit == "row" and self.rates is not None and float(self.rates[index]) > 0:
                draw = torch.rand(out.shape[0], generator=self.generator)
                drop = (draw < float(self.rates[index])).to(out.device)
                out = torch.where(drop[:, None, None], hidden_in.to(out.dtype), out)
            self.outputs[index] = out
            if isinstance(output, tuple):
                return (out, *output[1:])
            return out

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "LayerTaps":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _adapter(model: nn.Module):
    return adapter_for(getattr(model, "module", model), role="decoder")  # under DDP: the model it wraps


def exit_losses(model: nn.Module, taps: LayerTaps, input_ids: Tensor, exits: Sequence[int],
                active: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy at each exit (0 where ``active`` is False): one forward pass."""
    adapter = _adapter(model)
    taps.outputs.clear()
    out = model(input_ids=input_ids, use_cache=False)
    labels = input_ids[:, 1:].reshape(-1)
    losses = []
    for e, k in enumerate(exits):
        if active is not None and not bool(active[e]):
            losses.append(out.logits.new_zeros(()))
            continue
        logits = out.logits if k == adapter.num_layers else adapter.logits(taps.outputs[k - 1])
        losses.append(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels))
    return torch.stack(losses)


def _windows(tokens: Tensor, batch: int, seq_len: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq_len, (batch,), generator=gen)
    return torch.stack([tokens[s:s + seq_len] for s in starts.tolist()])


def _lr(args: LayerSkipArgs, step: int) -> float:
    warm = min(1.0, (step + 1) / max(args.warmup_steps, 1))
    return args.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step, args.max_steps) / args.max_steps))


def _load_state(model: nn.Module, optimizer, out: Path, args: LayerSkipArgs) -> dict[str, Any]:
    state_path = out / STATE_NAME
    if not (args.resume and state_path.is_file()):
        return {"step": 0, "losses": [], "seconds": 0.0}

    state = read_json(state_path, "training state", "delete the folder to start again")
    if state.get("recipe") != args.recipe:
        raise ValueError(f"{out} holds a {state.get('recipe')!r} run, not {args.recipe!r}: pick another "
                         f"output_dir or delete it")
    weights = load_safetensors(out / "model.safetensors", "model weights", "delete the folder to start again")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]:
        raise ValueError(f"{out}/model.safetensors does not fit this model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}): it was trained with another config; delete it")
    optimizer.load_state_dict(load_torch_state(out / OPTIMIZER_NAME, "optimizer state",
                                               "delete the folder to start again"))
    note(f"resuming from {out} at step {state['step']}")
    return state


def _save(model: nn.Module, tokenizer: Any, optimizer, state: dict, out: Path) -> None:
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_NAME)
        (tmp / STATE_NAME).write_text(json.dumps(state, indent=1))


def train_lm(model: nn.Module, tokens: Tensor, args: LayerSkipArgs, *, tokenizer: Any = None,
             accelerator: Any = None) -> dict[str, Any]:
    """Train ``model`` (a HF causal LM) on windows of ``tokens`` (1-D ids); returns the state
    (step, losses, seconds, the options) that is also saved in ``output_dir``."""
    adapter = _adapter(model)
    exits = args.validate(adapter.num_layers)
    if args.dropout_unit == "token" and adapter.kind != "ssm":
        raise ValueError("dropout_unit='token' takes tokens out of a layer's recurrence, which is what the "
                         "`freeze` cache strategy does on Mamba; this model has attention layers (positions, "
                         "and the exact `catch_up` strategy): use dropout_unit='row'")
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if len(tokens) <= args.seq_len + 1:
        raise ValueError(f"{len(tokens)} tokens are too few for windows of {args.seq_len}: give more text "
                         f"or a shorter seq_len")
    accelerator = accelerator or make_accelerator(args.device, args.dtype)
    out = Path(args.output_dir)
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    state = _load_state(model, optimizer, out, args)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    layerskip = args.recipe == "layerskip"
    scales = exit_loss_scales(exits, adapter.num_layers, args.e_scale if layerskip else 0.0, args.weighting)
    rank, world = accelerator.process_index, accelerator.num_processes
    state.update(recipe=args.recipe, exit_layers=exits, args={**asdict(args), "output_dir": str(out)})
    start, run_start = time.time() - state["seconds"], time.time()
    wrapped.train()
    with LayerTaps(adapter.layers(), unit=args.dropout_unit) as taps:
        while state["step"] < args.max_steps:
            step = state["step"]
            if args.max_minutes is not None and time.time() - run_start > args.max_minutes * 60:
                break
            for group in optimizer.param_groups:
                group["lr"] = _lr(args, step)
            ids = _windows(tokens, args.batch_size, args.seq_len, (args.seed + step) * world + rank)
            active = (curriculum_mask(exits, adapter.num_layers, step, args.max_steps, args.curriculum,
                                      args.rotation) if layerskip else torch.tensor([k == exits[-1] for k in exits]))
            if layerskip and args.p_max > 0:
                taps.rates = layer_dropout_rates(adapter.num_layers, args.p_max, step, args.max_steps,
                                                 args.dropout_curriculum)
                taps.generator = torch.Generator().manual_seed(10_000_019 + (args.seed + step) * world + rank)
            losses = exit_losses(wrapped, taps, ids.to(accelerator.device), exits, active)
            loss = early_exit_loss(losses, scales, active)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(wrapped.parameters(), args.max_grad_norm)
            optimizer.step()
            taps.rates = None
            state["step"] = step + 1
            state["losses"].append(round(float(losses[-1].detach()), 4))  # the last layer's loss
            state["seconds"] = round(time.time() - start, 1)
            if args.progress and state["step"] % args.log_every == 0 and accelerator.is_main_process:
                note(f"step {state['step']}/{args.max_steps} last-layer loss {state['losses'][-1]:.3f} "
                     f"objective {float(loss.detach()):.3f} lr {_lr(args, step):.2e} {state['seconds']:.0f}s")
            if state["step"] % args.save_every == 0:
                _checkpoint(accelerator, wrapped, tokenizer, optimizer, state, out)
    _checkpoint(accelerator, wrapped, tokenizer, optimizer, state, out)
    wrapped.eval()
    return state


def _checkpoint(accelerator, wrapped, tokenizer, optimizer, state: dict, out: Path) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save(accelerator.unwrap_model(wrapped), tokenizer, optimizer, state, out)
    accelerator.wait_for_everyone()


@torch.no_grad()
def exit_report(model: nn.Module, tokens: Tensor, *, exit_layers: Sequence[int] | None = None,
                seq_len: int = 256, max_windows: int = 16) -> dict[str, Any]:
    """Per exit, on consecutive windows of held-out ``tokens``: the perplexity of the exit's own
    next-token distribution and its top-1 agreement with the last layer's (teacher-forced)."""
    adapter = _adapter(model)
    exits = sorted(set(exit_layers or range(1, adapter.num_layers + 1)) | {adapter.num_layers})
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    n = min(max_windows, len(tokens) // seq_len)
    if n < 1:
        raise ValueError(f"{len(tokens)} held-out tokens are fewer than one window of {seq_len}")
    ids = tokens[: n * seq_len].view(n, seq_len).to(adapter.head_device)
    was_training = model.training
    model.eval()
    nll = torch.zeros(len(exits), dtype=torch.float64)
    agree = torch.zeros(len(exits), dtype=torch.float64)
    with LayerTaps(adapter.layers()) as taps:
        for row in ids.split(4):
            taps.outputs.clear()
            out = model(input_ids=row, use_cache=False)
            final = out.logits[:, :-1].argmax(-1)
            labels = row[:, 1:]
            for e, k in enumerate(exits):
                logits = (out.logits if k == adapter.num_layers else adapter.logits(taps.outputs[k - 1]))[:, :-1]
                nll[e] += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                      labels.reshape(-1), reduction="sum").double()
                agree[e] += (logits.argmax(-1) == final).sum().double()
    model.train(was_training)
    count = n * (seq_len - 1)
    return {"tokens": count, "exits": [
        {"layer": k, "perplexity": round(math.exp(float(nll[e]) / count), 3),
         "agreement": round(float(agree[e]) / count, 4)} for e, k in enumerate(exits)]}
