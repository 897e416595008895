"""Training LM exits on a frozen backbone: self-distillation with top-k-relaxed exit targets
(the losses are in ``offramp.objectives.distill``).

DYNAMAX / CALM recipe (shared/METHODS.md):

1. Data: the model's own greedy continuations of prompts (``greedy_continuations``), so the exits
   learn the distribution they will face when decoding; or any tokenised text.
2. Heads: each exit head is distilled towards the final layer, KL(p_final || p_exit) at
   temperature T, with per-exit weights that decay linearly with depth (w_e ∝ E - e).
   The teacher's distribution is kept on its top-``kd_top_k`` tokens per position; the student's
   softmax runs over the union of those tokens in a batch (the plausible alternatives), which
   makes a 49k-token LM head affordable on a CPU.
3. Confidence classifiers: target 1 where the exit's top token (full vocabulary) is among the final
   layer's top-``top_k`` tokens (top-k relaxation; ``top_k=1`` asks for the same token), trained
   with BCE on the heads' (detached) features after step 2.

The backbone never changes: hidden states are computed once (``collect_states``) and reused.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from offramp.data.assets import ALIASES, bbc_prompts
from offramp.data.prompts import chat_texts
from offramp.engines.generate import frequent_tokens, generate
from offramp.modeling.decoder import DecoderExitModel
from offramp.objectives.distill import distill_loss, exit_weights
from offramp.utils import progress as bar


@dataclass
class ExitStates:
    """Backbone outputs for one sequence, computed once.

    Attributes:
        hidden: (E, t, d) hidden state after each exit layer.
        top_ids, top_logits: (t, K) the final layer's top-K tokens and logits per position.
        train: (t,) bool, positions whose next token is trained on (the continuation).
    """

    hidden: Tensor
    top_ids: Tensor
    top_logits: Tensor
    train: Tensor


@torch.no_grad()
def greedy_continuations(backbone: nn.Module, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 48,
                         batch_size: int = 8, chat: bool = False, progress: bool = False) -> list[tuple[Tensor, int]]:
    """(token ids, index of the first generated token) for each prompt, greedy, no exits."""
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    tokenizer.padding_side = "left"
    out: list[tuple[Tensor, int]] = []
    for i in bar(range(0, len(prompts), batch_size), desc="greedy continuations", unit="batch", enabled=progress):
        texts = prompts[i:i + batch_size]
        texts = chat_texts(tokenizer, texts, chat)
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        res = generate(backbone, enc["input_ids"], enc["attention_mask"], max_new_tokens=max_new_tokens)
        p = enc["input_ids"].shape[1]
        for r in range(len(texts)):
            start = int(enc["attention_mask"][r].argmax())
            new = res.new_tokens[r][res.exit_layers[r] > 0]
            out.append((torch.cat([enc["input_ids"][r, start:], new]), p - start))
    return out


def text_sequences(tokenizer: Any, texts: list[str], *, max_tokens: int = 256) -> list[tuple[Tensor, int]]:
    """(token ids, 1) per text, cut to ``max_tokens``: teacher-forced text for :func:`fit_exits`.

    Every position after the first is distilled (the final layer is the teacher on the text itself),
    the cheap alternative to :func:`greedy_continuations` (one forward per text, no decoding).
    """
    if not texts:
        raise ValueError("texts is empty: give at least one text")
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2 (one position to predict), got {max_tokens}")
    out = []
    for text in texts:
        ids = torch.tensor(tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens], dtype=torch.long)
        if ids.numel() >= 2:
            out.append((ids, 1))
    if not out:
        raise ValueError("every text is shorter than 2 tokens: nothing to distil")
    return out


@torch.no_grad()
def collect_states(model: nn.Module, sequences: list[tuple[Tensor, int]], *, kd_top_k: int = 32,
                   progress: bool = False) -> list[ExitStates]:
    """Run the frozen backbone once per sequence; keep exit hidden states and the teacher's top-K."""
    states = []
    for ids, first_new in bar(sequences, desc="exit states", unit="sequence", enabled=progress):
        out = model.backbone(input_ids=ids[None].to(model.adapter.layer_device(0)), output_hidden_states=True,
                             use_cache=False)
        after = model.adapter.hidden_after
        hidden = torch.stack([after(out.hidden_states, k)[0] for k in model.exit_layers])  # (E, t, d)
        top = out.logits[0].float().topk(kd_top_k, dim=-1)
        train = torch.arange(ids.numel()) >= first_new - 1
        train[-1] = False  # the last token predicts nothing we kept
        states.append(ExitStates(hidden.cpu(), top.indices.cpu(), top.values.cpu(), train))
    return states


def _batch_support(batch: list[ExitStates]) -> tuple[Tensor, list[Tensor]]:
    """The union of the teacher's top-K tokens over a batch, and each sequence's ids remapped into it."""
    vocab = torch.unique(torch.cat([s.top_ids.flatten() for s in batch]))
    return vocab, [torch.searchsorted(vocab, s.top_ids) for s in batch]


def _teacher_on_support(state: ExitStates, local: Tensor, size: int) -> Tensor:
    """(n, size) teacher logits on the batch support (tokens outside its own top-K get -inf)."""
    rows = state.train.nonzero()[:, 0]
    full = torch.full((rows.numel(), size), float("-inf"))
    full.scatter_(1, local[rows], state.top_logits[rows])
    return full


def train_exit_heads(model: nn.Module, states: list[ExitStates], *, epochs: int = 3, lr: float = 1e-3,
                     batch_size: int = 8, temperature: float = 1.0, seed: int = 0,
                     log: Callable[[str], None] | None = print) -> list[float]:
    """Distil every exit head towards the final layer; returns the loss per step."""
    model.backbone.requires_grad_(False)  # the backbone (final norm + LM head included) stays frozen
    params = [p for p in model.heads.parameters() if p.requires_grad]
    if not params:
        return []
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    weights = exit_weights(len(model.exit_layers))
    rng = random.Random(seed)
    history: list[float] = []
    dev = model.adapter.head_device
    for epoch in range(epochs):
        order = list(range(len(states)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = [states[j] for j in order[i:i + batch_size]]
            vocab, local = _batch_support(batch)
            vocab = vocab.to(dev)
            teacher = torch.cat([_teacher_on_support(s, loc, vocab.numel()) for s, loc in zip(batch, local)])
            teacher = teacher.masked_fill(torch.isinf(teacher), -1e4).to(dev)  # no mass off its top-K
            loss = torch.zeros((), device=dev)
            for e in range(len(model.exit_layers)):
                feats = [model.features(e, s.hidden[e][None].to(dev))[0][s.train.to(dev)] for s in batch]
                student = model.adapter.logits_subset(torch.cat(feats), vocab)  # (n, |support|)
                loss = loss + weights[e] * distill_loss(student, teacher, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(loss.item())
        if log:
            log(f"heads epoch {epoch + 1}/{epochs}: distill loss {sum(history[-5:]) / len(history[-5:]):.4f}")
    return history


@torch.no_grad()
def exit_targets(model: nn.Module, states: list[ExitStates], *, top_k: int = 1) -> tuple[Tensor, Tensor]:
    """Features (n, E, d) of every trained position and targets (n, E): exit top-1 in final top-k."""
    feats_all, targets_all = [], []
    dev = model.adapter.head_device
    for s in states:
        rows = s.train.to(dev)
        final_top = s.top_ids[s.train][:, :top_k].to(dev)  # (n, k)
        feats, hits = [], []
        for e in range(len(model.exit_layers)):
            f = model.features(e, s.hidden[e][None].to(dev))[0][rows]  # (n, d)
            top1 = model.exit_logits(f).argmax(-1)  # full vocabulary, once
            hits.append((final_top == top1[:, None]).any(-1))
            feats.append(f)
        feats_all.append(torch.stack(feats, 1).cpu())
        targets_all.append(torch.stack(hits, 1).float().cpu())
    return torch.cat(feats_all), torch.cat(targets_all)


def train_confidence(model: nn.Module, feats: Tensor, targets: Tensor, *, epochs: int = 30, lr: float = 3e-3,
                     batch_size: int = 256, val_fraction: float = 0.2, patience: int = 3, seed: int = 0,
                     log: Callable[[str], None] | None = print) -> list[float]:
    """BCE of each exit's confidence classifier on the top-k-relaxed targets.

    A random ``val_fraction`` of the positions is held out; training stops when its BCE has not
    improved for ``patience`` epochs and the best classifiers are kept (a 37k-parameter MLP
    overfits a few thousand positions, and an over-confident classifier exits wrongly).
    Returns the validation BCE per epoch.
    """
    if feats.shape[0] == 0:
        raise ValueError("no training positions: the sequences have no continuation tokens")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(feats.shape[0], generator=gen)
    n_val = int(len(perm) * val_fraction) if len(perm) >= 10 else 0
    val, train = perm[:n_val], perm[n_val:]
    opt = torch.optim.AdamW(model.confidence.parameters(), lr=lr, weight_decay=0.05)
    dev = model.adapter.head_device

    def bce(idx: Tensor) -> Tensor:
        f, y = feats[idx].to(dev), targets[idx].to(dev)
        logits = torch.stack([model.confidence_logit(e, f[:, e]) for e in range(f.shape[1])], 1)
        return nn.functional.binary_cross_entropy_with_logits(logits, y)

    history, best, best_state, bad = [], math.inf, None, 0
    for epoch in range(epochs):
        order = train[torch.randperm(len(train), generator=gen)]
        for i in range(0, len(order), batch_size):
            loss = bce(order[i:i + batch_size])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            score = bce(val).item() if n_val else loss.item()
        history.append(score)
        if score < best - 1e-4:
            best, bad = score, 0
            best_state = {k: v.clone() for k, v in model.confidence.state_dict().items()}
        else:
            bad += 1
            if bad >= patience:
                break
    if best_state is not None:
        model.confidence.load_state_dict(best_state)
    if log:
        log(f"confidence: {len(history)} epochs, best validation bce {best:.4f}, "
            f"exit-ok rate per exit {[round(x, 3) for x in targets.mean(0).tolist()]}")
    return history


def fit_exits(model: nn.Module, sequences: list[tuple[Tensor, int]], *, head_epochs: int = 3,
              confidence_epochs: int = 30, top_k: int | None = None, kd_top_k: int = 32, lr: float = 1e-3,
              max_confidence_positions: int | None = None, log: Callable[[str], None] | None = print,
              progress: bool = False) -> dict:
    """The whole recipe on a frozen backbone: collect states, distil heads, train confidences.

    The confidence classifiers train on every position (``max_confidence_positions`` caps them at
    the first sequences holding that many): they need data, as a 37k-parameter MLP per exit. On
    frozen SmolLM2 their AUC for "the exit agrees with the last layer" at layers 24 / 27 went from
    0.74 / 0.68 (2,000 positions) to 0.79 / 0.77 (11,000).
    """
    model.backbone.requires_grad_(False)
    top_k = top_k or model.config.top_k
    states = collect_states(model, sequences, kd_top_k=kd_top_k, progress=progress)
    head_hist = train_exit_heads(model, states, epochs=head_epochs, lr=lr, log=log)
    keep, count = [], 0
    for s in states:
        if max_confidence_positions is not None and keep and count + int(s.train.sum()) > max_confidence_positions:
            break
        keep.append(s)
        count += int(s.train.sum())
    feats, targets = exit_targets(model, keep, top_k=top_k)
    conf_hist = train_confidence(model, feats, targets, epochs=confidence_epochs, log=log)
    model.config.top_k = top_k
    return {"head_loss": head_hist, "confidence_loss": conf_hist, "exit_ok_rate": targets.mean(0).tolist(),
            "positions": int(feats.shape[0]), "final_head_loss": head_hist[-1] if head_hist else math.nan}


DRAFT_VOCAB_KEPT = 16384  # the most frequent tokens of the fitted text that the exits' config records


def model_reference(name: str, backbone: Any) -> str:
    """How token exits name their base model: an offline alias as the alias (resolved at load, so
    moving the cache or the environment does not break them), a local folder as an absolute path,
    a Hub id as given."""
    if name in ALIASES and not Path(name).exists():
        return name
    if Path(name).exists():
        return str(Path(name).resolve())
    return getattr(backbone, "name_or_path", None) or name


def fit_token_exits(backbone: nn.Module, tokenizer: Any, model_name: str, *, exit_layers: list[int] | None = None,
                    head: str = "ffn", top_k: int = 1, texts: list[str] | None = None, max_tokens: int = 256,
                    prompts: int = 64, chat: bool = False, epochs: int = 3,
                    log: Callable[[str], None] | None = None) -> DecoderExitModel:
    """Token exits for a frozen causal LM, fitted and ready to save: distilled on ``texts``
    (teacher-forced, ``max_tokens`` per text) or, without texts, on the model's own greedy
    continuations of ``prompts`` offline BBC News prompts. The exits' config names the LM
    (``model_reference``) and records the fitted text's tokens by frequency (``draft_vocab``)."""
    model = DecoderExitModel.from_backbone(backbone, exit_layers=exit_layers, head=head, top_k=top_k,
                                           base_model_name_or_path=model_reference(model_name, backbone))
    if texts is not None:
        seqs = text_sequences(tokenizer, texts, max_tokens=max_tokens)
    else:
        seqs = greedy_continuations(backbone, tokenizer, bbc_prompts(prompts, split="train", instruct=chat),
                                    max_new_tokens=40, chat=chat, progress=True)
    stats = fit_exits(model, seqs, head_epochs=epochs, log=log, progress=True)
    # the fitted text's tokens by frequency: speculation's draft vocabulary is their first K
    model.config.draft_vocab = frequent_tokens([seq[p:] for seq, p in seqs], DRAFT_VOCAB_KEPT).tolist()
    model.config.extra["fit"] = {"sequences": len(seqs), "positions": stats["positions"],
                                 "exit_agreement": [round(float(x), 4) for x in stats["exit_ok_rate"]]}
    warn_thin_fit(len(seqs), stats["positions"], list(model.exit_layers), stats["exit_ok_rate"])
    return model


MIN_FIT_POSITIONS = 2000  # below it the confidence classifiers rarely learn when an exit is right


def warn_thin_fit(sequences: int, positions: int, exit_layers: list[int], agreement: list[float]) -> list[str]:
    """Warn (UserWarning, with the numbers) when exits were fitted on too few positions or when even
    the deepest exit rarely agrees with the last layer; returns the warnings' texts."""
    import warnings

    said = []
    if positions < MIN_FIT_POSITIONS:
        said.append(f"the exits were fitted on {positions} token positions ({sequences} texts); below "
                    f"{MIN_FIT_POSITIONS} their confidence classifiers rarely learn when an exit is right, so rules "
                    f"on them rarely exit (on SmolLM2 their AUC was 0.74 at 2,000 positions, 0.79 at 11,000): fit on "
                    f"more text (--train-prompts 64 or more, or --fit-text)")
    best = max(agreement) if agreement else 0.0
    if agreement and best < 0.3:
        k = exit_layers[max(range(len(agreement)), key=lambda i: agreement[i])]
        said.append(f"the best exit (layer {k}) agrees with the last layer on {best:.0%} of the fitted positions: "
                    f"exits on this model will rarely pay; train the model to exit with `offramp train-lm --model`")
    for text in said:
        warnings.warn(text, UserWarning, stacklevel=2)
    return said
