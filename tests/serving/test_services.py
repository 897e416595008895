"""The services behind ``offramp serve``, without the server: a request is checked alone before it
joins a batch, and an input that still fails inside a batch fails alone while its neighbours are
answered as if the bad one had never come."""

from __future__ import annotations

import pytest
import torch
from decoder_models import tiny_lm_folder
from tiny_assets import write_csv, write_model

from offramp.cli import main
from offramp.modeling import DecoderExitModel
from offramp.serving.service import ClassifyService, GenerateService, Item, RequestError

GOOD = ["good great fine", "bad awful", "okay neutral words here"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc")
    model, csv = write_model(root / "tiny"), write_csv(root / "d.csv", n=60)
    threads = torch.get_num_threads()
    assert main(["--threads", "1", "--quiet", "train", "--model", str(model), "--data", str(csv), "--out",
                 str(root / "run"), "--epochs", "1", "--batch-size", "16"]) == 0
    torch.set_num_threads(threads)
    return ClassifyService(root / "run")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    root = tmp_path_factory.mktemp("svc-gen")
    folder, lm = tiny_lm_folder(root)
    DecoderExitModel.from_backbone(lm, exit_layers=[1, 2, 3], base_model_name_or_path=str(folder)).save_pretrained(
        root / "exits")
    return GenerateService(root / "exits", max_new_tokens=6)


@pytest.mark.parametrize("body, status, message", [
    ({"text": "good \ud800"}, 400, "text 1 is not valid Unicode: a lone surrogate (U+D800) at character 5"),
    ({"texts": ["good", 3]}, 400, "text 2 must be a string, got int"),
    ({"texts": [None]}, 400, "text 1 must be a string, got NoneType"),
    ({"texts": [float("nan")]}, 400, "text 1 must be a string, got float 'nan'"),
])
def test_classify_checks_each_text_before_the_batch(classifier, body, status, message):
    with pytest.raises(RequestError, match=None) as e:
        classifier.check(body)
    assert e.value.status == status and message in e.value.message, e.value.message


def test_a_text_that_fails_inside_a_batch_fails_alone(classifier):
    alone = classifier.run([Item(t) for t in GOOD])
    mixed = classifier.run([Item(GOOD[0]), Item("good \ud800"), Item(GOOD[1]), Item(GOOD[2])])
    assert mixed[1]["status"] == 500 and "this input failed (TypeError" in mixed[1]["error"]  # the tokenizer's
    for got, want in zip([mixed[0], mixed[2], mixed[3]], alone):
        assert got["label"] == want["label"] and got["exit_layer"] == want["exit_layer"]
        assert got["confidence"] == pytest.approx(want["confidence"], abs=2e-3)


def test_generate_checks_the_prompt_length_with_max_new_tokens(generator):
    limit = generator.model.adapter.max_positions()
    with pytest.raises(RequestError) as e:
        generator.check({"prompt": " ".join(["w5"] * (limit - 3)), "max_new_tokens": 4})
    assert e.value.status == 413 and f"past the model's {limit}" in e.value.message
    assert len(generator.check({"prompt": " ".join(["w5"] * (limit - 4)), "max_new_tokens": 4})) == 1
    with pytest.raises(RequestError, match="lone surrogate"):
        generator.check({"prompts": ["w5", "w6 \udc80"]})


def test_a_prompt_the_tokenizer_cannot_encode_fails_before_it_joins_and_the_others_are_answered(generator):
    """A prompt the checks let through but the tokenizer cannot encode fails by itself."""
    prompts = ["w5 w6 w7", "w9", "w12 w13"]
    alone = generator.run([Item(p) for p in prompts])
    items = [Item(prompts[0]), Item("w5 \ud800"), Item(prompts[1]), Item(prompts[2])]
    with pytest.raises(TypeError):  # submit tokenizes: the item fails before it joins any batch
        generator.submit(items[1], lambda event: None)
    mixed = generator.run([items[0], items[2], items[3]])
    assert [m["tokens"] for m in mixed] == [a["tokens"] for a in alone]


def _candidates(generator, n: int = 6) -> list[str]:
    """Prompts whose generations run the full ``n`` tokens (most end early at EOS)."""
    candidates = [f"w{i} w{i + 1}" for i in range(4, 60)]
    return [p for p, r in zip(candidates, generator.run([Item(p) for p in candidates])) if len(r["tokens"]) == n]


def test_a_batch_that_fails_midway_is_run_again_without_streaming_a_token_twice(generator, monkeypatch):
    """A step of the running batch fails after some tokens were streamed; each prompt of it is
    decoded again alone, streaming only the tokens it had not yet sent."""
    from offramp.serving import scheduler

    prompts = _candidates(generator)[:2]
    assert len(prompts) == 2
    alone = generator.run([Item(p) for p in prompts])
    real, calls = scheduler.ContinuousBatch.step, []

    def flaky(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("a kernel failed")
        return real(self)

    monkeypatch.setattr(scheduler.ContinuousBatch, "step", flaky)
    lines: dict[int, list[dict]] = {}
    generator.stream([Item(p) for p in prompts], lambda u: [lines.setdefault(i, []).extend(v) for i, v in u.items()])
    assert len(calls) == 3  # then each prompt ran alone, outside the batch
    for i, expected in enumerate(alone):
        assert [line["token"] for line in lines[i] if "token" in line] == expected["tokens"]
        assert "".join(line["text"] for line in lines[i] if "token" in line) == expected["text"]
        assert lines[i][-1]["tokens"] == expected["tokens"] and lines[i][-1]["finish_reason"] == "length"


def test_prompts_that_join_a_running_batch_get_the_tokens_they_get_alone(generator):
    """Requests arriving while others decode join the running batch and leave it when they end."""
    import threading

    prompts = _candidates(generator, 6)[:4] + ["w9", "w12 w13"]
    alone = {p: r["tokens"] for p, r in zip(prompts, generator.run([Item(p) for p in prompts]))}
    got: dict[str, list[int]] = {}
    started = threading.Event()
    steps_before = generator.scheduler.steps

    def client(k: int) -> None:
        if k:
            started.wait()
        out = generator.run([Item(prompts[k], max_new_tokens=6)])[0]
        got[prompts[k]] = out["tokens"]
        started.set()

    workers = [threading.Thread(target=client, args=(k,)) for k in range(len(prompts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert got == alone
    assert generator.scheduler.stats()["mean_rows_per_step"] > 1  # rows shared steps
    assert generator.scheduler.steps > steps_before


def test_stop_strings_end_the_text_before_them(generator):
    prompt = _candidates(generator)[0]
    full = generator.run([Item(prompt)])[0]
    words = full["text"].split()
    assert len(words) >= 3
    stop = " " + words[2]
    out = generator.run([Item(prompt, stop=(stop,))])[0]
    assert out["text"] == full["text"][:full["text"].index(stop)] and out["finish_reason"] == "stop"
    lines: list[dict] = []
    generator.stream([Item(prompt, stop=(stop,))], lambda u: lines.extend(u[0]))
    assert "".join(line["text"] for line in lines if "token" in line) == out["text"]


def test_speculative_items_get_greedy_decoding_in_their_own_running_batch(generator):
    prompts = _candidates(generator)[:3] + ["w9"]
    greedy = generator.run([Item(p, policy="never") for p in prompts])
    spec = generator.run([Item(p, speculative=True) for p in prompts])
    assert [s["tokens"] for s in spec] == [g["tokens"] for g in greedy]
    assert all(s["policy"] == "speculative" for s in spec)
    with pytest.raises(RequestError, match="drop \"policy\""):
        generator.check({"prompt": "w5", "speculative": True, "policy": "never"})
