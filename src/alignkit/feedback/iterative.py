"""Iterative (online) DPO: sample with the current policy, score, pair best vs worst, a DPO round, repeat.

Xu et al. 2023 ("Some things are more CRINGE than others: Iterative preference optimization with the
pairwise Cringe loss") and Xiong et al. 2024 ("Iterative Preference Learning from Human Feedback:
Bridging Theory and Practice for RLHF under KL-Constraint", online iterative DPO): offline DPO learns
from responses of some other policy; re-sampling from the current policy each round keeps the pairs
on-policy. Round K (``OUTPUT/round-K/``):

1. sample ``samples_per_prompt`` responses per prompt with the current policy (``generation``);
2. score them with ``iterative.reward`` (any reward source, ``judge:`` included);
3. per prompt, the best versus the worst response is a pair; prompts whose best and worst rewards
   are within ``min_gap`` are ties and are dropped (counted), as are empty samples;
4. train one DPO round (:func:`alignkit.train.preference.train_dpo`) on the pairs, the reference being
   the previous round's policy or the original one (``iterative.reference``);
5. evaluate: the mean reward (``eval_reward``, default the training reward) of the new policy's
   samples on held-out prompts (``data.eval_path`` / ``data.eval_fraction``; without either, the
   training prompts, flagged in the summary).

Round 0 evaluates the starting policy, so ``summary.json``'s ``reward_per_round`` starts with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

from pydantic import Field, field_validator, model_validator

from alignkit.config import RunConfig, as_config, to_yaml
from alignkit.data import prepare
from alignkit.data.load import write_jsonl
from alignkit.feedback.common import clean_generation, load_policy, write_summary
# the round helpers live in feedback/rounds.py (shared with spin); these names stay importable from here
from alignkit.feedback.rounds import (RoundOptions, check_round_config, dpo_round, drop_model,  # noqa: F401
                                      finish_round, mean, round_slice, run_rounds)
from alignkit.models.loading import load_tokenizer
from alignkit.rewards import RewardSpec, build_reward
from alignkit.rollout.generate import GenerationConfig
from alignkit.rollout.job import SamplingJob
from alignkit.rollout.sampling import pick_best_worst, sample_and_score
from alignkit.train.common import report_data
from alignkit.train.logging import console
from alignkit.train.preference import DPOOptions
from alignkit.train.rundir import write_marker

RewardList = List[Union[str, Dict[str, Any]]]


def _reward_list(v):
    if v is None:
        return v
    v = [v] if isinstance(v, (str, dict)) else list(v)
    if not v:
        raise ValueError("at least one reward spec is needed (e.g. python:alignkit.rewards.toy:char_share)")
    for s in v:
        RewardSpec.coerce(s)  # unknown kinds and bad weights fail here, naming the spec
    return v


class IterativeOptions(RoundOptions):
    reward: RewardList = Field(description="Reward specs that score the samples (KIND:ARG@WEIGHT strings or "
                                           "{kind, arg, weight, options} mappings), e.g. judge:MODEL or "
                                           "python:alignkit.rewards.toy:char_share.")
    eval_reward: Optional[RewardList] = None
    """Reward for the per-round evaluation (a gold reward); empty: the training reward."""
    samples_per_prompt: int = Field(4, ge=2)
    """Responses sampled per prompt (k); the best and the worst form the pair."""
    min_gap: float = Field(0.0, ge=0)
    """Pairs whose best-minus-worst reward is at most this are ties: dropped and counted."""
    eval_samples: int = Field(2, gt=0)
    """Samples per held-out prompt in the evaluation."""
    eval_temperature: Optional[float] = Field(None, ge=0)
    """Sampling temperature of the evaluation (empty: generation.temperature; 0: greedy)."""

    @field_validator("reward", "eval_reward", mode="before")
    @classmethod
    def _check_reward(cls, v):
        return _reward_list(v)


class IterativeDPOConfig(RunConfig, SamplingJob):
    """Iterative / online DPO: rounds of sampling, reward scoring, best-vs-worst pairs and DPO."""

    command: Literal["iterative-dpo"] = "iterative-dpo"
    dpo: DPOOptions = DPOOptions()
    """Loss and reference options of each DPO round (dpo.ref_model is set per round)."""
    iterative: IterativeOptions
    """Rounds, sampling, reward and evaluation."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling of the candidate responses."""

    @model_validator(mode="before")
    @classmethod
    def _section_present(cls, data):
        # a missing section should report the missing field inside it: "iterative.reward: Field required"
        if isinstance(data, dict) and data.get("iterative") is None:
            data = {**data, "iterative": {}}
        return data

    @model_validator(mode="after")
    def _check(self):
        check_round_config(self)
        return self


# ----------------------------------------------------------------------------- building blocks

def best_vs_worst(texts: Sequence[str], rewards: Sequence[float], groups: Sequence[int], min_gap: float = 0.0
                  ) -> Tuple[List[Tuple[int, str, str, float, float]], Dict[str, int]]:
    """Per group (prompt): (group, best text, worst text, best reward, worst reward).

    Empty texts are left out (the data layer cannot hold an empty response); then each group is paired
    by the one best-versus-worst rule (:func:`alignkit.rollout.sampling.pick_best_worst`, the first of
    equally scored samples wins): groups with fewer than two non-empty samples are dropped, and so are
    ties (best - worst <= min_gap, or best and worst the same text); all three are counted.
    """
    by: Dict[int, List[Tuple[float, str]]] = {}
    counts = {"empty_samples": 0, "too_few_samples": 0, "ties": 0}
    for t, r, g in zip(texts, rewards, groups):
        by.setdefault(g, [])
        if t.strip():
            by[g].append((r, t))
        else:
            counts["empty_samples"] += 1
    pairs = []
    for g, cands in by.items():
        pick = pick_best_worst([r for r, _ in cands], min_gap, [t for _, t in cands])
        if pick.status == "too_few":
            counts["too_few_samples"] += 1
        elif pick.pair is None:
            counts["ties"] += 1
        else:
            (rb, tb), (rw, tw) = cands[pick.best], cands[pick.worst]
            pairs.append((g, tb, tw, rb, rw))
    return pairs, counts


def score_flat(model, tok, items: List[Dict[str, Any]], reward, gen: GenerationConfig, n: int):
    """(texts, rewards, prompt index per text, ended flags) of ``n`` cleaned samples per prompt item:
    :func:`alignkit.rollout.sampling.sample_and_score` in one chunk (one reward call, so a reward's
    ``metrics`` describe all of them), as flat lists."""
    if gen.engine == "vllm":
        raise ValueError("generation.engine='vllm': the feedback commands sample in-process "
                         "(generation.engine=fast or hf)")
    if not items:
        return [], [], [], []
    return sample_and_score(model, tok, items, gen, reward, n, prompts_per_chunk=None,
                            clean=clean_generation).flat()


# ----------------------------------------------------------------------------- rounds

class IterativeRoundConfig(IterativeDPOConfig):
    """One round of iterative DPO: a stage of the pipeline that :func:`run_iterative_dpo` generates."""

    command: Literal["iterative-dpo-round"] = "iterative-dpo-round"
    round: int = Field(0, ge=0)
    """Round index; round 0 only evaluates the starting policy."""
    start_model: Optional[str] = None
    """The policy the round starts from (the previous round's model_dir); empty: model.name_or_path."""


def run_iterative_round(config: Union[IterativeRoundConfig, Dict[str, Any], None] = None, **overrides
                        ) -> Dict[str, Any]:
    """Round K into OUTPUT/round-K: sample, score, pair best vs worst, a DPO round, evaluate."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    cfg = as_config(IterativeRoundConfig, config, overrides)
    opts, k, rdir = cfg.iterative, cfg.round, Path(cfg.output)
    set_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model)
    data = prepare("prompt", cfg.data, tok, seed=cfg.train.seed)
    eval_items, eval_split = (data.eval, "eval") if data.eval else (data.train, "train")
    reward = build_reward(opts.reward)
    gold = build_reward(opts.eval_reward) if opts.eval_reward else reward
    eval_gen = cfg.generation if opts.eval_temperature is None else \
        cfg.generation.model_copy(update={"temperature": opts.eval_temperature})
    original = cfg.model.name_or_path
    current = cfg.start_model or original
    model, _ = load_policy(current, cfg.model)

    def evaluate() -> Dict[str, Any]:
        set_seed(cfg.train.seed + 7919 * k)
        texts, rewards, _, _ = score_flat(model, tok, eval_items, gold, eval_gen, opts.eval_samples)
        rec = {"round": k, "eval_reward": mean(rewards), "eval_length_chars": mean([len(t) for t in texts]),
               "eval_split": eval_split, "model_dir": current}
        if len(gold.names) > 1:  # each component's mean, unweighted
            rec["eval_components"] = gold.metrics("")
        console().print(f"round {k}: mean eval reward {rec['eval_reward']:.4f}", style="green")
        return rec

    if k == 0:
        return finish_round(rdir, evaluate())
    items = round_slice(data.train, k, opts.prompts_per_round)
    set_seed(cfg.train.seed + k)
    texts, rewards, groups, ended = score_flat(model, tok, items, reward, cfg.generation,
                                                     opts.samples_per_prompt)
    unfinished = sum(1 for e in ended if not e)  # re-encoded for DPO, these get an EOS they never sampled
    pairs, counts = best_vs_worst(texts, rewards, groups, opts.min_gap)
    rdir.mkdir(parents=True, exist_ok=True)
    write_marker(rdir, "iterative-dpo-round", files=[])  # alignkit's directory; its samples are not the run's
    write_jsonl(rdir / "samples.jsonl", ({"prompt": items[g]["prompt"], "completion": t, "reward": r}
                                         for t, r, g in zip(texts, rewards, groups)))
    write_jsonl(rdir / "pairs.jsonl", ({"prompt": items[g]["prompt"], "chosen": c, "rejected": j,
                                        "reward_chosen": rc, "reward_rejected": rj}
                                       for g, c, j, rc, rj in pairs))
    previous = current
    train_summary: Dict[str, Any] = {}
    if pairs:
        del model
        train_summary = dpo_round(cfg, current, original, rdir / "pairs.jsonl", rdir, k, opts.reference)
        current = train_summary["model_dir"]
        model, _ = load_policy(current, cfg.model)
    else:
        console().print(f"round {k}: no pairs (all ties or empty samples); the policy is unchanged",
                        style="yellow")
    rec = evaluate()
    rec.update({"prompts": len(items), "samples": len(texts), "unfinished_samples": unfinished,
                "pairs": len(pairs), "dropped": counts,
                "train_reward": mean(rewards), "pair_gap": mean([b - w for *_, b, w in pairs]),
                "dpo_loss": train_summary.get("train/loss"),
                "dpo_margin": train_summary.get("rewards/margin")})
    finish_round(rdir, rec)
    if not opts.keep_round_models and current != previous:
        drop_model(previous, keep=[original, current])
    return rec


def run_iterative_dpo(config: Union[IterativeDPOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Iterative DPO; the Python twin of ``alignkit iterative-dpo``. Returns the summary.

    The rounds are the stages of a generated pipeline (:func:`run_rounds`): round 0 evaluates the
    starting policy, round K >= 1 is :func:`run_iterative_round`."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    cfg = as_config(IterativeDPOConfig, config, overrides)
    opts = cfg.iterative
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    set_seed(cfg.train.seed)
    data = prepare("prompt", cfg.data, load_tokenizer(cfg.model), seed=cfg.train.seed)  # bad data fails here
    report_data(data, out, True)
    records = run_rounds(cfg, "iterative", "alignkit.feedback.iterative:IterativeRoundConfig",
                         "alignkit.feedback.iterative:run_iterative_round", range(0, opts.rounds + 1))
    with (out / "rounds.jsonl").open("w") as f:
        f.writelines(json.dumps(r, default=float) + "\n" for r in records)
    summary = {"command": "iterative-dpo", "rounds": opts.rounds,
               "reward_per_round": [r["eval_reward"] for r in records],
               "train_reward_per_round": [r.get("train_reward") for r in records[1:]],
               "pairs_per_round": [r.get("pairs") for r in records[1:]],
               "eval_split": records[-1]["eval_split"], "reference": opts.reference,
               "model_dir": records[-1]["model_dir"]}
    summary["reward_gain"] = summary["reward_per_round"][-1] - summary["reward_per_round"][0]
    write_summary(out, summary)
    return summary
