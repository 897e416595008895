"""On a CUDA GPU (marker ``gpu``; skipped, with the reason, where there is none): the engines give
on the device what they give on the CPU, self-speculation is greedy decoding token for token in
float32 and bfloat16, a Mamba row decodes there, the services answer there, and decoding makes no
host synchronisation beyond those docs/devices.md documents (``torch.cuda.set_sync_debug_mode``).
``benchmarks/device_check.sh`` runs them first."""

from __future__ import annotations

import warnings

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder, tiny_lm_folder
from encoders import build_encoder, make_batch
from tiny_assets import write_csv, write_model

from offramp import EarlyExitModel, OfframpConfig
from offramp.engines.generate import generate
from offramp.engines.generate.sampling import SamplingOptions
from offramp.engines.generate.speculative import speculative_generate
from offramp.modeling import DecoderExitModel

pytestmark = pytest.mark.gpu
NO_EOS = SamplingOptions(eos_token_id=None, pad_token_id=0)
CUDA = torch.device("cuda")


def _exits(family: str, layers=(1, 2), head: str = "ffn") -> DecoderExitModel:
    model = DecoderExitModel.from_backbone(tiny_decoder(family), exit_layers=list(layers), head=head)
    torch.manual_seed(5)
    for p in list(model.heads.parameters()) + list(model.confidence.parameters()):
        torch.nn.init.normal_(p, 0.0, 1.0)  # confidences far apart: no decision sits on a rounding edge
    return model.eval()


def _mid_threshold(model: DecoderExitModel, prompts, mask) -> dict:
    """token_confidence between two of the confidences the prompts see: rows leave at different exits."""
    seen: list[float] = []
    real = model.confidence_logit

    def spy(e, feats):
        out = real(e, feats)
        seen.extend(torch.sigmoid(out).flatten().tolist())
        return out

    model.confidence_logit = spy
    generate(model, prompts, mask, max_new_tokens=8, policy={"type": "token_confidence", "threshold": 0.5},
             cache_strategy="catch_up", sampling=NO_EOS)
    del model.confidence_logit
    values = sorted(seen)
    gap, i = max((b - a, i) for i, (a, b) in enumerate(zip(values, values[1:])))
    return {"type": "token_confidence", "threshold": (values[i] + values[i + 1]) / 2}


def test_classify_with_mixed_exits_on_the_gpu_equals_the_cpu():
    model = EarlyExitModel.from_backbone(build_encoder("bert"), OfframpConfig(num_labels=3)).eval()
    ids, mask = make_batch(16, 12, seed=3)
    with torch.no_grad():
        first = model(ids, mask).exit_logits[0].softmax(-1).amax(-1).sort().values
    policy = {"type": "max_prob", "threshold": float(first[7] + first[8]) / 2}
    cpu = model.predict(ids, mask, policy)
    gpu = model.to(CUDA).predict(ids, mask, policy)  # inputs on the CPU: the engine moves them
    assert gpu.logits.device.type == "cuda"
    assert len(set(cpu.exit_layer.tolist())) > 1
    assert torch.equal(gpu.exit_layer.cpu(), cpu.exit_layer)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, strategies", [("llama", ["copy_kv", "propagate", "catch_up"]),
                                                ("gemma3", ["catch_up"]),
                                                ("mamba", ["freeze", "update", "catch_up"])])
def test_token_exits_on_the_gpu_decode_what_they_decode_on_the_cpu(family, strategies):
    model = _exits(family)
    prompts, mask = ragged_prompts(3)
    policy = _mid_threshold(model, prompts, mask)
    cpu = {s: generate(model, prompts, mask, max_new_tokens=8, policy=policy, cache_strategy=s, sampling=NO_EOS)
           for s in strategies}
    model.to(CUDA)
    for s in strategies:
        gpu = generate(model, prompts.to(CUDA), mask.to(CUDA), max_new_tokens=8, policy=policy, cache_strategy=s,
                       sampling=NO_EOS)
        assert torch.equal(gpu.sequences.cpu(), cpu[s].sequences), s
        assert torch.equal(gpu.exit_layers.cpu(), cpu[s].exit_layers), s
    never = generate(model, prompts.to(CUDA), mask.to(CUDA), max_new_tokens=8, sampling=NO_EOS)
    ref = model.backbone.generate(prompts.to(CUDA), attention_mask=mask.to(CUDA), do_sample=False, max_new_tokens=8,
                                  pad_token_id=0, eos_token_id=None)
    assert torch.equal(never.sequences, ref)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "mamba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_self_speculation_on_the_gpu_is_greedy_decoding(family, dtype):
    lm = tiny_decoder(family).to(CUDA, dtype)
    model = DecoderExitModel.from_backbone(lm, exit_layers=[3], head="tied").eval()
    prompts, mask = ragged_prompts(3)
    prompts, mask = prompts.to(CUDA), mask.to(CUDA)
    greedy = generate(lm, prompts, mask, max_new_tokens=16, sampling=NO_EOS)
    for d in (1, 3):
        out = speculative_generate(model, prompts, mask, exit_layer=3, draft_tokens=d, max_new_tokens=16,
                                   sampling=NO_EOS)
        assert torch.equal(out.sequences, greedy.sequences), (family, dtype, d)


def test_decoding_synchronises_no_more_than_documented():
    """CUDA's own sync check: every synchronisation in a decode warns; the count is held to one per
    step and one per exit decision (+ the setup), as on the CPU."""
    model = _exits("llama").to(CUDA)
    prompts, mask = ragged_prompts(3)
    steps = 12
    generate(model, prompts.to(CUDA), mask.to(CUDA), max_new_tokens=2, sampling=NO_EOS)  # warm-up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            generate(model, prompts.to(CUDA), mask.to(CUDA), max_new_tokens=steps, sampling=NO_EOS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) <= steps - 1 + 5, [str(w.message)[:80] for w in syncs[:5]]


def test_the_services_answer_on_the_gpu_as_on_the_cpu(tmp_path):
    from offramp.cli import main
    from offramp.serving.service import ClassifyService, GenerateService, Item

    model, csv = write_model(tmp_path / "tiny"), write_csv(tmp_path / "d.csv", n=40)
    assert main(["--quiet", "train", "--model", str(model), "--data", str(csv), "--out", str(tmp_path / "run"),
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu"]) == 0
    texts = ["good great fine", "bad awful", "okay neutral words here"]
    cpu = ClassifyService(tmp_path / "run", device="cpu").run([Item(t) for t in texts])
    gpu_service = ClassifyService(tmp_path / "run", device="cuda")
    assert gpu_service.model.device.type == "cuda"
    gpu = gpu_service.run([Item(t) for t in texts])
    assert [r["label"] for r in gpu] == [r["label"] for r in cpu]
    folder, lm = tiny_lm_folder(tmp_path)
    DecoderExitModel.from_backbone(lm, exit_layers=[1, 2, 3], base_model_name_or_path=str(folder)).save_pretrained(
        tmp_path / "exits")
    body = {"prompt": "w5 w6 w7", "max_new_tokens": 6, "policy": "never"}
    answers = {}
    for device in ("cpu", "cuda"):
        service = GenerateService(tmp_path / "exits", max_new_tokens=6, device=device)
        assert next(service.model.parameters()).device.type == device
        answers[device] = service.run(service.check(body))[0]["tokens"]
    assert answers["cuda"] == answers["cpu"]
