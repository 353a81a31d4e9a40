"""Reward model: learns a preference set, reads the last real token, `alignkit score` writes scores."""

import json

import pytest
import torch

from alignkit.data.layout import SeqBatch, pad_sequences
from alignkit.models.reward import last_token_index, reward_scores
from alignkit.train.reward import train_rm
from tests.helpers import pref_rows


def test_last_token_index_any_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_score_read_at_last_real_token_with_pad_eq_eos(tiny_model):
    from transformers import AutoModelForSequenceClassification

    from alignkit.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).eval()
    torch.nn.init.normal_(model.score.weight)
    eos = tok.eos_token_id
    seq = [5, 6, 7, eos]  # a response that ends with EOS, which is also the pad token
    alone = reward_scores(model, pad_sequences([seq], [[0] * 4], eos))
    right = reward_scores(model, pad_sequences([seq, [5] * 7], [[0] * 4, [0] * 7], eos))
    left = reward_scores(model, SeqBatch(torch.tensor([[eos] * 3 + seq]), torch.tensor([[0] * 3 + [1] * 4]),
                                         torch.zeros(1, 7, dtype=torch.long)))
    assert torch.allclose(alone[0], right[0], atol=1e-5) and torch.allclose(alone[0], left[0], atol=1e-5)
    # and it is the EOS position, not the token before it (what a pad-id search would pick)
    before_eos = reward_scores(model, pad_sequences([seq[:-1]], [[0] * 3], eos))
    assert not torch.allclose(alone, before_eos)


def test_reward_model_learns_preferences(tmp_path, tiny_model, jsonl):
    train = jsonl("train.jsonl", pref_rows(160, 0))
    held = jsonl("held.jsonl", pref_rows(60, 1))
    s = train_rm(**{"model.name_or_path": str(tiny_model), "data.path": str(train), "data.eval_path": str(held),
                    "train.epochs": 3, "train.batch_size": 8, "optim.lr": 2e-3, "log.progress": False},
                 output=str(tmp_path / "rm"))
    assert s["eval/accuracy_before"] == pytest.approx(0.5)  # zero-initialised head: every score ties
    assert s["eval/accuracy"] >= 0.9, s
    assert s["eval/margin"] > 0

    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm" / "model")
    assert m.config.num_labels == 1 and m.config.pad_token_id != m.config.eos_token_id

    # alignkit score on the held-out pairs agrees with the trainer's accuracy
    from alignkit.cli import build_cli

    out = tmp_path / "scores.jsonl"
    build_cli().main(["score", "--reward-model", str(tmp_path / "rm" / "model"), "--data", str(held),
                      "--output", str(out)], standalone_mode=False)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert len(rows) == 60 and all("score_chosen" in r and "score_rejected" in r for r in rows)
    acc = sum(r["score_chosen"] > r["score_rejected"] for r in rows) / len(rows)
    assert acc == pytest.approx(s["eval/accuracy"], abs=1e-9)


def test_score_rankings_and_single_completions(tmp_path, tiny_model, jsonl):
    from alignkit.score import score

    data = jsonl("d.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}, {"prompt": "p", "completion": "a"},
                             {"nothing": 1}])
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    torch.nn.init.normal_(m.score.weight)
    m.save_pretrained(tmp_path / "rm")
    from alignkit.testing import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "rm")
    s = score(reward_model=str(tmp_path / "rm"), data={"path": str(data)}, output=str(tmp_path / "o.jsonl"))
    rows = [json.loads(l) for l in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert s["rows_scored"] == 2 and s["rows_dropped"] == 1
    assert len(rows[0]["scores"]) == 3 and isinstance(rows[1]["score"], float)
    # the completion "a" scores the same alone as as the first ranked response
    assert rows[1]["score"] == pytest.approx(rows[0]["scores"][0], abs=1e-5)


def test_group_rankings_rebuilds_order_and_keeps_pairs():
    from alignkit.train.reward import collate_rankings, group_rankings

    def pair(row, c, r, **kw):
        return {"prompt_ids": [1, 2], "chosen_ids": c, "rejected_ids": r, "row": row, "soft_label": 1.0, **kw}

    # row 0: the ranking B > A > C expanded to (B,A), (B,C), (A,C); row 1: a plain pair with a soft label
    items = [pair(0, [7], [5]), pair(0, [7], [9]), pair(0, [5], [9]), pair(1, [4], [3], soft_label=0.7)]
    els, split = group_rankings(items)
    assert split == 0 and [e["responses"] for e in els] == [[[7], [5], [9]], [[4], [3]]]
    assert els[1]["soft_label"] == 0.7
    b = collate_rankings(els, pad_id=0)
    assert b.index.tolist() == [[0, 1, 2], [3, 4, 0]] and b.mask.tolist() == [[True] * 3, [True, True, False]]
    assert b.seq.input_ids[:, :3].tolist() == [[1, 2, 7], [1, 2, 5], [1, 2, 9], [1, 2, 4], [1, 2, 3]]
    # pairs that imply no strict order (a cycle) stay separate K = 2 elements, and are counted
    cyc, split = group_rankings([pair(0, [1], [2]), pair(0, [2], [3]), pair(0, [3], [1])])
    assert split == 1 and [e["responses"] for e in cyc] == [[[1], [2]], [[2], [3]], [[3], [1]]]


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_reward_model_learns_rankings(tmp_path, tiny_model, jsonl, loss):
    from tests.helpers import ranking_rows

    train = jsonl("train.jsonl", ranking_rows(48, 0))
    held = jsonl("held.jsonl", ranking_rows(24, 1))
    s = train_rm(**{"model.name_or_path": str(tiny_model), "data.path": str(train), "data.eval_path": str(held),
                    "train.epochs": 4, "train.batch_size": 4, "optim.lr": 3e-3, "log.progress": False,
                    "rm.loss": loss}, output=str(tmp_path / "rm"))
    assert s["eval/accuracy_before"] == pytest.approx(0.5)
    assert s["eval/ranking_exact_before"] == 0.0  # all rewards tie: no strict order
    assert s["eval/accuracy"] >= 0.8, s
    assert s["eval/plackett_luce_nll"] < s["eval/plackett_luce_nll_before"] - 0.5
    steps = [json.loads(l) for l in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert max(x.get("step", 0) for x in steps) == 48  # one element per prompt: 48 prompts / 4 * 4 epochs
