"""The HTTP application of ``offramp serve``: a Ray Serve deployment with dynamic batching.

Endpoints (JSON):

* ``POST /classify`` ``{"texts": ["...", ...], "policy": "entropy"}`` (``policy`` optional: the
  checkpoint's calibrated rule by default; a name from ``--policies`` or any registered policy)
  -> ``{"results": [{"label", "confidence", "exit_layer", "policy"}, ...]}``. Each text is one
  item of ``serve.batch``: the texts of concurrent requests run as one early-exit batch, and each
  row leaves at its own exit.
* ``POST /generate`` ``{"prompt": "...", "max_new_tokens": 32, "policy": "max_prob", "chat": false}``
  (or ``"prompts": [...]``) on a token-exits folder -> ``{"results": [{"text", "tokens",
  "exit_layers", "finish_reason", "policy"}]}``: every prompt joins the running batch of its policy at
  the next step and leaves it when it ends (continuous batching, ``offramp.serving.scheduler``),
  each token leaving at its own exit. With ``"stream":
  true`` the answer is NDJSON, one line per token as it is decoded (``{"index", "token", "text",
  "exit_layer"}``, ``text`` the new piece) and, when a prompt's generation ends, its result line
  (``{"index", "done": true, "text", "tokens", "exit_layers", "finish_reason", "policy"}``);
  streamed and whole answers share the running batch.
* ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``: the OpenAI API
  (``offramp.serving.openai_api``) on the token-exits model, and chat on the reasoning model, whose
  chain stops where ``offramp.stop_thinking`` says; streamed as server-sent events.
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
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from offramp.devices import resolve_device
from offramp.engines.generate import SamplingOptions
from offramp.engines.reason import prompt_ids
from offramp.serving import openai_api
from offramp.serving.service import (
    ClassifyService,
    GenerateService,
    Item,
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
        dtype: every served model's dtype (``auto``: bfloat16 where the hardware computes it natively, else
            float32).
        device: where the replicas run: ``auto`` (a GPU when Ray sees one), ``cpu`` or ``cuda``; on GPUs
            Ray gives each replica one (a share of one when there are more replicas than GPUs).
        batching: generation's batching: "continuous" (a prompt joins the running batch at the next
            step) or "static" (a batch runs until its last prompt ends; to compare against).
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
    device: str = "auto"
    batching: str = "continuous"

    def __post_init__(self) -> None:
        if self.batching not in ("continuous", "static"):
            raise ValueError(f"batching must be continuous or static, got {self.batching!r}")
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
    device = replica_device(opts.device)
    if kind == "classifier":
        return ClassifyService(checkpoint, max_texts=opts.max_texts, policies=opts.policies, device=device,
                               dtype=opts.dtype)
    if kind == "token_exits":
        return GenerateService(checkpoint, backbone=opts.model, max_prompts=opts.max_texts,
                               max_new_tokens=opts.max_new_tokens or 64, policies=opts.policies,
                               max_rows=opts.max_batch_size, static=opts.batching == "static", device=device,
                               dtype=opts.dtype)
    return ReasonService(checkpoint, model=opts.model, dtype=opts.dtype, max_questions=opts.max_texts,
                         max_new_tokens=opts.max_new_tokens, policies=opts.policies,
                         max_rows=opts.max_batch_size, device=device)


def replica_gpus(device: str, replicas: int) -> float:
    """The GPUs Ray reserves for each replica: none on the CPU; one each while there are enough,
    else an equal share of those this machine has. A GPU this machine lacks is an error naming the fix."""
    import torch

    if resolve_device(device).type != "cuda":
        return 0.0
    return min(1.0, torch.cuda.device_count() / replicas)


def replica_device(device: str) -> str:
    """The device a replica loads its models on: inside a Ray replica the GPU Ray gave it is its
    ``cuda`` (Ray sets CUDA_VISIBLE_DEVICES), whichever index the command named."""
    return "cuda" if str(device).startswith("cuda") else device


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
    """One JSON line per event of ``streams`` (async iterators of event dicts, one per item of a
    request) as they come, the items' events interleaved, each line's ``index`` the item's place in
    the request; a failure ends that item with an ``{"error": ...}`` line."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, s) -> None:
        try:
            async for event in s:
                await merged.put({**event, "index": index})
        except Exception as e:  # the worker failed: say so in the stream, which the client reads to its end
            await merged.put({"index": index, "done": True, "error": f"generation failed: {type(e).__name__}: {e}"})
        finally:
            await merged.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    left = len(tasks)
    try:
        while left:
            line = await merged.get()
            if line is None:
                left -= 1
            else:
                yield json.dumps(line) + "\n"
    finally:
        for t in tasks:
            t.cancel()  # a client that went away: its rows stop decoding


async def _row_lines(service: Any, item: Any):
    async for event in _row_events(service, item):
        yield event


async def _openai_stream(service: Any, item: Any, req: Any, prompt_tokens: int, num_layers: int):
    """Server-sent events of one completion in OpenAI's chunk format, then ``data: [DONE]``."""
    first = True
    async for event in _row_events(service, item):
        if event.get("done"):
            if "error" in event:
                yield openai_api.sse(openai_api.error_body(event["status"], event["error"]))
                break
            extra = openai_api.extension(event, num_layers)
            yield openai_api.sse(openai_api.chunk(req, finish=event["finish_reason"], first=first, extra=extra))
            if req.include_usage:
                yield openai_api.sse(openai_api.usage_chunk(req, prompt_tokens, len(event["tokens"])))
        elif event["text"] or first:
            yield openai_api.sse(openai_api.chunk(req, text=event["text"], first=first))
            first = False
    yield openai_api.sse("[DONE]")


def _open_rows(service: Any, items: list) -> tuple[list[asyncio.Queue], list[Any]]:
    """Start decoding ``items`` in the service's running batch; one queue of events per item (filled
    from the decoding thread) and the keys that ``cancel`` takes."""
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue] = []
    keys = []
    for item in items:
        q: asyncio.Queue = asyncio.Queue()
        keys.append(service.submit(item, lambda event, q=q: loop.call_soon_threadsafe(q.put_nowait, event)))
        queues.append(q)
    return queues, keys


async def _row_events(service: Any, item: Any):
    """The events of one item as they come (its last has ``done``); a client that goes away (the
    generator closed early) stops its decoding."""
    (q,), (key,) = _open_rows(service, [item])
    done = False
    try:
        while not done:
            event = await q.get()
            done = bool(event.get("done"))
            yield event
    finally:
        if not done:
            service.cancel(key)


async def _final(service: Any, item: Any) -> dict[str, Any]:
    async for event in _row_events(service, item):
        if event.get("done"):
            return {k: v for k, v in event.items() if k != "done"}
    raise RuntimeError("a generation ended without its result")


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

    gpus = replica_gpus(opts.device, opts.replicas)

    @serve.deployment(num_replicas=opts.replicas, ray_actor_options={"num_cpus": 0, "num_gpus": gpus},
                      graceful_shutdown_timeout_s=opts.drain_s, max_ongoing_requests=1000)
    @serve.ingress(api)
    class Offramp:
        def __init__(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            import torch

            torch.set_num_threads(opts.threads)
            _quiet_libraries()
            _replica_grpc_on_loopback()
            self.services = {kind: _service(c, opts) for kind, c in served.items()}
            self.ids = dict(served)  # the model ids of the OpenAI routes: each checkpoint as given
            self.created = int(time.time())
            self.models = [self.ids[k] for k in ("token_exits", "probe") if k in self.ids]
            self.pool = ThreadPoolExecutor(max_workers=1)  # one batch at a time on this replica's cores

        async def _run(self, kind: str, items: list) -> list[dict[str, Any]]:
            # in a worker thread: the event loop keeps taking requests, which queue for the next batch
            return await asyncio.get_running_loop().run_in_executor(self.pool, self.services[kind].run, items)

        @serve.batch(max_batch_size=opts.max_batch_size, batch_wait_timeout_s=opts.batch_wait_ms / 1000.0)
        async def _classify(self, items: list) -> list[dict[str, Any]]:
            return await self._run("classifier", items)

        async def _handle(self, kind: str, request: Request, batch):
            checked = await _checked_items(self.services, kind, request)
            if isinstance(checked, JSONResponse):
                return checked
            body, items = checked
            if kind in ("token_exits", "probe"):  # the running batch: each input joins at the next step
                service = self.services[kind]
                if body.get("stream"):
                    return StreamingResponse(_ndjson([_row_lines(service, it) for it in items]),
                                             media_type="application/x-ndjson")
                results = list(await asyncio.gather(*(_final(service, it) for it in items)))
            else:
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
            return await self._handle("token_exits", request, None)

        # ---- the OpenAI API (offramp.serving.openai_api) ------------------------------------------
        @api.get("/v1/models")
        async def v1_models(self):
            return openai_api.models(list(self.models), self.created)

        @api.post("/v1/completions")
        async def v1_completions(self, request: Request):
            return await self._openai(request, chat=False)

        @api.post("/v1/chat/completions")
        async def v1_chat_completions(self, request: Request):
            return await self._openai(request, chat=True)

        async def _openai(self, request: Request, chat: bool):
            try:
                body = await request.json()
            except Exception as e:  # any undecodable body
                return JSONResponse(openai_api.error_body(400, f"the body is not valid JSON ({type(e).__name__})"),
                                    status_code=400)
            try:
                kind = self._model_kind(body)
                if kind == "probe":
                    return await self._openai_reason(body)
                service = self.services["token_exits"]
                req = openai_api.check_completion(body, chat=chat, model_id=self.ids["token_exits"],
                                                  tokenizer=service.tokenizer, base=service.sampling,
                                                  default_max=service.max_new_tokens, max_cap=service.max_new_cap,
                                                  max_chars=service.max_chars)
                if req.stop_thinking is not None:
                    raise openai_api.OpenAIError(400, "offramp.stop_thinking needs the reasoning model: name it in "
                                                      f"model ({self.ids.get('probe', 'none is served')})", "offramp")
                service.resolve(req.policy)
                try:
                    prompt_tokens = service.prompt_tokens(req.prompt, req.max_tokens)
                except RequestError as e:  # OpenAI's code for it, as clients expect
                    raise openai_api.OpenAIError(400, e.message, "max_tokens", "context_length_exceeded") from None
            except openai_api.OpenAIError as e:
                return JSONResponse(e.body(), status_code=e.status)
            except RequestError as e:
                return JSONResponse(openai_api.error_body(e.status, e.message), status_code=e.status)
            service.requests += 1
            if req.speculative and req.sampling.do_sample:
                return JSONResponse(openai_api.error_body(400, "offramp.speculative is greedy here: leave temperature "
                                                               "out (or 0)", "temperature"), status_code=400)
            item = Item(req.prompt, req.policy, req.max_tokens, req.sampling, req.stop, req.speculative)
            layers = service.model.adapter.num_layers
            if req.stream:
                return StreamingResponse(_openai_stream(service, item, req, prompt_tokens, layers),
                                         media_type="text/event-stream")
            result = await _final(service, item)
            if "error" in result:
                return JSONResponse(openai_api.error_body(result["status"], result["error"]),
                                    status_code=result["status"])
            return openai_api.response(req, result, prompt_tokens, layers)

        def _model_kind(self, body: Any) -> str:
            """Which checkpoint a request names in ``model`` (the generation one when it names none)."""
            llms = {k: i for k, i in self.ids.items() if k in ("token_exits", "probe")}
            if not llms:
                raise openai_api.OpenAIError(404, "this server serves no language model (only /classify)", "model",
                                             "model_not_found")
            name = body.get("model") if isinstance(body, dict) else None
            if name is None:
                return "token_exits" if "token_exits" in llms else "probe"
            for kind, model_id in llms.items():
                if name == model_id:
                    return kind
            raise openai_api.OpenAIError(404, f"the model {name!r} does not exist here; this server serves "
                                              f"{sorted(llms.values())} (GET /v1/models)", "model", "model_not_found")

        async def _openai_reason(self, body: dict):
            """A chat request to the reasoning model: its last user message reasons as ``offramp reason
            run`` would, the chain stopping where ``offramp.stop_thinking`` says (the probe by default)."""
            service = self.services["probe"]
            req = openai_api.check_completion(body, chat=True, model_id=self.ids["probe"], tokenizer=service.tokenizer,
                                              base=SamplingOptions(), default_max=service.config.max_new_tokens,
                                              max_cap=service.max_new_cap, max_chars=service.max_chars, template=False)
            if req.sampling.do_sample:
                raise openai_api.OpenAIError(400, "chains of thought are greedy here: leave temperature out (or 0)",
                                             "temperature")
            policy = (req.stop_thinking or {}).get("policy", "probe")
            if set(req.stop_thinking or {}) - {"policy"} or not isinstance(policy, str):
                raise openai_api.OpenAIError(400, 'offramp.stop_thinking takes {"policy": NAME}', "offramp")
            try:
                items = service.check({"question": req.question, "policy": policy, "max_new_tokens": req.max_tokens})
            except RequestError as e:
                raise openai_api.OpenAIError(e.status, e.message, "messages") from None
            service.requests += 1
            res = await _final(service, items[0])
            if "error" in res:
                return JSONResponse(openai_api.error_body(res["status"], res["error"]), status_code=res["status"])
            result = {"text": res["answer"] or "", "reasoning_content": res["chain"], "finish_reason": "stop",
                      "completion_tokens": res["tokens"],
                      "offramp": {k: res[k] for k in ("stop", "exit_event", "chain_tokens", "answer_tokens",
                                                      "trial_tokens", "policy")}}
            prompt_tokens = len(prompt_ids(service.tokenizer, req.question, service.config.prompt_suffix))
            out = openai_api.response(req, result, prompt_tokens, 0)
            if not req.stream:
                return out
            message = out["choices"][0]["message"]

            async def one_chunk():
                yield openai_api.sse(openai_api.chunk(req, text=message["content"], first=True))
                yield openai_api.sse(openai_api.chunk(req, finish="stop", extra=out["choices"][0]["offramp"]))
                if req.include_usage:
                    yield openai_api.sse(openai_api.usage_chunk(req, prompt_tokens, res["tokens"]))
                yield openai_api.sse("[DONE]")

            return StreamingResponse(one_chunk(), media_type="text/event-stream")

        @api.post("/reason")
        async def reason(self, request: Request):
            return await self._handle("probe", request, None)

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
        ray.init(log_to_driver=False, logging_level=logging.WARNING, **kwargs)
        _STARTED_RAY[0] = address is None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # offramp says when it answers
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


def _quiet_libraries() -> None:
    """No progress bars from transformers or the Hub in the server's log (loading weights in every
    replica would print them)."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


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


_STARTED_RAY = [False]  # whether serve_checkpoint started the (local) Ray it serves on


def _drain_and_stop() -> None:
    """Delete the application first (its replicas stop taking requests and finish the ones in
    flight, for up to ``drain_s``, while the HTTP proxies still carry their answers), then stop
    Serve. ``serve.shutdown`` alone stops the proxies at once and cuts answers still streaming.
    On a local Ray this process started, Ray's own shutdown ends Serve with it (``serve.shutdown``
    there only adds a "graceful_shutdown failed ... retries" line about its controller); on a
    cluster Serve is stopped explicitly, as the cluster goes on."""
    import ray
    from ray import serve

    try:
        serve.delete("offramp")
    finally:
        if _STARTED_RAY[0]:
            ray.shutdown()
            _STARTED_RAY[0] = False
        else:
            serve.shutdown()


def shutdown() -> None:
    """Stop the application (in-flight requests drain) and Ray; nothing when Ray is not running."""
    import ray

    if ray.is_initialized():
        _drain_and_stop()
        if ray.is_initialized():
            ray.shutdown()
