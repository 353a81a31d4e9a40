"""Held-out means held out (issue 31, item 4): data.eval_fraction holds out whole prompts, grouped by
normalized prompt text; data.eval_split_by=row keeps the row split; what still overlaps is counted."""

import json

import pytest

from alignkit.config import DataConfig
from alignkit.data import DataError, prepare
from alignkit.data.formats import PreferenceExample, PromptExample, SFTExample
from alignkit.data.split import RowKeys, held_out_rows, normalize_text, overlaps, prompt_key
from tests.helpers import write_jsonl


def _pairs():
    """12 rows over 4 prompts (3 pairs each), written with case/space/width variants of one prompt so
    only normalization groups them; two prompts share a reply ("shared reply")."""
    rows = []
    variants = {"A": ["Tell me a joke", "tell me  a joke", " TELL ME A JOKE\n"],
                "B": ["Name a fruit", "name a fruit", "Ｎａｍｅ a fruit"],  # full-width letters (NFKC)
                "C": ["Write a haiku"] * 3, "D": ["Sum 2+2"] * 3}
    for g, texts in variants.items():
        for i, p in enumerate(texts):
            chosen = "shared reply" if (g, i) in {("A", 0), ("C", 0)} else f"good {g}{i}"
            rows.append({"prompt": p, "chosen": chosen, "rejected": f"bad {g}{i}", "group": g})
    return rows


def test_normalized_prompt_groups():
    assert normalize_text(" Ｔｅｌｌ  me\tA joke\n") == "tell me a joke"
    assert normalize_text("a,b") != normalize_text("a b")  # punctuation still counts
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "More"}, {"role": "assistant", "content": "ok"}]
    # a conversation is grouped by its turns before the first assistant reply
    assert prompt_key(SFTExample(row=0, messages=chat)) == prompt_key(SFTExample(row=1, messages=chat[:2]))
    assert prompt_key(SFTExample(row=0, messages=chat)) != prompt_key(
        SFTExample(row=1, messages=[{"role": "system", "content": "Hi"}, chat[1]]))  # the role counts
    assert prompt_key(PromptExample(row=0, prompt="HI ")) == prompt_key(PromptExample(row=3, prompt="hi"))
    # plain text has no prompt: equal texts group together, different ones do not
    assert prompt_key(SFTExample(row=0, prompt="", completion="Some text")) == \
        prompt_key(SFTExample(row=1, prompt="", completion="some  text"))
    assert prompt_key(SFTExample(row=0, prompt="", completion="a")) != prompt_key(SFTExample(row=1, prompt="", completion="b"))


def test_held_out_rows_take_whole_groups_and_row_split_does_not():
    ex = [PreferenceExample(row=r, prompt=f"p{r // 3}", chosen=f"c{r}", rejected=f"r{r}") for r in range(12)]
    keys = RowKeys.of(ex)
    for seed in range(20):
        held = held_out_rows(range(12), keys, 0.25, seed)
        assert len(held) == 3 and held == set(range(min(held), min(held) + 3)) and min(held) % 3 == 0
        # the row split draws rows, not groups: over 20 seeds it splits some prompt
    assert any(len({r // 3 for r in held_out_rows(range(12), keys, 0.25, s, by="row")}) > 1 for s in range(20))
    assert held_out_rows(range(12), keys, 0.25, 1) == held_out_rows(range(12), keys, 0.25, 1)
    # a fraction that would take every group still leaves one for training
    assert len(held_out_rows(range(12), keys, 0.9, 0)) == 9
    one = RowKeys.of([PreferenceExample(row=r, prompt="same", chosen="a", rejected="b") for r in range(4)])
    with pytest.raises(DataError, match="all 4 rows share one prompt.*eval_split_by=row"):
        held_out_rows(range(4), one, 0.25, 0, source="x.jsonl")


def test_overlaps_count_prompts_and_replies():
    train = RowKeys.of([PreferenceExample(row=0, prompt="p", chosen="yes", rejected="no"),
                        PreferenceExample(row=1, prompt="q", chosen="fine", rejected="bad")])
    held = RowKeys.of([PreferenceExample(row=0, prompt="P ", chosen="other", rejected="x"),  # prompt shared
                       PreferenceExample(row=1, prompt="r", chosen="Yes", rejected="y"),  # reply shared
                       PreferenceExample(row=2, prompt="s", chosen="new", rejected="z")])
    assert overlaps([0, 1], train, [0, 1, 1, 2], held) == {"prompt_overlap_with_train": 1,
                                                            "response_overlap_with_train": 2}


def test_eval_fraction_holds_out_whole_prompts(tiny_tok, tmp_path):
    rows = _pairs()
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    for seed in range(6):
        data = prepare("preference", DataConfig(path=str(path), eval_fraction=0.25), tiny_tok, seed=seed)
        group = lambda items: {rows[x["row"] - 1]["group"] for x in items}  # jsonl rows count from 1
        assert len(data.eval) == 3 and len(data.train) == 9
        assert len(group(data.eval)) == 1 and not group(data.eval) & group(data.train)
        report = data.reports[1].to_dict()
        assert report["prompt_overlap_with_train"] == 0
        # the one reply shared by prompts A and C is counted when one of them is held out
        assert report["response_overlap_with_train"] == (1 if group(data.eval) & {"A", "C"} else 0)
        assert report["split"] == f"0.25 of the training prompts (seed {seed}): 3 rows, 1 prompt"
        assert (data.reports[0].examples, report["rows_read"], report["examples"]) == (9, 3, 3)

    # the row split (the old behaviour, on request) lets held-out rows share prompts with training
    shared = []
    for seed in range(6):
        data = prepare("preference", DataConfig(path=str(path), eval_fraction=0.25, eval_split_by="row"),
                       tiny_tok, seed=seed)
        assert len(data.eval) == 3 and "training rows" in data.reports[1].split
        shared.append(data.reports[1].prompt_overlap_with_train)
    assert max(shared) > 0
    assert any("share their prompt with training rows" in line for line in data.summary_lines()) == (shared[-1] > 0)


def test_prompt_split_for_rankings_and_rl_prompts(tiny_tok, tmp_path):
    # a ranking row expands to 3 pairs; another row repeats its prompt: all 4 pairs go to one side
    rows = [{"prompt": "rank these", "responses": ["a", "b", "c"]}, {"prompt": "Rank these ", "chosen": "d", "rejected": "e"}]
    rows += [{"prompt": f"other {i}", "chosen": "f", "rejected": "g"} for i in range(6)]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    sides = set()
    for seed in range(8):
        data = prepare("preference", DataConfig(path=str(path), eval_fraction=0.2), tiny_tok, seed=seed)
        in_eval = sum(x["row"] in (1, 2) for x in data.eval)
        assert in_eval in (0, 4)
        sides.add(in_eval)
        assert data.reports[1].prompt_overlap_with_train == 0
    assert sides == {0, 4}  # the group lands on either side over seeds
    prompts = write_jsonl(tmp_path / "q.jsonl", [{"prompt": p} for p in ["x", "X", "y", "z", "w", "x "]])
    for seed in range(5):
        data = prepare("prompt", DataConfig(path=str(prompts), eval_fraction=0.3), tiny_tok, seed=seed)
        texts = lambda items: {normalize_text(x["prompt"]) for x in items}
        assert not texts(data.eval) & texts(data.train)


def test_data_report_json_has_the_overlaps(tmp_path, tiny_model):
    from alignkit.train.reward import train_rm

    path = write_jsonl(tmp_path / "p.jsonl", _pairs())
    train_rm(**{"model.name_or_path": str(tiny_model), "data.path": str(path), "data.eval_fraction": 0.25,
                "train.max_steps": 1, "train.batch_size": 4, "log.progress": False}, output=str(tmp_path / "run"))
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report[1]["role"] == "eval" and report[1]["prompt_overlap_with_train"] == 0
    assert "response_overlap_with_train" in report[1] and report[1]["examples"] == 3
