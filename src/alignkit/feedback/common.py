"""Pieces the feedback commands share: the input section, JSONL output, devices, prompt rendering."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pydantic import Field

from alignkit.config import ModelConfig, Section
from alignkit.data.formats import parse_rows
from alignkit.data.load import DataError, DataReport, read_rows
from alignkit.train.logging import console


class InputConfig(Section):
    path: Optional[str] = None
    """Input rows: a JSONL/JSON/Parquet/CSV file, a datasets.save_to_disk directory, a hub name or
    builtin:NAME."""
    split: str = "train"
    """Split to read from a dataset directory or hub dataset."""
    max_rows: Optional[int] = Field(None, gt=0)
    """Read at most this many rows (the first ones)."""


def read_input(cfg: InputConfig, what: str) -> Tuple[str, List[Tuple[int, Dict[str, Any]]]]:
    if not cfg.path:
        raise DataError(f"no {what}: pass --data FILE (or data.path=...)")
    return read_rows(cfg.path, split=cfg.split, max_rows=cfg.max_rows)


def load_prompt_examples(cfg: InputConfig, what: str = "prompts"):
    """Prompt rows ({prompt, ...}, {messages}, or pairs whose prompt is used) -> (examples, report)."""
    name, rows = read_input(cfg, what)
    report = DataReport(source=name)
    examples = parse_rows(rows, "prompt", report)
    report.examples = len(examples)
    if not examples:
        raise DataError(f"{name}: no usable prompts out of {report.rows_read} rows\n"
                        + "\n".join(report.summary_lines()))
    return examples, report


def write_summary(out: Path, summary: Dict[str, Any]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))


def print_report(report: DataReport) -> None:
    c = console()
    for line in report.summary_lines():
        c.print(line, style="yellow" if "dropped" in line else None, markup=False, highlight=False)


def load_policy(name_or_path: Optional[str], model_cfg=None, trainable: bool = False):
    """(model on the best device, tokenizer) for sampling."""
    # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
    from alignkit.models.loading import best_device, load_causal_lm, load_tokenizer

    mcfg = (model_cfg or ModelConfig()).model_copy(update={"name_or_path": name_or_path,
                                                           "gradient_checkpointing": False})
    tok = load_tokenizer(mcfg)
    model = load_causal_lm(mcfg, trainable=trainable).to(best_device()).eval()
    return model, tok


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def as_messages(prompt: Any) -> List[Dict[str, str]]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def conversation_ids(tok, messages: List[Dict[str, str]], max_prompt: Optional[int] = None) -> Tuple[List[int], bool]:
    """Token ids of a conversation ready for the assistant's next turn, and whether it was cut.

    Uses the tokenizer's chat template; without one, an Anthropic-HH transcript
    ("\\n\\nHuman: ...\\n\\nAssistant:"), whose generations are cut at the next "\\n\\nHuman:"
    (:func:`clean_generation`). Too-long conversations keep their last ``max_prompt`` tokens.
    """
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        text = "".join(f"{HH_ASSISTANT if m['role'] == 'assistant' else HH_HUMAN} {m['content']}"
                       for m in messages) + HH_ASSISTANT
        ids = tok(text, add_special_tokens=True)["input_ids"]
    if max_prompt and len(ids) > max_prompt:
        return ids[-max_prompt:], True
    return ids, False


def clean_generation(text: str) -> str:
    """Strip and cut a sampled turn where a plain-text model starts the next human turn."""
    cut = text.find(HH_HUMAN)
    return (text[:cut] if cut >= 0 else text).strip()


def sample_with_ended(model, tok, prompt_ids: List[List[int]], gen, n: int = 1) -> Tuple[List[str], List[bool]]:
    """``n`` cleaned samples per prompt, grouped prompt by prompt, and whether each ended (EOS) before
    ``generation.max_new_tokens``. An unfinished sample re-encoded as training text gets an EOS it
    never produced, so callers count (and may drop) them."""
    # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
    from alignkit.rollout.generate import generate

    if gen.engine == "vllm":
        raise ValueError("generation.engine='vllm': the feedback commands sample in-process "
                         "(generation.engine=fast or hf)")
    if not prompt_ids:
        return [], []
    ro = generate(model, tok, prompt_ids, gen, n=n, compute_logprobs=False)
    return [clean_generation(t) for t in ro.texts], [bool(e) for e in ro.ended.tolist()]


def sample_texts(model, tok, prompt_ids: List[List[int]], gen, n: int = 1) -> List[str]:
    """``n`` cleaned samples per prompt, grouped prompt by prompt (len = len(prompt_ids) * n)."""
    return sample_with_ended(model, tok, prompt_ids, gen, n)[0]
