"""The ViT adapter: never-exit equals the plain ViT, per-row exits, JEI gates on images."""

import pytest
import torch
from transformers import ViTConfig, ViTModel

from offramp import EarlyExitModel, OfframpConfig
from offramp.backbones import ADAPTERS
from offramp.backbones.vit import ViTAdapter, flatten_images
from offramp.evaluation.collect import collect, replay
from offramp.policies.gate import GatePolicy
from offramp.training.jei import JEIArgs, jei_config, train_jei


def test_vit_is_registered():
    assert ADAPTERS["vit"] is ViTAdapter


@pytest.fixture(scope="module")
def tiny_vit():
    torch.manual_seed(0)
    return ViTModel(ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=32, num_hidden_layers=3,
                              num_attention_heads=4, intermediate_size=64)).eval()


def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g)


def test_never_exit_equals_plain_vit(tiny_vit):
    torch.manual_seed(1)
    model = EarlyExitModel.from_backbone(tiny_vit, OfframpConfig(num_labels=4)).eval()
    px = _images(5)
    pred = model.predict(flatten_images(px), None, "never")
    with torch.no_grad():
        ref = model.classifiers(model.num_exits - 1, tiny_vit(pixel_values=px).pooler_output)
    torch.testing.assert_close(pred.logits, ref, atol=1e-5, rtol=0)
    assert pred.exit_layer.tolist() == [3] * 5


def test_rows_exit_independently_and_match_replay(tiny_vit):
    torch.manual_seed(1)
    model = EarlyExitModel.from_backbone(tiny_vit, OfframpConfig(num_labels=4)).eval()
    x = flatten_images(_images(12, seed=2))
    with torch.no_grad():
        conf = model(x).exit_logits.softmax(-1).amax(-1)  # (E, b)
    t = float(conf[:-1].max(0).values.median())
    policy = {"type": "max_prob", "threshold": t}
    batch = model.predict(x, None, policy)
    assert len(set(batch.exit_index.tolist())) >= 2
    for r in (0, 5, 11):
        assert model.predict(x[r:r + 1], None, policy).exit_index.item() == batch.exit_index[r].item()
    index, _ = replay(policy, collect(model, [{"input_ids": x}]))
    assert index.tolist() == batch.exit_index.tolist()


def test_jei_gates_train_on_images(tiny_vit, tmp_path):
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(tiny_vit, OfframpConfig(num_labels=2, **jei_config(0.05)))
    batches = []
    for k in range(6):
        px = _images(16, seed=10 + k)
        px[:8, :, :4] += 1.0  # class 1: bright top half
        batches.append({"input_ids": flatten_images(px), "labels": torch.tensor([1] * 8 + [0] * 8)})
    result = train_jei(model, batches[:4], batches[4:], JEIArgs(output_dir=str(tmp_path), epochs=4, warmup_epochs=15,
                                                                 phase_batches=4, lr=3e-2, seq_len=17))
    assert result["history"][-1]["accuracy"] > 0.8
    assert result["costs"][0] < result["costs"][1] < result["costs"][2] == 1.0  # ViT FLOPs per exit
    x = batches[4]["input_ids"]
    pred = model.predict(x, None, GatePolicy())
    index, _ = replay(GatePolicy(), collect(model, [{"input_ids": x}]))
    assert pred.exit_index.tolist() == index.tolist()


def test_bad_image_shape(tiny_vit):
    model = EarlyExitModel.from_backbone(tiny_vit, OfframpConfig(num_labels=2))
    with pytest.raises(ValueError, match="flatten_images"):
        model.predict(torch.rand(2, 10), None, "never")
    with pytest.raises(ValueError, match="pixel_values"):
        flatten_images(torch.rand(2, 8, 8))
