"""The one sample -> score -> pair path (rollout/sampling.py): the best-versus-worst rule by hand, its
three callers agreeing, the flat view of a Scored grid, and a round's DPO config built from its parent's."""

from __future__ import annotations

import random

import torch

from alignkit.feedback.iterative import IterativeDPOConfig, best_vs_worst
from alignkit.labeling import make_pairs
from alignkit.rollout.sampling import Pick, Scored, pick_best_worst, rejection_datasets


def test_pick_best_worst_by_hand():
    # first of the equal best (1, not 3) and of the equal worst (0, not 2)
    assert pick_best_worst([0.2, 0.9, 0.2, 0.9]) == Pick(1, 0, "pair")
    assert pick_best_worst([0.2, 0.9, -0.1, 0.9]).pair == (1, 2)
    assert pick_best_worst([0.5, 0.5]) == Pick(0, 0, "tie")
    assert pick_best_worst([0.5, 0.45], min_margin=0.1) == Pick(0, 1, "below_margin")
    assert pick_best_worst([0.5, 0.45], min_margin=0.04) == Pick(0, 1, "pair")
    assert pick_best_worst([0.5, 0.4], texts=["same", "same"]) == Pick(0, 1, "tie")  # no preference at all
    assert pick_best_worst([0.5, 0.4], texts=["a", "b"]).pair == (0, 1)
    assert pick_best_worst([1.0]) == Pick(0, 0, "too_few")
    assert pick_best_worst([]) == Pick(None, None, "too_few")
    assert pick_best_worst([1.0]).pair is None


def test_the_three_callers_pair_alike():
    """label's make_pairs, rejection-sampling's rejection_datasets and iterative DPO's best_vs_worst give
    the same chosen and rejected sample for every prompt, ties included (scores on a coarse grid, so
    many tie)."""
    rng = random.Random(0)
    P, N, margin = 60, 4, 0.25
    scores = [[rng.choice([0.0, 0.25, 0.5, 1.0]) for _ in range(N)] for _ in range(P)]
    texts = [[f"p{i}s{j}" for j in range(N)] for i in range(P)]
    expected = [pick_best_worst(sc, margin).pair for sc in scores]
    assert any(e is None for e in expected) and any(e is not None for e in expected)

    assert [(make_pairs(sc, "best_worst", margin) or [None])[0] for sc in scores] == expected

    items = [{"prompt": f"p{i}"} for i in range(P)]
    scored = Scored(items, texts, torch.tensor(scores, dtype=torch.float64), {}, torch.ones(P, N, dtype=torch.bool))
    _, pairs, _ = rejection_datasets(scored, min_margin=margin)
    want = [(texts[i][c], texts[i][r]) for i, e in enumerate(expected) if e for c, r in [e]]
    assert [(p["chosen"], p["rejected"]) for p in pairs] == want

    flat_texts, flat_rewards, groups, _ = scored.flat()
    got, counts = best_vs_worst(flat_texts, flat_rewards, groups, min_gap=margin)
    assert [(c, j) for _, c, j, _, _ in got] == want
    assert counts["ties"] == sum(e is None for e in expected)


def test_scored_flat_is_prompt_by_prompt():
    s = Scored([{"prompt": "a"}, {"prompt": "b"}], [["x", "y"], ["z", "w"]],
               torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64), {},
               torch.tensor([[True, False], [False, True]]))
    assert s.flat() == (["x", "y", "z", "w"], [1.0, 2.0, 3.0, 4.0], [0, 0, 1, 1], [True, False, False, True])


def test_dpo_round_keeps_every_parent_section(tmp_path, monkeypatch):
    """The round's DPO config is the parent's with only the round's own fields replaced: hub and
    overwrite (once dropped by a hand-written list) survive."""
    import alignkit.feedback.rounds as rounds
    from alignkit.feedback.rounds import dpo_round

    seen = {}
    monkeypatch.setattr(rounds, "train_dpo", lambda cfg: seen.setdefault("cfg", cfg) and {"model_dir": "x"})
    cfg = IterativeDPOConfig(output=str(tmp_path), overwrite=True,
                             hub={"push": True, "model_id": "me/round", "private": True},
                             optim={"lr": 3e-4}, train={"seed": 5},
                             iterative={"reward": ["python:alignkit.rewards.toy:char_share"]})
    dpo_round(cfg, "start", "orig", tmp_path / "pairs.jsonl", tmp_path / "round-2", 2, "original")
    inner = seen["cfg"]
    assert inner.overwrite is True
    assert inner.hub.push is True and inner.hub.model_id == "me/round" and inner.hub.private is True
    assert inner.optim.lr == 3e-4 and inner.train.seed == 7
    assert inner.model.name_or_path == "start" and inner.dpo.ref_model == "orig" and inner.lora.save == "merged"
    assert inner.data.path == str(tmp_path / "pairs.jsonl") and inner.output == str(tmp_path / "round-2")
    assert inner.resume is None
