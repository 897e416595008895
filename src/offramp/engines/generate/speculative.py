"""Lossless self-speculative decoding from a token exit (LayerSkip, Draft & Verify).

Each round, every running row drafts up to ``d`` tokens with layers 1..E and the exit head at E,
then the layers E+1..L verify them all in one pass. The draft's states at layers <= E are the full
model's own (same tokens, same positions), so the verify pass starts from them and their cache
entries are kept; nothing is recomputed. Greedy acceptance keeps the longest drafted prefix equal
to the full model's argmax and adds the full model's next token, so every round yields 1..d+1
tokens and the output is greedy decoding's. With sampling (temperature, top-p) the exit samples its
drafts and speculative sampling (``sampling.speculative_accept``) keeps or resamples them, so every
token is distributed exactly as the full model's sampling would draw it.

On Mamba and Mamba-2 the verify pass runs layers E+1..L on the d+1 tokens as one chunk from
each layer's state (``mamba_chunk``: the projections batched over the chunk, the conv window and
the recurrence token by token, the same arithmetic as one-token decoding) and keeps every token's
state, so rejected drafts are taken back by keeping, per row, the states after its last accepted
token (layers <= E: the states their drafting steps left).

Rows advance in lockstep through the cache's columns: a round uses d+1 columns for every row
(the pending token and the d drafts), and the columns of a row's rejected drafts become holes
that its attention mask hides from then on. Positions are per row, so a hole costs attention
width, never correctness. A row that reaches EOS or its token budget leaves the running batch.

With ``draft_confidence`` the draft stops early, for the batch, once no running row's exit is at
least that sure of its draft (``draft_rule``: the exit head's top probability, or the exit's
trained confidence classifier); the round then verifies what was drafted. With ``draft_vocab``
(``frequent_tokens``) the exit drafts among those tokens only and reads only their rows of the LM
head; verification still uses the whole vocabulary, so the output does not change.
``plan.plan_speculation`` measures the costs on this machine and the exits' acceptance and picks
the exit and the draft length (or says that plain decoding is faster).

```python
out = speculative_generate(exits, ids, mask, exit_layer=24, draft_tokens=3, max_new_tokens=64)
out.extra["speculation"]   # rounds, drafted, accepted, tokens per round
```
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from offramp.engines.generate.mamba import mamba_chunk
from offramp.engines.generate.run import DecodeRun, check_inputs
from offramp.engines.generate.sampling import SamplingOptions, sampling_probs, speculative_accept
from offramp.names import DRAFT_RULES
from offramp.outputs import GenerateOutput, GenerateReport


@dataclass
class SpeculationStats:
    """What the drafts did: rounds, drafted and accepted tokens (summed over rows)."""

    rounds: int = 0
    row_rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    ngram_rounds: int = 0  # rounds drafted from n-gram matches (no exit run)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.row_rounds if self.row_rounds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "acceptance": self.acceptance, "tokens_per_round": self.tokens_per_round}


def _exit_index(model: Any, exit_layer: int | None) -> int:
    layers = list(model.exit_layers)
    if exit_layer is None:
        return len(layers) - 1
    if exit_layer not in layers:
        raise ValueError(f"exit_layer {exit_layer} is not one of the model's exits {layers}: pick one of them "
                         "(or fit exits there with offramp fit-exits --exit-layers ...)")
    return layers.index(exit_layer)


def draft_cache_strategy(adapter: Any) -> str:
    """The engine cache strategy speculation runs its ``DecodeRun`` with (no layer is ever skipped)."""
    return "freeze" if adapter.kind == "ssm" else "copy_kv"




def check_speculation(model: Any, sampling: SamplingOptions, draft_tokens: int, draft_confidence: float | None,
                      exit_layer: int | None = None, draft_rule: str = "max_prob") -> int:
    """Refuse what self-speculation cannot do (ValueError naming the fix); the drafting exit's index."""
    if not hasattr(model, "exit_layers"):
        raise ValueError("self-speculation drafts with a token exit: pass a DecoderExitModel (backbone + trained "
                         "exit heads), not a plain causal LM")
    if sampling.repetition_penalty != 1.0:
        raise ValueError("self-speculative decoding keeps the model's distribution for greedy decoding and for "
                         "sampling with temperature / top-p, not with a repetition penalty: drop "
                         "repetition_penalty, or use generate()")
    if draft_tokens < 1:
        raise ValueError(f"draft_tokens must be >= 1, got {draft_tokens}")
    if draft_confidence is not None and not 0.0 <= draft_confidence <= 1.0:
        raise ValueError(f"draft_confidence must be in [0, 1], got {draft_confidence}")
    if draft_rule not in DRAFT_RULES:
        raise ValueError(f"draft_rule must be one of {', '.join(DRAFT_RULES)}, got {draft_rule!r}")
    e = _exit_index(model, exit_layer)
    if model.heads[e].stateful:
        raise ValueError(f"the exit at layer {model.exit_layers[e]} has a stateful (Mamba) head, whose state cannot "
                         "take back rejected drafts: draft from an exit with an ffn or transformer head")
    return e


def check_ngram(ngram_tokens: int, ngram_size: int, sampling: SamplingOptions, draft_tokens: int = 1) -> None:
    """Refuse n-gram drafting settings speculation cannot use (ValueError naming the fix);
    ``draft_tokens`` 0 (n-gram drafts only) needs ``ngram_tokens``."""
    if isinstance(ngram_tokens, bool) or not isinstance(ngram_tokens, int) or ngram_tokens < 0:
        raise ValueError(f"ngram_tokens must be an integer >= 0 (0: no n-gram drafts), got {ngram_tokens!r}")
    if ngram_tokens and (not isinstance(ngram_size, int) or ngram_size < 1):
        raise ValueError(f"ngram_size must be an integer >= 1, got {ngram_size!r}")
    if ngram_tokens and sampling.do_sample:
        raise ValueError("n-gram drafts are verified greedily: drop ngram_tokens (--ngram) to sample, or decode "
                         "greedily")
    if draft_tokens == 0 and not ngram_tokens:
        raise ValueError("draft_tokens=0 drafts from n-gram matches only: give ngram_tokens >= 1, or draft_tokens >= 1")


def check_draft_vocab(model: Any, draft_vocab: Any) -> Tensor | None:
    """The draft vocabulary as a 1-D long tensor of distinct token ids of the model (ValueError
    naming the fix otherwise); None stays None."""
    if draft_vocab is None:
        return None
    vocab = torch.as_tensor(draft_vocab)
    if vocab.dim() != 1 or vocab.numel() == 0 or vocab.dtype.is_floating_point or vocab.dtype == torch.bool:
        raise ValueError(f"draft_vocab must be a non-empty 1-D list of token ids, got shape {tuple(vocab.shape)} "
                         f"dtype {vocab.dtype}: build one with frequent_tokens(sequences, k)")
    vocab = vocab.long()
    size = model.adapter.vocab_size
    if int(vocab.min()) < 0 or int(vocab.max()) >= size:
        raise ValueError(f"draft_vocab holds ids outside the model's vocabulary [0, {size}): "
                         f"{int(vocab.min())}..{int(vocab.max())}; was it built with another tokenizer?")
    if vocab.unique().numel() != vocab.numel():
        raise ValueError("draft_vocab repeats token ids: pass each id once (frequent_tokens does)")
    return vocab


def frequent_tokens(sequences: Any, k: int, always: Any = ()) -> Tensor:
    """The ``k`` token ids most frequent in ``sequences`` (token-id tensors or lists), most frequent
    first (ties by id), then the ids of ``always`` (EOS, say) not among them: a draft vocabulary
    (FR-Spec, Zhao et al. 2025). The exit then drafts among these tokens only, so a draft reads the
    head's rows of k tokens instead of the whole vocabulary. Verification stays exact, so the output
    is unchanged; a token outside the set is never drafted and ends the round's accepted run."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    counts: dict[int, int] = {}
    for seq in sequences:
        for t in torch.as_tensor(seq).reshape(-1).tolist():
            counts[t] = counts.get(t, 0) + 1
    if not counts:
        raise ValueError("frequent_tokens needs token sequences to count (got none)")
    top = sorted(counts, key=lambda t: (-counts[t], t))[:k]
    for t in torch.as_tensor(list(always), dtype=torch.long).reshape(-1).tolist():
        if t not in top:
            top.append(t)
    return torch.tensor(top, dtype=torch.long)


class Speculator:
    """One call of self-speculation: the drafting exit (``exit_index``, after ``exit_layer`` layers),
    ``draft_tokens`` drafts a round, and a ``DecodeRun`` (``run``) whose cache and per-row positions
    the drafts and the verify pass share; ``round`` drafts and verifies once, ``run_layers`` runs a
    range of layers on a chunk of tokens."""

    def __init__(self, model: Any, exit_index: int, ids: Tensor, attn: Tensor, max_new: int, d: int,
                 draft_vocab: Tensor | None = None, ngram_tokens: int = 0) -> None:
        self.model, self.adapter, self.exit_index, self.draft_tokens = model, model.adapter, exit_index, d
        self.width = max(d, ngram_tokens) + 1  # cache columns a round takes: the pending token and the drafts
        self.exit_layer = model.exit_layers[exit_index]
        self.ssm = self.adapter.kind == "ssm"
        self.vocab = self.weight = self.bias = None
        if draft_vocab is not None:  # the LM head's rows of the draft vocabulary, taken once per call
            head = self.adapter.lm_head()
            self.vocab = draft_vocab.to(head.weight.device)
            self.weight = head.weight.index_select(0, self.vocab)
            self.bias = None if getattr(head, "bias", None) is None else head.bias.index_select(0, self.vocab)
        # every round takes `width` columns and yields >= 1 token: max_new rounds at most
        self.run = DecodeRun(self.adapter, model, None, draft_cache_strategy(self.adapter), ids, attn,
                             max_new * self.width)
        self.run.valid[:, ids.shape[1]:] = False
        self.run.future_valid = False  # a column is valid once a round has written an accepted token there
        self.num_layers = self.run.num_layers
        self.trail: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # Mamba: layer -> each token's states

    def draft_logits(self, states: Tensor) -> tuple[Tensor, Tensor]:
        """The drafting exit's features (r, d) and logits at the last position of ``states``
        (r, w, d): over the whole vocabulary, or over the draft vocabulary's tokens (r, k) in its order."""
        features = self.model.features(self.exit_index, states)[:, -1]
        if self.vocab is None:
            return features, self.adapter.logits(features[:, None])[:, 0]
        x = self.adapter.final_norm()(features.to(self.weight.device))
        return features, self.adapter.softcap(F.linear(x, self.weight, self.bias))

    def draft_sure(self, features: Tensor, logits: Tensor, threshold: float, rule: str) -> bool:
        """Whether any row's draft is sure enough to draft on: its top probability (``max_prob``) or
        its confidence classifier's probability that the exit's token is the model's
        (``token_confidence``) is at least ``threshold``."""
        if rule == "token_confidence":
            score = torch.sigmoid(self.model.confidence_logit(self.exit_index, features[:, None])[:, -1])
        else:
            score = logits.float().softmax(-1).amax(-1)
        return bool((score >= threshold).any())

    def _chunk(self, h: Tensor, rows: Tensor, full: bool, layers: range, commit: bool) -> Tensor:
        """Mamba: run ``layers`` on h (r, w, d), each from its stored states, keeping every token's
        states in ``trail`` (appended to with ``commit``, which also stores the last token's)."""
        store = self.run.ssm
        for layer in layers:
            conv, ssm = store.conv[layer], store.ssm[layer]
            if not full:
                conv, ssm = conv.index_select(0, rows), ssm.index_select(0, rows)
            h, convs, ssms = mamba_chunk(self.adapter.layers()[layer], h.to(self.adapter.layer_device(layer)), conv, ssm)
            if commit:
                old = self.trail.setdefault(layer, ([], []))
                old[0].extend(convs)
                old[1].extend(ssms)
                for states, new in ((store.conv, convs[-1]), (store.ssm, ssms[-1])):
                    if full:
                        states[layer] = new
                    else:
                        states[layer].index_copy_(0, rows, new)
            else:
                self.trail[layer] = (convs, ssms)
        self.run.layer_rows += rows.numel() * h.shape[1] * len(layers)
        return h

    def _settle(self, rows: Tensor, accepted: Tensor) -> None:
        """Mamba: keep, per row, every layer's states after its last accepted token."""
        store, pick = self.run.ssm, torch.arange(rows.numel(), device=rows.device)
        for layer, (convs, ssms) in self.trail.items():
            for states, trail in ((store.conv, convs), (store.ssm, ssms)):
                kept = torch.stack(trail).to(rows.device)[accepted, pick].to(states[layer].device)
                if rows.numel() == self.run.batch_size:
                    states[layer] = kept
                else:
                    states[layer].index_copy_(0, rows, kept)
        self.trail = {}

    def _masks(self, rows: Tensor, start: int, end: int, layers: range) -> dict:
        """Masks (r, 1, end-start, end) per window size; a sliding window counts positions (tokens),
        not columns, so the holes of rejected drafts do not shorten it."""
        valid = self.run.valid.index_select(0, rows)[:, :end]
        pos = self.run.pos.index_select(0, rows)[:, :end]
        k = torch.arange(end, device=valid.device)
        causal = (k[None, :] <= torch.arange(start, end, device=valid.device)[:, None])[None] & valid[:, None, :]
        masks: dict = {}
        for layer in layers:
            window = self.adapter.sliding_window(layer)
            if window in masks:
                continue
            allowed = causal
            if window is not None:
                allowed = allowed & (pos[:, None, :] > pos[:, start:end, None] - window)
            allowed = allowed[:, None]
            if self.run.mask_kind == "bool":
                masks[window] = allowed
            else:
                zero = torch.zeros((), dtype=self.adapter.dtype, device=valid.device)
                low = torch.tensor(torch.finfo(self.adapter.dtype).min, dtype=self.adapter.dtype, device=valid.device)
                masks[window] = torch.where(allowed, zero, low)
        return masks

    def run_layers(self, h: Tensor, rows: Tensor, full: bool, start: int, layers: range, commit: bool = False) -> Tensor:
        """Run ``layers`` on h (r, w, d) holding columns start..start+w-1 of ``rows`` (Mamba: see
        ``_chunk``; attention layers write their cache columns either way)."""
        if self.ssm:
            return self._chunk(h, rows, full, layers, commit)
        end = start + h.shape[1]
        posw = self.run.pos.index_select(0, rows)[:, start:end]
        rot = self.adapter.rotary(h, posw)
        masks = self._masks(rows, start, end, layers)
        for layer in layers:
            view = self.run.kv.view(layer, None if full else rows, start, end)
            h = self.adapter.run_layer(layer, h, cache=view, mask=masks[self.adapter.sliding_window(layer)],
                                  position_ids=posw, rotary=rot)
        self.run.layer_rows += rows.numel() * h.shape[1] * len(layers)
        return h

    def round(self, pending: Tensor, rows: Tensor, next_pos: Tensor, col: int, threshold: float | None,
              sampling: SamplingOptions | None = None, generator: torch.Generator | None = None,
              rule: str = "max_prob", given: Tensor | None = None) -> tuple[Tensor, Tensor, int]:
        """Draft from ``pending`` (r,) at column ``col``, verify; returns the tokens (r, k+1) (the
        accepted drafts, then the full model's next token), the number of accepted drafts per row
        (r,) and k, the drafts made. With ``sampling.do_sample``, drafts are sampled and accepted
        by speculative sampling. ``given`` (r, k): drafts found elsewhere (n-gram matches), verified
        in one pass through every layer with no exit run."""
        run, d, width = self.run, self.draft_tokens, self.width
        sample = sampling is not None and sampling.do_sample
        q: list[Tensor] = []
        full = rows.numel() == run.batch_size
        span = torch.arange(width, device=rows.device)
        run.pos[rows, col:col + width] = next_pos[:, None] + span[None]
        run.valid[rows, col:col + width] = True
        if given is not None:
            return self._verify_given(pending, given, rows, full, col)
        tokens, states, sure = [pending], [], True
        for j in range(d + 1):  # the pending token, then each draft: layers 1..E
            c = col + j
            h = self.adapter.embed(tokens[-1][:, None], run.pos.index_select(0, rows)[:, c:c + 1])
            states.append(self.run_layers(h, rows, full, c, range(self.exit_layer), commit=True))
            if j == d or not sure:  # the last draft's states are in: verify what was drafted
                break
            features, logits = self.draft_logits(states[-1])
            run.head_rows += rows.numel()
            if sample:
                probs = sampling_probs(logits, sampling)
                drawn = torch.multinomial(probs, 1, generator=generator)[:, 0]
                if self.vocab is not None:  # q is zero outside the draft vocabulary
                    probs = probs.new_zeros(probs.shape[0], self.adapter.vocab_size).index_copy_(1, self.vocab, probs)
                    drawn = self.vocab[drawn]
                q.append(probs)
                tokens.append(drawn.to(pending.device))
            else:
                best = logits.argmax(-1)
                tokens.append((best if self.vocab is None else self.vocab[best]).to(pending.device))
            sure = threshold is None or self.draft_sure(features, logits, threshold, rule)
        k = len(tokens) - 1
        run.valid[rows, col + k + 1:col + width] = False  # columns this round did not draft into
        hidden = self.run_layers(torch.cat(states, dim=1), rows, full, col, range(self.exit_layer, self.num_layers))
        logits = self.adapter.logits(hidden)  # (r, k+1, V)
        drafts = torch.stack(tokens[1:], dim=1) if k else pending.new_zeros(rows.numel(), 0)  # (r, k)
        if not sample:
            return self._accept_greedy(logits, drafts, rows, col, pending.device)
        qk = torch.stack(q, dim=1) if k else logits.new_zeros(rows.numel(), 0, logits.shape[-1])
        best, accepted = speculative_accept(drafts, qk.to(logits.device), sampling_probs(logits, sampling), generator)
        best, accepted = best.to(pending.device), accepted.to(pending.device)
        return self._settle_round(best, accepted, rows, col, k)

    def _accept_greedy(self, logits: Tensor, drafts: Tensor, rows: Tensor, col: int, device: Any
                       ) -> tuple[Tensor, Tensor, int]:
        """Greedy acceptance: the longest drafted prefix equal to the full model's argmax."""
        k = drafts.shape[1]
        best = logits.argmax(-1).to(device)  # (r, k+1)
        accepted = (drafts == best[:, :k]).long().cumprod(1).sum(1)  # (r,)
        return self._settle_round(best, accepted, rows, col, k)

    def _settle_round(self, best: Tensor, accepted: Tensor, rows: Tensor, col: int, k: int
                      ) -> tuple[Tensor, Tensor, int]:
        """Keep the accepted drafts' states and cache columns; the rejected ones become holes."""
        run = self.run
        if self.ssm:
            self._settle(rows, accepted)
        cols = torch.arange(k + 1, device=rows.device)
        holes = cols[None, :] > accepted[:, None]  # the rejected drafts' columns
        block = run.valid[rows, col:col + k + 1]
        run.valid[rows, col:col + k + 1] = block & ~holes
        return best, accepted, k

    def _verify_given(self, pending: Tensor, given: Tensor, rows: Tensor, full: bool, col: int
                      ) -> tuple[Tensor, Tensor, int]:
        """Verify drafts found without the model (n-gram matches): the pending token and the k
        drafts through every layer in one pass, then greedy acceptance."""
        k = given.shape[1]
        self.run.valid[rows, col + k + 1:col + self.width] = False
        chunk = torch.cat([pending[:, None], given.to(pending.device)], dim=1)  # (r, k+1)
        h = self.adapter.embed(chunk, self.run.pos.index_select(0, rows)[:, col:col + k + 1])
        h = self.run_layers(h, rows, full, col, range(self.exit_layer), commit=True)
        hidden = self.run_layers(h, rows, full, col, range(self.exit_layer, self.num_layers))
        return self._accept_greedy(self.adapter.logits(hidden), given, rows, col, pending.device)


def ngram_draft(history: list[int], max_tokens: int, max_n: int = 3) -> list[int]:
    """Prompt lookup: the (at most ``max_tokens``) tokens that followed the latest earlier
    occurrence of ``history``'s last n tokens, for the longest n <= ``max_n`` that occurs; [] when
    none does."""
    end = len(history)
    for n in range(min(max_n, end - 1), 0, -1):
        tail = history[end - n:]
        first = tail[0]
        for start in range(end - n - 1, -1, -1):  # the latest earlier occurrence
            if history[start] == first and history[start:start + n] == tail:
                return history[start + n:start + n + max_tokens]
    return []


def ngram_drafts(histories: list[list[int]], live: list[int], max_tokens: int, max_n: int, room: int,
                  device: Any) -> Tensor | None:
    """(r, k) drafts from n-gram matches when every running row has one (None otherwise): shorter
    ones padded with their last token (a pad the model rejects costs nothing; one it accepts is its
    own token)."""
    drafts = []
    for r in live:
        found = ngram_draft(histories[r], min(max_tokens, room), max_n)
        if not found:
            return None
        drafts.append(found)
    k = max(len(x) for x in drafts)
    return torch.tensor([x + [x[-1]] * (k - len(x)) for x in drafts], dtype=torch.long, device=device)


def _first_token(logits: Tensor, sampling: SamplingOptions, gen: torch.Generator | None) -> Tensor:
    """The token after the prompt, from the prefill's logits (b, V): sampled or greedy."""
    if sampling.do_sample:
        return torch.multinomial(sampling_probs(logits, sampling), 1, generator=gen)[:, 0]
    return logits.argmax(-1)


def _emit(live: list[int], best: Tensor, accepted: Tensor, out: Tensor, count: list[int], done: list[bool],
          sampling: SamplingOptions, histories: list[list[int]] | None = None) -> tuple[int, int, int]:
    """Write each running row's accepted drafts and the full model's token after them into ``out``
    (at most up to max_new_tokens, and up to its EOS); update the rows' host-side ``count`` and
    ``done``. The round's outcome reaches the host in one transfer. Returns (tokens written, drafts
    accepted, the most drafts any row accepted)."""
    max_new, eos, written = out.shape[1], set(sampling.eos_ids), 0
    host = torch.cat([accepted[:, None].to(best.device), best], 1).tolist()
    for i, r in enumerate(live):
        n_accepted, *tokens = host[i]
        new = tokens[:n_accepted + 1][:max_new - count[r]]
        end = next((j for j, t in enumerate(new) if t in eos), None)
        if end is not None:
            new = new[:end + 1]
        n = len(new)
        if histories is not None:
            histories[r].extend(new)
        out[r, count[r]:count[r] + n] = best[i, :n]  # a copy on the device: no transfer
        count[r] += n
        written += n
        done[r] = end is not None or count[r] >= max_new
    return written, sum(h[0] for h in host), max(h[0] for h in host)


@torch.no_grad()
def speculative_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                         exit_layer: int | None = None, draft_tokens: int = 3, draft_confidence: float | None = None,
                         draft_rule: str = "max_prob",
                         max_new_tokens: int = 32, sampling: SamplingOptions | None = None,
                         draft_vocab: Any = None, ngram_tokens: int = 0, ngram_size: int = 3,
                         tokenizer: Any = None) -> GenerateOutput:
    """Greedy decoding or sampling, drafted by a token exit and verified by the rest of the model.

    Args:
        model: a ``DecoderExitModel`` on an attention or Mamba backbone (its exit heads draft).
        input_ids: (b, t) left-padded prompts; attention_mask (b, t), 1 on real tokens.
        exit_layer: the exit that drafts (one of ``model.exit_layers``; default the deepest).
        draft_tokens: most tokens drafted per round (d); 0 with ``ngram_tokens``: n-gram drafts only
            (prompt lookup; a round without a match is a plain step).
        draft_confidence: stop a round's draft once no running row's exit is at least this sure
            of its draft (None: always draft d tokens).
        draft_rule: how sure an exit is: ``max_prob``, its top probability; ``token_confidence``,
            its confidence classifier's probability that its token is the full model's (fit them
            first: ``fit_exits`` / ``offramp fit-exits``).
        max_new_tokens: tokens per row (fewer if it emits EOS).
        sampling: EOS, padding, and sampling with temperature / top-p / seed (speculative sampling:
            the tokens are distributed as the full model's sampling draws them, though not the
            same draws); greedy by default. A repetition penalty is refused.
        draft_vocab: token ids the exit drafts among (``frequent_tokens``); None: the whole
            vocabulary. Drafting then reads only those rows of the LM head; the output is unchanged.
        ngram_tokens: draft up to this many tokens from n-gram matches (prompt lookup: what
            followed the latest earlier occurrence of the text's last ``ngram_size``..1 tokens, in
            the prompt or the text so far) in the rounds where every running row has a match, and
            from the exit otherwise; both are verified by the same pass (greedy only; 0: off).
        tokenizer: decodes ``texts`` when given.

    Returns:
        A ``GenerateOutput``: greedy decoding's tokens, or samples of the full model's
        distribution; ``extra["speculation"]`` holds the rounds, drafted and accepted tokens,
        acceptance and tokens per round.
    """
    sampling = sampling or SamplingOptions.from_model(model.backbone if hasattr(model, "backbone") else model)
    check_ngram(ngram_tokens, ngram_size, sampling, draft_tokens)
    e = check_speculation(model, sampling, draft_tokens or 1, draft_confidence,
                          exit_layer, draft_rule)
    vocab = check_draft_vocab(model, draft_vocab)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    check_inputs(model.adapter, input_ids, attention_mask, max_new_tokens, draft_cache_strategy(model.adapter))
    dev = model.adapter.layer_device(0)
    ids, attn = input_ids.to(dev), attention_mask.to(dev)
    start = time.perf_counter()
    spec = Speculator(model, e, ids, attn, max_new_tokens, draft_tokens, vocab, ngram_tokens)
    out = torch.full((ids.shape[0], max_new_tokens), sampling.pad_id, dtype=ids.dtype, device=dev)
    count = torch.zeros(ids.shape[0], dtype=torch.long, device=dev)
    gen = sampling.generator(dev)
    first = _first_token(spec.run.prefill(ids, attn), sampling, gen).to(dev)
    out[:, 0], count[:] = first, 1
    histories = None
    if ngram_tokens:  # each row's text on the host: the prompt's tokens and the first token
        histories = [[t for t, m in zip(row, keep) if m] + [f]
                     for row, keep, f in zip(ids.tolist(), attn.tolist(), first.tolist())]
    stats = _rounds(spec, first, out, count, draft_confidence, draft_rule, sampling, gen,
                    histories, ngram_tokens, ngram_size)
    settings = {"exit_layer": spec.exit_layer, "draft_tokens": draft_tokens, "draft_confidence": draft_confidence,
                "ngram_tokens": ngram_tokens,
                "draft_rule": draft_rule, "draft_vocab": None if vocab is None else vocab.numel(),
                "sampled": sampling.do_sample}
    return _output(spec, ids, out, count, time.perf_counter() - start, {**stats.to_dict(), **settings}, tokenizer)


def _rounds(spec: Speculator, first: Tensor, out: Tensor, count: Tensor, draft_confidence: float | None,
            draft_rule: str, sampling: SamplingOptions, gen: torch.Generator | None,
            histories: list[list[int]] | None = None, ngram_tokens: int = 0, ngram_size: int = 3) -> SpeculationStats:
    """Draft and verify, round after round, until every row has ended (EOS or max_new_tokens);
    each round's tokens go to ``out`` / ``count``; with ``histories``, n-gram drafts where every
    running row has one."""
    stats, p = SpeculationStats(), spec.run.prompt_len
    max_new, eos = out.shape[1], set(sampling.eos_ids)
    counts = [1] * out.shape[0]  # the rows' progress, kept on the host (the first token is written)
    done = [t in eos or 1 >= max_new for t in first.tolist()]
    pending = first
    next_pos = spec.run.pos[:, p - 1] + 1
    col = p
    while not all(done):
        live = [r for r, d in enumerate(done) if not d]
        rows = torch.tensor(live, device=pending.device)
        given = None
        if histories is not None:
            room = max_new - min(counts[r] for r in live)
            given = ngram_drafts(histories, live, ngram_tokens, ngram_size, room, pending.device)
            stats.ngram_rounds += given is not None
        best, accepted, k = spec.round(pending.index_select(0, rows), rows, next_pos.index_select(0, rows), col,
                                       draft_confidence, sampling, gen, draft_rule, given)
        stats.rounds += 1
        stats.row_rounds += len(live)
        stats.drafted += len(live) * k
        written, taken, most = _emit(live, best, accepted, out, counts, done, sampling, histories)
        stats.emitted += written
        stats.accepted += taken
        pending = pending.clone()
        pending[rows] = best.gather(1, accepted[:, None])[:, 0]  # the full model's next token
        next_pos[rows] += accepted + 1
        col += most + 1  # the next round starts after the last column any row kept: no row's tokens
        # are overwritten, and the columns every row rejected are reused (at batch 1 the cache has no holes)
    count.copy_(torch.tensor(counts, device=count.device))
    return stats


def _output(spec: Speculator, ids: Tensor, out: Tensor, count: Tensor, wall: float, speculation: dict[str, Any],
            tokenizer: Any) -> GenerateOutput:
    """The ``GenerateOutput`` of a speculation call: every emitted token ran every layer."""
    n = int(count.max())
    new = out[:, :n]
    layers = torch.where(torch.arange(n, device=out.device)[None] < count[:, None], spec.num_layers, 0)
    report = GenerateReport(new_tokens=int(count.sum()), layer_rows=spec.run.layer_rows, fill_layer_rows=0,
                            num_layers=spec.num_layers, wall_s=wall, extra_head_rows=spec.run.head_rows,
                            mean_exit_layer=float(spec.num_layers))
    texts = tokenizer.batch_decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return GenerateOutput(sequences=torch.cat([ids, new], dim=1), new_tokens=new, exit_layers=layers, report=report,
                          texts=texts, extra={"speculation": speculation})
