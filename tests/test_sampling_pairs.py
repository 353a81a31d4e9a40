"""The one sample -> score -> pair path (rollout/sampling.py): the best-versus-worst rule by hand, its
three callers agreeing, the flat view of a Scored grid, and a round's DPO config built from its parent's."""

from __future__ import annotations

import random

import pytest
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
    import alignkit.train.preference as pref
    from alignkit.feedback.rounds import dpo_round

    seen = {}
    monkeypatch.setattr(pref, "train_dpo", lambda cfg: seen.setdefault("cfg", cfg) and {"model_dir": "x"})
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


def test_every_sampling_job_shares_one_section_and_keeps_its_keys(tmp_path):
    """bon, rejection-sampling, sample-pairs, cai-sl, cai-rl, iterative-dpo and spin derive from the one
    sampling-job section (rollout/job.py); their YAML keys and per-job defaults load as before."""
    from alignkit.config import load_config
    from alignkit.feedback.constitution import CAIRLConfig, CAISLConfig
    from alignkit.feedback.spin import SPINConfig
    from alignkit.labeling import SamplePairsConfig
    from alignkit.rollout.job import NSamplesJob, SamplingJob
    from alignkit.train.rl_config import BoNConfig, RejectionSamplingConfig

    gen = "generation:\n  max_new_tokens: 7\n  temperature: 0.5\n"
    cases = [
        (BoNConfig, "model:\n  name_or_path: m\ndata:\n  path: p.jsonl\nn: 3\nseed: 5\nrewards: ['length:']\n"
                    "samples_path: s.jsonl\n", {"n": 3, "seed": 5, "samples_path": "s.jsonl"}),
        (RejectionSamplingConfig, "n: 6\nrewards: ['length:']\nmin_margin: 0.5\n", {"n": 6, "min_margin": 0.5}),
        (SamplePairsConfig, "n: 3\nseed: 1\ndata:\n  path: p.jsonl\n", {"n": 3, "seed": 1}),
        (CAISLConfig, "data:\n  path: p.jsonl\n  max_rows: 4\ncai:\n  rounds: 2\n", {}),
        (CAIRLConfig, "data:\n  path: p.jsonl\njudge:\n  model:\n    name_or_path: j\n", {}),
        (IterativeDPOConfig, "data:\n  path: p.jsonl\niterative:\n  reward: ['length:']\n  samples_per_prompt: 3\n",
         {}),
        (SPINConfig, "data:\n  path: p.jsonl\nspin:\n  rounds: 1\n", {}),
    ]
    for cls, text, expect in cases:
        path = tmp_path / f"{cls.__name__}.yaml"
        path.write_text(text + gen + "output: out\n")
        cfg = load_config(cls, path)
        assert isinstance(cfg, SamplingJob), cls
        assert cfg.output == "out" and cfg.generation.max_new_tokens == 7 and cfg.generation.temperature == 0.5
        assert {k: getattr(cfg, k) for k in expect} == expect, cls
    assert BoNConfig(rewards=["length:"]).model.name_or_path == BoNConfig.model_fields["model"].default.name_or_path
    # per-job defaults and ranges survive the shared base
    assert (SamplePairsConfig().n, SamplePairsConfig().seed, SamplePairsConfig().generation.max_new_tokens) == (2, 0, 64)
    assert (BoNConfig(rewards=["length:"]).n, BoNConfig(rewards=["length:"]).seed) == (4, 42)
    assert issubclass(SamplePairsConfig, NSamplesJob) and issubclass(BoNConfig, NSamplesJob)
    assert not issubclass(CAISLConfig, NSamplesJob)  # one sample chain per prompt: no n to set
    assert CAISLConfig(data={"path": "p", "max_rows": 2}).data.max_rows == 2  # cai keeps its own input section
    assert IterativeDPOConfig.model_fields["output"].default == "runs/alignkit"  # the training run's defaults win
    with pytest.raises(Exception, match="greater than or equal to 2"):
        SamplePairsConfig(n=1)
