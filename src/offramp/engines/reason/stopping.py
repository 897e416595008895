"""LYNX and DEER inside Hugging Face's own loop: a ``StoppingCriteria`` for ``model.generate``.

For users who keep ``model.generate`` (its logits processors, streamers, batching):

```python
stop = CueStoppingCriteria(model, tok, policy, attention_mask=enc.attention_mask, config=cfg)
out = model.generate(**enc, stopping_criteria=[stop], return_dict_in_generate=True, max_new_tokens=512)
results = stop.results(out)   # per row: answer (forced where the chain stopped), stop, events
stop.close()                  # removes the hooks
```

The criterion follows every row of the batch: it decodes the row's text, detects cue events
(``offramp.engines.reason.cues``) and calls the policy's ``decide`` at each, with the hidden states of
the cue token captured by forward hooks on the model's layers (the ``hidden_states`` indices of
``ReasonConfig.feature_layers``). A row whose policy accepts a cue stops (HF pads it from then
on). DEER's trial answers are forked from ``generate``'s live cache; ``results`` forces the
answers of the rows that stopped, all in one batch, from the cache ``generate`` returns
(``return_dict_in_generate=True``), without re-encoding.

The decisions are those of ``offramp.engines.reason.engine`` on the same chain. A cue whose last
character and its confirming character fall in the same token is decided one token later here
(that token's hidden state is computed by the next forward), so the chain may run one token
longer; its fork point, answer and decisions are the same.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import StoppingCriteria

from offramp.data.tasks import extract_answer
from offramp.engines.reason.cues import CueDetector, CueEvent
from offramp.engines.reason.engine import SIGNALS, ReasonConfig, eos_ids, event_signals, trial_value  # noqa: F401
from offramp.engines.reason.forcing import ForcedAnswer, force_answers, forcing_text, is_boxed
from offramp.engines.reason.rowcache import RowCache, input_device
from offramp.policies import ExitPolicy, make_policy, require_signals


def _feature_modules(model, layers: tuple[int, ...]) -> list[tuple[Any, str]]:
    """(module, "pre" | "post") whose input / output is ``hidden_states[i]`` for each feature index."""
    decoder = model.get_decoder()
    blocks = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    if blocks is None or norm is None:
        raise ValueError(f"{type(model).__name__} has no decoder .layers and .norm to hook: use offramp's own "
                         "engine (offramp.engines.reason.reason_batch) for it")
    n = len(blocks)
    out = []
    for i in layers:
        j = i + n + 1 if i < 0 else i
        if not 0 <= j <= n:
            raise ValueError(f"feature layer {i} is outside hidden_states 0..{n} (or -{n + 1}..-1)")
        out.append((blocks[0], "pre") if j == 0 else (norm, "post") if j == n else (blocks[j - 1], "post"))
    return out


class CueStoppingCriteria(StoppingCriteria):
    """Stop each row of ``model.generate`` at the first cue event ``policy`` accepts.

    Args:
        model, tokenizer: the HF causal LM ``generate`` runs and its tokenizer.
        policy: an exit policy over cue events (probe = LYNX, deer, static, never).
        attention_mask: (b, prompt length) of the prompts passed to ``generate`` (left padding).
        config: cues, forcing and feature layers (``ReasonConfig``; the probe's own for LYNX).
    """

    def __init__(self, model, tokenizer, policy: str | dict | ExitPolicy, *, attention_mask: Tensor,
                 config: ReasonConfig | None = None) -> None:
        self.model, self.tok, self.cfg = model, tokenizer, config or ReasonConfig()
        self.policy = make_policy(policy)
        require_signals(self.policy, set(SIGNALS), "a chain of thought's cue events",
                        "use never, static (a token count), deer or probe")
        mask = attention_mask.detach().cpu().long()
        self.pads = (mask == 0).sum(1)
        for i in range(mask.shape[0]):
            if mask[i, int(self.pads[i]):].min() < 1:
                raise ValueError("the prompts must be left-padded (tokenizer.padding_side = 'left'), as "
                                 "decoder-only generation needs")
        self.width = mask.shape[1]
        self.eos = eos_ids(tokenizer, model)
        self.forcing = forcing_text(self.cfg.forcing)
        b = mask.shape[0]
        self.detectors = [CueDetector(self.cfg.cues) for _ in range(b)]
        self.states = [self.policy.start(1, 0) for _ in range(b)]
        self.feats: list[list[Tensor]] = [[] for _ in range(b)]
        self.ends: list[list[int]] = [[] for _ in range(b)]
        self.pending: list[list[CueEvent]] = [[] for _ in range(b)]
        self.events: list[list[dict[str, Any]]] = [[] for _ in range(b)]
        self.exit: list[dict[str, Any] | None] = [None] * b
        self.forced: list[ForcedAnswer | None] = [None] * b
        self.trial_tokens = [0] * b
        self.generated = [0] * b  # tokens a row had generated when it stopped at a cue
        self.done = [False] * b
        self._captured: list[Tensor | None] = [None] * len(self.cfg.feature_layers)
        self._cache = None
        self._quiet = False
        modules = _feature_modules(model, self.cfg.feature_layers)  # (checked before any hook is added)
        self._hooks = [model.register_forward_pre_hook(self._grab_cache, with_kwargs=True)]
        for k, (module, when) in enumerate(modules):
            if when == "pre":
                self._hooks.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, k=k: self._grab(k, args[0] if args else kwargs["hidden_states"]),
                    with_kwargs=True))
            else:
                self._hooks.append(module.register_forward_hook(
                    lambda m, args, out, k=k: self._grab(k, out[0] if isinstance(out, tuple) else out)))

    # ------------------------------------------------------------------ hooks
    def _grab_cache(self, module, args, kwargs) -> None:
        if not self._quiet:
            self._cache = kwargs.get("cache", kwargs.get("past_key_values"))

    def _grab(self, k: int, hidden: Tensor) -> None:
        if not self._quiet:
            self._captured[k] = hidden[:, -1].detach().float()

    def close(self) -> None:
        """Remove the hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # ------------------------------------------------------------------ forced answers
    def _rows(self, cache) -> RowCache:
        width, device = cache.get_seq_length(), input_device(self.model)
        pads = self.pads.to(device)
        mask = (torch.arange(width, device=device)[None] >= pads[:, None]).long()
        return RowCache(cache, mask, width - pads)

    def _force(self, cache, items: list[tuple[int, int, list[int]]]) -> list[ForcedAnswer]:
        """Forced answers of (row, fork, generated ids) from ``cache`` (HF's), in one batch. Generated
        tokens the cache does not hold yet (``generate`` never feeds its last token) go in first."""
        rows = self._rows(cache)
        cached = rows.width - self.width  # generated tokens in the cache (the same for every row)
        forks = rows.fork(self.model, [r for r, _, _ in items],
                          [self.width - int(self.pads[r]) + min(f, cached) for r, f, _ in items])
        texts = []
        for _, f, ids in items:
            prefix = self.tok.decode(ids[:f], skip_special_tokens=True)
            text = self.forcing.lstrip("\n ") if (not prefix or prefix.endswith("\n")) else self.forcing
            texts.append(ids[min(f, cached):f] + list(self.tok.encode(text, add_special_tokens=False)))
        self._quiet = True
        try:
            return force_answers(self.model, forks, texts, boxed=is_boxed(self.forcing),
                                 decode=lambda x: self.tok.decode(x, skip_special_tokens=True), eos_ids=self.eos,
                                 max_answer_tokens=self.cfg.max_answer_tokens)
        finally:
            self._quiet = False

    # ------------------------------------------------------------------ the criterion
    def __call__(self, input_ids: Tensor, scores: Tensor | None = None, **kwargs: Any) -> Tensor:
        n = input_ids.shape[1] - self.width  # generated tokens so far
        stop = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if n >= 2 and all(c is not None for c in self._captured):  # the last forward ran generated token n-2
            step = torch.cat(self._captured, -1).cpu()  # (b, d)
            for i in range(len(self.done)):
                if len(self.feats[i]) == n - 2:
                    self.feats[i].append(step[i])
        ready: list[tuple[int, CueEvent]] = []
        gen = input_ids[:, self.width:].tolist()
        for i, ids in enumerate(gen):
            if self.done[i]:
                stop[i] = True
                continue
            if ids and ids[-1] in self.eos:
                self.done[i] = True
                continue
            text = None
            for k in range(len(self.ends[i]), len(ids)):  # each new token's end offset in the decoded text
                text = self.tok.decode(ids[: k + 1], skip_special_tokens=True)
                self.ends[i].append(max(len(text), self.ends[i][-1] if self.ends[i] else 0))
            if text is None:
                text = self.tok.decode(ids, skip_special_tokens=True)
            self.pending[i] += self.detectors[i].update(text, self.ends[i])
            while self.pending[i] and self.pending[i][0].token < len(self.feats[i]):
                ready.append((i, self.pending[i].pop(0)))
        trials: dict[tuple[int, int], ForcedAnswer] = {}
        if ready and "trial" in self.policy.needs and self._cache is not None:
            for (i, ev), ans in zip(ready, self._force(self._cache, [(i, ev.fork, gen[i]) for i, ev in ready])):
                trials[i, ev.index] = ans
        for i, ev in ready:
            if self.done[i]:
                continue
            info: dict[str, Any] = {}
            features = self.feats[i][ev.token]
            trial = trials.get((i, ev.index))
            signals = event_signals(self.policy, ev.fork, features, (lambda a=trial: a) if trial else None, info)
            accept, self.states[i] = self.policy.decide(ev.index, signals, self.states[i])
            info.update(self.policy.explain(ev.index, signals))
            entry = {"index": ev.index, "token": ev.token, "fork": ev.fork, "kind": ev.kind, "cue": ev.cue,
                     "exit": bool(accept[0]), **info}
            self.events[i].append(entry)
            if bool(accept[0]):
                self.exit[i], self.done[i], stop[i] = entry, True, True
                self.generated[i] = n
                self.forced[i] = trial
                self.pending[i] = []
            elif trial is not None:
                self.trial_tokens[i] += len(trial.token_ids)
        return stop

    # ------------------------------------------------------------------ after generate
    def results(self, output) -> list[dict[str, Any]]:
        """Per row of ``generate``'s output (``return_dict_in_generate=True``): the answer (forced at
        the accepted cue, else the chain's own boxed answer, else forced at the chain's end), ``stop``
        ("cue", "eos", "budget"), the kept chain's ids, the events and the token counts."""
        seqs = output.sequences if hasattr(output, "sequences") else output
        cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
        if cache is None:
            raise ValueError("results() forks the answers from generate's cache: call generate with "
                             "return_dict_in_generate=True")
        rows = []
        need: list[tuple[int, int, list[int]]] = []
        gen = seqs[:, self.width:].tolist()
        for i, ids in enumerate(gen):
            stop = "cue" if self.exit[i] else "budget"
            if stop == "budget" and any(t in self.eos for t in ids):
                stop, ids = "eos", ids[: next(k for k, t in enumerate(ids) if t in self.eos)]
            kept = ids[: self.exit[i]["fork"]] if self.exit[i] else ids
            answer = extract_answer(self.tok.decode(kept, skip_special_tokens=True)) if stop == "eos" else None
            rows.append({"stop": stop, "chain_ids": kept, "generated": self.generated[i] if self.exit[i] else len(ids),
                         "events": self.events[i],
                         "exit_event": self.exit[i]["index"] if self.exit[i] else None, "answer": answer,
                         "trial_tokens": self.trial_tokens[i]})
            if stop == "cue" and self.forced[i] is None:
                need.append((i, self.exit[i]["fork"], ids))
            elif stop != "cue" and answer is None and ids:
                need.append((i, len(ids), ids))
        answers = dict(zip([i for i, _, _ in need], self._force(cache, need))) if need else {}
        for i, row in enumerate(rows):
            forced = answers.get(i, self.forced[i] if row["stop"] == "cue" else None)
            if forced is not None:
                row["answer"], row["answer_tokens"] = forced.text, len(forced.token_ids)
            else:
                row["answer_tokens"] = 0
        return rows
