"""offramp serve for token exits (/generate) and a LYNX probe (/reason) on localhost: real HTTP
requests, answers equal offline ``generate`` / ``reason`` on the same inputs, bad requests answered."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from decoder_models import tiny_lm_folder
from http_client import free_port, get, post

from offramp.modeling import DecoderExitModel
from reasoning import tiny_lm, tiny_tokenizer

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.serving

PROMPTS = ["w5 w6 w7", "w9", "w12 w13 w14 w15 w16", "w40 w41"]
QUESTIONS = ["add two and three", "add three and two", "so add two"]


def _probe(root):
    """A calibrated probe fitted on a tiny LM's cue events (labels alternated: the LM is never right)."""
    from offramp.cli import main
    from offramp.data.tasks import Problem
    from offramp.engines.reason import ReasonConfig
    from offramp.evaluation.events import build_dataset

    tok = tiny_tokenizer()
    lm_dir = root / "lm-reason"
    tiny_lm(len(tok), seed=0).save_pretrained(lm_dir)
    tok.save_pretrained(lm_dir)
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
    probs = [Problem(f"t{i}", q, "5", "test") for i, q in enumerate(
        ["add two and three", "add three and two", "Solve it", "so add two", "two and two", "add it"])]
    config = ReasonConfig(max_new_tokens=20, max_answer_tokens=2, feature_layers=(1, -1))
    build_dataset(lm, tok, probs, root / "ev", config=config, model_name=str(lm_dir))
    for f in (root / "ev").glob("*.npz"):
        z = dict(np.load(f))
        z["labels"] = (np.arange(z["labels"].size) % 2).astype(np.int64)
        np.savez(f, **z)
    assert main(["reason", "fit", str(root / "ev"), "--delta", "0.4", "--epochs", "30",
                 "--out", str(root / "probe")]) == 0
    return root / "probe", lm, tok


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from offramp.serving.app import ServeOptions, serve_checkpoint, shutdown

    root = tmp_path_factory.mktemp("serve-dec")
    folder, lm = tiny_lm_folder(root)
    exits = DecoderExitModel.from_backbone(lm, exit_layers=[1, 2, 3], base_model_name_or_path=str(folder))
    exits.save_pretrained(root / "exits")
    probe, rlm, rtok = _probe(root)
    threads = torch.get_num_threads()
    opts = ServeOptions(max_batch_size=8, batch_wait_ms=20, max_texts=4,
                        policies={"eager": {"type": "max_prob", "threshold": 0.0}})
    url = serve_checkpoint([str(root / "exits"), str(probe)], opts, port=free_port(), blocking=False)
    torch.set_num_threads(threads)
    yield url, root, (probe, rlm, rtok)
    shutdown()


def _offline_generate(root, prompt, policy, new):
    from offramp.engines.generate import SamplingOptions, generate
    from offramp.modeling.causal_lm import load_exits_and_lm

    model, tok = load_exits_and_lm(str(root / "exits"))
    enc = tok([prompt], return_tensors="pt", padding=True)
    out = generate(model, enc["input_ids"], enc["attention_mask"], policy=policy, max_new_tokens=new,
                   sampling=SamplingOptions.from_model(model.backbone, do_sample=False), tokenizer=tok)
    keep = out.exit_layers[0] > 0
    return out.new_tokens[0][keep].tolist(), out.exit_layers[0][keep].tolist()


def test_generate_answers_equal_offline_generate(server):
    url, root, _ = server
    health = get(url + "/health")
    assert set(health["endpoints"]) == {"/generate", "/reason"}
    status, out = post(url + "/generate", {"prompts": PROMPTS, "policy": "eager"})
    assert status == 200 and len(out["results"]) == len(PROMPTS)
    for prompt, row in zip(PROMPTS, out["results"]):
        tokens, layers = _offline_generate(root, prompt, {"type": "max_prob", "threshold": 0.0}, 64)
        assert row["tokens"] == tokens and row["exit_layers"] == layers and set(layers[1:]) <= {1}  # prefill: full
    status, out = post(url + "/generate", {"prompt": PROMPTS[0], "max_new_tokens": 3, "policy": "never"})
    assert status == 200
    tokens, layers = _offline_generate(root, PROMPTS[0], "never", 3)
    assert out["results"][0]["tokens"] == tokens and out["results"][0]["exit_layers"] == layers == [4] * len(tokens)
    metrics = get(url + "/metrics")["/generate"]
    assert metrics["rows"] == len(PROMPTS) + 1 and metrics["exits_per_layer"]["1"] > 0


def _post_stream(url: str, body: dict) -> list[dict]:
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"},
                                 method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r if line.strip()]  # read line by line, as they come


def test_streamed_generation_equals_offline_generate(server):
    url, root, _ = server
    bodies = [{"prompts": PROMPTS[:2], "policy": "eager", "max_new_tokens": 12, "stream": True},
              {"prompt": PROMPTS[2], "max_new_tokens": 7, "stream": True, "policy": "eager"}]
    answers: dict[int, list] = {}

    def client(n: int) -> None:  # concurrent streams share a batch
        answers[n] = _post_stream(url + "/generate", bodies[n])

    workers = [threading.Thread(target=client, args=(n,)) for n in range(len(bodies))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    policy = {"type": "max_prob", "threshold": 0.0}
    for n, prompts in ((0, PROMPTS[:2]), (1, PROMPTS[2:3])):
        lines = answers[n]
        assert all("error" not in line for line in lines), lines
        for i, prompt in enumerate(prompts):
            mine = [line for line in lines if line["index"] == i]
            steps, final = mine[:-1], mine[-1]
            tokens, layers = _offline_generate(root, prompt, policy, bodies[n]["max_new_tokens"])
            assert final["done"] and final["tokens"] == tokens and final["exit_layers"] == layers
            assert [s["token"] for s in steps] == tokens and [s["exit_layer"] for s in steps] == layers
            assert "".join(s["text"] for s in steps) == final["text"]
            status, whole = post(url + "/generate", {"prompt": prompt, "policy": "eager",
                                                      "max_new_tokens": bodies[n]["max_new_tokens"]})
            assert status == 200 and whole["results"][0] == {k: final[k] for k in whole["results"][0]}
    status, out = post(url + "/generate", {"prompt": "w5", "stream": "yes"})
    assert status == 400 and "true or false" in out["error"]


def test_reason_answers_equal_offline_reason(server):
    from offramp.engines.reason import reason

    url, _, (probe, lm, tok) = server
    results = {}

    def client(q: str) -> None:  # concurrent requests: chains of several requests share a batch
        results[q] = post(url + "/reason", {"question": q})

    workers = [threading.Thread(target=client, args=(q,)) for q in QUESTIONS]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    from offramp.calibration.lynx import probe_policy

    policy = probe_policy(probe)
    from offramp.engines.reason import ReasonConfig

    stored = json.loads((probe / "probe.json").read_text())["extra"]["reason_config"]
    served_config = ReasonConfig.from_dict(stored)
    for q in QUESTIONS:
        status, out = results[q]
        assert status == 200, out
        row = out["results"][0]
        alone = reason(lm, tok, q, policy=policy, config=served_config)
        assert (row["answer"], row["tokens"], row["stop"], row["exit_event"]) == \
            (alone.answer, alone.tokens, alone.stop, alone.exit_event)
        assert row["policy"] == "probe" and row["chain"] == alone.chain
    status, out = post(url + "/reason", {"question": QUESTIONS[0], "policy": "never", "max_new_tokens": 5})
    assert status == 200 and out["results"][0]["chain_tokens"] == 5 and out["results"][0]["stop"] == "budget"
    metrics = get(url + "/metrics")["/reason"]
    assert metrics["rows"] == len(QUESTIONS) + 1 and sum(metrics["stops"].values()) == metrics["rows"]


def test_bad_requests_get_a_4xx(server):
    url, _, _ = server
    cases = [("/generate", {"prompts": []}, 400, "non-empty list"),
             ("/generate", {"prompt": " "}, 400, "prompt 1 is empty"),
             ("/generate", {"prompts": ["w5"] * 5}, 413, "at most 4"),
             ("/generate", {"prompt": "w5", "max_new_tokens": 0}, 400, "positive integer"),
             ("/generate", {"prompt": "w5", "max_new_tokens": 10**6}, 413, "limit"),
             ("/generate", {"prompt": "w5", "policy": "deer"}, 400, "deer"),
             ("/generate", {"prompt": "w5", "chat": "yes"}, 400, "true or false"),
             ("/reason", {"question": ""}, 400, "question 1 is empty"),
             ("/reason", {"question": "x", "policy": "entropy"}, 400, "unknown policy 'entropy'"),
             ("/reason", {"text": "x"}, 400, "unknown fields"),
             ("/reason", {"question": "x", "stream": True}, 400, "unknown fields"),
             ("/classify", {"texts": ["x"]}, 404, "no 'classifier' checkpoint")]
    for route, body, status, message in cases:
        got, out = post(url + route, body)
        assert got == status and message in out["error"], (route, body, out)
    assert post(url + "/generate", {"prompt": "w5"})[0] == 200


def test_poisoned_prompts_fail_alone_and_every_good_neighbour_is_answered(server):
    url, root, (probe, rlm, rtok) = server
    expected = {p: _offline_generate(root, p, "never", 8)[0] for p in PROMPTS}
    poison = [("/generate", {"prompt": " ".join(["w5"] * 125), "policy": "never", "max_new_tokens": 8}, 413,
               "past the model's 128"),
              ("/generate", {"prompt": "w5 \udfff", "policy": "never", "max_new_tokens": 8}, 400, "lone surrogate"),
              ("/generate", {"prompt": "w5", "max_new_tokens": 64, "stream": True, "prompts": None}, 400,
               "either"),
              ("/reason", {"question": " ".join(["add"] * 600)}, 413, "past the model's 512"),
              ("/reason", {"question": "add \ud800"}, 400, "lone surrogate")]
    answers: dict[str, list[list[int]]] = {p: [] for p in PROMPTS}
    refused: list = []
    go = threading.Barrier(4)

    def good() -> None:
        go.wait()
        for _ in range(2):
            for p in PROMPTS:
                status, out = post(url + "/generate", {"prompt": p, "policy": "never", "max_new_tokens": 8})
                assert status == 200, out
                answers[p].append(out["results"][0]["tokens"])

    def bad() -> None:
        go.wait()
        for route, body, status, message in poison:
            refused.append((*post(url + route, body), status, message, route))

    workers = [threading.Thread(target=good) for _ in range(2)] + [threading.Thread(target=bad) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert all(answers[p] == [expected[p]] * 4 for p in PROMPTS)
    assert len(refused) == 2 * len(poison)
    for got, out, status, message, route in refused:
        assert got == status and message in out["error"], (route, out)


# ------------------------------------------------------------------ the OpenAI API, with its own client
def _client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_openai_completions_equal_offline_generate(server):
    url, root, (probe, _, _) = server
    client = _client(url)
    assert {m.id for m in client.models.list().data} == {str(root / "exits"), str(probe)}
    for prompt in PROMPTS:
        tokens, layers = _offline_generate(root, prompt, {"type": "max_prob", "threshold": 0.0}, 12)
        out = client.completions.create(model=str(root / "exits"), prompt=prompt, max_tokens=12,
                                        extra_body={"offramp": {"policy": "eager"}})
        from offramp.modeling.causal_lm import load_exits_and_lm

        _, tok = load_exits_and_lm(str(root / "exits"))
        assert out.choices[0].text == tok.decode(tokens, skip_special_tokens=True)
        assert out.usage.completion_tokens == len(tokens)
        assert out.usage.prompt_tokens == len(tok(prompt)["input_ids"])
        assert out.choices[0].finish_reason == ("length" if len(tokens) == 12 else "stop")
        extra = out.choices[0].model_extra["offramp"]
        assert extra["exit_layers"] == layers and extra["policy"] == "max_prob"
        decoded = layers[1:]  # the first token comes from the prompt's pass through every layer
        assert extra["layers_saved"] == pytest.approx(1 - sum(decoded) / (4 * len(decoded)) if decoded else 0, abs=1e-4)
        streamed = client.completions.create(model=str(root / "exits"), prompt=prompt, max_tokens=12, stream=True,
                                             stream_options={"include_usage": True},
                                             extra_body={"offramp": {"policy": "eager"}})
        chunks = list(streamed)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
        assert chunks[-1].usage.completion_tokens == len(tokens)
        greedy = tok.decode(_offline_generate(root, prompt, "never", 12)[0], skip_special_tokens=True)
        spec = client.completions.create(model=str(root / "exits"), prompt=prompt, max_tokens=12,
                                         extra_body={"offramp": {"speculative": True}})
        assert spec.choices[0].text == greedy and spec.choices[0].model_extra["offramp"]["policy"] == "speculative"


def test_openai_chat_and_errors_in_openai_shape(server):
    url, root, (probe, _, rtok) = server
    client = _client(url)
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=str(root / "exits"), messages=[{"role": "user", "content": "w5"}])
    assert "no chat template" in e.value.body["message"] and e.value.body["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="w5")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(root / "exits"), prompt="w5", n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(root / "exits"), prompt=" ".join(["w5"] * 120), max_tokens=20)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=str(root / "exits"), prompt="w5", presence_penalty=0.5)
    assert e.value.body["param"] == "presence_penalty"
    # the reasoning model: a chat request stops its chain where `offramp reason run` stops it
    from offramp.calibration.lynx import probe_policy
    from offramp.engines.reason import ReasonConfig, reason

    for question in QUESTIONS:
        out = client.chat.completions.create(model=str(probe), messages=[{"role": "user", "content": question}],
                                             max_tokens=20)
        offline = reason(server[2][1], rtok, question, policy=probe_policy(probe),
                         config=ReasonConfig.from_dict({**probe_policy(probe).probe.extra_["reason_config"],
                                                        "max_new_tokens": 20}))
        extra = out.choices[0].model_extra["offramp"]
        assert (out.choices[0].message.content, extra["stop"], extra["exit_event"]) == \
            (offline.answer or "", offline.stop, offline.exit_event)
        assert out.usage.completion_tokens == offline.tokens


def test_a_request_joining_mid_generation_gets_the_tokens_it_gets_alone(server):
    url, root, _ = server
    client = _client(url)
    prompts = [f"w{i} w{i + 1}" for i in range(4, 60)]
    lengths = {p: len(_offline_generate(root, p, "never", 40)[0]) for p in prompts}
    long = max(lengths, key=lengths.get)
    shorts = [p for p in prompts if p != long][:6]
    got: dict[str, list[str]] = {}
    first = threading.Event()

    def streamer() -> None:
        pieces = []
        for c in client.completions.create(model=str(root / "exits"), prompt=long, max_tokens=40, stream=True,
                                           extra_body={"offramp": {"policy": "never"}}):
            pieces.append(c.choices[0].text if c.choices else "")
            first.set()
        got[long] = ["".join(pieces)]

    def joiner(p: str) -> None:
        first.wait(60)
        got[p] = [client.completions.create(model=str(root / "exits"), prompt=p, max_tokens=40,
                                            extra_body={"offramp": {"policy": "never"}}).choices[0].text]

    workers = [threading.Thread(target=streamer)] + [threading.Thread(target=joiner, args=(p,)) for p in shorts]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    from offramp.modeling.causal_lm import load_exits_and_lm

    _, tok = load_exits_and_lm(str(root / "exits"))
    for p in [long, *shorts]:
        assert got[p] == [tok.decode(_offline_generate(root, p, "never", 40)[0], skip_special_tokens=True)], p


def test_shutdown_drains_a_request_in_flight(server):
    """Last in this module: it stops the server. A streamed generation that has begun when
    shutdown starts still ends with every token."""
    import urllib.request

    from offramp.serving.app import shutdown

    url, root, _ = server
    lengths = {p: len(_offline_generate(root, p, "never", 120)[0]) for p in [f"w{i} w{i + 1}" for i in range(4, 60)]}
    prompt = max(lengths, key=lengths.get)  # the longest generation (EOS ends most early)
    assert lengths[prompt] >= 60
    body = {"prompts": [prompt] * 4, "policy": "never", "max_new_tokens": 120, "stream": True}
    started, got = threading.Event(), []

    def client() -> None:
        req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=60) as r:
            for line in r:
                got.append(json.loads(line))
                started.set()

    worker = threading.Thread(target=client)
    worker.start()
    assert started.wait(60)
    at_shutdown = len(got)  # lines received when shutdown began
    shutdown()
    worker.join(60)
    done = [line for line in got if line.get("done")]
    assert len(done) == 4 and all(len(d["tokens"]) == lengths[prompt] for d in done), got[-3:]
    assert len(got) > at_shutdown and not any(line.get("done") for line in got[:at_shutdown])  # still streaming
