"""What a served checkpoint does, without the server: check a request, run a batch, keep metrics.

One service per checkpoint kind, each the replica's logic for one endpoint:

* ``ClassifyService`` (``/classify``, an ``offramp train`` checkpoint): texts in; label,
  confidence and exit layer out;
* ``GenerateService`` (``/generate``, a token-exits folder): a prompt in; the text and the exit
  layer of every generated token out;
* ``ReasonService`` (``/reason``, a probe folder of ``offramp reason fit``, with the model it was
  fitted on): a question in; the answer, the tokens used and where the chain stopped out.

``offramp.serving.app`` puts them behind Ray Serve, whose ``serve.batch`` gathers the items of
concurrent requests into one batch. The service runs offramp's engine on that batch, so each row
leaves at its own exit (the speed-up of a batch, for requests that arrive one by one). Items that
ask for different policies (or generation lengths) run as one batch each.

A bad request raises ``RequestError`` (HTTP status and message) before any model work; the
replica keeps serving.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from offramp.calibration.lynx import PROBE_FILE, load_policy, probe_policy
from offramp.data.prompts import chat_texts
from offramp.engines.classify import model_signals
from offramp.engines.generate import SIGNALS, SamplingOptions
from offramp.engines.reason import SIGNALS as REASON_SIGNALS
from offramp.engines.reason import ReasonConfig, check_chain_positions
from offramp.modeling import EarlyExitModel
from offramp.modeling.causal_lm import load_causal_lm, load_exits_and_lm
from offramp.modeling.checkpoints import checkpoint_kind, fit_max_length
from offramp.modeling.predict import predict_rows, tokenizer_of
from offramp.policies import POLICIES, make_policy, require_signals
from offramp.serving.scheduler import GenerationScheduler, ReasonScheduler
from offramp.utils import checkpoint_dir


class RequestError(ValueError):
    """A request the server answers with ``status`` (4xx) and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Item:
    """One input of a request, with the policy it asks for (None: the checkpoint's) and, for
    generation and reasoning, the most new tokens (None: the server's default); for generation
    its sampling (None: greedy) and the strings that end it."""

    text: str
    policy: str | None = None
    max_new_tokens: int | None = None
    sampling: Any = None
    stop: tuple[str, ...] = ()
    speculative: bool = False


class _Service:
    """What every service shares: the named policies a request may choose, and the counters it
    keeps (requests, rows, batches, exits, batch latency)."""

    named: dict[str, Any]

    def policy_names(self) -> list[str]:
        """The policy names a request to this service may give: exactly those ``resolve`` accepts."""
        return sorted(n for n in self._candidates() if self._accepts(n))

    def _candidates(self) -> set[str]:
        return set(self.named) | set(POLICIES)

    def _accepts(self, name: str) -> bool:
        try:
            self.resolve(name)
        except (RequestError, ValueError):
            return False
        return True

    def _start_metrics(self) -> None:
        self.exits: Counter = Counter()
        self.latencies: list[float] = []
        self.requests = self.rows = self.batches = 0

    def _record(self, rows: int, seconds: float) -> None:
        self.rows += rows
        self.latencies.append(seconds)
        del self.latencies[:-10_000]

    def _submit_all(self, items: list[Item], on: Callable[[int, dict[str, Any]], None]) -> None:
        """``submit`` every item to the running batch, pass each event to ``on(index, event)``, and
        return when every item is done (for callers without an event loop: tests, ``run``)."""
        import threading

        t0 = time.perf_counter()
        left, finished = [len(items)], threading.Event()

        def to(i: int) -> Callable[[dict[str, Any]], None]:
            def forward(event: dict[str, Any]) -> None:
                on(i, event)
                if event.get("done"):
                    left[0] -= 1
                    if not left[0]:
                        finished.set()
            return forward

        for i, item in enumerate(items):
            self.submit(item, to(i))  # type: ignore[attr-defined]
        finished.wait()
        self.batches = self.scheduler.steps  # type: ignore[attr-defined]
        self._record(0, time.perf_counter() - t0)

    def _base_metrics(self) -> dict[str, Any]:
        import numpy as np

        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {"requests": self.requests, "rows": self.rows, "batches": self.batches,
                "mean_batch_rows": self.rows / max(self.batches, 1),
                "exits_per_layer": {str(k): v for k, v in sorted(self.exits.items())},
                "batch_latency_s": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))}}


def _check_fields(body: Any, allowed: set[str], example: str) -> dict:
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object: {example}")
    unknown = set(body) - allowed
    if unknown:
        raise RequestError(400, f"unknown fields {sorted(unknown)}; this endpoint takes {sorted(allowed)}")
    return body


def _check_text(t: Any, n: int, what: str, max_chars: int, hint: str = "") -> str:
    if not isinstance(t, str):
        raise RequestError(400, f"{what} {n} must be a string, got {type(t).__name__} {str(t)[:40]!r}")
    if not t.strip():
        raise RequestError(400, f"{what} {n} is empty: every input needs at least one non-space character")
    if len(t) > max_chars:
        raise RequestError(413, f"{what} {n} has {len(t)} characters; the server takes at most {max_chars}{hint}")
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(400, f"{what} {n} is not valid Unicode: a lone surrogate (U+{ord(t[e.start]):04X}) at "
                                f"character {e.start}; JSON \\uD800-\\uDFFF escapes come in pairs (send the text "
                                "as UTF-8)") from None
    return t


def failed_row(error: BaseException) -> dict[str, Any]:
    """The result of an input that failed inside a batch: ``{"error", "status"}`` (400 for a
    ValueError, the library's bad-input error, else 500). Its neighbours in the batch are answered."""
    status = 400 if isinstance(error, ValueError) else 500
    return {"error": f"this input failed ({type(error).__name__}: {error})", "status": status}


def _each_alone_on_failure(groups: dict[Any, list[int]], run_group: Callable[[Any, list[int]], None],
                           fail: Callable[[int, BaseException], None]) -> None:
    """``run_group(key, indices)`` for each group; a group that raises runs again one item at a time,
    so an input that fails inside a batch fails alone (``fail(index, error)``) and the others
    are answered."""
    for key, idx in groups.items():
        try:
            run_group(key, idx)
            continue
        except Exception as e:  # any failure: find the item(s) that cause it
            if len(idx) == 1:
                fail(idx[0], e)
                continue
        for i in idx:
            try:
                run_group(key, [i])
            except Exception as e:  # this item alone fails: its answer says so
                fail(i, e)


def _check_count(body: dict, many: str, one: str, limit: int) -> list:
    if (many in body) == (one in body):
        raise RequestError(400, f'send either "{many}" (a list of strings) or "{one}" (one string)')
    items = body[many] if many in body else [body[one]]
    if not isinstance(items, list) or not items:
        raise RequestError(400, f'"{many}" must be a non-empty list of strings')
    if len(items) > limit:
        raise RequestError(413, f"{len(items)} {many} in one request; the server takes at most {limit} "
                                "(send several requests: they are batched together)")
    return items


def _check_policy_name(body: dict) -> str | None:
    policy = body.get("policy")
    if policy is not None and not isinstance(policy, str):
        raise RequestError(400, f'"policy" must be a policy name, got {type(policy).__name__}')
    return policy


def _check_max_new(body: dict, cap: int) -> int | None:
    n = body.get("max_new_tokens")
    if n is None:
        return None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(400, f'"max_new_tokens" must be a positive integer, got {n!r}')
    if n > cap:
        raise RequestError(413, f'"max_new_tokens" {n} is over the server\'s limit of {cap}')
    return n


def _bound(config: Any) -> dict[str, Any] | None:
    """What ``offramp calibrate`` stored about the checkpoint's policy (its bound, delta, epsilon,
    risk, n); None for a policy that was never calibrated."""
    record = (getattr(config, "extra", None) or {}).get("calibration")
    if not record:
        return None
    return {k: record[k] for k in ("bound", "risk", "delta", "epsilon", "n", "threshold") if k in record}


def _resolve_named(name: str | None, default: Any, named: dict[str, Any], signals: set[str], where: str) -> Any:
    """The policy a request names (None: ``default``); ``RequestError`` 400 if unknown or if it reads
    a signal ``signals`` lacks."""
    if name is None:
        return default
    if name in named:
        policy = named[name]
    elif name in POLICIES:
        try:
            policy = make_policy(name)
        except ValueError as e:
            raise RequestError(400, f"policy {name!r} needs parameters: {e}") from None
    else:
        known = sorted(set(named) | set(POLICIES))
        raise RequestError(400, f"unknown policy {name!r}; known: {', '.join(known)}")
    try:
        require_signals(policy, signals, where)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    return policy


class ClassifyService(_Service):
    """A classifier checkpoint ready to serve.

    Args:
        checkpoint: an ``offramp train`` output folder (or its ``checkpoint``).
        max_texts: the most texts one request may send.
        max_length: tokens per text (longer texts are truncated, as ``offramp predict`` does);
            default: the checkpoint's training length.
        max_chars: the longest text accepted (longer: 413), so one request cannot stall a replica.
        policies: extra named policies a request may choose (``{"fast": {"type": "entropy", ...}}``);
            every registered policy type is also accepted by its name, with its default parameters.
        device, dtype: where the model runs (auto, cpu, cuda, cuda:N) and its dtype (``--dtype``).
    """

    def __init__(self, checkpoint: str | Path, *, max_texts: int = 64, max_length: int | None = None,
                 max_chars: int = 100_000, policies: dict[str, dict] | None = None, device: str = "cpu",
                 dtype: str = "float32") -> None:
        if max_texts < 1:
            raise ValueError(f"max_texts must be >= 1, got {max_texts}")
        folder = checkpoint_dir(checkpoint)
        kind = checkpoint_kind(folder)
        if kind != "classifier":
            raise ValueError(f"{checkpoint} holds {kind!r}; `offramp serve` serves classifiers (`offramp train` "
                             "checkpoints)")
        self.model = EarlyExitModel.from_pretrained(folder, device=device, dtype=dtype).eval()
        self.tokenizer = tokenizer_of(self.model)
        self.max_texts, self.max_chars = max_texts, max_chars
        self.max_length = fit_max_length(
            self.model, max_length or self.model.config.extra.get("data", {}).get("max_length", 128),
            given=max_length is not None)
        self.default = make_policy(self.model.config.policy)
        self.named = {name: make_policy(spec) for name, spec in (policies or {}).items()}
        self._start_metrics()

    kind = "classifier"
    route = "/classify"

    # ------------------------------------------------------------------ requests
    def resolve(self, name: str | None):
        """The policy a request names (None: the checkpoint's); ``RequestError`` 400 if unknown or
        if this model's exits cannot supply what it reads."""
        # served rows have no labels: the oracle rule cannot run here
        return _resolve_named(name, self.default, self.named, model_signals(self.model) - {"labels"},
                              "a served request")

    def check(self, body: Any) -> list[Item]:
        """The items of a request body ``{"texts": [...], "policy": name?}`` (or ``{"text": "..."}``)."""
        body = _check_fields(body, {"texts", "text", "policy"}, '{"texts": ["..."], "policy": "entropy"}')
        texts = _check_count(body, "texts", "text", self.max_texts)
        for n, t in enumerate(texts, 1):
            _check_text(t, n, "text", self.max_chars, f" (texts are cut to {self.max_length} tokens anyway)")
        policy = _check_policy_name(body)
        self.resolve(policy)
        return [Item(t, policy) for t in texts]

    # ------------------------------------------------------------------ batches
    def run(self, items: list[Item]) -> list[dict[str, Any]]:
        """Classify ``items`` (the texts of possibly many requests): one early-exit batch per policy."""
        t0 = time.perf_counter()
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[str | None, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.policy, []).append(i)

        def run_group(name: str | None, idx: list[int]) -> None:
            policy = self.resolve(name)
            texts = [items[i].text for i in idx]
            rows = predict_rows(self.model, texts, policy, batch_size=len(texts), max_length=self.max_length,
                                warn=False)
            for i, row in zip(idx, rows):
                row.pop("text")
                out[i] = {**row, "policy": policy.type}
                self.exits[int(row["exit_layer"])] += 1
            self.batches += 1

        _each_alone_on_failure(groups, run_group, lambda i, e: out.__setitem__(i, failed_row(e)))
        self._record(len(items), time.perf_counter() - t0)
        return out  # type: ignore[return-value]

    def metrics(self) -> dict[str, Any]:
        """Counts of exits per layer, requests, rows, batches, and batch latency percentiles (s)."""
        return {**self._base_metrics(), "default_policy": self.default.to_dict(), "max_texts": self.max_texts}

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "route": self.route, "default_policy": self.default.to_dict(),
                "calibration": _bound(self.model.config), "policies": self.policy_names()}


class GenerateService(_Service):
    """A token-exits folder (``DecoderExitModel.save_pretrained``, ``offramp fit-exits``)
    ready to serve: generation with per-token exits, prompts of concurrent requests decoded in one
    continuously refilled batch (a prompt joins at the next step and leaves when it ends).

    Args:
        folder: the token-exits folder; the LM it names is loaded (``backbone`` overrides it).
        max_prompts: the most prompts one request may send.
        max_new_tokens: the default generation length; ``max_new_cap`` the most a request may ask.
        max_chars: the longest prompt accepted (413 beyond).
        policies: extra named policies (``{"fast": {"type": "max_prob", "threshold": 0.9}}``).
        max_rows: the most prompts decoding at once (per policy); more wait for a free row.
        static: static batching (a batch runs until its last prompt ends), to compare against.
        device, dtype: where the LM and its exits run (auto, cpu, cuda, cuda:N) and their dtype.
    """

    kind = "token_exits"
    route = "/generate"

    def __init__(self, folder: str | Path, *, backbone: str | None = None, max_prompts: int = 16,
                 max_new_tokens: int = 64, max_new_cap: int = 1024, max_chars: int = 100_000,
                 policies: dict[str, dict] | None = None, max_rows: int = 32, static: bool = False,
                 device: str = "cpu", dtype: str = "float32") -> None:
        if min(max_prompts, max_new_tokens, max_new_cap) < 1 or max_new_tokens > max_new_cap:
            raise ValueError(f"need max_prompts, max_new_tokens >= 1 and max_new_tokens <= max_new_cap, got "
                             f"{max_prompts}, {max_new_tokens}, {max_new_cap}")
        self.model, self.tokenizer = load_exits_and_lm(str(folder), backbone, dtype, device)
        self.model.eval()
        self.sampling = SamplingOptions.from_model(self.model.backbone, do_sample=False)
        self.max_prompts, self.max_new_tokens, self.max_new_cap = max_prompts, max_new_tokens, max_new_cap
        self.max_chars = max_chars
        self.default = make_policy(self.model.config.policy)
        self.named = {name: make_policy(spec) for name, spec in (policies or {}).items()}
        self._start_metrics()
        self.scheduler = GenerationScheduler(self.model, self.tokenizer, cache_strategy=self.model.config.cache_strategy,
                                             max_rows=max_rows, static=static)

    def resolve(self, name: str | None):
        policy = _resolve_named(name, self.default, self.named, set(SIGNALS), "token-exit generation")
        try:
            policy.check_exits(self.model.exit_layers)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        return policy

    def check(self, body: Any) -> list[Item]:
        """``{"prompts": [...]}`` or ``{"prompt": "..."}``, optional ``policy``, ``max_new_tokens``,
        ``chat`` (wrap each prompt in the model's chat template) and ``stream`` (the server's
        business: answer line by line as tokens are decoded)."""
        body = _check_fields(body, {"prompts", "prompt", "policy", "max_new_tokens", "chat", "stream", "speculative"},
                             '{"prompt": "...", "max_new_tokens": 32}')
        for flag in ("chat", "stream", "speculative"):
            if not isinstance(body.get(flag, False), bool):
                raise RequestError(400, f'"{flag}" must be true or false, got {body[flag]!r}')
        prompts = _check_count(body, "prompts", "prompt", self.max_prompts)
        for n, t in enumerate(prompts, 1):
            _check_text(t, n, "prompt", self.max_chars)
        chat = body.get("chat", False)
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, "this model's tokenizer has no chat template: send plain prompts (chat false)")
        policy, new = _check_policy_name(body), _check_max_new(body, self.max_new_cap)
        self.resolve(policy)
        prompts = chat_texts(self.tokenizer, prompts, chat)
        for n, p in enumerate(prompts, 1):
            self.prompt_tokens(p, new or self.max_new_tokens, f"prompt {n}")
        if body.get("speculative") and policy is not None:
            raise RequestError(400, '"speculative" decodes losslessly (greedy, every token checked by the full model): '
                                    'drop "policy"')
        return [Item(p, policy, new, speculative=body.get("speculative", False)) for p in prompts]

    def prompt_tokens(self, text: str, max_new: int, what: str = "the prompt") -> int:
        """The tokens of ``text``; a ``RequestError`` 413 when they and ``max_new`` new ones would run
        past the model's positions."""
        length = len(self.tokenizer(text)["input_ids"])
        limit = self.model.adapter.max_positions()
        if limit is not None and length + max_new > limit:
            raise RequestError(413, f"{what} has {length} tokens; with max_new_tokens {max_new} it needs "
                                    f"{length + max_new} positions, past the model's {limit}: shorten it or lower "
                                    "max_new_tokens")
        return length

    def submit(self, item: Item, emit: Callable[[dict[str, Any]], None]) -> Any:
        """Start decoding ``item`` in the running batch (it joins at the next step); ``emit`` gets its
        events from the decoding thread (``offramp.serving.scheduler``). Returns the key ``cancel`` takes."""
        policy = self.resolve(item.policy)
        ids = list(self.tokenizer(item.text)["input_ids"])

        def record(event: dict[str, Any]) -> None:
            if event.get("done") and "exit_layers" in event:
                self.exits.update(event["exit_layers"])
                self.rows += 1
            emit(event)

        return self.scheduler.submit(ids, item.max_new_tokens or self.max_new_tokens, policy,
                                     item.sampling or self.sampling, record, stop=item.stop,
                                     speculative=item.speculative)

    def cancel(self, key: Any) -> None:
        self.scheduler.cancel(key)

    def run(self, items: list[Item]) -> list[dict[str, Any]]:
        """Generate for ``items`` (each joins the running batch) and wait for every result:
        ``{"text", "tokens", "exit_layers", "finish_reason", "policy"}`` (or ``{"error", "status"}``)."""
        out: list[dict[str, Any] | None] = [None] * len(items)

        def keep(updates: dict[int, list[dict[str, Any]]]) -> None:
            for i, lines in updates.items():
                if lines[-1].get("done"):
                    out[i] = {k: v for k, v in lines[-1].items() if k not in ("index", "done")}

        self.stream(items, keep)
        return out  # type: ignore[return-value]

    def stream(self, items: list[Item], emit: Callable[[dict[int, list[dict[str, Any]]]], None]) -> None:
        """Generate for ``items`` as ``run`` does, calling ``emit({item: [lines]})`` for each token:
        ``{"index": item, "token": id, "text": piece, "exit_layer": l}`` and, when its generation
        ends, ``{"index": item, "done": true, "text", "tokens", "exit_layers", "finish_reason",
        "policy"}``. The pieces add up to the whole text (a piece is held back while it ends inside
        a character or may begin a stop string). Returns when every item is done."""
        self._submit_all(items, lambda i, event: emit({i: [{"index": i, **event}]}))

    def metrics(self) -> dict[str, Any]:
        stats = self.scheduler.stats()  # a "batch" is a decoding step of the running batch
        return {**self._base_metrics(), "batches": stats["steps"], "mean_batch_rows": stats["mean_rows_per_step"],
                "running": stats["running"], "queued": stats["queued"], "default_policy": self.default.to_dict(),
                "num_layers": self.model.adapter.num_layers, "exit_layers": list(self.model.exit_layers)}

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "route": self.route, "default_policy": self.default.to_dict(),
                "calibration": _bound(self.model.config), "policies": self.policy_names(),
                "max_new_tokens": self.max_new_tokens}


REASON_POLICIES = ("never", "static", "deer")  # policies a /reason request may name besides "probe"


class ReasonService(_Service):
    """A calibrated LYNX probe (``offramp reason fit`` folder) and the model it was fitted on, ready
    to serve: questions of concurrent requests reason as one batch of chains, each stopping at the
    first cue event its rule accepts (the probe's calibrated rule by default).

    Args:
        probe: the probe folder; its cue, forcing and feature settings are reused.
        model: the LM to load (default: the one the probe's events were built with).
        dtype: the LM's dtype (``auto``: bfloat16 where the hardware computes it natively, else float32).
        device: where it runs (auto, cpu, cuda, cuda:N).
        max_questions: the most questions one request may send.
        max_new_tokens: the longest chain by default (the probe's setting when None);
            ``max_new_cap`` the most a request may ask.
        policies: extra named policies (``{"deer": {"type": "deer", "threshold": 0.9}}``).
        max_rows: the most chains reasoning at once (per policy and length); more wait for a free row.
    """

    kind = "probe"
    route = "/reason"

    def __init__(self, probe: str | Path, *, model: str | None = None, dtype: str = "float32",
                 max_questions: int = 8, max_new_tokens: int | None = None, max_new_cap: int = 4096,
                 max_chars: int = 20_000, policies: dict[str, dict] | None = None, max_rows: int = 8,
                 device: str = "cpu") -> None:
        self.default = probe_policy(probe)
        extra = getattr(self.default.probe, "extra_", {}) or {}
        name = model or extra.get("model")
        if not name:
            raise ValueError(f"{probe} names no model: pass the model it was fitted on (--model NAME)")
        # the probe's own settings; served chains are greedy
        self.config = dataclasses.replace(ReasonConfig.from_dict(extra.get("reason_config") or {}), do_sample=False)
        if max_new_tokens is not None:
            self.config = dataclasses.replace(self.config, max_new_tokens=max_new_tokens)
        if max_questions < 1 or max_new_cap < self.config.max_new_tokens:
            raise ValueError(f"need max_questions >= 1 and max_new_cap >= {self.config.max_new_tokens}, got "
                             f"{max_questions}, {max_new_cap}")
        self.model_name = str(name)
        self.model, self.tokenizer = load_causal_lm(name, dtype, device)
        self.max_questions, self.max_new_cap, self.max_chars = max_questions, max_new_cap, max_chars
        self.named = {n: load_policy(spec) for n, spec in (policies or {}).items()}
        self._start_metrics()
        self.stops: Counter = Counter()
        self.tokens = 0
        self.scheduler = ReasonScheduler(self.model, self.tokenizer, batch_size=max_rows)

    def _candidates(self) -> set[str]:
        return {"probe", *REASON_POLICIES, *self.named}

    def resolve(self, name: str | None):
        if name in (None, "probe", "lynx"):
            return self.default
        if name not in self.named and name not in REASON_POLICIES:
            raise RequestError(400, f"unknown policy {name!r} for chains of thought; known: "
                                    f"{', '.join(self.policy_names())}")
        return _resolve_named(name, self.default, self.named, set(REASON_SIGNALS), "a chain of thought's cue events")

    def check(self, body: Any) -> list[Item]:
        """``{"questions": [...]}`` or ``{"question": "..."}``, optional ``policy`` and ``max_new_tokens``."""
        body = _check_fields(body, {"questions", "question", "policy", "max_new_tokens"},
                             '{"question": "...", "policy": "probe"}')
        questions = _check_count(body, "questions", "question", self.max_questions)
        for n, t in enumerate(questions, 1):
            _check_text(t, n, "question", self.max_chars)
        policy, new = _check_policy_name(body), _check_max_new(body, self.max_new_cap)
        self.resolve(policy)
        config = dataclasses.replace(self.config, max_new_tokens=new or self.config.max_new_tokens)
        try:
            check_chain_positions(self.model, self.tokenizer, questions, config)
        except ValueError as e:
            raise RequestError(413, str(e)) from None
        return [Item(q, policy, new) for q in questions]

    def submit(self, item: Item, emit: Callable[[dict[str, Any]], None]) -> Any:
        """Start the chain of ``item`` in the running batch of its policy and length (it joins at the
        next step); ``emit`` gets ``{"done": True, **result row}`` (or an error) from the worker thread."""
        policy = self.resolve(item.policy)
        config = dataclasses.replace(self.config, max_new_tokens=item.max_new_tokens or self.config.max_new_tokens)

        def done(event: dict[str, Any]) -> None:
            if "result" not in event:
                emit(event)
                return
            res = event["result"]
            row = res.to_dict()
            row.pop("correct", None)
            row.pop("chain_ids", None)
            self.rows += 1
            self.stops[res.stop] += 1
            self.tokens += res.tokens
            if res.exit_event is not None:
                self.exits[int(res.exit_event)] += 1
            emit({"done": True, **row, "policy": policy.type})

        return self.scheduler.submit(item.text, policy, config, done)

    def cancel(self, key: Any) -> None:
        """Chains are short and answered whole: a chain whose client went away finishes anyway."""

    def run(self, items: list[Item]) -> list[dict[str, Any]]:
        """Reason over ``items`` (each joins the running batch) and wait for every result."""
        out: list[dict[str, Any] | None] = [None] * len(items)
        self._submit_all(items, lambda i, event: out.__setitem__(i, {k: v for k, v in event.items() if k != "done"}))
        return out  # type: ignore[return-value]

    def metrics(self) -> dict[str, Any]:
        base = self._base_metrics()
        base["exit_events"] = base.pop("exits_per_layer")  # the cue event each stopped chain left at
        return {**base, "stops": dict(self.stops), "mean_tokens": self.tokens / max(self.rows, 1),
                "model": self.model_name, "default_policy": {"type": "probe", "path": self.default.path}}

    def health(self) -> dict[str, Any]:
        return {"kind": self.kind, "route": self.route, "model": self.model_name,
                "default_policy": {"type": "probe", "path": self.default.path,
                                   "delta": getattr(self.default.probe, "delta_", None),
                                   "per": getattr(self.default.probe, "per_", "event")},
                "policies": self.policy_names(), "max_new_tokens": self.config.max_new_tokens}


def checkpoint_service_kind(path: str | Path) -> str:
    """"classifier", "token_exits" or "probe" for a folder ``offramp serve`` can serve; a ValueError
    naming what it is otherwise."""
    p = Path(path)
    if (p / PROBE_FILE).is_file():
        return "probe"
    if not p.is_dir():
        raise ValueError(f"{p} is not a folder: give an `offramp train` output, a token-exits folder or a probe "
                         "folder of `offramp reason fit`")
    kind = checkpoint_kind(checkpoint_dir(p))
    if kind not in ("classifier", "token_exits"):
        raise ValueError(f"{p} holds {kind!r}, which `offramp serve` does not serve")
    return kind
