"""SPIN: self-play fine-tuning (Chen et al. 2024, "Self-Play Fine-Tuning Converts Weak Language Models
to Strong Language Models", ICML).

Iteration t trains ``p_{t+1}`` to tell the SFT data's response ``y`` from the current model's own
generation ``y'`` for the same prompt ``x`` (eq. 4.7 with the logistic loss):

    L = E[ -log sigma( lambda log p(y|x)/p_t(y|x) - lambda log p(y'|x)/p_t(y'|x) ) ]

which is the DPO loss on pairs (chosen = y, rejected = y') with beta = lambda and the previous iterate
``p_t`` as the reference. So each round here writes those pairs and runs
:func:`alignkit.train.preference.train_dpo` (``dpo.loss`` and ``dpo.beta`` apply; ``spin.reference``
can pin the reference to the original model instead). The process stops improving when the model's
generations are indistinguishable from the data (``p_t = p_data`` is the fixed point, Theorem 5.2).

Measured per round, on the round's pairs: the margin ``log p(y|x) - log p(y'|x)`` (summed over response
tokens) before and after the round. At the end, ``margin_initial`` / ``margin_final`` are the starting
and the final model's margins on the first round's pairs (data versus the starting model's
generations), and ``self_play_gap_final`` the final model's margin against its own fresh generations,
which goes to 0 at SPIN's fixed point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import Field, model_validator

from alignkit.config import RunConfig, as_config, to_yaml
from alignkit.data.formats import parse_rows
from alignkit.data.layout import pad_sequences
from alignkit.data.load import DataError, DataReport, read_rows, write_jsonl
from alignkit.data.tokenize import Encoder
from alignkit.feedback.common import load_policy, print_report, sample_with_ended, write_summary
from alignkit.feedback.rounds import (RoundOptions, check_round_config, dpo_round, drop_model, finish_round, mean,
                                     round_slice, run_rounds)
from alignkit.rollout.generate import GenerationConfig, batched_logprobs
from alignkit.rollout.job import SamplingJob
from alignkit.train.logging import console
from alignkit.train.preference import DPOOptions


class SPINOptions(RoundOptions):
    rounds: int = Field(2, gt=0)
    """SPIN iterations (the paper runs 3-4 on 50k prompts). Must be > 0: a run of no rounds trains nothing."""


class SPINConfig(RunConfig, SamplingJob):
    """SPIN: the SFT data's response is chosen, the model's own generation rejected; DPO loss; iterated."""

    command: Literal["spin"] = "spin"
    dpo: DPOOptions = DPOOptions()
    """Loss (dpo: SPIN's logistic loss) and beta (SPIN's lambda) of each round."""
    spin: SPINOptions = SPINOptions()
    """Rounds and the reference of each round."""
    generation: GenerationConfig = GenerationConfig()
    """Sampling of the model's own responses (the rejected side)."""

    @model_validator(mode="after")
    def _check(self):
        check_round_config(self)
        return self


def sft_pairs(source: str, split: str, max_rows: Optional[int]):
    """SFT rows -> [(row, prompt, response)] and the report. {messages} rows: the last assistant turn is
    the response, everything before it the prompt. Rows without a prompt are dropped (counted)."""
    name, rows = read_rows(source, split=split, max_rows=max_rows)
    report = DataReport(source=name)
    out = []
    for ex in parse_rows(rows, "sft", report):
        if ex.messages is not None:
            msgs = ex.messages
            if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
                report.drop(ex.row, "messages must end with an assistant turn after a prompt", "messages")
                continue
            prompt, response = msgs[:-1], msgs[-1]["content"]
        else:
            prompt, response = ex.prompt, ex.completion
        if not prompt:
            report.drop(ex.row, "SPIN needs a prompt to generate from ({text} rows have none)", "prompt")
            continue
        out.append((ex.row, prompt, response))
    report.examples = len(out)
    if not out:
        raise DataError(f"{name}: no usable {{prompt, completion}} examples out of {report.rows_read} rows\n"
                        + "\n".join(report.summary_lines()))
    return out, report


def response_logps(model, encoder, prompts: List[Any], responses: List[str], batch_size: int = 16) -> List[float]:
    """Summed log p(response | prompt) per pair, encoded exactly as DPO training encodes it."""
    seqs, masks = [], []
    scratch = DataReport()
    for p, r in zip(prompts, responses):
        p_ids, r_ids = encoder.encode_response(p, r)
        fitted = encoder.fit(p_ids, [r_ids], 0, scratch)
        if fitted is None:  # data.truncation=drop: training drops this pair; measure it truncated anyway
            p_ids = p_ids[-encoder.max_prompt:]
            r_ids = r_ids[: max(1, encoder.max_len - len(p_ids))]
        else:
            p_ids, (r_ids,) = fitted
        seqs.append(p_ids + r_ids)
        masks.append([0] * len(p_ids) + [1] * len(r_ids))
    lp = batched_logprobs(model, pad_sequences(seqs, masks, encoder.tok.pad_token_id), batch_size=batch_size)
    return lp.sum(-1).tolist()


def margins(model, encoder, prompts, chosen, rejected, batch_size: int) -> Dict[str, float]:
    c = response_logps(model, encoder, prompts, chosen, batch_size)
    r = response_logps(model, encoder, prompts, rejected, batch_size)
    return {"margin": mean([a - b for a, b in zip(c, r)]), "logp_data": mean(c), "logp_own": mean(r)}


class SPINRoundConfig(SPINConfig):
    """One SPIN round: a stage of the pipeline that :func:`run_spin` generates."""

    command: Literal["spin-round"] = "spin-round"
    round: int = Field(1, ge=1)
    """Round index (1-based)."""
    start_model: Optional[str] = None
    """The model the round starts from (the previous round's model_dir); empty: model.name_or_path."""


def own_generations(model, tok, encoder, items, gen: GenerationConfig):
    """The model's own responses (and ended flags) to the prompts of ``(row, prompt, response)`` items."""
    return sample_with_ended(model, tok, [encoder.encode_prompt_ids(p) for _, p, _ in items], gen)


def run_spin_round(config: Union[SPINRoundConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Round K into OUTPUT/round-K: the model's own generations, (data, own) pairs, margins, a DPO round."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    cfg = as_config(SPINRoundConfig, config, overrides)
    opts, k, rdir, bs = cfg.spin, cfg.round, Path(cfg.output), cfg.generation.batch_size
    examples, _ = sft_pairs(cfg.data.path, cfg.data.split, cfg.data.max_rows)
    original = cfg.model.name_or_path
    current = cfg.start_model or original
    model, tok = load_policy(current, cfg.model)
    encoder = Encoder(tok, cfg.data)
    items = round_slice(examples, k, opts.prompts_per_round)
    set_seed(cfg.train.seed + k)
    gens, ended = own_generations(model, tok, encoder, items, cfg.generation)
    keep = [(it, g) for it, g in zip(items, gens) if g.strip() and g != it[2]]
    dropped = {"empty_generation": sum(1 for g in gens if not g.strip()),
               "generation_equals_data": sum(1 for it, g in zip(items, gens) if g.strip() and g == it[2])}
    prompts = [it[1] for it, _ in keep]
    chosen = [it[2] for it, _ in keep]
    rejected = [g for _, g in keep]
    write_jsonl(rdir / "pairs.jsonl", ({"prompt": p, "chosen": c, "rejected": r, "source_row": it[0]}
                                       for (it, _), p, c, r in zip(keep, prompts, chosen, rejected)))
    rec: Dict[str, Any] = {"round": k, "pairs": len(keep), "dropped": dropped,
                           "unfinished_generations": sum(1 for e in ended if not e)}
    previous = current
    if keep:
        rec["before"] = margins(model, encoder, prompts, chosen, rejected, bs)
        del model
        summ = dpo_round(cfg, current, original, rdir / "pairs.jsonl", rdir, k, opts.reference)
        current = summ["model_dir"]
        model, tok = load_policy(current, cfg.model)
        rec["after"] = margins(model, encoder, prompts, chosen, rejected, bs)
        rec["dpo_loss"] = summ.get("train/loss")
        console().print(f"spin round {k}: margin log p(data) - log p(own) {rec['before']['margin']:.2f} -> "
                        f"{rec['after']['margin']:.2f}", style="green")
    else:
        console().print(f"spin round {k}: no pairs; the model is unchanged", style="yellow")
    rec["model_dir"] = current
    finish_round(rdir, rec)
    if not opts.keep_round_models and current != previous:
        drop_model(previous, keep=[original, current])
    return rec


def run_spin(config: Union[SPINConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """SPIN; the Python twin of ``alignkit spin``. Returns the summary.

    The rounds are the stages of a generated pipeline (:func:`alignkit.feedback.rounds.run_rounds`),
    each :func:`run_spin_round`; the final model is measured here."""
    # deferred: accelerate (slow import) loads only for training
    from accelerate.utils import set_seed

    cfg = as_config(SPINConfig, config, overrides)
    if not cfg.data.path:
        raise DataError("no training data: pass --data FILE (or data.path=...) with SFT rows")
    opts = cfg.spin
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    if cfg.data.eval_path or cfg.data.eval_fraction:
        console().print("spin: data.eval_path / data.eval_fraction are not used (margins are measured on the "
                        "training prompts)", style="yellow")
    examples, report = sft_pairs(cfg.data.path, cfg.data.split, cfg.data.max_rows)
    print_report(report)
    (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    records = run_rounds(cfg, "spin", "alignkit.feedback.spin:SPINRoundConfig", "alignkit.feedback.spin:run_spin_round",
                         range(1, opts.rounds + 1))
    current = records[-1]["model_dir"]
    model, tok = load_policy(current, cfg.model)
    encoder = Encoder(tok, cfg.data)
    bs = cfg.generation.batch_size

    # the final model on the first round's pairs (the starting model's own generations) and against its
    # own fresh generations: that gap goes to 0 at SPIN's fixed point p = p_data (Theorem 5.2)
    first_pairs = [json.loads(line) for line in (out / "round-1" / "pairs.jsonl").read_text().splitlines() if line]
    initial = records[0].get("before", {})
    final: Dict[str, float] = {}
    if first_pairs:
        final = margins(model, encoder, [r["prompt"] for r in first_pairs], [r["chosen"] for r in first_pairs],
                        [r["rejected"] for r in first_pairs], bs)
    first = round_slice(examples, 1, opts.prompts_per_round)
    set_seed(cfg.train.seed + 104729)
    gens, _ = own_generations(model, tok, encoder, first, cfg.generation)
    fresh = [(it, g) for it, g in zip(first, gens) if g.strip()]
    gap = margins(model, encoder, [it[1] for it, _ in fresh], [it[2] for it, _ in fresh], [g for _, g in fresh],
                  bs)["margin"] if fresh else float("nan")
    with (out / "rounds.jsonl").open("w") as f:
        f.writelines(json.dumps(r, default=float) + "\n" for r in records)
    summary = {"command": "spin", "rounds": opts.rounds, "pairs_per_round": [r.get("pairs") for r in records],
               "margin_before_per_round": [r.get("before", {}).get("margin") for r in records],
               "margin_after_per_round": [r.get("after", {}).get("margin") for r in records],
               "margin_initial": initial.get("margin"), "margin_final": final.get("margin"),
               "logp_data_initial": initial.get("logp_data"), "logp_data_final": final.get("logp_data"),
               "self_play_gap_final": gap,
               "fresh_equals_data": sum(g == it[2] for it, g in fresh) / max(len(fresh), 1),
               "reference": opts.reference, "model_dir": current}
    write_summary(out, summary)
    return summary
