"""Continuous batching behind the server: one worker thread decodes every running prompt.

Requests ``submit`` a prompt (token ids, its policy, its sampling, its stop strings) with a callback;
the worker adds it to the running ``ContinuousBatch`` of its policy (or, for lossless
self-speculation, the running ``ContinuousSpeculation``) at the next step, and calls
back, from its thread, once per token (``{"token", "text", "exit_layer"}``, ``text`` the new piece)
and once at the end (``{"done": True, "text", "tokens", "exit_layers", "finish_reason"}``, where
``finish_reason`` is "stop" at EOS or a stop string and "length" at ``max_new_tokens``). A prompt
that arrives while others decode joins them at the next step; one that ends leaves at once.

A step that fails (a kernel error, not a bad request: those are refused before ``submit``) is not
allowed to fail its neighbours: every prompt of that batch is decoded again alone from its start
(the tokens it already sent are not sent twice), and only a prompt that fails alone gets an
``{"done": True, "error", "status"}`` event.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from offramp.engines.generate import ContinuousBatch, ContinuousSpeculation, SamplingOptions, generate
from offramp.engines.reason import ReasonBatch, reason
from offramp.names import NGRAM_TOKENS
from offramp.policies import ExitPolicy

Event = dict[str, Any]


@dataclass
class _Request:
    key: Hashable
    ids: list[int]
    max_new: int
    policy: ExitPolicy
    sampling: SamplingOptions
    stop: tuple[str, ...]
    emit: Callable[[Event], None]
    speculative: bool = False
    muted: bool = False  # re-run alone after a failed step: its tokens already sent are not sent again
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    sent: str = ""  # the text already handed out
    submitted: float = field(default_factory=time.perf_counter)


class GenerationScheduler:
    """The worker thread and the running batches (one per exit policy) of a served token-exits model.

    Args:
        model: the ``DecoderExitModel`` (or a plain causal LM).
        tokenizer: decodes the pieces.
        cache_strategy: the model's cache strategy.
        max_rows: the most prompts decoding at once per policy (more wait for a free row).
        static: static batching instead (queued prompts start only when the running batch has
            ended), to measure what continuous batching gains.
    """

    def __init__(self, model: Any, tokenizer: Any, *, cache_strategy: str | None, max_rows: int = 32,
                 static: bool = False) -> None:
        self.model, self.tokenizer, self.cache_strategy, self.max_rows = model, tokenizer, cache_strategy, max_rows
        self.static = static
        self.inbox: queue.Queue = queue.Queue()
        self.batches: dict[str, ContinuousBatch] = {}
        self.requests: dict[Hashable, _Request] = {}
        self.steps = 0
        self.rows_stepped = 0
        self.closed = False
        self._ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name="offramp-decoder", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------------ from the request side
    def submit(self, ids: list[int], max_new: int, policy: ExitPolicy, sampling: SamplingOptions,
               emit: Callable[[Event], None], stop: tuple[str, ...] = (), speculative: bool = False) -> Hashable:
        """Queue a prompt; returns its key (for ``cancel``). ``emit`` is called from the worker thread.
        ``speculative``: lossless self-speculation (greedy; ``policy`` is not used) in its own running batch."""
        key = next(self._ids)
        self.inbox.put(("add", _Request(key, list(ids), max_new, policy, sampling, tuple(s for s in stop if s), emit,
                                        speculative)))
        return key

    def cancel(self, key: Hashable) -> None:
        """Stop decoding a prompt whose client went away."""
        self.inbox.put(("cancel", key))

    def close(self) -> None:
        self.closed = True
        self.inbox.put(("close", None))

    def stats(self) -> dict[str, Any]:
        return {"running": sum(len(b.rows) for b in self.batches.values()),
                "queued": sum(len(b.queue) for b in self.batches.values()) + self.inbox.qsize(),
                "steps": self.steps, "mean_rows_per_step": self.rows_stepped / max(self.steps, 1)}

    # ------------------------------------------------------------------ the worker thread
    def _loop(self) -> None:
        while True:
            busy = any(len(b) for b in self.batches.values())
            try:
                op, arg = self.inbox.get(block=not busy)
            except queue.Empty:
                op = None
            while op is not None:
                if op == "close":
                    return
                self._apply(op, arg)
                try:
                    op, arg = self.inbox.get_nowait()
                except queue.Empty:
                    op = None
            for name in list(self.batches):
                self._step(name)

    def _apply(self, op: str, arg: Any) -> None:
        if op == "add":
            req: _Request = arg
            name = _batch_key(req)
            try:
                batch = self.batches.get(name)
                if batch is None:
                    batch = self.batches[name] = self._new_batch(req)
                batch.add(req.key, req.ids, req.max_new, sampling=req.sampling)
            except ValueError as e:
                req.emit({"done": True, "error": str(e), "status": 400})
                return
            self.requests[req.key] = req
        elif op == "cancel":
            req = self.requests.pop(arg, None)
            if req is not None:
                self.batches[_batch_key(req)].cancel(arg)

    def _new_batch(self, req: _Request) -> Any:
        if req.speculative:
            # n-gram drafts where every running row has a match, as `offramp generate --speculative`
            return ContinuousSpeculation(self.model, sampling=req.sampling, max_rows=self.max_rows,
                                         ngram_tokens=NGRAM_TOKENS)
        return ContinuousBatch(self.model, policy=req.policy, cache_strategy=self.cache_strategy,
                               max_rows=self.max_rows, static=self.static)

    def _step(self, name: str) -> None:
        batch = self.batches[name]
        if not len(batch):
            return
        try:
            tokens = batch.step()
        except Exception as error:  # a failure inside the batch: every prompt of it runs again alone
            del self.batches[name]
            for key in batch.keys:
                self._alone(self.requests.pop(key), error)
            return
        self.steps += 1
        self.rows_stepped += len(tokens)
        for t in tokens:
            req = self.requests.get(t.key)
            if req is None:
                continue
            if self._take(req, t.token, t.exit_layer, t.finished):
                self.requests.pop(t.key, None)
                if not t.finished:
                    batch.cancel(t.key)  # a stop string ended it

    def _take(self, req: _Request, token: int, exit_layer: int, last: bool) -> bool:
        """Hand out one token of ``req``; True when the request is done (its last token, or a stop string)."""
        req.tokens.append(token)
        req.exit_layers.append(exit_layer)
        eos = bool(req.sampling.is_eos(_tensor([token]))[0])
        text = self.tokenizer.decode(req.tokens, skip_special_tokens=True)
        stop_at = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if stop_at >= 0:
            text, last, reason = text[:stop_at], True, "stop"
        else:
            reason = "stop" if eos else "length"
        hold = max((len(s) - 1 for s in req.stop), default=0)  # a piece that may begin a stop string waits
        ready = text if last else (text[:len(text) - hold] if hold else text)
        if not last and (ready.endswith("\ufffd") or not ready.startswith(req.sent)):
            ready = req.sent  # a character still incomplete (or decoding revised it): wait
        piece, req.sent = ready[len(req.sent):] if ready.startswith(req.sent) else "", max(ready, req.sent, key=len)
        if not req.muted:
            req.emit({"token": token, "text": piece, "exit_layer": exit_layer})
        if last:
            req.emit({"done": True, "text": text, "tokens": req.tokens, "exit_layers": req.exit_layers,
                      "finish_reason": reason, "policy": "speculative" if req.speculative else req.policy.type})
        return last

    def _alone(self, req: _Request, error: BaseException) -> None:
        """Decode ``req`` alone from its start, sending only the tokens it had not sent."""
        sent = len(req.tokens)
        req.tokens, req.exit_layers, req.sent = [], [], ""
        try:
            policy = "never" if req.speculative else req.policy  # speculation's tokens are greedy decoding's
            out = generate(self.model, _tensor([req.ids]), None, policy=policy, cache_strategy=self.cache_strategy,
                           max_new_tokens=req.max_new, sampling=req.sampling)
        except Exception as e:  # it fails alone too: its own answer says so
            status = 400 if isinstance(e, ValueError) else 500
            req.emit({"done": True, "error": f"this input failed ({type(e).__name__}: {e}; the batch it ran in "
                                             f"failed with {type(error).__name__})", "status": status})
            return
        layers = out.exit_layers[0]
        tokens = out.new_tokens[0][layers > 0].tolist()
        for i, (tok, layer) in enumerate(zip(tokens, layers[layers > 0].tolist())):
            req.muted = i < sent
            if self._take(req, tok, layer, i == len(tokens) - 1):
                break


def _batch_key(req: _Request) -> str:
    """Rows share a running batch when they decode alike: the same exit policy, or speculation."""
    return "speculative" if req.speculative else json.dumps(req.policy.to_dict(), sort_keys=True, default=str)


def _tensor(values: list) -> Any:
    return torch.tensor(values)


class ReasonScheduler:
    """Continuous batching of chains of thought: one worker thread steps a ``ReasonBatch`` per
    (policy, settings); a question joins at the next step and leaves when its chain and answer are
    done. ``emit`` gets one event, ``{"done": True, "result": ReasonResult}`` (or ``{"done": True,
    "error", "status"}``), from the worker thread. A step that fails runs each of its chains again
    alone, so only a chain that fails alone gets an error."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8) -> None:
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.inbox: queue.Queue = queue.Queue()
        self.batches: dict[str, Any] = {}
        self.waiting: dict[Hashable, tuple[Any, Any, Any, Callable[[Event], None]]] = {}
        self.steps = 0
        self._ids = itertools.count()
        self.thread = threading.Thread(target=self._loop, name="offramp-reasoner", daemon=True)
        self.thread.start()

    def submit(self, question: str, policy: Any, config: Any, emit: Callable[[Event], None]) -> Hashable:
        key = next(self._ids)
        self.inbox.put((key, question, policy, config, emit))
        return key

    def close(self) -> None:
        self.inbox.put(None)

    def _loop(self) -> None:
        while True:
            busy = any(len(b) for b in self.batches.values())
            items = []
            try:
                items.append(self.inbox.get(block=not busy))
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for item in items:
                if item is None:
                    return
                key, question, policy, config, emit = item
                name = json.dumps([policy.to_dict(), dataclasses.asdict(config)], sort_keys=True, default=str)
                try:
                    batch = self.batches.get(name)
                    if batch is None:
                        batch = self.batches[name] = ReasonBatch(self.model, self.tokenizer, policy=policy,
                                                                 config=config, batch_size=self.batch_size)
                    batch.add(key, question)
                except ValueError as e:
                    emit({"done": True, "error": str(e), "status": 400})
                    continue
                self.waiting[key] = (question, policy, config, emit)
            for name in list(self.batches):
                self._step(name)

    def _step(self, name: str) -> None:
        batch = self.batches[name]
        if not len(batch):
            return
        try:
            done = batch.step()
        except Exception as error:  # every chain of the failed batch runs again alone
            del self.batches[name]
            for key in [k for k in self.waiting if k in set(batch.keys.values()) | {k for k, _ in batch.waiting}]:
                question, policy, config, emit = self.waiting.pop(key)
                try:
                    emit({"done": True, "result": reason(self.model, self.tokenizer, question, policy=policy,
                                                         config=config)})
                except Exception as e:  # it fails alone too
                    emit({"done": True, "error": f"this input failed ({type(e).__name__}: {e}; its batch failed "
                                                 f"with {type(error).__name__})",
                          "status": 400 if isinstance(e, ValueError) else 500})
            return
        self.steps += 1
        for key, result in done:
            entry = self.waiting.pop(key, None)
            if entry is not None:
                entry[3]({"done": True, "result": result})
