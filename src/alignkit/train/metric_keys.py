"""Every metric key the online-RL trainers log, defined once: name, unit and meaning (and, at the end,
the keys of the loop and the offline losses that the diagnostics read).

Trainers, diagnostics (``eval/diagnostics.py``), reports and docs import the constants below instead of
spelling the strings, so a key means one quantity everywhere; the module imports nothing of ours, so
any layer may read it. In particular ``kl/ref`` is always the KL of the policy to
its reference in **nats per sequence** of the rollout (sum over response tokens of the k1 estimate
``log pi(y_t) - log pi_ref(y_t)``, mean over the rollout's sequences: an unbiased estimate of the
sequence-level KL, the quantity ``diagnostics.kl_budget`` and ``alignkit eval`` use), and the per-token
figure has its own key, ``kl/ref_token``. The KL the algorithm *penalizes* (with its named estimator,
where it is placed) is ``kl/penalty``.

``held_out(key)`` is the key of the same quantity measured on held-out prompts (``eval/`` prefix).
docs/online-rl.md's metric table is generated from :data:`METRICS` (``markdown_table``) and a test
checks that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List


@dataclass(frozen=True)
class MetricKey:
    name: str
    unit: str
    meaning: str

    def __str__(self) -> str:
        return self.name


METRICS: Dict[str, MetricKey] = {}


def _key(name: str, unit: str, meaning: str) -> str:
    if name in METRICS:
        raise ValueError(f"metric key {name!r} defined twice")
    METRICS[name] = MetricKey(name, unit, meaning)
    return name


# ---- rewards
REWARD_MEAN = _key("rewards/mean", "reward", "total reward of the step's own rollout, before any shaping")
REWARD_STD = _key("rewards/std", "reward", "standard deviation of that total reward over the rollout")
REWARD_GOLD = _key("rewards/gold", "reward", "the gold_reward (logged, never optimized)")
REWARD_SHAPED = _key("rewards/shaped_mean", "reward",
                     "sequence reward trained on: after penalties, normalization, clipping and a "
                     "sequence-level KL penalty")
ZERO_STD_GROUPS = _key("rewards/zero_std_groups", "fraction",
                       "prompts whose samples all got the same reward (no signal for group advantages)")
# ---- KL
KL_REF = _key("kl/ref", "nats/sequence",
              "KL(policy || reference) of the rollout: per-sequence sum of the k1 estimate, mean over sequences")
KL_REF_TOKEN = _key("kl/ref_token", "nats/token", "the same KL per response token (sum over tokens / tokens)")
KL_PENALTY = _key("kl/penalty", "nats/sequence",
                  "the KL the algorithm penalizes, with its kl_estimator, per sequence (rollout time)")
KL_COEF = _key("kl/coef", "1/nats", "KL coefficient beta (adaptive or fixed)")
# ---- policy
ENTROPY = _key("policy/entropy", "nats/token", "mean per-token entropy of the policy on its samples")
CLIP_FRAC = _key("policy/clip_frac", "fraction", "tokens (or sequences, GSPO) whose clipped branch is active")
APPROX_KL = _key("policy/approx_kl", "nats/token", "k3 estimate of KL(pi_old || pi) during the update")
RATIO_MEAN = _key("policy/ratio_mean", "ratio", "mean importance ratio pi/pi_old (per token; per sequence for GSPO)")
POLICY_LOSS = _key("policy/loss", "loss", "policy-gradient part of the loss")
SEQ_LOGPROB = _key("policy/seq_logprob_mean", "nats/sequence", "mean summed log-prob of a sampled response")
ADV_MEAN = _key("policy/advantage_mean", "advantage", "mean advantage over response tokens")
ADV_STD = _key("policy/advantage_std", "advantage", "standard deviation of the advantages over response tokens")
# ---- critic
VALUE_LOSS = _key("value/loss", "loss", "value loss (before vf_coef)")
VALUE_MSE = _key("value/mse", "reward^2", "mean squared error of the values against the returns")
VALUE_CLIP_FRAC = _key("value/clip_frac", "fraction", "tokens where the clipped value term is active")
EXPLAINED_VARIANCE = _key("value/explained_variance", "fraction",
                          "1 - Var(R - V)/Var(R) at rollout time (1: perfect critic, <= 0: useless)")
VALUE_MEAN = _key("value/mean", "reward", "mean value over response tokens at rollout time")
# ---- rollout
LENGTH_MEAN = _key("rollout/length_mean", "tokens", "mean response length")
EOS_RATE = _key("rollout/eos_rate", "fraction", "responses that ended with EOS (the rest hit max_new_tokens)")
DISTINCT_2 = _key("diversity/distinct_2", "fraction", "distinct bigrams over the rollout's texts")
# ---- reward against surface markers (alignkit.eval.markers; the verbosity and reward_marker alerts)
CORR_LENGTH = _key("rewards/corr_length", "correlation", "Pearson correlation of the reward with the response length")
CORR_HEDGING = _key("rewards/corr_hedging", "correlation",
                    "correlation of the reward with a hedge phrase in the response (0/1); nan when no or every response hedges")
CORR_LIST = _key("rewards/corr_list", "correlation", "correlation of the reward with a markdown list in the response (0/1)")
CORR_AGREEMENT = _key("rewards/corr_agreement", "correlation",
                      "correlation of the reward with an agreement or flattery phrase in the response (0/1)")
# ---- dynamic sampling
DROPPED_GROUPS = _key("sampling/dropped_groups", "groups",
                      "all-equal-reward groups dropped this step (every process, every round)")
SAMPLING_ROUNDS = _key("sampling/rounds", "rounds", "rollout rounds this step (1 without dynamic sampling)")
SHORT_GROUPS = _key("sampling/short_groups", "groups",
                    "slots still without an informative group at the cap, topped up with dropped groups")
# ---- the loop
TRAIN_LOSS = _key("train/loss", "loss", "total loss of the update, normalized by its global units")
GRAD_NORM = _key("train/grad_norm", "norm", "gradient norm before clipping")
LR = _key("train/lr", "lr", "learning rate of the first optimizer group (the policy)")

# ---- keys of the loop and the offline losses that the diagnostics read (not in the online-RL table above)
TRAIN_UNITS = "train/units"  # loss units of the update, every process (0: every label masked)
WEIGHT_RMS = "train/weight_rms"  # root mean square of the trained weights
REWARD_MARGIN = "rewards/margin"  # implicit (DPO family) or model (reward models) reward, chosen minus rejected
REWARD_ACCURACY = "rewards/accuracy"  # pairs whose chosen reward is higher
LOGP_CHOSEN = "logps/chosen"  # summed log-prob of the chosen response
ACCURACY = "accuracy"  # held-out pair accuracy, logged as eval/accuracy
LOSS = "loss"  # held-out loss, logged as eval/loss


def held_out(key: str) -> str:
    """The held-out twin of ``key`` (``eval/`` prefix)."""
    return key if key.startswith("eval/") else f"eval/{key}"


def unit_of(key: str) -> str:
    """Unit of a key (``eval/`` twins and ``rewards/<component>`` included); KeyError if unknown."""
    base = key[5:] if key.startswith("eval/") else key
    if base in METRICS:
        return METRICS[base].unit
    if base.startswith("rewards/"):
        return "reward"
    raise KeyError(key)


def markdown_table(prefixes: List[str] = None) -> str:
    """The metric table of docs/online-rl.md."""
    lines = ["| metric | unit | meaning |", "|---|---|---|"]
    for k in METRICS.values():
        if prefixes is None or any(k.name.startswith(p) for p in prefixes):
            lines.append(f"| `{k.name}` | {k.unit} | {k.meaning} |")
    return "\n".join(lines)


__all__ = ["MetricKey", "METRICS", "held_out", "unit_of", "markdown_table"] + [
    n for n in dir() if n.isupper() and n != "METRICS"]
