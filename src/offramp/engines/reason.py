"""Online reasoning engine: generate a chain of thought, stop at an accepted cue, force the answer.

The loop decodes greedily with a KV cache. After each token it looks for newly confirmed cue
events (``offramp.reasoning.cues``); at each one an exit rule decides whether to stop. On an exit
the cache is forked at the event's prefix, the answer-forcing text is appended and the answer is
generated greedily. Generation really stops there, so the savings are measured as generated
tokens and wall-clock, not replayed afterwards.

The exit decision is an ``ExitPolicy`` over cue events (``offramp.policies``), the protocol of the
classify and generate engines: the state starts once per chain and follows it across its events;
``index`` is the event number, ``layer`` the tokens generated before the event's fork point,
``hidden`` the cue features and ``trial`` a forced trial answer's mean token probability (computed
only for policies that read it). The rules:

* ``never``: the full chain (and, with a smaller ``max_new_tokens``, a fixed token budget);
* ``static`` (layer=N): stop at the first cue after N tokens (a budget aligned to a step boundary);
* ``deer``: DEER; a trial answer at each cue, exit when its mean token probability >= threshold;
* ``probe``: LYNX; the calibrated probe on the cue features, exit when its set is exactly {1}.

``replay_events`` (``offramp.reasoning.dataset``) runs the same ``decide`` over stored events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from offramp.policies import ExitPolicy, ExitSignals, make_policy, require_signals
from offramp.reasoning.cues import CueConfig, CueDetector, CueEvent
from offramp.reasoning.forcing import ForcedAnswer, force_answer, forcing_text, fork_cache, hidden_features, is_boxed
from offramp.reasoning.tasks import PROMPT_SUFFIX, Problem, extract_answer


@dataclass(frozen=True)
class ReasonConfig:
    """How to generate, where to look for cues, and how to force the answer.

    Attributes:
        cues: cue words and step boundaries.
        forcing: answer-forcing preset ("boxed", "r1", "plain") or literal text.
        max_new_tokens: the longest chain (a fixed token budget when set small).
        max_answer_tokens: the longest forced answer.
        feature_layers: ``hidden_states`` indices whose states at the cue token are concatenated
            (0 = embeddings, -1 = the last layer after the final norm).
        prompt_suffix: appended to the question in the user message.
    """

    cues: CueConfig = field(default_factory=CueConfig)
    forcing: str = "boxed"
    max_new_tokens: int = 512
    max_answer_tokens: int = 16
    feature_layers: tuple[int, ...] = (-1,)
    prompt_suffix: str = PROMPT_SUFFIX

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        if not self.feature_layers:
            raise ValueError("feature_layers is empty: give hidden_states indices, e.g. (8, 16, -1)")
        forcing_text(self.forcing)


@dataclass
class EventContext:
    """What an exit rule sees at a cue event; ``force()`` forks and forces an answer (cached)."""

    event: CueEvent
    features: Tensor  # (d,)
    _force: Callable[[], ForcedAnswer]
    forced: ForcedAnswer | None = None

    def force(self) -> ForcedAnswer:
        if self.forced is None:
            self.forced = self._force()
        return self.forced


SIGNALS = ("hidden", "trial")  # what the reasoning engine gives a policy at a cue event (and layer)


def trial_value(answer: ForcedAnswer) -> float:
    """``ExitSignals.trial`` of a forced answer: its mean token probability, -1 if empty or unclosed."""
    return float(answer.mean_prob) if (answer.complete and answer.text) else -1.0


def event_signals(policy: ExitPolicy, fork: int, features: Tensor, force: Callable[[], ForcedAnswer] | None,
                  info: dict[str, Any]) -> ExitSignals:
    """The signals of one cue event for ``policy`` (a trial answer forced only if the policy reads it)."""
    signals = ExitSignals(layer=int(fork), hidden=features.reshape(1, -1))
    if "trial" in policy.needs and force is not None:
        ans = force()
        signals.trial = torch.tensor([trial_value(ans)], dtype=torch.float64)
        info.update(trial=ans.text, mean_prob=ans.mean_prob, complete=ans.complete)
    return signals


@dataclass
class ReasonResult:
    """The outcome of one chain.

    ``tokens`` counts every generated token: the chain, the final answer and any trial answers
    (DEER). ``stop`` is "cue" (an exit rule accepted a cue), "eos" or "budget".
    """

    answer: str | None
    correct: bool | None
    chain: str
    tokens: int
    chain_tokens: int
    answer_tokens: int
    trial_tokens: int
    wall_s: float
    stop: str
    exit_event: int | None
    events: list[dict[str, Any]]
    chain_ids: list[int] = field(default_factory=list)  # token ids of ``chain``

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def prompt_ids(tokenizer, question: str, suffix: str = PROMPT_SUFFIX) -> list[int]:
    """Token ids of the prompt: the chat template when the tokenizer has one, else plain text."""
    if not question.strip():
        raise ValueError("the question is empty: pass the problem text")
    content = question + suffix
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                            add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    return list(tokenizer.encode(f"Question: {content}\nAnswer:", add_special_tokens=False))


def eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


class _Chain:
    """Mutable state of one generation: prompt length, cache, generated ids, text offsets."""

    def __init__(self, model, tokenizer, config: ReasonConfig, n_prompt: int, cache) -> None:
        self.model, self.tok, self.cfg = model, tokenizer, config
        self.n_prompt, self.cache = n_prompt, cache
        self.ids: list[int] = []
        self.ends: list[int] = []
        self.feats: list[Tensor] = []
        self.eos = eos_ids(tokenizer, model)
        self.forcing = forcing_text(config.forcing)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def force_at(self, n_gen: int) -> ForcedAnswer:
        """Fork after ``n_gen`` generated tokens and force the answer."""
        prefix = self.decode(self.ids[:n_gen])
        text = self.forcing.lstrip("\n ") if (not prefix or prefix.endswith("\n")) else self.forcing
        ids = list(self.tok.encode(text, add_special_tokens=False))
        cache = fork_cache(self.cache, self.n_prompt + n_gen)
        return force_answer(self.model, cache, ids, boxed=is_boxed(self.forcing), decode=self.decode,
                            eos_ids=self.eos, max_answer_tokens=self.cfg.max_answer_tokens)


@torch.no_grad()
def reason(model, tokenizer, problem: Problem | str, *, policy: str | dict | ExitPolicy | None = None,
           config: ReasonConfig | None = None,
           on_event: Callable[[EventContext], dict[str, Any]] | None = None) -> ReasonResult:
    """Generate a chain of thought for ``problem`` and stop at the first cue event ``policy`` accepts.

    Args:
        model: an HF causal LM (batch size 1, greedy decoding).
        tokenizer: its tokenizer.
        problem: a ``Problem`` (the answer is then checked) or the question text.
        policy: an exit policy over cue events (never, static, deer, probe); ``never`` (the full
            chain) by default. A policy that reads what cue events do not carry is refused first.
        config: generation, cue and forcing settings.
        on_event: called at every cue event before the decision (labelling, logging); the dict it
            returns goes into that event's log entry.

    Returns:
        The answer, its correctness (if a ``Problem``), tokens used, wall-clock and event log.
    """
    from transformers import DynamicCache

    config = config or ReasonConfig()
    policy = make_policy(policy)
    require_signals(policy, set(SIGNALS), "a chain of thought's cue events",
                    "use never, static (a token count), deer or probe")
    state = policy.start(1, 0)
    question = problem.question if isinstance(problem, Problem) else problem
    t0 = time.perf_counter()
    ids = prompt_ids(tokenizer, question, config.prompt_suffix)
    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    ch = _Chain(model, tokenizer, config, len(ids), cache)
    det = CueDetector(config.cues)
    log: list[dict[str, Any]] = []
    trial_tokens, stop, exit_ctx = 0, "budget", None
    while len(ch.ids) < config.max_new_tokens and exit_ctx is None:
        nxt = int(logits.argmax())
        if nxt in ch.eos:
            stop = "eos"
            break
        ch.ids.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True,
                    output_hidden_states=True, logits_to_keep=1)
        ch.feats.append(hidden_features(out.hidden_states, config.feature_layers))
        logits = out.logits[0, -1]  # (v,)
        text = ch.decode(ch.ids)
        ch.ends.append(max(len(text), ch.ends[-1] if ch.ends else 0))
        for ev in det.update(text, ch.ends):
            ctx = EventContext(ev, ch.feats[ev.token], lambda f=ev.fork: ch.force_at(f))
            info = dict(on_event(ctx)) if on_event is not None else {}
            signals = event_signals(policy, ev.fork, ctx.features, ctx.force, info)
            accept, state = policy.decide(ev.index, signals, state)
            info.update(policy.explain(ev.index, signals))
            leave = bool(accept[0])
            log.append({"index": ev.index, "token": ev.token, "fork": ev.fork, "kind": ev.kind,
                        "cue": ev.cue, "exit": bool(leave), **info})
            if leave:
                exit_ctx = ctx
                stop = "cue"
                break
            if ctx.forced is not None:
                trial_tokens += len(ctx.forced.token_ids)
    return _finish(ch, problem, exit_ctx, stop, trial_tokens, log, t0)


def _finish(ch: _Chain, problem, exit_ctx: EventContext | None, stop: str, trial_tokens: int,
            log: list[dict[str, Any]], t0: float) -> ReasonResult:
    """Read off the answer (forced at the exit, else stated in the chain, else forced at the end)."""
    answer_tokens = 0
    if exit_ctx is not None:
        forced = exit_ctx.force()
        answer, answer_tokens = forced.text, len(forced.token_ids)
        kept = ch.ids[: exit_ctx.event.fork]
    else:
        kept = ch.ids
        answer = extract_answer(ch.decode(kept)) if stop == "eos" else None
        if answer is None and ch.ids:
            forced = ch.force_at(len(ch.ids))
            answer, answer_tokens = forced.text, len(forced.token_ids)
    wall = time.perf_counter() - t0
    chain = ch.decode(kept)
    correct = problem.check(answer) if isinstance(problem, Problem) else None
    n = len(ch.ids)
    return ReasonResult(answer, correct, chain, n + answer_tokens + trial_tokens, n, answer_tokens,
                        trial_tokens, wall, stop, exit_ctx.event.index if exit_ctx else None, log, list(kept))
