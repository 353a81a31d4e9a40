"""Constitutional AI (Bai et al. 2022, "Constitutional AI: Harmlessness from AI Feedback").

A constitution is a YAML list of principles, each with a ``critique`` request, a ``revision`` request
and optionally a ``preference`` principle for comparisons (``resources/constitution.yaml`` ships).

- SL-CAI (``alignkit cai-sl``, Bai et al. sec. 3): sample a response to each prompt, then k rounds of
  "critique your response against a randomly drawn principle" and "rewrite it accordingly", each
  round starting from (prompt, latest revision). The (prompt, final revision) pairs are an SFT
  dataset; the whole chain is kept for inspection.
- RL-CAI (``alignkit cai-rl``, sec. 4): sample two responses per prompt and ask a feedback model
  which one better follows a randomly drawn principle. The judge's option probabilities, averaged
  over both orders and over ``principles_per_pair`` principles (the paper ensembles 16), are the
  soft labels of a preference dataset for ``alignkit rm`` or ``alignkit dpo``.
"""

from __future__ import annotations

import random
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field

from alignkit.config import ModelConfig, Section, as_config
from alignkit.data.load import DataError, write_jsonl
from alignkit.feedback.common import (InputConfig, as_messages, conversation_ids, load_policy,
                                      load_prompt_examples, print_report, sample_with_ended, write_summary)
from alignkit.feedback.judge import (JudgeOptions, JudgeQuery, average_verdicts, decide, judge_both_orders,
                                     judge_model_name, load_judge, load_template, summarize, template_fields)
from alignkit.rollout.generate import GenerationConfig
from alignkit.rollout.job import SamplingJob


class Principle(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    critique: str = Field(min_length=1)
    revision: str = Field(min_length=1)
    preference: Optional[str] = None

    @property
    def comparison(self) -> str:
        """The text shown to the judge as {principle} in RL-CAI."""
        return self.preference or self.critique


def default_constitution_path() -> Path:
    return Path(str(files("alignkit") / "resources" / "constitution.yaml"))


def load_constitution(path: Optional[str] = None, only: Sequence[str] = ()) -> List[Principle]:
    """Principles from a YAML file (a list, or a mapping with a ``principles`` list); errors name the
    file, the principle's index and the field. ``only`` keeps the named principles."""
    p = Path(path).expanduser() if path else default_constitution_path()
    if not p.is_file():
        raise DataError(f"constitution {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise DataError(f"constitution {p}: not valid YAML ({e})") from None
    if isinstance(data, dict) and "principles" in data:
        data = data["principles"]
    if not isinstance(data, list) or not data:
        raise DataError(f"constitution {p}: expected a non-empty list of principles")
    out: List[Principle] = []
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(f"constitution {p}: principle {i} is a {type(item).__name__}, not a mapping")
        try:
            out.append(Principle.model_validate(item))
        except ValueError as e:
            errs = "; ".join(f"field {'.'.join(map(str, x['loc']))!r}: {x['msg']}" for x in e.errors())
            raise DataError(f"constitution {p}: principle {i} ({item.get('name', '?')}): {errs}") from None
    names = [x.name for x in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"constitution {p}: duplicate principle names {dup}")
    if only:
        missing = [n for n in only if n not in names]
        if missing:
            raise DataError(f"cai.principles: {missing} not in constitution {p} (has: {', '.join(names)})")
        out = [x for x in out if x.name in set(only)]
    return out


class ConstitutionOptions(Section):
    constitution: Optional[str] = None
    """Constitution YAML file (a list of {name, critique, revision, preference}). Empty: the default
    shipped in alignkit/resources/constitution.yaml."""
    principles: List[str] = []
    """Use only these principle names (empty: all)."""
    seed: int = 0
    """Seed for drawing principles (and sampling)."""
    max_prompt_length: int = Field(1024, gt=8)
    """Longest conversation fed to the model, in tokens; longer ones keep their end and are counted."""


class CAISLOptions(ConstitutionOptions):
    rounds: int = Field(1, gt=0)
    """Critique-revision rounds per prompt (k); each draws a fresh principle."""
    keep_unfinished: bool = False
    """Write final responses that hit generation.max_new_tokens before ending to sft.jsonl too (they
    would teach the model to stop mid-sentence). Default: dropped and counted, kept in chains.jsonl."""


class CAIRLOptions(ConstitutionOptions):
    principles_per_pair: int = Field(1, gt=0)
    """Principles drawn per pair; the judge's probabilities are averaged over them (Bai et al. 2022
    ensemble over 16)."""


class CAISLConfig(SamplingJob):
    """SL-CAI: critique and revise sampled responses against a constitution; write an SFT dataset."""

    command: Literal["cai-sl"] = "cai-sl"
    output: str = "runs/cai-sl"
    """Output directory: sft.jsonl (prompt, final revision), chains.jsonl (every step) and summary.json."""
    model: ModelConfig = ModelConfig()
    """The model that answers, critiques and revises."""
    data: InputConfig = InputConfig()
    """Prompts: {prompt, ...} (string or messages) or {messages} rows."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling of responses, critiques and revisions."""
    cai: CAISLOptions = CAISLOptions()
    """Constitution and rounds."""


class CAIRLConfig(SamplingJob):
    """RL-CAI: sample response pairs and label them with a judge against drawn principles."""

    command: Literal["cai-rl"] = "cai-rl"
    output: str = "runs/cai-rl"
    """Output directory: preferences.jsonl (prompt, chosen, rejected, soft_label, principles) and summary.json."""
    model: ModelConfig = ModelConfig()
    """The policy that samples the two responses per prompt."""
    data: InputConfig = InputConfig()
    """Prompts: {prompt, ...} (string or messages) or {messages} rows."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling of the response pairs (temperature > 0, or the two samples are identical)."""
    cai: CAIRLOptions = CAIRLOptions()
    """Constitution and principles per pair."""
    judge: JudgeOptions = JudgeOptions()
    """The feedback model (empty model name: the policy) and its template, which must use {principle}."""


# ----------------------------------------------------------------------------- SL-CAI

def critique_revise(model, tok, prompts: List[Any], principles: List[Principle], rounds: int,
                    gen: GenerationConfig, rng: random.Random, max_prompt: int = 1024):
    """Run the SL-CAI chain for every prompt, batched stage by stage.

    Returns (chains, counts): one chain per prompt ``{initial, steps: [{round, principle,
    critique_request, critique, revision_request, revision, kept_previous}], final, final_ended}``. An
    empty revision keeps the previous response (``kept_previous``), counted in ``counts``;
    ``final_ended`` says whether the final response ended before generation.max_new_tokens.
    """
    counts = {"truncated_conversations": 0, "empty_critiques": 0, "empty_revisions": 0}
    base = [as_messages(p) for p in prompts]

    def run(convs):
        ids = []
        for c in convs:
            x, cut = conversation_ids(tok, c, max_prompt)
            counts["truncated_conversations"] += cut
            ids.append(x)
        return sample_with_ended(model, tok, ids, gen)

    current, ended = run(base)
    chains = [{"initial": r, "steps": []} for r in current]
    for k in range(rounds):
        drawn = [rng.choice(principles) for _ in prompts]
        crit_convs = [m + [{"role": "assistant", "content": cur}, {"role": "user", "content": p.critique}]
                      for m, cur, p in zip(base, current, drawn)]
        critiques, _ = run(crit_convs)
        rev_convs = [c + [{"role": "assistant", "content": cr}, {"role": "user", "content": p.revision}]
                     for c, cr, p in zip(crit_convs, critiques, drawn)]
        revisions, rev_ended = run(rev_convs)
        for i, (p, cr, rev) in enumerate(zip(drawn, critiques, revisions)):
            counts["empty_critiques"] += not cr
            kept = not rev
            counts["empty_revisions"] += kept
            chains[i]["steps"].append({"round": k + 1, "principle": p.name, "critique_request": p.critique,
                                       "critique": cr, "revision_request": p.revision, "revision": rev,
                                       "kept_previous": kept})
            if not kept:
                current[i], ended[i] = rev, rev_ended[i]
    for c, final, e in zip(chains, current, ended):
        c["final"], c["final_ended"] = final, e
    return chains, counts


def run_cai_sl(config: Union[CAISLConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """SL-CAI; the Python twin of ``alignkit cai-sl``."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    cfg = as_config(CAISLConfig, config, overrides)
    principles = load_constitution(cfg.cai.constitution, cfg.cai.principles)
    examples, report = load_prompt_examples(cfg.data)
    print_report(report)
    set_seed(cfg.cai.seed)
    model, tok = load_policy(cfg.model.name_or_path, cfg.model)
    prompts = [ex.prompt for ex in examples]
    chains, counts = critique_revise(model, tok, prompts, principles, cfg.cai.rounds, cfg.generation,
                                     random.Random(cfg.cai.seed), cfg.cai.max_prompt_length)
    out = Path(cfg.output)
    chain_rows = [{"source_row": ex.row, "prompt": ex.prompt, **c} for ex, c in zip(examples, chains)]
    write_jsonl(out / "chains.jsonl", chain_rows)
    unfinished = sum(1 for c in chains if c["final"] and not c["final_ended"])
    sft = [{"prompt": ex.prompt, "completion": c["final"]} for ex, c in zip(examples, chains)
           if c["final"] and (c["final_ended"] or cfg.cai.keep_unfinished)]
    write_jsonl(out / "sft.jsonl", sft)
    summary = {"command": "cai-sl", "prompts": len(examples), "rounds": cfg.cai.rounds, "sft_rows": len(sft),
               "dropped_empty_final": sum(1 for c in chains if not c["final"]),
               "unfinished_final": unfinished, "dropped_unfinished_final": 0 if cfg.cai.keep_unfinished else unfinished,
               **counts, "rows_dropped": report.n_dropped,
               "revised_share": sum(any(not s["kept_previous"] for s in c["steps"]) for c in chains) / len(chains),
               "output": str(out / "sft.jsonl"), "chains": str(out / "chains.jsonl")}
    write_summary(out, summary)
    return summary


# ----------------------------------------------------------------------------- RL-CAI

def run_cai_rl(config: Union[CAIRLConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """RL-CAI preference labelling; the Python twin of ``alignkit cai-rl``."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    cfg = as_config(CAIRLConfig, config, overrides)
    if "principle" not in template_fields(load_template(cfg.judge.template)):
        raise ValueError("cai-rl: judge.template must use {principle} (the drawn constitutional principle)")
    principles = load_constitution(cfg.cai.constitution, cfg.cai.principles)
    examples, report = load_prompt_examples(cfg.data)
    print_report(report)
    set_seed(cfg.cai.seed)
    model, tok = load_policy(cfg.model.name_or_path, cfg.model)
    truncated = 0
    ids = []
    for ex in examples:
        x, cut = conversation_ids(tok, as_messages(ex.prompt), cfg.cai.max_prompt_length)
        truncated += cut
        ids.append(x)
    texts, ended = sample_with_ended(model, tok, ids, cfg.generation, n=2)
    same = judge_model_name(cfg.judge, cfg.model.name_or_path) == cfg.model.name_or_path
    judge = load_judge(cfg.judge, cfg.model.name_or_path, *((model, tok) if same else (None, None)))
    rng = random.Random(cfg.cai.seed)
    m = cfg.cai.principles_per_pair
    pairs, dropped = [], {"empty_response": 0, "identical_responses": 0}
    for i, ex in enumerate(examples):
        a, b = texts[2 * i], texts[2 * i + 1]
        if not a or not b:
            dropped["empty_response"] += 1
        elif a == b:
            dropped["identical_responses"] += 1
        else:
            drawn = rng.sample(principles, m) if m <= len(principles) else [rng.choice(principles) for _ in range(m)]
            pairs.append((ex, a, b, drawn))
    queries = [JudgeQuery(ex.prompt, a, b, p.comparison) for ex, a, b, drawn in pairs for p in drawn]
    verdicts = judge_both_orders(judge, queries) if queries else []
    per_pair = [average_verdicts(verdicts[j * m:(j + 1) * m]) for j in range(len(pairs))]
    decisions = [decide(v, cfg.judge.inconsistent, cfg.judge.min_confidence, cfg.judge.max_label) for v in per_pair]
    rows = []
    for (ex, a, b, drawn), v, d in zip(pairs, per_pair, decisions):
        if d.keep:
            chosen, rejected = (a, b) if d.a_chosen else (b, a)
            rows.append({"prompt": ex.prompt, "chosen": chosen, "rejected": rejected,
                         "soft_label": round(d.soft_label, 6), "principles": [p.name for p in drawn],
                         "judge": {"p_ab": v.p_ab, "p_ba": v.p_ba, "prob_a": v.prob_a, "consistent": v.consistent,
                                   "status": d.status}, "source_row": ex.row})
    out = Path(cfg.output)
    write_jsonl(out / "preferences.jsonl", rows)
    summary = {"command": "cai-rl", "prompts": len(examples), **summarize(per_pair, decisions),
               "dropped_before_judging": dropped, "truncated_conversations": truncated,
               "unfinished_responses": sum(1 for e in ended if not e),
               "rows_dropped": report.n_dropped, "output": str(out / "preferences.jsonl")}
    write_summary(out, summary)
    return summary
