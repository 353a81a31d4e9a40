"""Best-of-N sampling and rejection sampling (``alignkit bon``, ``alignkit rejection-sampling``).

Best-of-N (Nakano et al. 2021; Stiennon et al. 2020): draw N samples per prompt, keep the one the reward
scores highest. It is the simplest way to spend compute on a reward and the baseline every RL method
should beat at equal KL. Rejection sampling (Touvron et al. 2023, Llama 2 sec. 3.2.3) turns the same
samples into training data: the best sample per prompt becomes an SFT row, best-versus-worst a
preference pair (pairs whose best and worst tie carry no preference and are dropped, counted).

This module is also the one sample -> score -> pair path of every command that builds pairs from its
own samples (``rejection-sampling``, ``label``, ``iterative-dpo``): :func:`sample_and_score` draws and
scores, :func:`pick_best_worst` holds the one best-versus-worst rule with its tie rule.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from alignkit.config import as_config, to_yaml
from alignkit.data import prepare
from alignkit.data.load import write_jsonl
from alignkit.models.loading import best_device, load_causal_lm, load_tokenizer
from alignkit.rewards import build_reward
from alignkit.rollout.generate import GenerationConfig, generate
from alignkit.train.common import report_data
from alignkit.train.logging import console
from alignkit.train.rl_config import BoNConfig, RejectionSamplingConfig


@dataclass
class Scored:
    """N samples for each of P prompts, scored. Sample j of prompt i is ``texts[i][j]``."""

    items: List[Dict[str, Any]]
    texts: List[List[str]]
    rewards: torch.Tensor  # (P, N) weighted total reward
    components: Dict[str, torch.Tensor]  # name -> (P, N) unweighted component scores
    ended: torch.Tensor  # (P, N) bool: reached EOS

    @property
    def best(self) -> torch.Tensor:
        """(P,) index of each prompt's best sample (the first one on ties)."""
        return self.rewards.argmax(dim=1)

    @property
    def worst(self) -> torch.Tensor:
        return self.rewards.argmin(dim=1)


    def flat(self) -> Tuple[List[str], List[float], List[int], List[bool]]:
        """(texts, rewards, prompt index, ended) as flat lists, sample by sample, prompt by prompt."""
        P, n = self.rewards.shape if self.rewards.dim() == 2 else (len(self.items), 0)
        return ([t for row in self.texts for t in row], self.rewards.reshape(-1).tolist(),
                [i for i in range(P) for _ in range(n)], [bool(e) for e in self.ended.reshape(-1).tolist()])


@torch.no_grad()
def sample_and_score(policy, tokenizer, items: Sequence[Dict[str, Any]], gen: GenerationConfig, reward, n: int,
                     prompts_per_chunk: Optional[int] = 64, clean: Optional[Callable[[str], str]] = None) -> Scored:
    """Sample ``n`` responses per prompt item (from ``prepare("prompt", ...)``) and score them.

    The one sample -> score step of ``bon``, ``rejection-sampling`` and ``iterative-dpo``. ``reward``
    is called as ``reward(prompts, texts, rows)`` once per chunk of ``prompts_per_chunk`` prompts
    (``None``: all prompts in one generate call and one reward call); ``clean``, when given, rewrites
    each sampled text before it is scored (the feedback commands' ``clean_generation``).
    """
    items = list(items)
    texts, rewards, ended = [], [], []
    comps: Dict[str, List[float]] = {}
    step = prompts_per_chunk or max(len(items), 1)
    for s in range(0, len(items), step):
        chunk = items[s:s + step]
        ro = generate(policy, tokenizer, [it["prompt_ids"] for it in chunk], gen, n=n, compute_logprobs=False)
        out = [clean(t) for t in ro.texts] if clean is not None else list(ro.texts)
        prompts = [chunk[i]["prompt"] for i in ro.prompt_index]
        rows = [dict(chunk[i].get("fields", {})) for i in ro.prompt_index]
        rewards.extend(reward(prompts, out, rows))
        for name, vals in getattr(reward, "last_components", {}).items():
            comps.setdefault(name, []).extend(vals)
        texts.extend(out)
        ended.extend(ro.ended.tolist())
    P = len(items)
    grid = [texts[i * n:(i + 1) * n] for i in range(P)]
    return Scored(items, grid, torch.tensor(rewards, dtype=torch.float64).view(P, n),
                  {k: torch.tensor(v, dtype=torch.float64).view(P, n) for k, v in comps.items()},
                  torch.tensor(ended, dtype=torch.bool).view(P, n))


class Pick(NamedTuple):
    """One prompt's best-versus-worst choice (:func:`pick_best_worst`)."""

    best: Optional[int]  # index of the first sample with the highest reward (None: no samples)
    worst: Optional[int]  # index of the first sample with the lowest reward
    status: str  # "pair", "tie", "below_margin" or "too_few"

    @property
    def pair(self) -> Optional[Tuple[int, int]]:
        """(chosen, rejected) when the pick is a preference pair, else None."""
        return (self.best, self.worst) if self.status == "pair" else None


def pick_best_worst(rewards: Sequence[float], min_margin: float = 0.0, texts: Optional[Sequence[str]] = None
                    ) -> Pick:
    """The one best-versus-worst pairing rule of ``rejection-sampling``, ``label`` and ``iterative-dpo``.

    Best is the first sample with the highest reward and worst the first with the lowest (equal rewards
    are resolved by sample order, so the result is deterministic). The two form a pair only when
    ``best - worst > min_margin``. Otherwise the status says why there is none:

    - ``too_few``: fewer than two samples;
    - ``tie``: best and worst score the same, or (when ``texts`` are given) are the same text: no
      preference at all;
    - ``below_margin``: ``0 < best - worst <= min_margin``.

    Example: ``[0.2, 0.9, -0.1, 0.9]`` -> best 1, worst 2, ``pair``; ``[0.5, 0.5]`` -> ``tie``.
    """
    r = [float(x) for x in rewards]
    if not r:
        return Pick(None, None, "too_few")
    best = max(range(len(r)), key=r.__getitem__)  # max/min return the first of equal keys
    worst = min(range(len(r)), key=r.__getitem__)
    if len(r) < 2:
        return Pick(best, worst, "too_few")
    if r[best] == r[worst] or (texts is not None and texts[best] == texts[worst]):
        return Pick(best, worst, "tie")
    if r[best] - r[worst] <= min_margin:
        return Pick(best, worst, "below_margin")
    return Pick(best, worst, "pair")


def expected_best_of_k(rewards: Sequence[float], k: int) -> float:
    """Unbiased estimate of E[max of k samples] from n >= k i.i.d. samples (Nakano et al. 2021, app.).

    Over all C(n, k) subsets of the samples, the i-th smallest value (1-based) is the maximum of
    C(i-1, k-1) of them, so ``E = sum_i C(i-1, k-1) / C(n, k) * r_(i)``.
    Example: rewards (1, 2, 3), k=2: subsets {1,2},{1,3},{2,3} -> maxima 2, 3, 3 -> 8/3.
    """
    r = sorted(float(x) for x in rewards)
    n = len(r)
    if not 1 <= k <= n:
        raise ValueError(f"best-of-{k} needs 1 <= k <= n={n}")
    total = math.comb(n, k)
    return sum(math.comb(i - 1, k - 1) * r[i - 1] for i in range(k, n + 1)) / total


def best_of_k_curve(rewards: torch.Tensor) -> Dict[int, float]:
    """Mean over prompts of :func:`expected_best_of_k` for k = 1, 2, 4, ..., N (and N)."""
    n = rewards.shape[1]
    ks = sorted({2 ** j for j in range(int(math.log2(n)) + 1)} | {n})
    return {k: sum(expected_best_of_k(row.tolist(), k) for row in rewards) / rewards.shape[0] for k in ks}


def _prompt_text(item: Dict[str, Any]) -> str:
    return item.get("prompt_text") or (item["prompt"] if isinstance(item["prompt"], str) else json.dumps(item["prompt"]))


def sample_rows(scored: Scored, n_tag: str) -> List[Dict[str, Any]]:
    """One JSON row per sample (report.html reads ``tag``/``prompt``/``completion``/``reward``)."""
    out = []
    best = scored.best.tolist()
    for i, item in enumerate(scored.items):
        for j, text in enumerate(scored.texts[i]):
            out.append({"tag": n_tag if j == best[i] else "sample", "prompt": _prompt_text(item), "prompt_index": i,
                        "sample": j, "completion": text, "reward": float(scored.rewards[i, j]),
                        "components": {k: float(v[i, j]) for k, v in scored.components.items()},
                        "ended": bool(scored.ended[i, j]), "chosen": j == best[i], "row": item.get("row")})
    return out


def _write_jsonl(path: Path, rows: List[Dict[str, Any]]) -> Path:
    write_jsonl(path, rows)
    return Path(path)


def _setup(cfg):
    """Seed, tokenizer, policy (eval mode, on the GPU when there is one), prompts and the reward."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    set_seed(cfg.seed)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    tok = load_tokenizer(cfg.model)
    data = prepare("prompt", cfg.data, tok, seed=cfg.seed)
    report_data(data, out, True)
    policy = load_causal_lm(cfg.model, trainable=False).to(best_device()).eval()
    return tok, data.train + data.eval, policy, build_reward(cfg.rewards, timeout_s=cfg.reward_timeout_s)


def _finish(cfg, summary: Dict[str, Any]) -> Dict[str, Any]:
    (Path(cfg.output) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    c = console()
    curve = summary.get("best_of_k", {})
    if curve:
        c.print("expected reward of best-of-k: " + ", ".join(f"k={k}: {v:.4f}" for k, v in curve.items()),
                highlight=False)
    c.print(f"mean reward: single sample {summary['rewards/single_mean']:.4f}, best-of-{cfg.n} "
            f"{summary['rewards/best_of_n_mean']:.4f}", style="green", highlight=False)
    return summary


def _summary(cfg, scored: Scored) -> Dict[str, Any]:
    best = scored.rewards.max(dim=1).values
    return {"command": cfg.command, "prompts": len(scored.items), "n": cfg.n,
            "rewards/single_mean": float(scored.rewards.mean()),
            "rewards/best_of_n_mean": float(best.mean()),
            "rewards/worst_of_n_mean": float(scored.rewards.min(dim=1).values.mean()),
            "best_of_k": {str(k): v for k, v in best_of_k_curve(scored.rewards).items()}}


def best_of_n(config: Union[Dict[str, Any], Any, None] = None, **overrides) -> Dict[str, Any]:
    """``alignkit bon``: N samples per prompt, every one written with its scores and the chosen (best)
    one marked; prints the mean reward of best-of-N against single samples."""
    cfg = as_config(BoNConfig, config, overrides)
    tok, items, policy, reward = _setup(cfg)
    scored = sample_and_score(policy, tok, items, cfg.generation, reward, cfg.n)
    path = _write_jsonl(Path(cfg.samples_path or Path(cfg.output) / "samples.jsonl"),
                        sample_rows(scored, f"best-of-{cfg.n}"))
    return _finish(cfg, {**_summary(cfg, scored), "samples_path": str(path)})


def rejection_datasets(scored: Scored, min_margin: float = 0.0, min_reward=None):
    """(SFT rows {prompt, completion}, preference rows {prompt, chosen, rejected}, counts).

    Prompts keep their original form (string or messages), so ``alignkit sft``/``dpo`` apply the same
    chat template the policy saw. Pairs follow :func:`pick_best_worst`: best - worst > ``min_margin``;
    ties (equal rewards or the same text) never make a pair.
    """
    sft, pairs = [], []
    counts = {"prompts": len(scored.items), "ties_dropped": 0, "below_margin_dropped": 0, "below_min_reward": 0}
    for i, item in enumerate(scored.items):
        pick = pick_best_worst(scored.rewards[i].tolist(), min_margin, scored.texts[i])
        rb, rw = float(scored.rewards[i, pick.best]), float(scored.rewards[i, pick.worst])
        if min_reward is None or rb >= min_reward:
            sft.append({"prompt": item["prompt"], "completion": scored.texts[i][pick.best], "reward": rb})
        else:
            counts["below_min_reward"] += 1
        if pick.status in ("tie", "too_few"):
            counts["ties_dropped"] += 1
        elif pick.status == "below_margin":
            counts["below_margin_dropped"] += 1
        else:
            pairs.append({"prompt": item["prompt"], "chosen": scored.texts[i][pick.best],
                          "rejected": scored.texts[i][pick.worst], "reward_chosen": rb, "reward_rejected": rw})
    counts["sft_rows"], counts["pairs"] = len(sft), len(pairs)
    return sft, pairs, counts


def rejection_sampling(config: Union[Dict[str, Any], Any, None] = None, **overrides) -> Dict[str, Any]:
    """``alignkit rejection-sampling``: best samples -> SFT JSONL; best versus worst -> preference JSONL."""
    cfg = as_config(RejectionSamplingConfig, config, overrides)
    if cfg.n < 2:
        raise ValueError("rejection-sampling needs n >= 2 samples per prompt (best versus worst)")
    tok, items, policy, reward = _setup(cfg)
    scored = sample_and_score(policy, tok, items, cfg.generation, reward, cfg.n)
    out = Path(cfg.output)
    samples = _write_jsonl(Path(cfg.samples_path or out / "samples.jsonl"), sample_rows(scored, f"best-of-{cfg.n}"))
    sft, pairs, counts = rejection_datasets(scored, cfg.min_margin, cfg.min_reward)
    sft_path = _write_jsonl(Path(cfg.sft_path or out / "sft.jsonl"), sft)
    pairs_path = _write_jsonl(Path(cfg.pairs_path or out / "pairs.jsonl"), pairs)
    c = console()
    c.print(f"{counts['sft_rows']} SFT rows -> {sft_path}; {counts['pairs']} preference pairs -> {pairs_path}",
            style="green", highlight=False)
    dropped = counts["ties_dropped"] + counts["below_margin_dropped"]
    if dropped or counts["below_min_reward"]:
        c.print(f"dropped: {counts['ties_dropped']} prompt(s) whose best and worst samples tie, "
                f"{counts['below_margin_dropped']} below min_margin={cfg.min_margin}, "
                f"{counts['below_min_reward']} SFT row(s) below min_reward", style="yellow", highlight=False)
    summary = {**_summary(cfg, scored), **counts, "samples_path": str(samples), "sft_path": str(sft_path),
               "pairs_path": str(pairs_path)}
    return _finish(cfg, summary)
