"""What a served classifier does, without the server: check a request, run a batch, keep metrics.

``ClassifyService`` is the replica's logic; ``offramp.serving.app`` puts it behind Ray Serve, whose
``serve.batch`` gathers the texts of concurrent requests into one batch. The service then runs
offramp's early-exit engine on that batch, so each row leaves at its own exit (the speed-up of
``offramp predict`` on a batch, for requests that arrive one by one). Rows asking for different
policies are run as one batch per policy.

A bad request raises ``RequestError`` (HTTP status and message) before any model work; the
replica keeps serving.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class RequestError(ValueError):
    """A request the server answers with ``status`` (4xx) and ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Item:
    """One text of a request, with the policy it asks for (None: the checkpoint's)."""

    text: str
    policy: str | None = None


class ClassifyService:
    """A classifier checkpoint ready to serve.

    Args:
        checkpoint: an ``offramp train`` output folder (or its ``checkpoint``).
        max_texts: the most texts one request may send.
        max_length: tokens per text (longer texts are truncated, as ``offramp predict`` does);
            default: the checkpoint's training length.
        max_chars: the longest text accepted (longer: 413), so one request cannot stall a replica.
        policies: extra named policies a request may choose (``{"fast": {"type": "entropy", ...}}``);
            every registered policy type is also accepted by its name, with its default parameters.
    """

    def __init__(self, checkpoint: str | Path, *, max_texts: int = 64, max_length: int | None = None,
                 max_chars: int = 100_000, policies: dict[str, dict] | None = None) -> None:
        from offramp import EarlyExitModel
        from offramp.cli import common
        from offramp.policies import make_policy

        if max_texts < 1:
            raise ValueError(f"max_texts must be >= 1, got {max_texts}")
        folder = common.checkpoint_dir(checkpoint)
        kind = common.checkpoint_kind(folder)
        if kind != "classifier":
            raise ValueError(f"{checkpoint} holds {kind!r}; `offramp serve` serves classifiers (`offramp train` "
                             "checkpoints)")
        self.model = EarlyExitModel.from_pretrained(folder).eval()
        self.tokenizer = common.tokenizer_of(self.model)
        self.max_texts, self.max_chars = max_texts, max_chars
        self.max_length = common.fit_max_length(
            self.model, max_length or self.model.config.extra.get("data", {}).get("max_length", 128),
            given=max_length is not None)
        self.default = make_policy(self.model.config.policy)
        self.named = {name: make_policy(spec) for name, spec in (policies or {}).items()}
        self.exits = Counter()
        self.latencies: list[float] = []
        self.requests = 0
        self.rows = 0
        self.batches = 0

    # ------------------------------------------------------------------ requests
    def policy_names(self) -> list[str]:
        from offramp.policies import POLICIES

        return sorted(set(self.named) | set(POLICIES))

    def resolve(self, name: str | None):
        """The policy a request names (None: the checkpoint's); ``RequestError`` 400 if unknown or
        if this model's exits cannot supply what it reads."""
        from offramp.engines.classify import model_signals
        from offramp.policies import POLICIES, make_policy, require_signals

        if name is None:
            return self.default
        if name in self.named:
            policy = self.named[name]
        elif name in POLICIES:
            try:
                policy = make_policy(name)
            except ValueError as e:
                raise RequestError(400, f"policy {name!r} needs parameters: {e}") from None
        else:
            raise RequestError(400, f"unknown policy {name!r}; known: {', '.join(self.policy_names())}")
        try:  # served rows have no labels: the oracle rule cannot run here
            require_signals(policy, model_signals(self.model) - {"labels"}, "a served request")
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        return policy

    def check(self, body: Any) -> list[Item]:
        """The items of a request body ``{"texts": [...], "policy": name?}`` (or ``{"text": "..."}``)."""
        if not isinstance(body, dict):
            raise RequestError(400, 'the body must be a JSON object: {"texts": ["..."], "policy": "entropy"}')
        unknown = set(body) - {"texts", "text", "policy"}
        if unknown:
            raise RequestError(400, f"unknown fields {sorted(unknown)}; send texts (or text) and an optional policy")
        if ("texts" in body) == ("text" in body):
            raise RequestError(400, 'send either "texts" (a list of strings) or "text" (one string)')
        texts = body["texts"] if "texts" in body else [body["text"]]
        if not isinstance(texts, list) or not texts:
            raise RequestError(400, '"texts" must be a non-empty list of strings')
        if len(texts) > self.max_texts:
            raise RequestError(413, f"{len(texts)} texts in one request; the server takes at most {self.max_texts} "
                                    "(send several requests: they are batched together)")
        for n, t in enumerate(texts, 1):
            if not isinstance(t, str) or not t.strip():
                raise RequestError(400, f"text {n} is empty: every input needs at least one non-space character")
            if len(t) > self.max_chars:
                raise RequestError(413, f"text {n} has {len(t)} characters; the server takes at most {self.max_chars} "
                                        f"(texts are cut to {self.max_length} tokens anyway)")
        policy = body.get("policy")
        if policy is not None and not isinstance(policy, str):
            raise RequestError(400, f'"policy" must be a policy name, got {type(policy).__name__}')
        self.resolve(policy)
        return [Item(t, policy) for t in texts]

    # ------------------------------------------------------------------ batches
    def run(self, items: list[Item]) -> list[dict[str, Any]]:
        """Classify ``items`` (the texts of possibly many requests): one early-exit batch per policy."""
        from offramp.data.batching import encode_texts

        t0 = time.perf_counter()
        out: list[dict[str, Any] | None] = [None] * len(items)
        groups: dict[str | None, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.policy, []).append(i)
        for name, idx in groups.items():
            policy = self.resolve(name)
            texts = [items[i].text for i in idx]
            enc = encode_texts(texts, self.tokenizer, max_length=self.max_length)
            pred = self.model.predict(enc["input_ids"], enc["attention_mask"], policy,
                                      token_type_ids=enc.get("token_type_ids"))
            for i, row in zip(idx, self.model.prediction_rows(texts, pred)):
                row.pop("text")
                out[i] = {**row, "policy": policy.type}
                self.exits[int(row["exit_layer"])] += 1
            self.batches += 1
        self.rows += len(items)
        self.latencies.append(time.perf_counter() - t0)
        del self.latencies[:-10_000]
        return out  # type: ignore[return-value]

    def metrics(self) -> dict[str, Any]:
        """Counts of exits per layer, requests, rows, batches, and batch latency percentiles (s)."""
        import numpy as np

        lat = np.array(self.latencies) if self.latencies else np.zeros(1)
        return {"requests": self.requests, "rows": self.rows, "batches": self.batches,
                "mean_batch_rows": self.rows / max(self.batches, 1),
                "exits_per_layer": {str(k): v for k, v in sorted(self.exits.items())},
                "batch_latency_s": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99))},
                "default_policy": self.default.to_dict(), "max_texts": self.max_texts}
