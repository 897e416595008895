"""Tiny random-init encoders for every adapter (offline, seconds on 2 cores) and ragged batches."""

from __future__ import annotations

import torch
from transformers import (
    AlbertConfig,
    AlbertModel,
    BertConfig,
    BertModel,
    DistilBertConfig,
    DistilBertModel,
    ElectraConfig,
    ElectraModel,
    MPNetConfig,
    MPNetModel,
    RobertaConfig,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaModel,
)

torch.set_num_threads(1)  # tiny models: intra-op threads only add overhead

VOCAB = 99
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=64, max_position_embeddings=64)


def build_encoder(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "bert":
        return BertModel(BertConfig(**_COMMON))
    if kind == "roberta":
        return RobertaModel(RobertaConfig(**_COMMON, pad_token_id=1))
    if kind == "xlm-roberta":
        return XLMRobertaModel(XLMRobertaConfig(**_COMMON, pad_token_id=1))
    if kind == "electra":
        return ElectraModel(ElectraConfig(**{**_COMMON, "embedding_size": 16}))
    if kind == "mpnet":
        return MPNetModel(MPNetConfig(**_COMMON))
    if kind == "distilbert":
        return DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=4, n_heads=4, hidden_dim=64,
                                                max_position_embeddings=64))
    if kind == "albert":
        return AlbertModel(AlbertConfig(**{**_COMMON, "embedding_size": 16, "num_hidden_groups": 1}))
    raise KeyError(kind)


ENCODERS = ["bert", "roberta", "xlm-roberta", "electra", "mpnet", "distilbert", "albert"]



def make_batch(b: int = 16, t: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged batch: token ids in [3, VOCAB) with right padding of varying length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    return ids * mask + (1 - mask) * 1, mask


def labelled_batches(n_batches: int, seed: int) -> list[dict]:
    """Batches of 16 rows whose label (of 3) is set by the first token: learnable in a few epochs."""
    batches = []
    for k in range(n_batches):
        ids, mask = make_batch(16, 8, seed=seed + k)
        ids[:, 0] = 3 + torch.arange(16) % 6  # the first token (of 6) sets the label
        labels = (ids[:, 0] % 3).long()
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches
