"""FLOPs per exit, counted from shapes, against torch's FLOP counter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from offramp import EarlyExitModel, OfframpConfig
from offramp.flops import Shapes, exit_flops, layer_flops, model_exit_flops


def _bert(layers: int = 3) -> BertModel:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = "eager"  # the FLOP counter does not see inside CPU SDPA
    return BertModel(cfg).eval()


def _matmul_flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("t", [5, 17])
def test_bert_layer_matmuls_match_torch_counter(t):
    bert = _bert(3)
    ids = torch.randint(3, 50, (1, t))
    counted = _matmul_flops(lambda: bert(ids))
    shapes = Shapes.from_config(bert.config)
    pooler = 2 * 32 * 32
    assert counted == pytest.approx(3 * layer_flops(shapes, t, elementwise=False) + pooler)
    assert layer_flops(shapes, t) > layer_flops(shapes, t, elementwise=False)


def test_gated_gqa_decoder_layer_matches_torch_counter():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "eager"
    model = LlamaModel(cfg).eval()
    ids = torch.randint(0, 50, (1, 9))
    counted = _matmul_flops(lambda: model(ids))
    assert counted == pytest.approx(2 * layer_flops(Shapes.from_config(cfg), 9, elementwise=False))


def test_per_exit_costs_grow_and_include_heads():
    bert = _bert(4)
    f = exit_flops(bert.config, [1, 2, 4], num_labels=3, seq_len=10)
    assert np.all(np.diff(f.per_exit) > 0)
    assert f.per_exit[0] == pytest.approx(f.embeddings + f.layer + f.head)
    assert f.per_exit[-1] == pytest.approx(f.embeddings + 4 * f.layer + 3 * f.head)
    halt = exit_flops(bert.config, [1, 2, 4], num_labels=3, seq_len=10, halting={"type": "palbert"})
    assert np.all(halt.per_exit > f.per_exit) and halt.full == f.full


def test_lengths_array_keeps_attention_quadratic_exact():
    shapes = Shapes.from_config(_bert().config)
    lengths = np.array([4, 20])
    assert layer_flops(shapes, lengths) == pytest.approx((layer_flops(shapes, 4) + layer_flops(shapes, 20)) / 2)
    assert layer_flops(shapes, lengths) > layer_flops(shapes, 12)


def test_model_exit_flops_reads_the_model():
    model = EarlyExitModel.from_backbone(_bert(4), OfframpConfig(num_labels=2, exit_layers=[2, 4]))
    f = model_exit_flops(model, 8)
    assert f.exit_layers == (2, 4) and f.head > 2 * 32 * 32  # the BERT pooler runs in each CLS head


def test_bad_exit_layers():
    with pytest.raises(ValueError, match="exit_layers"):
        exit_flops(_bert(3).config, [2, 5], num_labels=2, seq_len=4)
