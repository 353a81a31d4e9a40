"""Issue 34, item 7: a template that cannot render a row drops it (counted), tools schemas reach the text
with chatml (or are reported), a mistyped Hub id fails at once offline, and every run says how many
processes it has."""

import json
import time

import pytest
from click.testing import CliRunner

from alignkit.cli import build_cli
from alignkit.config import DataConfig
from alignkit.data.formats import parse_rows
from alignkit.data.load import DataReport
from alignkit.data.templates import NAMED_TEMPLATES
from alignkit.data.tokenize import Encoder
from alignkit.testing import tiny_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "today's weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ROW = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "0", "name": "get_weather", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."}], "tools": TOOLS}

# SmolLM2-Instruct's own template reads message['content'] as text (`.strip()` of None is jinja's
# UndefinedError on a tool-call turn), as this minimal one does
STRICT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'].strip() }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def encode(template, rows):
    tok = tiny_tokenizer(chat_template=template)
    rep = DataReport(source="t.jsonl")
    examples = parse_rows(list(enumerate(rows, 1)), "sft", rep)
    return tok, Encoder(tok, DataConfig()).encode("sft", examples, rep), rep


def test_a_template_error_is_a_counted_dropped_row_not_a_traceback():
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    _, items, rep = encode(STRICT, [ROW, ok])
    assert len(items) == 1 and items[0]["row"] == 2 and rep.n_dropped == 1
    (reason,) = rep.dropped
    assert reason.startswith("the chat template cannot render this row (UndefinedError:") and "chatml" in reason
    assert rep.samples[0]["row"] == 1 and rep.samples[0]["field"] == "messages"


def test_chatml_puts_the_rows_tools_schemas_in_the_text():
    tok, (item,), rep = encode(NAMED_TEMPLATES["chatml"], [ROW])
    text = tok.decode(item["input_ids"])
    schema = json.dumps(TOOLS[0])
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou can call the functions below")
    assert f"<tools>\n{schema}\n</tools>" in text and text.count("<|im_start|>system") == 1
    assert rep.n_dropped == 0 and not rep.noted
    labels = "".join(t for t, m in zip(tok.convert_ids_to_tokens(item["input_ids"]), item["loss_mask"]) if m)
    assert "get_weather" not in labels.split("<tool_call>")[0] and schema not in labels  # schemas are context
    # without a system turn the tools get their own
    no_sys = {**ROW, "messages": ROW["messages"][1:]}
    tok, (item,), _ = encode(NAMED_TEMPLATES["chatml"], [no_sys])
    assert tok.decode(item["input_ids"]).startswith("<|im_start|>system\nYou can call the functions below")


def test_a_template_that_ignores_tools_is_reported():
    keeps_calls = NAMED_TEMPLATES["zephyr"]  # renders tool calls, not tool schemas
    _, items, rep = encode(keeps_calls, [ROW])
    assert len(items) == 1
    (reason,) = rep.noted
    assert "leaves out the row's tools schemas (get_weather)" in reason and rep.samples[0]["field"] == "tools"


def test_mistyped_hub_id_offline_fails_at_once_in_one_line(monkeypatch, tmp_path):
    from alignkit.models import default

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(default, "_ANNOUNCED", set())
    t0 = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set") as e:
        default.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instructt")
    assert time.perf_counter() - t0 < 5 and "\n" not in str(e.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(default, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(FileNotFoundError, match="the Hub cannot be reached"):
        default.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instructt")
    res = CliRunner().invoke(build_cli(), ["sft", "--model", "nobody/no-such-model", "--data", "builtin:demo_sft",
                                           "--output", str(tmp_path / "x")])
    assert res.exit_code == 1 and "Traceback" not in res.output and "the Hub cannot be reached" in res.output


def test_every_run_says_how_many_processes(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(tiny_model), "--data", str(data), "--output",
                                           str(tmp_path / "r"), "--max-steps", "1", "log.progress=false"])
    assert res.exit_code == 0, res.output
    assert "processes: 1 (single process, device cpu" in res.output.splitlines()[0] + res.output


def test_unreachable_hub_dataset_fails_at_once(monkeypatch, tmp_path):
    from alignkit.data.load import DataError, read_rows
    from alignkit.models import default

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="offline mode is set"):
        read_rows("nobody/no-such-dataset")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(default, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match="the Hub cannot be reached"):
        read_rows("nobody/no-such-dataset")
    assert time.perf_counter() - t0 < 5
    (tmp_path / "hub" / "datasets--nobody--cached").mkdir(parents=True)
    assert default.check_hub_dataset("nobody/cached") is None  # a cached dataset is left to datasets
