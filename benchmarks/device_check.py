"""The device check: what offramp saves on one accelerator, every ratio measured in one run there.

    python benchmarks/device_check.py --device cuda --json device_check.json      (benchmarks/device_check.sh)

Sections of the JSON, each against the plain model on the same device in the same run:

* ``bench``: the classify engine (``offramp bench``): never-exit overhead and realised / ideal
  speed-up at batch 1 and 32, mixed and shallow exit depths, on a MiniLM-L6-shaped encoder
  (random weights: the timing does not depend on them);
* ``generate``: a causal LM (SmolLM2-135M-Instruct by default; ``--random-weights`` builds one of
  its shape where the weights cannot be had) at batch 1: plain HF ``generate``, offramp's
  engine without exits (its overhead), offramp's lossless self-speculation and HF's
  ``assistant_early_exit`` from the same layer, as tokens/s ratios against plain ``generate``,
  with the rows whose tokens equal plain greedy's (``identical`` k/n);
* ``gpu_tests``: the counts of ``pytest -m gpu`` when its JUnit file is given (``--tests-xml``).

Every timed region starts and ends with the device synchronised; methods are interleaved on the
same prompts and the median of the repeats is kept. Progress goes to stderr, the JSON to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from offramp.data.assets import bbc_prompts  # noqa: E402
from offramp.devices import describe_device, resolve_device, resolve_dtype, synchronize  # noqa: E402
from offramp.engines.generate import generate, speculative_generate  # noqa: E402
from offramp.evaluation.bench import run as bench_run  # noqa: E402
from offramp.modeling import DecoderExitModel  # noqa: E402
from offramp.modeling.causal_lm import load_causal_lm  # noqa: E402
from offramp.utils import atomic_write_json  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


def log(msg: str) -> None:
    print(f"[device_check] {msg}", file=sys.stderr, flush=True)


def minilm_shaped(folder: Path) -> str:
    """A random-init encoder of MiniLM-L6's shape (6 layers, 384 wide), saved as a HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30517)]))
    BertTokenizerFast(str(vocab)).save_pretrained(folder)
    return str(folder)


FALLBACK_PROMPTS = [  # where the offline BBC News package is not installed
    "Summarise in one sentence: The city council approved a new budget on Tuesday after a long debate.",
    "Summarise in one sentence: Shares in the carmaker rose sharply after it reported record sales.",
    "Summarise in one sentence: The team won the final with a late goal in front of a full stadium.",
    "Summarise in one sentence: Scientists said the new telescope will begin observations next year.",
    "Summarise in one sentence: The film festival opened with a premiere attended by its young cast.",
    "Summarise in one sentence: Heavy rain caused flooding across the region, closing several roads.",
    "Summarise in one sentence: The minister announced plans to expand broadband to rural villages.",
    "Summarise in one sentence: The band released its first album in ten years to strong reviews.",
]


def prompts_for(n: int) -> list[str]:
    try:
        return bbc_prompts(n, split="test", instruct=True)
    except (ValueError, ImportError, OSError):
        return [FALLBACK_PROMPTS[i % len(FALLBACK_PROMPTS)] for i in range(n)]


def smollm2_shaped() -> tuple[torch.nn.Module, object]:
    """A random-init Llama of SmolLM2-135M's shape, with a word-level tokenizer of the fallback prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for p in FALLBACK_PROMPTS for w in p.split()})
    vocab = {"<pad>": 0, "<s>": 1, "<unk>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=3, pad_token_id=0)
    return LlamaForCausalLM(config).eval(), tok


def timed(fn, device: torch.device) -> tuple[float, object]:
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out


def generate_section(args: argparse.Namespace, device: torch.device) -> dict:
    dtype = resolve_dtype(args.dtype, device)
    if args.random_weights:
        lm, tok = smollm2_shaped()
        lm = lm.to(device, dtype)
        weights = "random (SmolLM2-135M's shape): drafts are rarely accepted; speeds, not acceptance, mean something"
    else:
        lm, tok = load_causal_lm(args.model, dtype, device)
        weights = args.model
    num_layers = lm.config.num_hidden_layers
    layer = args.exit_layer or max(1, num_layers // 2)
    exits = DecoderExitModel.from_backbone(lm, exit_layers=[layer], head="tied").eval()
    prompts = FALLBACK_PROMPTS[:args.prompts] if args.random_weights else prompts_for(args.prompts)
    texts = prompts if args.random_weights else [tok.apply_chat_template([{"role": "user", "content": p}],
                                                                         tokenize=False, add_generation_prompt=True)
                                                 for p in prompts]
    batches = [tok(t, return_tensors="pt", add_special_tokens=False).to(device) for t in texts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    n = args.new_tokens

    def plain(b):
        return lm.generate(**b, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)[
            :, b["input_ids"].shape[1]:]

    methods = {
        "hf_generate": plain,
        "never_exit": lambda b: generate(lm, b["input_ids"], b["attention_mask"], max_new_tokens=n,
                                         sampling=_no_eos(pad)).new_tokens,
        f"speculative@{layer}/d{args.draft_tokens}": lambda b: speculative_generate(
            exits, b["input_ids"], b["attention_mask"], exit_layer=layer, draft_tokens=args.draft_tokens,
            max_new_tokens=n, sampling=_no_eos(pad)).new_tokens,
        f"hf_assistant_early_exit@{layer}": lambda b: lm.generate(
            **b, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad,
            assistant_early_exit=layer)[:, b["input_ids"].shape[1]:],
    }
    for b in batches[:1]:  # warm-up: kernels, allocator, autotuning
        for fn in methods.values():
            fn(b)
    times = {m: [] for m in methods}
    outputs: dict[str, list] = {}
    for rep in range(args.repeats):
        spent = dict.fromkeys(methods, 0.0)
        outputs = {m: [] for m in methods}
        for i, b in enumerate(batches):
            order = list(methods) if (i + rep) % 2 == 0 else list(methods)[::-1]
            for m in order:
                t, out = timed(lambda m=m, b=b: methods[m](b), device)
                spent[m] += t
                outputs[m].append(out.reshape(-1).tolist())
        for m in methods:
            times[m].append(spent[m])
        log(f"generate: repeat {rep + 1}/{args.repeats}")
    tokens = len(batches) * n
    base = statistics.median(times["hf_generate"])
    rows = {}
    for m in methods:
        med = statistics.median(times[m])
        same = sum(a == b for a, b in zip(outputs[m], outputs["hf_generate"]))
        rows[m] = {"tokens_per_s": tokens / med, "ratio": base / med, "identical": f"{same}/{len(batches)}"}
    return {"model": weights, "dtype": str(dtype).removeprefix("torch."), "num_layers": num_layers,
            "exit_layer": layer, "prompts": len(batches), "new_tokens": n, "batch_size": 1, "repeats": args.repeats,
            "methods": rows}


def _no_eos(pad: int):
    from offramp.engines.generate.sampling import SamplingOptions

    return SamplingOptions(eos_token_id=None, pad_token_id=pad)  # every method makes n tokens: equal work


def tests_section(path: str) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default auto)")
    p.add_argument("--dtype", default="auto", help="the decoder's dtype (default auto: bfloat16 where native)")
    p.add_argument("--model", default=SMOLLM2, help=f"the causal LM (default {SMOLLM2}; an offline alias or folder)")
    p.add_argument("--random-weights", action="store_true", help="a random-init LM of SmolLM2-135M's shape")
    p.add_argument("--exit-layer", type=int, default=None, help="the drafting exit (default half the layers)")
    p.add_argument("--draft-tokens", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bench-rows", type=int, default=64)
    p.add_argument("--skip", default="", help="sections to leave out, comma-separated: bench, generate")
    p.add_argument("--tests-xml", default=None, help="the JUnit file of `pytest -m gpu --junitxml ...`")
    p.add_argument("--json", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    result: dict = {"device": describe_device(device), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "date": time.strftime("%Y-%m-%d")}
    if args.tests_xml:
        result["gpu_tests"] = tests_section(args.tests_xml)
    if "bench" not in skip:
        log("bench: the classify engine at batch 1 and 32")
        with tempfile.TemporaryDirectory() as tmp:
            result["bench"] = bench_run(minilm_shaped(Path(tmp) / "minilm-shaped"), batch_sizes=(1, 32),
                                        num_rows=args.bench_rows, repeats=5, device=str(device))
        result["bench"]["model"] = "random-init MiniLM-L6 shape (6 layers, 384 wide)"
    if "generate" not in skip:
        log("generate: plain HF generate, the engine, self-speculation and HF assistant_early_exit at batch 1")
        result["generate"] = generate_section(args, device)
    text = json.dumps(result, indent=2)
    if args.json:
        atomic_write_json(args.json, result)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
