"""The OpenAI API's request checks, without a server: every bad field is an OpenAI error naming it."""

from __future__ import annotations

import pytest
from reasoning import tiny_tokenizer

from offramp.engines.generate import SamplingOptions
from offramp.serving.openai_api import OpenAIError, check_completion, chunk, response

BASE = SamplingOptions(eos_token_id=1, pad_token_id=0)


def _check(body, chat=False, **kw):
    return check_completion(body, chat=chat, model_id="m", tokenizer=tiny_tokenizer(), base=BASE, default_max=16,
                            max_cap=64, max_chars=1000, **kw)


@pytest.mark.parametrize("body, status, param, message", [
    ({"prompt": "add \ud800"}, 400, "prompt", "lone surrogate (U+D800)"),
    ({"prompt": "add", "bogus": 1}, 400, "bogus", "unknown field 'bogus'"),
    ({"prompt": "add", "n": 2}, 400, "n", "n must be 1"),
    ({"prompt": "add", "max_tokens": 65}, 400, "max_tokens", "[1, 64]"),
    ({"prompt": "add", "max_tokens": True}, 400, "max_tokens", "integer"),
    ({"prompt": "add", "temperature": 3}, 400, "temperature", "[0.0, 2.0]"),
    ({"prompt": "add", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4"),
    ({"prompt": "add", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"prompt": "add", "logprobs": True}, 400, "logprobs", "not supported"),
    ({"prompt": "add", "model": "gpt-4o"}, 404, "model", "does not exist here"),
    ({"prompt": 3}, 400, "prompt", "a string"),
    ({"prompt": " "}, 400, "prompt", "empty"),
    ({"prompt": "x" * 1001}, 413, "prompt", "at most 1000"),
    ({"prompt": "add", "offramp": {"policy": "never", "speculative": True}}, 400, "offramp", "without offramp.policy"),
    ({"prompt": "add", "offramp": {"bogus": 1}}, 400, "offramp", '"policy", "speculative" or "stop_thinking"'),
    ({"max_tokens": 3}, 400, "prompt", "'prompt' is required"),
])
def test_a_bad_completion_request_names_its_field(body, status, param, message):
    with pytest.raises(OpenAIError) as e:
        _check(body)
    assert e.value.status == status and e.value.param == param and message in e.value.message, e.value.message
    err = e.value.body()["error"]
    assert err["param"] == param and err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize("body, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"messages": [{"role": "system", "content": "be brief"}]}, "no user message"),
    ({"messages": [{"role": "user", "content": "add"}]}, "no chat template"),
])
def test_a_bad_chat_request_names_its_field(body, message):
    with pytest.raises(OpenAIError) as e:
        _check(body, chat=True)
    assert e.value.param == "messages" and message in e.value.message


def test_a_good_request_and_its_answer_objects():
    req = _check({"prompt": ["add two"], "max_tokens": 8, "temperature": 0.5, "seed": 3, "stop": "so",
                  "stream": True, "stream_options": {"include_usage": True}, "offramp": {"policy": "never"}})
    assert req.prompt == "add two" and req.max_tokens == 8 and req.stop == ("so",) and req.include_usage
    assert req.sampling.do_sample and req.sampling.temperature == 0.5 and req.sampling.seed == 3
    assert req.sampling.eos_token_id == 1 and req.policy == "never"
    greedy = _check({"prompt": "add"})
    assert not greedy.sampling.do_sample and greedy.max_tokens == 16 and not greedy.stream
    result = {"text": "three", "tokens": [5, 6], "exit_layers": [4, 2], "finish_reason": "length", "policy": "never"}
    out = response(greedy, result, prompt_tokens=3, num_layers=4)
    assert out["object"] == "text_completion" and out["choices"][0]["text"] == "three"
    assert out["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert out["choices"][0]["offramp"]["layers_saved"] == 0.5  # the second token ran 2 of 4 layers
    assert chunk(greedy, text="th")["choices"][0]["text"] == "th"
    chat = _check({"messages": [{"role": "user", "content": "add"}]}, chat=True, template=False)
    assert chat.question == "add" and chunk(chat, first=True)["choices"][0]["delta"] == {"role": "assistant"}
