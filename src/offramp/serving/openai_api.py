"""The OpenAI API's shapes for ``offramp serve``: request checks and response objects.

``/v1/completions`` and ``/v1/chat/completions`` take what the OpenAI clients send (``model``,
``prompt`` / ``messages``, ``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``n``
= 1, ``stream`` with ``stream_options.include_usage``, ``user``) and answer in OpenAI's objects:
``text_completion`` / ``chat.completion``, streamed as ``*.chunk`` server-sent events ending with
``data: [DONE]``, with ``usage`` counts; a bad request gets ``{"error": {"message", "type",
"param", "code"}}``. A request the server cannot honour (``n`` > 1, ``logprobs``, penalties) is
refused by name rather than ignored.

offramp's own settings travel in the extension field ``offramp`` (with the ``openai`` client:
``extra_body={"offramp": {...}}``): ``policy`` (a named exit policy), ``speculative`` (lossless
self-speculation from an exit: greedy decoding's tokens, drafted and verified), and on a chat request to a
reasoning model ``stop_thinking`` (``{"policy": "probe" | "deer" | "never" | "static"}``: stop the
chain of thought where that rule accepts a cue, the calibrated LYNX probe by default). Each choice
carries ``offramp``: the exit layer of every token and the layers saved, or where the chain stopped.

``temperature`` absent or 0 decodes greedily (the answer of ``offramp generate``); above 0 samples
(with ``top_p``, and ``seed`` for a reproducible draw).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from offramp.engines.generate import SamplingOptions
from offramp.serving.service import RequestError

COMMON_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "n",
                 "stream", "stream_options", "user", "offramp", "frequency_penalty", "presence_penalty",
                 "logprobs", "top_logprobs", "echo", "best_of", "logit_bias", "suffix", "response_format",
                 "parallel_tool_calls", "metadata", "store", "service_tier"}
FIELDS = {False: COMMON_FIELDS | {"prompt"}, True: COMMON_FIELDS | {"messages"}}
UNSUPPORTED = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": (None, False, 0), "top_logprobs": (None, 0),
               "echo": (None, False), "best_of": (None, 1), "logit_bias": (None, {}), "suffix": (None, ""),
               "response_format": (None, {"type": "text"})}


class OpenAIError(RequestError):
    """A request error answered in OpenAI's shape, naming the field (``param``) at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, message)
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 404:
            kind = "not_found_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return OpenAIError(status, message, param).body()


@dataclass
class Completion:
    """What a checked ``/v1/completions`` or ``/v1/chat/completions`` request asks for."""

    chat: bool
    model: str
    prompt: str  # the text the model continues (a chat request: its messages in the chat template)
    max_tokens: int
    sampling: SamplingOptions
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    policy: str | None = None
    speculative: bool = False
    stop_thinking: dict[str, Any] | None = None
    question: str = ""  # a chat request's last user message (what a reasoning model answers)
    id: str = field(default_factory=lambda: f"{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))


def _number(body: dict, name: str, low: float, high: float, default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise OpenAIError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", name)
    return value


def check_completion(body: Any, *, chat: bool, model_id: str, tokenizer: Any, base: SamplingOptions,
                     default_max: int, max_cap: int, max_chars: int, template: bool = True) -> Completion:
    """The ``Completion`` a request body asks for, or an ``OpenAIError`` naming the field at fault.
    ``template``: a chat request is put through the tokenizer's chat template (False: a reasoning
    model, which builds its own prompt from the last user message)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - FIELDS[chat])
    if unknown:
        raise OpenAIError(400, f"unknown field {unknown[0]!r}; this endpoint takes {sorted(FIELDS[chat])}", unknown[0])
    for name, allowed in UNSUPPORTED.items():
        if name in body and body[name] not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise OpenAIError(400, f"{name} is not supported by this server (leave it out)", name)
    model = body.get("model")
    if model is not None and model != model_id:
        raise OpenAIError(404, f"the model {model!r} does not exist here; this server serves {model_id!r} "
                               "(GET /v1/models)", "model", "model_not_found")
    n = body.get("n", 1)
    if n not in (None, 1):
        raise OpenAIError(400, f"n must be 1 (one choice per request), got {n!r}", "n")
    field_name = "messages" if chat else "prompt"
    if field_name not in body:
        raise OpenAIError(400, f"{field_name!r} is required", field_name)
    ext = body.get("offramp") or {}
    if not isinstance(ext, dict) or set(ext) - {"policy", "stop_thinking", "speculative"}:
        raise OpenAIError(400, 'offramp must be an object with "policy", "speculative" or "stop_thinking"', "offramp")
    if not isinstance(ext.get("speculative", False), bool) or (ext.get("speculative") and ext.get("policy")):
        raise OpenAIError(400, "offramp.speculative is true or false, without offramp.policy (speculation is "
                               "lossless: every token is the full model's)", "offramp")
    if ext.get("policy") is not None and not isinstance(ext["policy"], str):
        raise OpenAIError(400, "offramp.policy must be a policy name", "offramp")
    thinking = ext.get("stop_thinking")
    if thinking is not None and (not chat or not isinstance(thinking, dict)):
        raise OpenAIError(400, "offramp.stop_thinking is an object, on /v1/chat/completions", "offramp")
    question = ""
    if chat:
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise OpenAIError(400, "messages must be a non-empty list of {role, content}", "messages")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer") or \
                    not isinstance(m.get("content"), str):
                raise OpenAIError(400, f"messages[{k}] must be {{\"role\": system | user | assistant, \"content\": "
                                       "a string}", "messages")
            _check_string(m["content"], f"messages[{k}].content", max_chars, allow_empty=m["role"] != "user")
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise OpenAIError(400, "messages hold no user message", "messages")
        question = prompt = users[-1]
        if template and not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
        if template:
            prompt = tokenizer.apply_chat_template([{"role": "system" if m["role"] == "developer" else m["role"],
                                                     "content": m["content"]} for m in messages],
                                                   tokenize=False, add_generation_prompt=True)
    else:
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise OpenAIError(400, "prompt must be a string (or a list of one string)", "prompt")
        _check_string(prompt, "prompt", max_chars)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= max_cap:
        raise OpenAIError(400, f"max_tokens must be an integer in [1, {max_cap}], got {max_tokens!r}", "max_tokens")
    temperature = _number(body, "temperature", 0.0, 2.0, 0.0)
    top_p = _number(body, "top_p", 1e-9, 1.0, 1.0)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OpenAIError(400, f"seed must be an integer, got {seed!r}", "seed")
    sampling = SamplingOptions(do_sample=temperature > 0, temperature=temperature or 1.0, top_p=top_p, seed=seed,
                               eos_token_id=base.eos_token_id, pad_token_id=base.pad_token_id)
    stop = body.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise OpenAIError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise OpenAIError(400, f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise OpenAIError(400, "stream_options must be an object", "stream_options")
    return Completion(chat=chat, model=model_id, prompt=prompt, max_tokens=max_tokens, sampling=sampling,
                      stop=tuple(stop), stream=stream, include_usage=bool(options.get("include_usage")),
                      policy=ext.get("policy"), speculative=ext.get("speculative", False), stop_thinking=thinking,
                      question=question)


def _check_string(text: str, name: str, max_chars: int, allow_empty: bool = False) -> None:
    if not allow_empty and not text.strip():
        raise OpenAIError(400, f"{name} is empty", name.split("[")[0])
    if len(text) > max_chars:
        raise OpenAIError(413, f"{name} has {len(text)} characters; the server takes at most {max_chars}",
                          name.split("[")[0])
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise OpenAIError(400, f"{name} is not valid Unicode: a lone surrogate (U+{ord(text[e.start]):04X}) at "
                               f"character {e.start}", name.split("[")[0]) from None


# ---------------------------------------------------------------------------------- responses
def extension(result: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """A generation's ``offramp`` field: each token's exit layer, its policy, the layers saved."""
    layers = result.get("exit_layers") or []
    decoded = layers[1:]  # the first token comes from the prompt's forward pass: every layer
    saved = 1 - sum(decoded) / (num_layers * len(decoded)) if decoded else 0.0
    return {"exit_layers": layers, "policy": result.get("policy"), "num_layers": num_layers,
            "layers_saved": round(saved, 4)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(req: Completion, result: dict[str, Any], prompt_tokens: int, num_layers: int) -> dict[str, Any]:
    """The whole (not streamed) answer object."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": result.get("finish_reason", "stop"), "logprobs": None}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": result["text"]}
        if "reasoning_content" in result:
            choice["message"]["reasoning_content"] = result["reasoning_content"]
    else:
        choice["text"] = result["text"]
    choice["offramp"] = result["offramp"] if "offramp" in result else extension(result, num_layers)
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + req.id,
            "object": "chat.completion" if req.chat else "text_completion", "created": req.created,
            "model": req.model, "choices": [choice],
            "usage": usage(prompt_tokens, result.get("completion_tokens", len(result.get("tokens", []))))}


def chunk(req: Completion, *, text: str | None = None, finish: str | None = None, first: bool = False,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One streamed chunk: a new piece of text, the role (first chat chunk), or the finish reason."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if req.chat:
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    if extra is not None:
        choice["offramp"] = extra
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + req.id,
            "object": "chat.completion.chunk" if req.chat else "text_completion", "created": req.created,
            "model": req.model, "choices": [choice]}


def usage_chunk(req: Completion, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {"id": ("chatcmpl-" if req.chat else "cmpl-") + req.id,
            "object": "chat.completion.chunk" if req.chat else "text_completion", "created": req.created,
            "model": req.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def models(ids: list[str], created: int) -> dict[str, Any]:
    return {"object": "list", "data": [{"id": i, "object": "model", "created": created, "owned_by": "offramp"}
                                       for i in ids]}
