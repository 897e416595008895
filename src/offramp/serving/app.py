"""The HTTP application of ``offramp serve``: a Ray Serve deployment with dynamic batching.

Endpoints (JSON):

* ``POST /classify`` ``{"texts": ["...", ...], "policy": "entropy"}`` (``policy`` optional: the
  checkpoint's calibrated rule by default; a name from ``--policies`` or any registered policy)
  -> ``{"results": [{"label", "confidence", "exit_layer", "policy"}, ...]}``. Each text is one
  item of ``serve.batch``: the texts of concurrent requests run as one early-exit batch, and each
  row leaves at its own exit.
* ``POST /generate`` ``{"prompt": "...", "max_new_tokens": 32, "policy": "max_prob", "chat": false}``
  (or ``"prompts": [...]``) on a token-exits folder -> ``{"results": [{"text", "tokens",
  "exit_layers", "policy"}]}``: the prompts of concurrent requests decode as one ragged batch
  (one per generation length and policy), each token leaving at its own exit. With ``"stream":
  true`` the answer is NDJSON, one line per token as it is decoded (``{"index", "token", "text",
  "exit_layer"}``, ``text`` the new piece) and, when a prompt's generation ends, its result line
  (``{"index", "done": true, "text", "tokens", "exit_layers", "policy"}``); streamed requests
  batch with each other (``serve.batch`` over a generator).
* ``POST /reason`` ``{"question": "...", "policy": "probe"}`` on a probe folder of ``offramp reason
  fit`` (and the model it names) -> ``{"results": [{"answer", "tokens", "chain_tokens", "stop",
  "exit_event", "chain", "events", ...}]}``: chains of concurrent requests reason as one batch.
* ``GET /health`` -> ``{"status": "ok", "endpoints": {...}}`` (per endpoint: the default
  policy, the bound ``offramp calibrate`` stored with it, the named policies); ``GET /metrics``
  -> exits per layer (per cue event for /reason), rows, batches, batch latency of the replica
  that answers (Ray Serve's own Prometheus metrics cover every replica).

One server serves one checkpoint of each kind at once (``offramp serve CLASSIFIER EXITS PROBE``).

A bad request gets a 4xx with ``{"error": message}`` and the replica keeps serving: each request
is checked alone before it joins a batch (text that is valid Unicode, a length within the
model's positions, known fields and policies), and an input that still fails inside a batch is
run again alone, so it fails by itself and the batch's other requests are answered; Ray Serve
drains in-flight requests on shutdown (``graceful_shutdown_timeout_s``). Replicas scale out with
``num_replicas`` and, on a Ray cluster (``ray start --head`` on one machine, ``ray start
--address`` on the others), across machines.
"""

import asyncio  # (no postponed annotations: FastAPI reads the handlers' parameter types)
from dataclasses import dataclass, field
from typing import Any

from offramp.serving.service import (
    ClassifyService,
    GenerateService,
    ReasonService,
    RequestError,
    checkpoint_service_kind,
)


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
        max_new_tokens: the default length of a generation or a chain (None: 64 tokens for
            generation, the probe's setting for chains).
        model: the LM to load for a token-exits or probe folder instead of the one it names.
        dtype: the reasoning LM's dtype (``auto``: bfloat16 where the hardware computes it natively, else float32).
    """

    replicas: int = 1
    max_batch_size: int = 32
    batch_wait_ms: float = 5.0
    max_texts: int = 64
    threads: int = 1
    policies: dict[str, dict] = field(default_factory=dict)
    drain_s: float = 30.0
    max_new_tokens: int | None = None
    model: str | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("replicas", "max_batch_size", "max_texts", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.batch_wait_ms >= 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


def _service(checkpoint: str, opts: ServeOptions):
    """The service of ``checkpoint``, by its kind."""
    kind = checkpoint_service_kind(checkpoint)
    if kind == "classifier":
        return ClassifyService(checkpoint, max_texts=opts.max_texts, policies=opts.policies)
    if kind == "token_exits":
        return GenerateService(checkpoint, backbone=opts.model, max_prompts=opts.max_texts,
                               max_new_tokens=opts.max_new_tokens or 64, policies=opts.policies)
    return ReasonService(checkpoint, model=opts.model, dtype=opts.dtype, max_questions=opts.max_texts,
                         max_new_tokens=opts.max_new_tokens, policies=opts.policies)


ROUTES = {"classifier": "/classify", "token_exits": "/generate", "probe": "/reason"}


def check_checkpoints(checkpoints: list[str]) -> dict[str, str]:
    """{kind: checkpoint} of the folders to serve: one per kind (each kind has its endpoint)."""
    if not checkpoints:
        raise ValueError("give at least one checkpoint to serve")
    out: dict[str, str] = {}
    for c in checkpoints:
        kind = checkpoint_service_kind(c)
        if kind in out:
            raise ValueError(f"{out[kind]} and {c} are both {kind!r} checkpoints: serve one per kind (run another "
                             "server on another port for the second)")
        out[kind] = str(c)
    return out


async def _ndjson(streams: list):
    """One JSON line per line of ``streams`` (async iterators of lists of dicts, one per item of a
    request) as they come, the items' lines interleaved, each line's ``index`` the item's place
    in the request; a failure ends the answer with an ``{"error": ...}`` line."""
    import json

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, s) -> None:
        try:
            async for lines in s:
                for line in lines:
                    await merged.put({**line, "index": index})  # the service numbers items in its batch
                if lines and lines[-1].get("done"):
                    break
        except Exception as e:  # the worker failed: say so in the stream, which the client reads to its end
            await merged.put({"error": f"generation failed: {type(e).__name__}: {e}"})
        finally:
            await merged.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    left = len(tasks)
    while left:
        line = await merged.get()
        if line is None:
            left -= 1
        else:
            yield json.dumps(line) + "\n"
    await asyncio.gather(*tasks)


async def _stream_batch(pool: Any, service: Any, items: list):
    """The streamed generation of a batch: the decoder runs in the worker thread and hands over each
    step's lines; every yield gives each item of the batch its lines of that step ([] when it got
    no token), and StopIteration once its generation is done."""
    loop = asyncio.get_running_loop()
    steps: asyncio.Queue = asyncio.Queue()

    def work() -> None:
        try:
            service.stream(items, lambda u: loop.call_soon_threadsafe(steps.put_nowait, u))
        finally:
            loop.call_soon_threadsafe(steps.put_nowait, None)

    task = loop.run_in_executor(pool, work)
    done = [False] * len(items)
    while (updates := await steps.get()) is not None:
        out: list[Any] = [StopIteration if done[i] else updates.get(i, []) for i in range(len(items))]
        for i, lines in updates.items():
            done[i] = done[i] or bool(lines and lines[-1].get("done"))
        yield out
    await task  # the worker's error, if any, reaches every request of the batch


async def _checked_items(services: dict[str, Any], kind: str, request: Any) -> Any:
    """(body, items) of a request to the ``kind`` endpoint, or the JSON error response (404 for a
    kind this server does not serve, 400 for a body that is not JSON, the service's 4xx for a bad
    request) before any model work."""
    from fastapi.responses import JSONResponse

    service = services.get(kind)
    if service is None:
        routes = ", ".join(ROUTES[k] for k in services)
        return JSONResponse({"error": f"this server has no {kind!r} checkpoint; it serves {routes}"}, status_code=404)
    try:
        body = await request.json()
    except Exception as e:  # any undecodable body
        return JSONResponse({"error": f"the body is not valid JSON ({type(e).__name__}); see "
                                      f"GET /health for what {ROUTES[kind]} takes"}, status_code=400)
    try:
        items = service.check(body)
    except RequestError as e:
        return JSONResponse({"error": e.message}, status_code=e.status)
    except ValueError as e:  # a check the service leaves to the library (a tokenizer's, a chat template's)
        return JSONResponse({"error": f"bad request: {e}"}, status_code=400)
    service.requests += 1
    return body, items


def build_app(checkpoints: str | list[str], options: ServeOptions | None = None):
    """The Ray Serve application (bound deployment) serving ``checkpoints`` (one per kind):
    ``/classify``, ``/generate`` and ``/reason`` for the kinds given."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve

    opts = options or ServeOptions()
    served = check_checkpoints([checkpoints] if isinstance(checkpoints, str) else list(checkpoints))
    api = FastAPI(title="offramp", description="early-exit classification, generation and reasoning")

    @api.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        # whatever escapes a handler is answered in the documented shape, never a plain-text 500
        return JSONResponse({"error": f"the server failed on this request ({type(error).__name__}: {error})"},
                            status_code=500)

    @serve.deployment(num_replicas=opts.replicas, ray_actor_options={"num_cpus": 0},
                      graceful_shutdown_timeout_s=opts.drain_s, max_ongoing_requests=1000)
    @serve.ingress(api)
    class Offramp:
        def __init__(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            import torch

            torch.set_num_threads(opts.threads)
            _replica_grpc_on_loopback()
            self.services = {kind: _service(c, opts) for kind, c in served.items()}
            self.pool = ThreadPoolExecutor(max_workers=1)  # one batch at a time on this replica's cores

        async def _run(self, kind: str, items: list) -> list[dict[str, Any]]:
            # in a worker thread: the event loop keeps taking requests, which queue for the next batch
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.services[kind].run, items)

        @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_ms / 1000.0)
        async def _classify(self, items: list) -> list[dict[str, Any]]:
            return await self._run("classifier", items)

        @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_ms / 1000.0)
        async def _generate(self, items: list) -> list[dict[str, Any]]:
            return await self._run("token_exits", items)

        @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_ms / 1000.0)
        async def _reason(self, items: list) -> list[dict[str, Any]]:
            return await self._run("probe", items)

        @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_ms / 1000.0)
        async def _generate_stream(self, items: list):
            async for out in _stream_batch(self.pool, self.services["token_exits"], items):
                yield out

        async def _handle(self, kind: str, request: Request, batch, stream=None):
            checked = await _checked_items(self.services, kind, request)
            if isinstance(checked, JSONResponse):
                return checked
            body, items = checked
            if stream is not None and body.get("stream"):
                return StreamingResponse(_ndjson([stream(it) for it in items]), media_type="application/x-ndjson")
            results = list(await asyncio.gather(*(batch(it) for it in items)))
            for n, row in enumerate(results, 1):
                if "error" in row:  # this input failed inside its batch; the batch's other requests are answered
                    return JSONResponse({"error": f"input {n}: {row['error']}"}, status_code=row["status"])
            return {"results": results}

        @api.post("/classify")
        async def classify(self, request: Request):
            return await self._handle("classifier", request, self._classify)

        @api.post("/generate")
        async def generate(self, request: Request):
            return await self._handle("token_exits", request, self._generate, self._generate_stream)

        @api.post("/reason")
        async def reason(self, request: Request):
            return await self._handle("probe", request, self._reason)

        @api.get("/health")
        async def health(self):
            first = next(iter(self.services.values()))
            return {"status": "ok", "kind": first.kind, "checkpoint": served[first.kind],
                    "default_policy": first.health()["default_policy"], "policies": first.policy_names(),
                    "endpoints": {ROUTES[k]: {**s.health(), "checkpoint": served[k]} for k, s in self.services.items()}}

        @api.get("/metrics")
        async def metrics(self):
            if len(self.services) == 1:
                return next(iter(self.services.values())).metrics()
            return {ROUTES[k]: s.metrics() for k, s in self.services.items()}

    return Offramp.bind()


def serve_checkpoint(checkpoint: str | list[str], options: ServeOptions | None = None, *, host: str = "127.0.0.1",
                     port: int = 8000, address: str | None = None, blocking: bool = True,
                     ready: Any = None) -> str:
    """Start Ray (a local one, or join ``address``), Serve on ``host:port`` and the application of
    ``checkpoint`` (or several, one per kind); returns the base URL. ``blocking`` waits until
    interrupted (Ctrl-C or SIGTERM), then shuts down, draining the requests in flight. ``ready(url)``
    is called once the application answers requests."""
    import os

    check_port_free(host, port)
    if address is None:
        local_ray_on_loopback()
    import ray
    from ray import serve

    # on a busy machine the HTTP proxy takes longer than Ray's default 5 s to answer its first
    # checks, and Serve kills it while it starts. Ray also runs its workers (the replicas, the
    # proxy) at nice 15, below every other process, which on a shared machine costs served
    # throughput (serve_load.py: 22 -> 30 texts/s for one client); a local Ray started here runs
    # them at normal priority. The user's own settings win.
    for name, value in (("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60"),
                        ("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "30"), ("RAY_worker_niceness", "0")):
        os.environ.setdefault(name, value)
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": address} if address else {"include_dashboard": False}
        ray.init(log_to_driver=False, **kwargs)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(checkpoint, options), name="offramp", route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    if ready is not None:
        ready(url)
    if blocking:
        import signal
        import time

        def stop(*_: Any) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, stop)  # a service manager's stop drains too, as Ctrl-C does
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            _drain_and_stop()
    return url


def check_port_free(host: str, port: int) -> None:
    """A ValueError naming ``host:port`` and the fix when another process listens there, before Ray
    starts (Ray's own failure is a long traceback after its start)."""
    import errno
    import socket

    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ValueError(f"port {port} on {host} is in use (another server, or an earlier offramp serve "
                                 "still running): choose another --port, or stop that process") from None
            raise ValueError(f"cannot listen on {host}:{port} ({e.strerror}): check --host and --port") from None


def local_ray_on_loopback() -> None:
    """Make the Ray that ``offramp serve`` starts listen on 127.0.0.1 only: its GCS, raylet, workers,
    Serve controller and proxy, dashboard agent and metrics exporter bind every interface by default
    (on Linux Ray takes the machine's address as the node's). With the node on the loopback address,
    as Ray does on macOS and Windows, nothing is reachable from another host. A cluster
    (``--address``) keeps Ray's own settings, and so does a user who sets the variable."""
    import os
    import sys

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0":
        constants.ENABLE_RAY_CLUSTER = False  # ray was imported before: its node address is read at start


def _replica_grpc_on_loopback() -> None:
    """In a replica of a Ray whose node is on the loopback address (``local_ray_on_loopback``): bind the
    replica's inter-deployment gRPC server (which Ray Serve opens on every interface, "[::]:0",
    whatever the node's address) to 127.0.0.1 too. It starts after the deployment's constructor,
    which calls this; on a cluster nothing changes."""
    import ray
    from ray.serve._private import replica

    original = getattr(replica, "add_port_to_grpc_server", None)
    if ray.util.get_node_ip_address() != "127.0.0.1" or original is None or hasattr(original, "loopback"):
        return

    def on_loopback(server: Any, address: str) -> Any:
        return original(server, address.replace("[::]:", "127.0.0.1:", 1))

    on_loopback.loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = on_loopback


def _drain_and_stop() -> None:
    """Delete the application first (its replicas stop taking requests and finish the ones in
    flight, for up to ``drain_s``, while the HTTP proxies still carry their answers), then stop
    Serve. ``serve.shutdown`` alone stops the proxies at once and cuts answers still streaming."""
    from ray import serve

    try:
        serve.delete("offramp")
    finally:
        serve.shutdown()


def shutdown() -> None:
    """Stop the application (in-flight requests drain) and Ray; nothing when Ray is not running."""
    import ray

    if ray.is_initialized():
        _drain_and_stop()
        ray.shutdown()
