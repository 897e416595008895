"""Real pretrained encoders from the offline packages (slow: run with `pytest -m slow`)."""

from __future__ import annotations

import pytest
import torch

from offramp import EarlyExitModel, OfframpConfig

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name", ["minilm", "mpnet"])
def test_real_encoder_never_exit_equals_plain_forward(name):
    from offramp.data import assets

    path = assets.minilm_path() if name == "minilm" else assets.mpnet_path()
    torch.manual_seed(0)
    model = EarlyExitModel.from_backbone(path, OfframpConfig(num_labels=3, head={"pooling": "mean"})).eval()
    batch = model.encode(["offramp exits early when it is sure", "a longer second sentence, with more words in it"])
    pred = model.predict(**batch, policy="never")
    with torch.no_grad():
        h = model.backbone(**batch).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        ref = model.classifiers(model.num_exits - 1, (h * m).sum(1) / m.sum(1))
    torch.testing.assert_close(pred.logits, ref, atol=1e-5, rtol=0)
    assert pred.exit_layer.tolist() == [model.num_layers] * 2
