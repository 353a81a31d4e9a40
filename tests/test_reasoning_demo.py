"""The reasoning demo's rule-checked rewards, its data, and its pipeline end to end (quick preset, tiny
model: checks the wiring; the real numbers are in docs/reasoning-demo.md)."""

import json

from alignkit.rewards.reasoning import answer_format, reasoning_rows, tagged_correct
from tests.helpers import one_thread as _one_thread  # noqa: F401  (autouse: one thread per module)


def test_rewards_check_the_tagged_answer():
    texts = ["2 + 3 = 5 <answer>5</answer>", "the answer is 5", "<answer> 5 </answer><answer>6</answer>",
             "<answer>five</answer>", "<answer>5</answer>"]
    assert tagged_correct(None, texts, answer=["5", "5", "5", "5", "6"]) == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert answer_format(None, texts) == [1.0, 0.0, 0.0, 0.0, 1.0]


def test_rows_have_checkable_answers():
    rows = reasoning_rows(20, seed=0)
    text = [r["prompt"][0]["content"] for r in rows]  # one user message each (the chat template applies)
    assert len(rows) == 20 and all("<answer>" in t for t in text)
    add = text[0].split("?")[0].replace("What is ", "").split(" + ")
    assert int(rows[0]["answer"]) == int(add[0]) + int(add[1])
    word = text[1].split('"')[1]
    listed = text[1].split(": ", 1)[1].split("?")[0].split(", ")
    assert int(rows[1]["answer"]) == listed.count(word)
    assert reasoning_rows(20, seed=0) == rows and reasoning_rows(20, seed=1) != rows


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
