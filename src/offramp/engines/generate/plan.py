"""Pick the drafting exit and the draft length of self-speculation from costs measured here.

``plan_speculation`` measures, on this machine and for the batch it is given, what one round of
``speculative_generate`` costs: a layer run on 1 and on w tokens (the draft steps and the verify
pass, through the engine's own cache), the exit head and LM head on 1 and w tokens, and the
embedding. It then decodes the prompts once with the full model (greedy) and reads, at every
generated position, whether each exit's own greedy token equals the full model's. For greedy
drafts that indicator is exact: a draft is made after an accepted prefix, which is the full
model's own. Replaying the rounds on it gives each row's number of rounds for every exit and draft
length, so the only modelled part is the time: per batch, the rounds of the slowest row times the
measured round cost, against as many plain steps as its longest output.

    plan = plan_speculation(exits, ids, mask, max_new_tokens=32)
    plan.best            # {"exit_layer": 24, "draft_tokens": 3, "predicted_speedup": 1.21, ...} or None
    print(plan.summary())

``best`` is None when no setting is predicted to beat plain decoding by ``margin``: then decode
plainly (``generate`` without exits). Each setting also gives ``all_accepted_speedup``, its
ceiling on this machine: the predicted speed-up if every draft were accepted.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from offramp.engines.generate.engine import generate
from offramp.engines.generate.run import check_inputs
from offramp.engines.generate.sampling import SamplingOptions
from offramp.engines.generate.speculative import Speculator, check_draft_vocab, check_speculation, draft_cache_strategy


@dataclass(frozen=True)
class RoundCosts:
    """What the pieces of a round cost (seconds): one layer and the exit + LM head on w tokens per
    row (by w), the embedding, and the drafting head over the draft vocabulary (None: not used)."""

    layer_s: dict[int, float]
    head_s: dict[int, float]
    embed_s: float
    draft_head_s: float | None = None


@dataclass
class SpeculationPlan:
    """Measured costs (seconds), per-exit acceptance, every setting's prediction and the best one."""

    batch_size: int
    num_layers: int
    layer_s: dict[int, float]          # one layer on w tokens per row, by w
    head_s: dict[int, float]           # exit head + LM head on w tokens per row, by w
    embed_s: float
    acceptance: dict[int, float]       # per exit layer: the share of positions its greedy token is the model's
    draft_head_s: float | None = None  # the exit head + LM head over the draft vocabulary (None: the whole one)
    settings: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    margin: float = 0.05

    @property
    def plain_step_s(self) -> float:
        """A plain decoding step: embed + L layers + head on 1 token."""
        return self.embed_s + self.num_layers * self.layer_s[1] + self.head_s[1]

    def round_s(self, exit_layer: int, d: int) -> float:
        """One round: d+1 tokens through layers 1..E (the pending token and d drafts), d exit
        heads, then layers E+1..L and the head on d+1 tokens at once."""
        L = self.num_layers
        draft = self.head_s[1] if self.draft_head_s is None else self.draft_head_s
        return ((d + 1) * (self.embed_s + exit_layer * self.layer_s[1]) + d * draft
                + (L - exit_layer) * self.layer_s[d + 1] + self.head_s[d + 1])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "plain_step_s": self.plain_step_s}

    def summary(self) -> str:
        head = (f"speculation plan at batch {self.batch_size}: plain step {self.plain_step_s * 1e3:.2f} ms; "
                f"acceptance {', '.join(f'@{k} {v:.2f}' for k, v in self.acceptance.items())}")
        if self.best is None:
            top = max(self.settings, key=lambda s: s["predicted_speedup"]) if self.settings else None
            tail = (f"no setting is predicted to beat plain decoding by {self.margin:.0%} (best: exit "
                    f"{top['exit_layer']}, {top['draft_tokens']} drafts, {top['predicted_speedup']:.2f}x): "
                    f"decode without speculation" if top else "no setting to try")
        else:
            b = self.best
            tail = (f"best: exit {b['exit_layer']}, {b['draft_tokens']} drafts, {b['tokens_per_round']:.2f} tokens "
                    f"per round, predicted {b['predicted_speedup']:.2f}x plain decoding")
        return f"{head}\n{tail}"


def replay_rounds(matches: Sequence[bool], length: int, d: int) -> int:
    """Rounds one row needs for ``length`` tokens with ``d`` drafts per round, given ``matches[i]``:
    whether the exit's greedy token for generated position i equals the model's (i >= 1; position 0
    comes from the prompt's pass)."""
    count, rounds = 1, 0
    while count < length:
        a = 0
        while a < d and count + a < length and matches[count + a]:
            a += 1
        count += a + 1
        rounds += 1
    return rounds


def median_seconds(fn, repeats: int = 5) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def measure_costs(model: Any, input_ids: Tensor, attention_mask: Tensor, widths: Sequence[int],
                  exit_index: int, repeats: int = 5, draft_vocab: Tensor | None = None
                  ) -> tuple[dict[int, float], dict[int, float], float, float | None]:
    """(per-layer seconds by width, head seconds by width, embed seconds, the drafting head's
    seconds over ``draft_vocab`` or None) through the engine's cache."""
    spec = Speculator(model, exit_index, input_ids, attention_mask, max(widths) + 1, max(widths), draft_vocab)
    spec.run.prefill(input_ids, attention_mask)
    b, p = input_ids.shape
    rows = torch.arange(b, device=input_ids.device)
    ad, L = spec.adapter, spec.num_layers
    layer_s, head_s = {}, {}
    for w in sorted(set(widths)):
        spec.run.pos[:, p:p + w] = spec.run.pos[:, p - 1:p] + 1 + torch.arange(w, device=input_ids.device)
        spec.run.valid[:, p:p + w] = True
        h = ad.embed(input_ids[:, -1:].expand(b, w), spec.run.pos[:, p:p + w])
        layer_s[w] = median_seconds(lambda: spec.run_layers(h, rows, True, p, range(L)), repeats) / L
        head_s[w] = median_seconds(lambda: ad.logits(model.features(exit_index, h)).argmax(-1), repeats)
        spec.run.valid[:, p:p + w] = False
    tok = input_ids[:, -1:]
    embed_s = median_seconds(lambda: ad.embed(tok, spec.run.pos[:, p:p + 1]), repeats)
    draft_s = None
    if draft_vocab is not None:
        h = ad.embed(tok, spec.run.pos[:, p:p + 1])
        draft_s = median_seconds(lambda: spec.draft_logits(h)[1].argmax(-1), repeats)
    return layer_s, head_s, embed_s, draft_s


@torch.no_grad()
def exit_matches(model: Any, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int,
                 sampling: SamplingOptions, draft_vocab: Tensor | None = None
                 ) -> tuple[dict[int, list[list[bool]]], list[int]]:
    """Greedy decoding once with the full model; per exit layer and row, whether the exit's greedy
    token (among ``draft_vocab``'s, when given) at each generated position equals the model's; and
    each row's output length."""
    out = generate(model.backbone, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampling=sampling)
    lengths = [int(n) for n in (out.exit_layers > 0).sum(1).tolist()]
    seq = out.sequences
    mask = torch.cat([attention_mask, (out.exit_layers > 0).long()], dim=1)
    res = model(seq, attention_mask=mask)
    p = input_ids.shape[1]
    matches: dict[int, list[list[bool]]] = {}
    for e, k in enumerate(model.exit_layers):
        if model.heads[e].stateful:
            continue
        logits = model.exit_logits(res.exit_features[e])
        if draft_vocab is None:
            pred = logits.argmax(-1)  # (b, t): the token after each position
        else:
            vocab = draft_vocab.to(logits.device)
            pred = vocab[logits.index_select(-1, vocab).argmax(-1)]
        # the token at generated position i is predicted at sequence position p + i - 1
        hit = pred[:, p - 1:p - 1 + out.new_tokens.shape[1]] == out.new_tokens
        matches[k] = [[bool(x) for x in row[:n]] for row, n in zip(hit.tolist(), lengths)]
    return matches, lengths


def plan_speculation(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                     max_new_tokens: int = 32, draft_tokens: Sequence[int] = (1, 2, 3, 4, 6),
                     exit_layers: Sequence[int] | None = None, margin: float = 0.05, repeats: int = 5,
                     sampling: SamplingOptions | None = None, draft_vocab: Any = None,
                     costs: RoundCosts | None = None, probe_rows: int | None = None,
                     probe_tokens: int | None = None) -> SpeculationPlan:
    """Measure and choose (see the module docstring). ``input_ids`` / ``attention_mask``: a batch
    like the ones to decode (its size and prompt lengths set the costs); ``draft_vocab``: the
    tokens the exits draft among, as ``speculative_generate`` takes it; ``costs``: a cost table to
    use instead of timing one here (another machine's, or a fixed one: the prediction is then a
    function of the exits' acceptance alone). ``probe_rows`` / ``probe_tokens``: read the exits'
    acceptance on the batch's first rows and tokens only (the costs still at the batch's size),
    so that planning takes seconds: the full model decodes that much once."""
    sampling = sampling or SamplingOptions.from_model(model.backbone if hasattr(model, "backbone") else model)
    if not draft_tokens or min(draft_tokens) < 1:
        raise ValueError(f"draft_tokens must be a non-empty list of counts >= 1, got {list(draft_tokens)}")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    greedy = SamplingOptions(eos_token_id=sampling.eos_token_id, pad_token_id=sampling.pad_token_id)
    check_speculation(model, greedy, max(draft_tokens), None, None)
    candidates = list(exit_layers) if exit_layers is not None else [
        k for e, k in enumerate(model.exit_layers) if not model.heads[e].stateful]
    for k in candidates:
        check_speculation(model, greedy, 1, None, k)
    vocab = check_draft_vocab(model, draft_vocab)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_inputs(model.adapter, input_ids, attention_mask, max_new_tokens, draft_cache_strategy(model.adapter))
    dev = model.adapter.layer_device(0)
    ids, attn = input_ids.to(dev), attention_mask.to(dev)
    widths = sorted({1, *[d + 1 for d in draft_tokens]})
    e0 = list(model.exit_layers).index(candidates[0])
    if costs is None:
        costs = RoundCosts(*measure_costs(model, ids, attn, widths, e0, repeats, vocab))
    missing = [w for w in widths if w not in costs.layer_s or w not in costs.head_s]
    if missing:
        raise ValueError(f"the cost table has no layer or head cost for {missing} tokens per row: give "
                         f"layer_s and head_s for every width in {widths} (draft_tokens + 1, and 1)")
    layer_s, head_s, embed_s, draft_s = costs.layer_s, costs.head_s, costs.embed_s, costs.draft_head_s
    rows = ids.shape[0] if probe_rows is None else max(1, min(probe_rows, ids.shape[0]))
    steps = max_new_tokens if probe_tokens is None else max(2, min(probe_tokens, max_new_tokens))
    matches, lengths = exit_matches(model, ids[:rows], attn[:rows], steps, greedy, vocab)

    def acceptance(rows: list[list[bool]]) -> float:  # position 0 comes from the prompt's pass
        return round(sum(sum(r[1:]) for r in rows) / max(1, sum(len(r) - 1 for r in rows)), 4)

    plan = SpeculationPlan(batch_size=ids.shape[0], num_layers=model.adapter.num_layers, layer_s=layer_s,
                           head_s=head_s, embed_s=embed_s, margin=margin, draft_head_s=draft_s,
                           acceptance={k: acceptance(matches[k]) for k in candidates})
    plain_s = (max(lengths) - 1) * plan.plain_step_s  # the first token comes from the prompt's pass in both
    for k in candidates:
        for d in sorted(set(draft_tokens)):
            rounds = [replay_rounds(m, n, d) for m, n in zip(matches[k], lengths)]
            spec_s = max(rounds) * plan.round_s(k, d)
            plan.settings.append({"exit_layer": k, "draft_tokens": d,
                                  "tokens_per_round": round((sum(lengths) - len(lengths)) / max(1, sum(rounds)), 3),
                                  "round_s": plan.round_s(k, d),
                                  "predicted_speedup": round(plain_s / spec_s, 3) if spec_s else 0.0,
                                  # the ceiling of this setting: every draft accepted (d + 1 tokens a round)
                                  "all_accepted_speedup": round((d + 1) * plan.plain_step_s / plan.round_s(k, d), 3)})
    top = max(plan.settings, key=lambda s: s["predicted_speedup"])
    plan.best = top if top["predicted_speedup"] >= 1 + margin else None
    return plan
