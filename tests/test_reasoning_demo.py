"""The reasoning demo's rule-checked rewards, its data, and its pipeline end to end (quick preset, tiny
model: checks the wiring; the real numbers are in docs/reasoning-demo.md)."""

import json

import pytest

from alignkit.rewards.reasoning import answer_format, reasoning_rows, tagged_correct
from tests.helpers import one_thread as _one_thread  # noqa: F401  (autouse: one thread per module)


def test_rewards_check_the_tagged_answer():
    texts = ["2 + 3 = 5 <answer>5</answer>", "the answer is 5", "<answer> 5 </answer><answer>6</answer>",
             "<answer>five</answer>", "<answer>5</answer>"]
    assert tagged_correct(None, texts, answer=["5", "5", "5", "5", "6"]) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert answer_format(None, texts) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_rows_have_checkable_answers():
    rows = reasoning_rows(20, seed=0)
    assert len(rows) == 20
    for r in rows:
        # the worked example (one user/assistant turn pair), then the question; the chat template applies
        assert [m["role"] for m in r["prompt"]] == ["user", "assistant", "user"]
        assert r["prompt"][1]["content"] == "3 + 4 = 7 <answer>7</answer>"
        q = r["prompt"][2]["content"]
        assert q.startswith(r["question"]) and "<answer></answer>" in q
        a, b = r["question"].removeprefix("What is ").removesuffix("?").split(" + ")
        assert 2 <= int(a) <= 30 and 2 <= int(b) <= 30 and int(r["answer"]) == int(a) + int(b)
    assert len({r["question"] for r in rows}) == 20 and "What is 3 + 4?" not in {r["question"] for r in rows}
    assert reasoning_rows(20, seed=0) == rows and reasoning_rows(20, seed=1) != rows
    # the worked example's reply gets full marks from both rules
    example = reasoning_rows(1, seed=0)[0]["prompt"][1]["content"]
    assert tagged_correct(None, [example], answer=["7"]) == [1.0] and answer_format(None, [example]) == [1.0]


def test_heldout_rows_exclude_the_training_questions():
    train = reasoning_rows(40, seed=1, low=2, high=9)  # 64 questions with numbers 2..9, minus 3 + 4
    held = reasoning_rows(23, seed=2, low=2, high=9, exclude=[r["question"] for r in train])
    assert not {r["question"] for r in train} & {r["question"] for r in held}
    assert len(held) == 23  # all that is left: 64 - 1 - 40
    with pytest.raises(ValueError, match="only 23 distinct"):
        reasoning_rows(24, seed=2, low=2, high=9, exclude=[r["question"] for r in train])


def test_reasoning_demo_runs_end_to_end_quick(tmp_path, tiny_model):
    from alignkit.demo import demo

    res = demo(task="reasoning", quick=True, model=str(tiny_model), output=str(tmp_path / "r"))
    assert set(res["results"]) == {"base", "GRPO (DAPO)"}
    for m in res["results"].values():
        assert 0.0 <= m["rewards/accuracy"] <= 1.0 and 0.0 <= m["rewards/format"] <= 1.0
    rows = [json.loads(l) for l in (tmp_path / "r" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "rewards/mean" in r]
    assert len(train) == 2 and "sampling/rounds" in train[0] and "rewards/accuracy" in train[0]
    assert (tmp_path / "r" / "compare" / "compare.html").is_file()
