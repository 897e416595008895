"""The HTTP application of ``offramp serve``: a Ray Serve deployment with dynamic batching.

Endpoints (JSON):

* ``POST /classify`` ``{"texts": ["...", ...], "policy": "entropy"}`` (``policy`` optional: the
  checkpoint's calibrated rule by default; a name from ``--policies`` or any registered policy)
  -> ``{"results": [{"label", "confidence", "exit_layer", "policy"}, ...]}``. Each text is one
  item of ``serve.batch``: the texts of concurrent requests run as one early-exit batch, and each
  row leaves at its own exit.
* ``GET /health`` -> ``{"status": "ok", ...}``; ``GET /metrics`` -> exits per layer, rows, batches,
  batch latency of the replica that answers (Ray Serve's own Prometheus metrics cover every replica).

A bad request gets a 4xx with ``{"error": message}`` and the replica keeps serving; Ray Serve
drains in-flight requests on shutdown (``graceful_shutdown_timeout_s``). Replicas scale out with
``num_replicas`` and, on a Ray cluster (``ray start --head`` on one machine, ``ray start
--address`` on the others), across machines.
"""

import asyncio  # (no postponed annotations: FastAPI reads the handlers' parameter types)
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServeOptions:
    """How ``offramp serve`` runs a checkpoint.

    Attributes:
        replicas: model copies serving requests (each in its own process).
        max_batch_size: the most texts one batch runs (``serve.batch``).
        batch_wait_ms: how long a batch waits for more texts once it has one.
        max_texts: the most texts one request may send.
        threads: torch threads per replica.
        policies: named policies a request may choose, ``{"fast": {"type": "entropy", "threshold": 0.5}}``.
        drain_s: how long shutdown waits for requests in flight.
    """

    replicas: int = 1
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    max_texts: int = 64
    threads: int = 1
    policies: dict[str, dict] = field(default_factory=dict)
    drain_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("replicas", "max_batch_size", "max_texts", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


def build_app(checkpoint: str, options: ServeOptions | None = None):
    """The Ray Serve application (bound deployment) serving ``checkpoint``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    opts = options or ServeOptions()
    api = FastAPI(title="offramp", description="early-exit classification")

    @serve.deployment(num_replicas=opts.replicas, ray_actor_options={"num_cpus": 0},
                      graceful_shutdown_timeout_s=opts.drain_s, max_ongoing_requests=1000)
    @serve.ingress(api)
    class Classifier:
        def __init__(self) -> None:
            import torch

            from offramp.serving.service import ClassifyService

            from concurrent.futures import ThreadPoolExecutor

            torch.set_num_threads(opts.threads)
            self.service = ClassifyService(checkpoint, max_texts=opts.max_texts, policies=opts.policies)
            self.pool = ThreadPoolExecutor(max_workers=1)  # one batch at a time on this replica's cores

        @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_ms / 1000.0)
        async def _batch(self, items: list) -> list[dict[str, Any]]:
            # in a worker thread: the event loop keeps taking requests, which queue for the next batch
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.service.run, items)

        @api.post("/classify")
        async def classify(self, request: Request):
            from offramp.serving.service import RequestError

            try:
                body = await request.json()
            except Exception as e:  # any undecodable body
                return JSONResponse({"error": f"the body is not valid JSON ({type(e).__name__}): send "
                                              '{"texts": ["..."]}'}, status_code=400)
            try:
                items = self.service.check(body)
            except RequestError as e:
                return JSONResponse({"error": e.message}, status_code=e.status)
            self.service.requests += 1
            return {"results": list(await asyncio.gather(*(self._batch(it) for it in items)))}

        @api.get("/health")
        async def health(self):
            return {"status": "ok", "kind": "classifier", "checkpoint": checkpoint,
                    "default_policy": self.service.default.to_dict(), "policies": self.service.policy_names()}

        @api.get("/metrics")
        async def metrics(self):
            return self.service.metrics()

    return Classifier.bind()


def serve_checkpoint(checkpoint: str, options: ServeOptions | None = None, *, host: str = "127.0.0.1",
                     port: int = 8000, address: str | None = None, blocking: bool = True) -> str:
    """Start Ray (a local one, or join ``address``), Serve on ``host:port`` and the application;
    returns the base URL. ``blocking`` waits until interrupted, then shuts down (draining)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {"include_dashboard": False}
        ray.init(log_to_driver=False, **kwargs)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(checkpoint, options), name="offramp", route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    if blocking:
        import time

        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()
    return url


def shutdown() -> None:
    """Stop the application (in-flight requests drain) and Ray."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
