"""``alignkit eval``: measure a policy against its reference on a prompt set.

For each prompt the policy samples ``samples`` responses. Every sample is scored by the reward
sources (``--reward``: the proxy, e.g. the reward model that was optimized; ``--gold``: the true task
reward when there is one), and the run reports what the classic failure modes need:

* mean reward per source, for the policy and for the reference's own samples;
* win rate against the reference: policy sample j of prompt i versus reference sample j of prompt i,
  judged by the gold reward (or the proxy without one), ties counting half;
* KL to the reference estimated on the policy's own samples (Schulman 2020, k1 by default): per token
  and per sequence, the quantity on the x-axis of the reward-versus-KL frontier of the DPO paper
  (Rafailov et al. 2023, Figure 2);
* response length statistics and the reward-length correlation (verbosity bias; Singhal et al. 2023,
  "A Long Way to Go: Investigating Length Correlations in RLHF");
* distinct-1/2 (Li et al. 2016) and self-similarity among the samples of one prompt (mode collapse;
  Kirk et al. 2024, "Understanding the Effects of RLHF on LLM Generalisation and Diversity");
* repetition rate and the share of responses that end with EOS.

With ``--reward-model DIR`` the command evaluates a reward model on held-out pairs instead
(:mod:`alignkit.eval.rm_eval`). Outputs: ``OUTPUT/eval.json``, ``OUTPUT/samples.jsonl``,
``metrics.jsonl`` (one ``eval/``-prefixed line, so ``alignkit compare`` can plot the frontier),
``summary.json`` and ``report.html``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import torch
from pydantic import Field, field_validator

from alignkit.config import ConfigError, DataConfig, ModelConfig, Section, as_config, known_names, to_yaml
from alignkit.data import prepare
from alignkit.data.load import DataError
from alignkit.eval import metrics as M
from alignkit.eval.behaviour import BEHAVIOUR_PROBES, BehaviourProbeConfig, policy_answerer, run_behaviour_probes
from alignkit.eval.rm_eval import evaluate_reward_model
from alignkit.eval.stats import interval_keys, is_interval_key, mean_interval, paired_comparison, read_interval
from alignkit.models.default import resolve_model_path
from alignkit.models.loading import best_device, load_causal_lm, load_frozen, load_tokenizer
from alignkit.ops.kl import KLKind, kl_estimate
from alignkit.ops.packing import resolve_packing
from alignkit.rewards import RewardSpec, build_reward
from alignkit.rollout.generate import GenerationConfig, batched_logprobs, generate
from alignkit.train.common import write_run_report
from alignkit.train.logging import phase


class EvalConfig(Section):
    """Evaluate a policy (or, with reward_model, a reward model) on held-out prompts or pairs."""

    command: Literal["eval"] = "eval"
    output: str = "runs/eval"
    """Directory for eval.json, samples.jsonl, metrics.jsonl, summary.json and report.html."""
    name: Optional[str] = None
    """Label of this evaluation in reports and comparisons (default: the output directory name)."""
    model: ModelConfig = ModelConfig()
    """The policy to evaluate (empty: the embedded default model)."""
    reference: Optional[str] = None
    """Reference model (path or id) for KL and win rate; it must share the policy's tokenizer.
    Empty: the policy's base model (its LoRA adapter's base_model_name_or_path, or the model recorded in
    the run's config.yaml beside the policy's model/ directory), else an error asking for one; the
    embedded default policy is its own reference."""
    data: DataConfig = DataConfig()
    """Prompt rows ({prompt, ...} or {messages}; extra fields reach python rewards). With
    reward_model: preference pairs."""
    samples: int = Field(4, gt=0)
    """Responses sampled per prompt (diversity metrics need 2 or more)."""
    generation: GenerationConfig = GenerationConfig(max_new_tokens=64, temperature=1.0)
    """Sampling of the responses. KL is estimated with both models' log-probs at this temperature
    (temperature 0, greedy: at temperature 1, and then it is the log-ratio of the greedy responses)."""
    rewards: List[RewardSpec] = []
    """Proxy reward sources (CLI: --reward KIND:ARG@W, repeatable), e.g. model:runs/rm/model; summed
    with their weights and reported as rewards/proxy."""
    gold: List[RewardSpec] = []
    """Gold reward sources (CLI: --gold KIND:ARG@W, repeatable), e.g.
    python:alignkit.rewards.sentiment:vader_compound; reported as rewards/gold."""
    judge: Literal["auto", "gold", "proxy"] = "auto"
    """Reward that judges the win rate against the reference; auto: gold when given, else proxy."""
    reference_samples: Optional[str] = None
    """samples.jsonl of an earlier eval whose policy was this reference: its responses are reused as
    the reference's samples instead of generating them again, and so are their rewards when that eval
    used the same reward specs (a changed file behind the same model path is not detected: evaluate the
    reference again after retraining a reward model)."""
    kl_estimator: KLKind = "k1"
    """Per-token KL estimator (k1 = log-ratio, unbiased; k3 = non-negative, unbiased; k2)."""
    repetition_n: int = Field(4, gt=0)
    """n of the repetition rate: share of a response's n-grams that repeat an earlier one."""
    batch_size: int = Field(16, gt=0)
    """Sequences per forward pass when scoring log-probs (generation uses generation.batch_size)."""
    prefix_sharing: bool = True
    """Score the reference's log-probs of a prompt's samples with the prompt run once
    (``[prompt][sample 1][sample 2]...``, each sample seeing the prompt and itself: the layout of
    train.prefix_sharing), where the reference model gives the same numbers that way (a start-up probe;
    otherwise one line says why and each sample runs after its own copy of the prompt)."""
    seed: int = 0
    """Sampling seed."""
    reward_model: Optional[str] = None
    """Evaluate this reward model (directory from `alignkit rm`) on the preference pairs of data.path
    instead of a policy: pairwise accuracy and calibration."""
    calibration_bins: int = Field(10, gt=0)
    """Equal-width probability bins of the reward model's calibration (ECE)."""
    probes: List[str] = []
    """Behaviour probes (CLI: --probe NAME, repeatable): sycophancy, hedging, format, over_refusal
    (alignkit.eval.behaviour; docs/evaluation.md). Metrics probe/<name>/..., intervals in eval.json."""
    probe_settings: BehaviourProbeConfig = BehaviourProbeConfig()
    """Settings of the behaviour probes (probe sets, answer length, refusal judge)."""

    @field_validator("probes", mode="before")
    @classmethod
    def _known_probes(cls, v: Any) -> List[str]:
        return known_names(v, BEHAVIOUR_PROBES, "behaviour probe")

    @field_validator("rewards", "gold", mode="before")
    @classmethod
    def _coerce_specs(cls, v: Any) -> List[RewardSpec]:
        return RewardSpec.coerce_list(v)


# ---------------------------------------------------------------------------------- aggregation

def per_token_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                 estimator: KLKind = "k1") -> List[List[float]]:
    """Per-sequence lists of per-token KL estimates on the response tokens.

    ``policy_logps``, ``ref_logps``: (N, T) log-probs of the policy's sampled tokens under the policy
    and the reference; ``mask``: (N, T) 1 on response tokens. Row i of the result holds the estimate
    at each masked position of row i, in order. k1 at a token is log pi(y_t) - log pi_ref(y_t).
    """
    kl = kl_estimate(policy_logps.float(), ref_logps.float(), estimator)  # (N, T)
    m = mask.bool()
    return [kl[i][m[i]].tolist() for i in range(kl.shape[0])]


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else float("nan")


def _by_prompt(values: Sequence[Any], prompt_index: Sequence[int]) -> Dict[int, List[Any]]:
    groups: Dict[int, List[Any]] = {}
    for v, i in zip(values, prompt_index):
        groups.setdefault(i, []).append(v)
    return groups


def summarize(texts: List[str], lengths: Sequence[float], ended: Sequence[bool], prompt_index: Sequence[int],
              kl_tokens: Optional[List[List[float]]], rewards: Dict[str, List[float]],
              ref_rewards: Optional[Dict[str, List[float]]] = None, ref_prompt_index: Optional[Sequence[int]] = None,
              judge: Optional[str] = None, repetition_n: int = 4) -> Dict[str, float]:
    """The flat metric dict of an evaluation (keys as in docs/evaluation.md).

    ``texts``/``lengths``/``ended``/``prompt_index`` describe the policy's N samples; ``rewards`` maps a
    source name (``proxy``, ``gold``) to N scores; ``ref_rewards`` the same for the reference's samples
    (grouped by ``ref_prompt_index``). Win rate pairs the j-th policy sample of a prompt with the
    j-th reference sample of that prompt (modulo the reference's count) and compares ``judge`` scores.

    Rewards, the win rate and the KL carry their uncertainty (:mod:`alignkit.eval.stats`): ``KEY_se``,
    ``KEY_lo``, ``KEY_hi`` (95% t interval over the prompt means: the samples of one prompt are not
    independent) and ``KEY_n`` (prompts). ``gain/<source>`` is the policy's reward minus the
    reference's, paired by prompt (mean of the per-prompt differences, t interval, ``_p`` the two-sided
    t test). Each section is one small function of the same inputs, so a new family of metrics is one
    more ``out.update(...)``.
    """
    ref_index = ref_prompt_index if ref_prompt_index is not None else prompt_index
    out: Dict[str, float] = {"num_prompts": float(len(set(prompt_index))), "num_samples": float(len(texts))}
    for name, scores in rewards.items():
        out.update(_reward_metrics(name, scores, lengths, prompt_index,
                                   (ref_rewards or {}).get(name), ref_index))
    if "proxy" in rewards and "gold" in rewards:  # does the proxy still track the gold on these samples?
        out["rewards/proxy_gold_corr"] = M.pearson(rewards["proxy"], rewards["gold"])
    if judge and ref_rewards and judge in rewards and judge in ref_rewards:
        out.update(_win_rate_metrics(judge, rewards[judge], prompt_index, ref_rewards[judge], ref_index))
    if kl_tokens is not None:
        kl = M.sequence_kl_stats(kl_tokens)
        out["kl/ref"] = kl["sequence_mean"]
        out.update(interval_keys("kl/ref", mean_interval([sum(t) for t in kl_tokens], prompt_index)))
        out["kl/ref_token"] = kl["token_mean"]
        out["kl/ref_max"] = kl["sequence_max"]
    for k, v in M.length_stats(lengths).items():
        out[f"length/{k}"] = v
    groups = _by_prompt(texts, prompt_index).values()
    out["diversity/distinct_1"] = _mean([M.distinct_n(g, 1) for g in groups])
    out["diversity/distinct_2"] = _mean([M.distinct_n(g, 2) for g in groups])
    out["diversity/self_similarity"] = _mean([M.self_similarity(g) for g in groups])
    out["text/repetition_rate"] = _mean([M.repetition_rate(t, repetition_n) for t in texts])
    out["text/eos_rate"] = M.eos_rate(list(ended))
    return out


def _reward_metrics(name: str, scores: List[float], lengths: Sequence[float], index: Sequence[int],
                    ref_scores: Optional[List[float]], ref_index: Sequence[int]) -> Dict[str, float]:
    """``rewards/NAME`` with its std and interval, its length correlation, and with reference scores
    ``reference/rewards/NAME`` (with interval) and the paired ``gain/NAME``."""
    stats = M.length_stats(scores)
    out = {f"rewards/{name}": stats["mean"], f"rewards/{name}_std": stats["std"],
           **interval_keys(f"rewards/{name}", mean_interval(scores, index)),
           f"length/reward_corr_{name}": M.reward_length_correlation(scores, lengths)}
    if ref_scores is not None:
        out[f"reference/rewards/{name}"] = _mean(ref_scores)
        out.update(interval_keys(f"reference/rewards/{name}", mean_interval(ref_scores, ref_index)))
        pc = paired_comparison(ref_scores, scores, list(ref_index), list(index))
        out[f"gain/{name}"] = pc.diff.mean
        out.update(interval_keys(f"gain/{name}", pc.diff, pc.p_value))
    return out


def _win_rate_metrics(judge: str, scores: List[float], index: Sequence[int], ref_scores: List[float],
                      ref_index: Sequence[int]) -> Dict[str, float]:
    """``win_rate/JUDGE`` over all N comparisons, and its t interval over the per-prompt win rates
    (clipped to [0, 1]; nan stays nan)."""
    pol = _by_prompt(scores, index)
    ref = _by_prompt(ref_scores, ref_index)
    a, b, per_prompt = [], [], []
    for i, mine in pol.items():
        if i not in ref:
            raise ValueError(f"win rate: the reference has no sample for prompt {i}")
        r = ref[i]
        theirs = [r[j % len(r)] for j in range(len(mine))]
        a += mine
        b += theirs
        per_prompt.append(M.win_rate(mine, theirs))
    key = f"win_rate/{judge}"
    iv = mean_interval(per_prompt)
    if not math.isnan(iv.lo):  # a rate: the t interval clipped to [0, 1]
        iv = replace(iv, lo=max(0.0, iv.lo), hi=min(1.0, iv.hi))
    return {key: M.win_rate(a, b), **interval_keys(key, iv)}


# ---------------------------------------------------------------------------------- running

def display_prompt(prompt: Any) -> str:
    """A readable one-string form of a prompt: the last user turn of a message list."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
        return users[-1] if users else str(prompt[-1].get("content", ""))
    return str(prompt)


def _device() -> torch.device:
    return best_device()


def _load_lm(name: Optional[str], base: ModelConfig):
    cfg = base.model_copy(update={"name_or_path": name, "gradient_checkpointing": False})
    return load_causal_lm(cfg, trainable=False).to(_device()).eval()


def _load_reference(name: Optional[str], base: ModelConfig):
    """(reference model, autocast context for its passes): see
    :func:`~alignkit.models.loading.load_frozen` (with ``model.dtype=auto`` where bf16 is native,
    the reference runs as a training run's frozen reference does)."""
    return load_frozen(lambda dt: _load_lm(name, base.model_copy(update={"dtype": dt})), base.dtype, _device())


def read_reference_samples(path: str, prompts: List[str], specs: Optional[Dict[str, List[RewardSpec]]] = None
                           ) -> tuple:
    """(texts, prompt_index, scores) of the rows tagged ``policy`` in an earlier eval's samples.jsonl,
    matched to ``prompts`` (display strings) by prompt; every prompt needs at least one sample.

    ``scores`` holds the stored rewards (``{name: [float]}``) of every name in ``specs`` whose reward
    sources the earlier eval (its eval.json, beside the file) scored with exactly the same specs, so
    they need not be scored again; other names are left out (the caller scores them)."""
    by_prompt: Dict[str, List[Dict[str, Any]]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("tag", "policy") == "policy":
                by_prompt.setdefault(row["prompt"], []).append(row)
    rows, index = [], []
    for i, p in enumerate(prompts):
        if p not in by_prompt:
            raise ValueError(f"reference_samples {path}: no sample for prompt {p!r} (evaluate the reference on "
                             "the same prompts first)")
        rows += by_prompt[p]
        index += [i] * len(by_prompt[p])
    scores: Dict[str, List[float]] = {}
    meta = Path(path).parent / "eval.json"
    context = json.loads(meta.read_text()) if meta.is_file() else {}
    for name, key in (("proxy", "rewards"), ("gold", "gold")):
        wanted = [s.shorthand() for s in (specs or {}).get(name, [])]
        if wanted and context.get(key) == wanted and all(name in r.get("rewards", {}) for r in rows):
            scores[name] = [float(r["rewards"][name]) for r in rows]
    return [r["completion"] for r in rows], index, scores


def default_reference(policy: Optional[str]) -> Optional[str]:
    """The reference of an eval that names none: the model the policy was trained from.

    A LoRA adapter directory names its base (``adapter_config.json: base_model_name_or_path``); a
    run's ``OUTPUT/model`` has the run's ``OUTPUT/config.yaml`` beside it, whose ``model.name_or_path``
    is the model training started from (None there: the embedded default, returned as None). The
    embedded default policy is its own reference. Anything else (a hub id, a directory without that
    record) raises :class:`~alignkit.config.ConfigError` asking for ``--reference``: comparing with an
    unrelated model gives a meaningless KL and win rate."""
    import yaml

    if policy is None or resolve_model_path(policy) == resolve_model_path(None):
        return policy
    d = Path(policy).expanduser()
    adapter = d / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            return base
    run_config = d.parent / "config.yaml"
    if d.is_dir() and run_config.is_file():
        recorded = (yaml.safe_load(run_config.read_text()) or {}).get("model")
        if isinstance(recorded, dict) and "name_or_path" in recorded:
            return recorded["name_or_path"]
    raise ConfigError(f"eval: no reference given, and the policy {policy} records no base model (no "
                      f"adapter_config.json in it, no run config.yaml beside it): pass --reference MODEL, the "
                      f"model the policy was trained from (or --reference {policy} to compare it with itself)")


def _score(specs: List[RewardSpec], prompts: List[Any], texts: List[str], rows: List[Dict[str, Any]]):
    return build_reward(specs)(prompts, texts, rows) if specs else None


def evaluate(config: Union[EvalConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run ``alignkit eval``; returns the flat metrics (``eval.json`` holds them with the context)."""
    cfg = as_config(EvalConfig, config, overrides)
    if cfg.reward_model:
        return evaluate_reward_model(cfg)
    if not cfg.data.path:
        raise DataError("no prompts to evaluate on: pass --data FILE (rows {prompt, ...})")
    if cfg.reference is None and cfg.model.name_or_path is not None:
        import sys

        cfg = cfg.model_copy(update={"reference": default_reference(cfg.model.name_or_path)})
        print(f"eval: reference = the policy's base model, {cfg.reference or 'the embedded default'}",
              file=sys.stderr)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(cfg.model)
    items = prepare("prompt", cfg.data, tok).train
    prompts = [it["prompt"] for it in items]
    shown = [display_prompt(p) for p in prompts]
    policy = _load_lm(cfg.model.name_or_path, cfg.model)
    torch.manual_seed(cfg.seed)
    n_samples = len(items) * cfg.samples
    with phase(f"sampling {n_samples} policy answers", label="eval"):
        # the policy's log-probs of its samples come with them (the fast engine's sampling step; other
        # engines add one forward pass)
        ro = generate(policy, tok, [it["prompt_ids"] for it in items], cfg.generation, n=cfg.samples)
    probe_metrics, probe_details = {}, None
    if cfg.probes:  # behaviour probes while the policy is loaded (alignkit.eval.behaviour)
        with phase(f"behaviour probes: {', '.join(cfg.probes)}", label="eval"):
            probe_metrics, probe_details = run_behaviour_probes(
                cfg.probes, cfg.probe_settings,
                policy_answerer(policy, tok, cfg.generation, cfg.probe_settings.max_new_tokens),
                ro.texts, ro.prompt_index)
    temp = cfg.generation.temperature or 1.0
    lp = ro.logprobs
    same = resolve_model_path(cfg.reference) == resolve_model_path(cfg.model.name_or_path)
    ref_model, precision = None, contextlib.nullcontext()
    if same:  # the policy is its own reference: KL 0, every comparison a tie
        ref_lp = lp
    else:
        ref_tok = load_tokenizer(cfg.model.model_copy(update={"name_or_path": cfg.reference}))
        if ref_tok.get_vocab() != tok.get_vocab():
            raise ValueError(f"reference {cfg.reference or 'default'} has a different tokenizer than the policy: "
                             "KL needs both models' log-probs of the same tokens")
        del policy
        ref_model, precision = _load_reference(cfg.reference, cfg.model)
        share = (cfg.prefix_sharing and cfg.samples > 1
                 and resolve_packing(ref_model, True, share_prompt=True,
                                     switches=("eval.prefix_sharing",) * 2).share_prompt)
        with phase("reference log-probs", label="eval"), precision:
            ref_lp = batched_logprobs(ref_model, ro.sequences, temperature=temp, batch_size=cfg.batch_size,
                                      share_prompts=share, pad_id=tok.pad_token_id)
    kl_tokens = per_token_kl(lp, ref_lp, ro.sequences.loss_mask[:, 1:], cfg.kl_estimator)
    stored: Dict[str, List[float]] = {}
    if same:
        ref_texts, ref_index = ro.texts, ro.prompt_index
    elif cfg.reference_samples:
        ref_texts, ref_index, stored = read_reference_samples(cfg.reference_samples, shown,
                                                              {"proxy": cfg.rewards, "gold": cfg.gold})
    else:
        torch.manual_seed(cfg.seed)
        with phase(f"sampling {n_samples} reference answers", label="eval"), precision:
            rro = generate(ref_model, tok, [it["prompt_ids"] for it in items], cfg.generation, n=cfg.samples,
                           compute_logprobs=False)
        ref_texts, ref_index = rro.texts, rro.prompt_index
    del ref_model
    rows = [dict(items[i]["fields"]) for i in ro.prompt_index]
    ref_rows = [dict(items[i]["fields"]) for i in ref_index]
    rewards, ref_rewards = {}, {}
    for name, specs in (("proxy", cfg.rewards), ("gold", cfg.gold)):
        if specs:
            with phase(f"scoring with the {name} reward", label="eval"):
                rewards[name] = _score(specs, [prompts[i] for i in ro.prompt_index], ro.texts, rows)
            if same:
                ref_rewards[name] = rewards[name]
            elif name in stored:  # scored by the earlier eval with the same specs: not again
                ref_rewards[name] = stored[name]
            else:
                ref_rewards[name] = _score(specs, [prompts[i] for i in ref_index], ref_texts, ref_rows)
    judge = cfg.judge if cfg.judge != "auto" else ("gold" if cfg.gold else "proxy" if cfg.rewards else None)
    lengths = ro.response_lengths.tolist()
    metrics = summarize(ro.texts, lengths, ro.ended.tolist(), ro.prompt_index, kl_tokens, rewards, ref_rewards,
                        ref_index, judge, cfg.repetition_n)
    metrics.update(probe_metrics)
    samples = []
    for tag, texts, index, scores in (("reference", ref_texts, ref_index, ref_rewards),
                                      ("policy", ro.texts, ro.prompt_index, rewards)):
        if tag == "reference" and same:
            continue
        for n, (text, i) in enumerate(zip(texts, index)):
            row = {"tag": tag, "prompt": shown[i], "prompt_index": i, "completion": text,
                   "rewards": {k: v[n] for k, v in scores.items()}}
            if judge in scores:
                row["reward"] = scores[judge][n]
            if tag == "policy":
                row.update(tokens=int(lengths[n]), ended=bool(ro.ended[n]), kl=sum(kl_tokens[n]),
                           response_ids=ro.response_ids[n])
            samples.append(row)
    context = {"policy": cfg.model.name_or_path or "default", "reference": cfg.reference or "default",
               "reference_is_policy": same, "judge": judge, "samples_per_prompt": cfg.samples,
               "generation": cfg.generation.model_dump(), "kl_estimator": cfg.kl_estimator,
               "rewards": [s.shorthand() for s in cfg.rewards], "gold": [s.shorthand() for s in cfg.gold],
               "reference_samples": cfg.reference_samples}
    write_eval_run(out, cfg, metrics, context, samples, {"probes": probe_details} if probe_details else None)
    print_table(metrics, f"eval: {cfg.name or out.name}")
    return metrics


def write_eval_run(out: Path, cfg: EvalConfig, metrics: Dict[str, float], context: Dict[str, Any],
                   samples: List[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> None:
    """eval.json, samples.jsonl, config.yaml, metrics.jsonl (one eval/ line), summary.json, report.html."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"metrics": metrics, **context, **(extra or {})}
    (out / "eval.json").write_text(json.dumps(doc, indent=2, default=float))
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    (out / "config.yaml").write_text(to_yaml(cfg))  # its name and command label the run in reports
    line = {"step": 0, **{f"eval/{k}": v for k, v in metrics.items()}}
    (out / "metrics.jsonl").write_text(json.dumps(line) + "\n")
    (out / "summary.json").write_text(json.dumps({"command": "eval", **metrics}, indent=2, default=float))
    write_run_report(out)


def print_table(metrics: Dict[str, float], title: str) -> None:
    """The metrics as a two- or three-column table on stderr (policy | reference where known); a metric
    with an interval reads ``mean ± half-width`` (95%), its ``_se``/``_lo``/``_hi``/``_n``/``_p`` keys
    folded into that cell."""
    from rich.console import Console
    from rich.table import Table

    def cell(key: str) -> str:
        iv = read_interval(metrics, key)
        return iv.format() if iv is not None else M.fmt_value(metrics[key])

    table = Table(title=title, caption="± : half-width of the 95% interval over prompts")
    table.add_column("metric")
    table.add_column("policy", justify="right")
    table.add_column("reference", justify="right")
    for k in metrics:
        if k.startswith("reference/") or is_interval_key(k, metrics):
            continue
        ref = f"reference/{k}"
        table.add_row(k, cell(k), cell(ref) if ref in metrics else "")
    Console(stderr=True).print(table)


def run_eval_command(cfg: EvalConfig) -> Dict[str, Any]:
    """The CLI runner: the table is printed by :func:`evaluate`; the summary names the files."""
    evaluate(cfg)
    return {"eval": str(Path(cfg.output) / "eval.json"), "report": str(Path(cfg.output) / "report.html")}
