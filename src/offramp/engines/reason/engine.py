"""Online reasoning engine: generate a chain of thought, stop at an accepted cue, force the answer.

The loop decodes greedily with a KV cache. After each token it looks for newly confirmed cue
events (``offramp.engines.reason.cues``); at each one an exit rule decides whether to stop. On an exit
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

``replay_events`` (``offramp.evaluation.events``) runs the same ``decide`` over stored events.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from offramp.data.tasks import PROMPT_SUFFIX, Problem, extract_answer
from offramp.engines.generate.sampling import SamplingOptions, sampling_probs
from offramp.engines.reason.cues import CueConfig, CueDetector, CueEvent
from offramp.engines.reason.forcing import ForcedAnswer, force_answers, forcing_text, hidden_features, is_boxed
from offramp.engines.reason.rowcache import RowCache
from offramp.policies import ExitPolicy, ExitSignals, make_policy, require_signals
from offramp.policies.base import row_keys


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
        do_sample: sample the chain (temperature, top-p) instead of decoding greedily; forced
            answers are always greedy.
        temperature, top_p: the sampling distribution (HF's warpers).
        seed: with the prompt's tokens, seeds each chain's own sampler, so a chain samples the same
            tokens in any batch.
    """

    cues: CueConfig = field(default_factory=CueConfig)
    forcing: str = "boxed"
    max_new_tokens: int = 512
    max_answer_tokens: int = 16
    feature_layers: tuple[int, ...] = (-1,)
    prompt_suffix: str = PROMPT_SUFFIX
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.max_answer_tokens < 1:
            raise ValueError(f"max_answer_tokens must be >= 1, got {self.max_answer_tokens}")
        if not self.feature_layers:
            raise ValueError("feature_layers is empty: give hidden_states indices, e.g. (8, 16, -1)")
        forcing_text(self.forcing)
        SamplingOptions(temperature=self.temperature, top_p=self.top_p)  # the same checks as generation

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ReasonConfig":
        """The config stored as a dict (an event dataset's manifest, a probe's ``reason_config``);
        settings it lacks take their defaults, keys this release does not know are ignored."""
        import dataclasses

        d = {k: v for k, v in data.items() if k in {f.name for f in dataclasses.fields(cls)}}
        if isinstance(d.get("cues"), dict):
            cues = dict(d["cues"])
            if "words" in cues:
                cues["words"] = tuple(cues["words"])
            d["cues"] = CueConfig(**cues)
        if "feature_layers" in d:
            d["feature_layers"] = tuple(d["feature_layers"])
        return cls(**d)


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
        signals.trial = torch.tensor([trial_value(ans)], dtype=torch.float64, device=features.device)
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
    features: Tensor | None = None  # (events, d) the cue features of ``events`` (not in ``to_dict``)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "features"}


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


def chain_positions(tokenizer, question: str, config: ReasonConfig) -> int:
    """The most positions a chain for ``question`` can reach: its prompt, ``max_new_tokens`` of
    thought, the answer-forcing text and ``max_answer_tokens`` of answer."""
    forcing = len(tokenizer.encode(forcing_text(config.forcing), add_special_tokens=False))
    return len(prompt_ids(tokenizer, question, config.prompt_suffix)) + config.max_new_tokens + forcing + \
        config.max_answer_tokens


def check_chain_positions(model, tokenizer, questions: list[str], config: ReasonConfig) -> None:
    """A ValueError naming the first question whose chain could run past the model's positions
    (``max_position_embeddings``), and the fix, before any work."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not limit:
        return
    for n, q in enumerate(questions, 1):
        need = chain_positions(tokenizer, q, config)
        if need > limit:
            raise ValueError(f"question {n}'s chain could reach {need} positions (prompt + max_new_tokens "
                             f"{config.max_new_tokens} + the forced answer), past the model's {limit}: "
                             "shorten the question or lower max_new_tokens")


def eos_ids(tokenizer, model) -> set[int]:
    ids: set[int] = set()
    for src in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(i) for i in src)
    return ids


class _Chain:
    """Mutable state of one chain in the batch: its ids, text offsets, cue detector, policy state, log."""

    def __init__(self, index: int, problem, prompt: list[int], policy: ExitPolicy, config: ReasonConfig,
                 generator: torch.Generator | None) -> None:
        self.index, self.problem, self.prompt = index, problem, prompt
        self.ids: list[int] = []
        self.ends: list[int] = []
        self.feats: list[Tensor] = []
        self.det = CueDetector(config.cues)
        self.state = policy.start(1, 0)
        self.log: list[dict[str, Any]] = []
        self.contexts: list[EventContext] = []
        self.trial_tokens = 0
        self.stop = "budget"
        self.exit_ctx: EventContext | None = None
        self.generator = generator
        self.logits: Tensor | None = None  # (v,) the next token's logits
        self.t0 = time.perf_counter()


class _Engine:
    """The batch of running chains: one ``RowCache``, one model step for all, forced answers in batches."""

    def __init__(self, model, tokenizer, policy: ExitPolicy, config: ReasonConfig,
                 on_event: Callable[[EventContext], dict[str, Any]] | None, label_events: bool) -> None:
        self.model, self.tok, self.policy, self.cfg = model, tokenizer, policy, config
        self.on_event, self.label_events = on_event, label_events
        self.eos = eos_ids(tokenizer, model)
        self.forcing = forcing_text(config.forcing)
        self.rows = RowCache.empty_like(model)
        self.chains: list[_Chain] = []  # row i of ``rows`` is chains[i]
        self.sampling = SamplingOptions(do_sample=True, temperature=config.temperature, top_p=config.top_p) \
            if config.do_sample else None

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ forced answers
    def force(self, items: list[tuple[_Chain, int]]) -> list[ForcedAnswer]:
        """Forced answers after ``n`` generated tokens of each (chain, n), forked from the batch's cache
        (the chains must be running), decoded in batches as large as the running batch."""
        out: list[ForcedAnswer] = []
        size = max(1, len(self.chains))
        for lo in range(0, len(items), size):
            part = items[lo:lo + size]
            rows = [self.chains.index(ch) for ch, _ in part]
            forks = self.rows.fork(self.model, rows, [len(ch.prompt) + n for ch, n in part])
            texts = []
            for ch, n in part:
                prefix = self.decode(ch.ids[:n])
                text = self.forcing.lstrip("\n ") if (not prefix or prefix.endswith("\n")) else self.forcing
                texts.append(list(self.tok.encode(text, add_special_tokens=False)))
            out += force_answers(self.model, forks, texts, boxed=is_boxed(self.forcing), decode=self.decode,
                                 eos_ids=self.eos, max_answer_tokens=self.cfg.max_answer_tokens)
        return out

    # ------------------------------------------------------------------ joining and leaving
    def join(self, index: int, problem) -> None:
        question = problem.question if isinstance(problem, Problem) else problem
        ids = prompt_ids(self.tok, question, self.cfg.prompt_suffix)
        gen = None
        if self.sampling is not None:
            key = int(row_keys(torch.tensor([ids], device="cpu"))[0])  # on the host: the ids are a list
            gen = torch.Generator().manual_seed((key ^ (self.cfg.seed * 0x9E3779B97F4A7C15)) & ((1 << 63) - 1))
        ch = _Chain(index, problem, ids, self.policy, self.cfg, gen)
        one = RowCache.empty_like(self.model)
        ch.logits = one.step(self.model, torch.tensor([ids], device=one.device), logits_to_keep=1).logits[0, -1]
        self.rows = self.rows.merge(one)
        self.chains.append(ch)

    def finish(self, done: list[_Chain]) -> list[tuple[int, ReasonResult]]:
        """Force the answers the finished chains need (one batch), build their results, drop their rows."""
        need: list[tuple[_Chain, int]] = []
        for ch in done:
            if ch.exit_ctx is not None:
                if ch.exit_ctx.forced is None:
                    need.append((ch, ch.exit_ctx.event.fork))
            elif not (ch.stop == "eos" and extract_answer(self.decode(ch.ids)) is not None) and ch.ids:
                need.append((ch, len(ch.ids)))
            if self.label_events:
                need += [(ch, c.event.fork) for c in ch.contexts if c.forced is None]
        answers = dict(zip([(id(ch), n) for ch, n in need], self.force(need))) if need else {}
        results = []
        for ch in done:
            if self.label_events:
                for c, entry in zip(ch.contexts, ch.log):
                    if c.forced is None:
                        c.forced = answers[(id(ch), c.event.fork)]
                    entry.update(answer=c.forced.text, mean_prob=c.forced.mean_prob, complete=c.forced.complete,
                                 answer_tokens=len(c.forced.token_ids))
            if ch.exit_ctx is not None and ch.exit_ctx.forced is None:
                ch.exit_ctx.forced = answers[(id(ch), ch.exit_ctx.event.fork)]
            results.append((ch.index, self._result(ch, answers.get((id(ch), len(ch.ids))))))
        gone = {id(ch) for ch in done}
        keep = [i for i, ch in enumerate(self.chains) if id(ch) not in gone]
        self.rows.keep(keep)
        self.chains = [self.chains[i] for i in keep]
        return results

    def _result(self, ch: _Chain, end_answer: ForcedAnswer | None) -> ReasonResult:
        answer_tokens = 0
        if ch.exit_ctx is not None:
            forced = ch.exit_ctx.forced
            answer, answer_tokens = forced.text, len(forced.token_ids)
            kept = ch.ids[: ch.exit_ctx.event.fork]
        else:
            kept = ch.ids
            answer = extract_answer(self.decode(kept)) if ch.stop == "eos" else None
            if answer is None and end_answer is not None:
                answer, answer_tokens = end_answer.text, len(end_answer.token_ids)
        wall = time.perf_counter() - ch.t0
        correct = ch.problem.check(answer) if isinstance(ch.problem, Problem) else None
        n = len(ch.ids)
        feats = torch.stack([c.features for c in ch.contexts]) if ch.contexts else None
        return ReasonResult(answer, correct, self.decode(kept), n + answer_tokens + ch.trial_tokens, n,
                            answer_tokens, ch.trial_tokens, wall, ch.stop,
                            ch.exit_ctx.event.index if ch.exit_ctx else None, ch.log, list(kept), feats)

    # ------------------------------------------------------------------ one decoding step
    def picks(self) -> list[int]:
        """Every chain's next token: greedy ones in one transfer from the device; sampled ones drawn
        with each chain's own generator (on the host, where it lives)."""
        if not self.chains:
            return []
        if self.sampling is None:
            return torch.stack([ch.logits for ch in self.chains]).argmax(-1).tolist()
        out = []
        for ch in self.chains:
            probs = sampling_probs(ch.logits[None], self.sampling)[0].cpu()
            out.append(int(torch.multinomial(probs, 1, generator=ch.generator)))
        return out

    def step(self) -> list[tuple[int, ReasonResult]]:
        """Pick every chain's next token, retire the chains that end, run one step, decide at cue events."""
        done, going = [], []
        picked = self.picks()
        for ch, nxt in zip(self.chains, picked):
            if len(ch.ids) >= self.cfg.max_new_tokens:
                done.append(ch)
                continue
            if nxt in self.eos:
                ch.stop = "eos"
                done.append(ch)
                continue
            ch.ids.append(nxt)
            going.append(ch)
        results = self.finish(done) if done else []
        if not going:
            return results
        tokens = torch.tensor([[ch.ids[-1]] for ch in self.chains], device=self.rows.device)
        out = self.rows.step(self.model, tokens, output_hidden_states=True, logits_to_keep=1)
        new: list[EventContext] = []
        for i, ch in enumerate(self.chains):
            ch.feats.append(hidden_features(out.hidden_states, self.cfg.feature_layers, i))
            ch.logits = out.logits[i, -1]
            text = self.decode(ch.ids)
            ch.ends.append(max(len(text), ch.ends[-1] if ch.ends else 0))
            for ev in ch.det.update(text, ch.ends):
                ctx = EventContext(ev, ch.feats[ev.token], lambda c=ch, f=ev.fork: self.force([(c, f)])[0])
                ctx.chain = ch  # type: ignore[attr-defined]
                new.append(ctx)
        if new and "trial" in self.policy.needs:  # every new event's trial answer, in one batch
            for ctx, ans in zip(new, self.force([(ctx.chain, ctx.event.fork) for ctx in new])):
                ctx.forced = ans
        exits = []
        for ctx in new:
            ch = ctx.chain
            if ch.exit_ctx is not None:
                continue  # this chain stopped at an earlier event of the same step
            info = dict(self.on_event(ctx)) if self.on_event is not None else {}
            signals = event_signals(self.policy, ctx.event.fork, ctx.features, ctx.force, info)
            accept, ch.state = self.policy.decide(ctx.event.index, signals, ch.state)
            info.update(self.policy.explain(ctx.event.index, signals))
            ev = ctx.event
            ch.log.append({"index": ev.index, "token": ev.token, "fork": ev.fork, "kind": ev.kind,
                           "cue": ev.cue, "exit": bool(accept[0]), **info})
            ch.contexts.append(ctx)
            if bool(accept[0]):
                ch.exit_ctx, ch.stop = ctx, "cue"
                exits.append(ch)
            elif ctx.forced is not None:
                ch.trial_tokens += len(ctx.forced.token_ids)
        return results + (self.finish(exits) if exits else [])


def _problems_arg(problems) -> list:
    items = list(problems)
    for i, p in enumerate(items):
        if not isinstance(p, (Problem, str)):
            raise ValueError(f"problem {i} is a {type(p).__name__}: pass Problem objects or question strings")
        if not (p.question if isinstance(p, Problem) else p).strip():
            raise ValueError(f"problem {i}: the question is empty: pass the problem text")
    return items


@torch.no_grad()
def iter_reason(model, tokenizer, problems, *, policy: str | dict | ExitPolicy | None = None,
                config: ReasonConfig | None = None, batch_size: int = 8,
                on_event: Callable[[EventContext], dict[str, Any]] | None = None,
                label_events: bool = False) -> Iterator[tuple[int, ReasonResult]]:
    """Reason over ``problems`` in a continuously refilled batch; yield (index, result) as chains end.

    Up to ``batch_size`` chains decode together, one model step for all. Cue detection and the exit
    decision are per chain; the forced answers of every chain that stops at a step (and the trial
    answers DEER needs at the cue events of a step) are decoded as one batch, forked from the
    chains' own cache rows. A finished chain leaves the batch and the next problem joins it, so the
    batch stays full. Each chain's tokens, events, decisions and answer are those it gets alone.

    Args:
        model, tokenizer: an HF causal LM whose layers are all full attention, and its tokenizer.
        problems: ``Problem`` objects (answers are checked) or question strings.
        policy, config, on_event: as in ``reason``.
        batch_size: the most chains decoding at once.
        label_events: force the answer at every cue event of every chain (after the chain ends, in
            batches) and put it into the event's log entry (``answer``, ``mean_prob``, ``complete``,
            ``answer_tokens``);
            ``offramp reason build`` labels its events this way.
    """
    config = config or ReasonConfig()
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = _problems_arg(problems)
    policy = make_policy(policy)
    require_signals(policy, set(SIGNALS), "a chain of thought's cue events",
                    "use never, static (a token count), deer or probe")
    check_chain_positions(model, tokenizer, [p.question if isinstance(p, Problem) else p for p in items], config)
    eng = _Engine(model, tokenizer, policy, config, on_event, label_events)
    queue = list(enumerate(items))[::-1]
    while queue or eng.chains:
        while queue and len(eng.chains) < batch_size:
            eng.join(*queue.pop())
        yield from eng.step()


class ReasonBatch:
    """Chains that join a running batch between steps (a server's continuous batching): ``add`` a
    question (or ``Problem``) under a key; each ``step`` joins what waits (up to ``batch_size``
    chains decode together), decodes one token for every chain and returns ``(key, ReasonResult)``
    for each chain that ended. Each chain's tokens, events, decisions and answer are those it gets
    alone (as in ``iter_reason``, which runs the same engine on a fixed list)."""

    def __init__(self, model, tokenizer, *, policy: str | dict | ExitPolicy | None = None,
                 config: ReasonConfig | None = None, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.config = config or ReasonConfig()
        self.policy = make_policy(policy)
        require_signals(self.policy, set(SIGNALS), "a chain of thought's cue events",
                        "use never, static (a token count), deer or probe")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.engine = _Engine(model, tokenizer, self.policy, self.config, None, False)
        self.waiting: list[tuple[Any, Any]] = []
        self.keys: dict[int, Any] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self.engine.chains) + len(self.waiting)

    def add(self, key: Any, problem) -> None:
        """Queue a chain; its positions are checked now (a ValueError before any work)."""
        question = problem.question if isinstance(problem, Problem) else problem
        check_chain_positions(self.model, self.tokenizer, [question], self.config)
        self.waiting.append((key, problem))

    def step(self) -> list[tuple[Any, ReasonResult]]:
        while self.waiting and len(self.engine.chains) < self.batch_size:
            key, problem = self.waiting.pop(0)
            self.keys[self._next] = key
            self.engine.join(self._next, problem)
            self._next += 1
        if not self.engine.chains:
            return []
        return [(self.keys.pop(i), res) for i, res in self.engine.step()]


def reason_batch(model, tokenizer, problems, *, policy: str | dict | ExitPolicy | None = None,
                 config: ReasonConfig | None = None, batch_size: int = 8,
                 on_event: Callable[[EventContext], dict[str, Any]] | None = None,
                 label_events: bool = False) -> list[ReasonResult]:
    """``iter_reason``'s results in the order of ``problems``."""
    out: dict[int, ReasonResult] = {}
    for i, res in iter_reason(model, tokenizer, problems, policy=policy, config=config, batch_size=batch_size,
                              on_event=on_event, label_events=label_events):
        out[i] = res
    return [out[i] for i in range(len(out))]


def reason(model, tokenizer, problem: Problem | str, *, policy: str | dict | ExitPolicy | None = None,
           config: ReasonConfig | None = None,
           on_event: Callable[[EventContext], dict[str, Any]] | None = None) -> ReasonResult:
    """Generate a chain of thought for ``problem`` and stop at the first cue event ``policy`` accepts.

    Args:
        model: an HF causal LM (one chain; ``reason_batch`` runs many together).
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
    return reason_batch(model, tokenizer, [problem], policy=policy, config=config, batch_size=1,
                        on_event=on_event)[0]
