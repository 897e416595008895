"""The vocabularies the command line offers (policy names, cache strategies, head types, dtypes,
risks, p-values) and the data settings a checkpoint records, in one torch-free module: the
parsers read them here, so ``offramp --help`` answers without loading torch, and the library
modules that own each vocabulary import it from here, so there is one copy. A test holds each
tuple equal to the registry it names."""

from __future__ import annotations

from typing import Any

CONFIG_NAME = "offramp_config.json"  # the file that makes a folder an offramp checkpoint (offramp.config)

# exit rules (offramp.policies.POLICIES, plus the probe built from a fitted file)
CLASSIFY_POLICIES = ("entropy", "max_prob", "margin", "patience", "saturation", "q_exit", "ponder_sample", "gate",
                     "oracle", "static", "never")
GENERATION_POLICIES = ("token_confidence", "max_prob", "entropy", "margin", "patience", "saturation", "static",
                       "never")
REASON_POLICIES = ("probe", "deer", "static", "never")

# token exits (offramp.heads.LM_HEADS; offramp.engines.generate.run)
LM_HEAD_TYPES = ("tied", "ffn", "block", "mamba")
ATTENTION_STRATEGIES = ("copy_kv", "propagate", "catch_up")
SSM_STRATEGIES = ("freeze", "update", "catch_up")
CACHE_STRATEGIES = ("copy_kv", "propagate", "catch_up", "freeze", "update")
DRAFT_RULES = ("max_prob", "token_confidence")
NGRAM_TOKENS = 2  # n-gram draft length of `generate --speculative` and of served speculation: the fastest
# measured on a CPU, where every drafted token adds a position to the verify pass

# a language model's --dtype (offramp.modeling.resolve_dtype)
DTYPES = ("auto", "float32", "bfloat16", "float16")

# calibration (offramp.calibration.risk, offramp.calibration.lynx)
RISKS = ("disagree", "wrong_when_full_right")
TOKEN_RISKS = ("sequence", "token")  # on a token trace, per generated sequence
PVALUES = ("hoeffding", "hoeffding_bentkus", "binomial")
CHAIN_RISKS = ("premature", "lost")  # per chain: any stop at a wrong answer, or one that loses a right answer

# the data settings a checkpoint records (offramp train --data and its options)
DATA_DEFAULTS: dict[str, Any] = {
    "data": None, "config": None, "hub_splits": None, "text_column": None, "pair_column": None,
    "label_column": None, "seed": 0, "validation_fraction": 0.1, "test_fraction": 0.1, "max_train": None,
    "max_eval": None, "max_length": 128, "batch_size": 32}
