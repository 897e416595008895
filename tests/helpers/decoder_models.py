"""Tiny random-init decoder LMs of every adapted family, for the decoder and generate tests."""

from __future__ import annotations

import torch


def tiny_decoder(family: str, *, layers: int = 4, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A random-init HF causal LM of ``family`` (llama, qwen3, mistral, gemma3, gpt2, mamba, mamba2)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=97, hidden_size=32, num_hidden_layers=layers, eos_token_id=3, pad_token_id=0,
                  bos_token_id=1)
    if family in ("llama", "qwen3", "mistral"):
        cfg_cls = {"llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config, "mistral": tf.MistralConfig}[family]
        cfg = cfg_cls(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      max_position_embeddings=128, **common)
        if family == "mistral":
            cfg.sliding_window = 6
        model_cls = {"llama": tf.LlamaForCausalLM, "qwen3": tf.Qwen3ForCausalLM,
                     "mistral": tf.MistralForCausalLM}[family]
    elif family == "gemma3":
        cfg = tf.Gemma3TextConfig(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=128, sliding_window=5, query_pre_attn_scalar=8,
                                  layer_types=["sliding_attention", "full_attention"] * (layers // 2), **common)
        model_cls = tf.Gemma3ForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=97, n_embd=32, n_layer=layers, n_head=4, n_positions=128,
                            eos_token_id=3, pad_token_id=0, bos_token_id=1)
        model_cls = tf.GPT2LMHeadModel
    elif family == "mamba":
        cfg = tf.MambaConfig(state_size=8, expand=2, conv_kernel=4, **common)
        model_cls = tf.MambaForCausalLM
    elif family == "mamba2":
        cfg = tf.Mamba2Config(state_size=8, expand=2, conv_kernel=4, num_heads=8, head_dim=8, n_groups=1,
                              chunk_size=16, **common)
        model_cls = tf.Mamba2ForCausalLM
    else:
        raise KeyError(family)
    if not family.startswith("mamba"):
        cfg._attn_implementation = attn
    model = model_cls(cfg).eval()
    if family == "gemma3":  # random RMSNorm weights of zero would make every layer an identity
        for name, p in model.named_parameters():
            if "norm" in name:
                torch.nn.init.normal_(p, 0.0, 0.3)
    return model


def ragged_prompts(batch: int = 3, vocab: int = 97, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (pad id 0) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 9, 2, 7, 4][:batch]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, width - n:] = torch.randint(4, vocab, (n,), generator=g)
        mask[r, width - n:] = 1
    return ids, mask


def tiny_lm_folder(tmp_path):
    """A tiny Llama and a word-level tokenizer (w4 .. w96) saved as a HF folder: (folder, model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, 97)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    model = tiny_decoder("llama")
    model.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm", model


def chain_stream(n: int = 6000, vocab: int = 97, seed: int = 0) -> torch.Tensor:
    """A second-order chain: each token follows from the two before it (a fixed random table), with
    a random restart every 50 tokens; the last layer of a tiny model learns it in 200 steps."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randint(4, vocab, (vocab, vocab), generator=g)
    out = [4, 5]
    for i in range(n - 2):
        out.append(int(table[out[-2], out[-1]]) if i % 50 else int(torch.randint(4, vocab, (1,), generator=g)))
    return torch.tensor(out)
