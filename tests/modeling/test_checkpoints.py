"""One checkpoint format for every model kind: offramp.load, the previous release's folders, wrong kinds."""

from __future__ import annotations

import json

import pytest
import torch
from decoder_models import ragged_prompts, tiny_decoder
from encoders import make_batch

import offramp
from offramp import EarlyExitModel, OfframpConfig
from offramp.config import CONFIG_NAME
from offramp.engines.generate.sampling import SamplingOptions
from offramp.modeling import HEADS_NAME, DecoderExitModel
from offramp.modeling.decoder import LEGACY_WEIGHTS


def _classifier(tiny_bert, tmp_path):
    model = EarlyExitModel.from_backbone(tiny_bert, OfframpConfig(num_labels=3, policy={"type": "entropy",
                                                                                      "threshold": 0.5})).eval()
    model.save_pretrained(tmp_path / "clf")
    return model, tmp_path / "clf"


def _exits(tmp_path):
    lm = tiny_decoder("llama")
    model = DecoderExitModel.from_backbone(lm, exit_layers=[1, 2], head="ffn")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / "exits")
    return lm, model, tmp_path / "exits"


def test_both_kinds_write_one_format_and_load_by_kind(tiny_bert, tmp_path):
    model, clf = _classifier(tiny_bert, tmp_path)
    lm, exits_model, exits = _exits(tmp_path)
    for folder, kind in ((clf, "classifier"), (exits, "token_exits")):
        data = json.loads((folder / CONFIG_NAME).read_text())
        assert data["kind"] == kind and data["format_version"] == 2 and (folder / HEADS_NAME).is_file()
    loaded = offramp.load(clf)
    assert isinstance(loaded, EarlyExitModel)
    ids, mask = make_batch(6)
    torch.testing.assert_close(loaded.predict(ids, mask).logits, model.predict(ids, mask).logits)
    back = offramp.load(exits, backbone=lm)
    assert isinstance(back, DecoderExitModel)
    ids, mask = ragged_prompts(3)
    opts = SamplingOptions(eos_token_id=None, pad_token_id=0)
    a = exits_model.generate(ids, mask, max_new_tokens=6, sampling=opts)
    b = back.generate(ids, mask, max_new_tokens=6, sampling=opts)
    assert torch.equal(a.new_tokens, b.new_tokens) and torch.equal(a.exit_layers, b.exit_layers)


def test_previous_release_folders_still_load(tiny_bert, tmp_path):
    model, clf = _classifier(tiny_bert, tmp_path)
    data = json.loads((clf / CONFIG_NAME).read_text())
    del data["kind"]
    data["format_version"] = 1
    (clf / CONFIG_NAME).write_text(json.dumps(data))
    loaded = EarlyExitModel.from_pretrained(clf)
    assert loaded.config.policy == {"type": "entropy", "threshold": 0.5}
    ids, mask = make_batch(6)
    torch.testing.assert_close(loaded.predict(ids, mask).logits, model.predict(ids, mask).logits)

    lm, exits_model, exits = _exits(tmp_path)
    data = json.loads((exits / CONFIG_NAME).read_text())
    for key in ("kind", "format_version", "policy", "extra"):
        del data[key]
    data.update(format="decoder-exits/1", threshold=0.55)
    (exits / CONFIG_NAME).write_text(json.dumps(data))
    (exits / HEADS_NAME).rename(exits / LEGACY_WEIGHTS)
    old = DecoderExitModel.from_pretrained(exits, backbone=lm)
    assert old.config.policy == {"type": "token_confidence", "threshold": 0.55}
    for a, b in zip(old.state_dict().values(), exits_model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_folder_of_the_wrong_kind_names_what_it_is_and_the_command(tiny_bert, tmp_path):
    _, clf = _classifier(tiny_bert, tmp_path)
    lm, _, exits = _exits(tmp_path)
    with pytest.raises(ValueError, match="holds token exits for a decoder LM.*offramp generate"):
        EarlyExitModel.from_pretrained(exits)
    with pytest.raises(ValueError, match="holds a classifier with exits.*offramp predict"):
        DecoderExitModel.from_pretrained(clf, backbone=lm)
    with pytest.raises(ValueError, match="holds a classifier with exits .*, not a Hugging Face backbone"):
        DecoderExitModel.from_backbone(str(clf))  # a checkpoint given where a HF model belongs
    (tmp_path / "trace").mkdir()
    (tmp_path / "trace" / "trace.json").write_text("{}")
    with pytest.raises(ValueError, match="is an exit trace.*offramp sweep"):
        offramp.load(tmp_path / "trace")
    with pytest.raises(ValueError, match="unsupported encoder model_type 'llama'.*decoder: use it for token exits"):
        EarlyExitModel.from_backbone(lm, OfframpConfig())
    data = json.loads((clf / CONFIG_NAME).read_text())
    data["format_version"] = 9
    (clf / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format 9.*install the offramp version"):
        offramp.load(clf)


def test_offline_aliases_load_and_checkpoints_keep_the_alias(tiny_bert, tmp_path, monkeypatch):
    """A checkpoint names an offline backbone by its alias, resolved at load: moving the environment
    that holds the model does not break it."""
    import offramp.data.assets as assets

    tiny_bert.save_pretrained(tmp_path / "where-the-package-is")
    monkeypatch.setattr(assets, "minilm_path", lambda: str(tmp_path / "where-the-package-is"))
    model = EarlyExitModel.from_backbone("minilm", OfframpConfig(num_labels=3)).eval()
    assert model.config.base_model_name_or_path == "minilm"
    model.save_pretrained(tmp_path / "clf", save_backbone=False)
    assert json.loads((tmp_path / "clf" / CONFIG_NAME).read_text())["base_model_name_or_path"] == "minilm"
    (tmp_path / "where-the-package-is").rename(tmp_path / "moved")  # the environment moved
    monkeypatch.setattr(assets, "minilm_path", lambda: str(tmp_path / "moved"))
    again = offramp.load(tmp_path / "clf")
    ids, mask = make_batch(5)
    torch.testing.assert_close(again.predict(ids, mask).logits, model.predict(ids, mask).logits)
