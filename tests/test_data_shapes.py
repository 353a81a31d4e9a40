"""Data shapes of issue 12: implicit prompts, content-part lists, tool calls, a chat template by file."""

import json

import pytest
from click.testing import CliRunner

from alignkit.config import DataConfig, ModelConfig
from alignkit.data.formats import parse_rows
from alignkit.data.load import DataError, DataReport
from alignkit.data.templates import NAMED_TEMPLATES
from alignkit.data.tokenize import Encoder
from alignkit.testing import tiny_tokenizer


def parse(kind, rows):
    rep = DataReport(source="t.jsonl")
    return parse_rows(list(enumerate(rows, 1)), kind, rep), rep


def labelled(tok, item):
    return "".join(t for t, m in zip(tok.convert_ids_to_tokens(item["input_ids"]), item["loss_mask"]) if m)


U = {"role": "user", "content": "hi"}


def test_implicit_prompt_conversations_share_their_prefix():
    sys_ = {"role": "system", "content": "be brief"}
    a1, a2 = {"role": "assistant", "content": "hello"}, {"role": "assistant", "content": "go away"}
    row = {"chosen": [sys_, U, a1, {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}],
           "rejected": [sys_, U, a1, {"role": "user", "content": "and?"}, {"role": "assistant", "content": "no"}]}
    (ex,), rep = parse("preference", [row, {"chosen": [U, a1], "rejected": [U, a2]}][:1])
    assert ex.prompt == row["chosen"][:4] and (ex.chosen, ex.rejected) == ("bye", "no")
    (ex,), _ = parse("preference", [{"chosen": [U, a1], "rejected": [U, a2]}])
    assert ex.prompt == [U] and (ex.chosen, ex.rejected) == ("hello", "go away")


def test_implicit_prompt_plain_strings_as_trl_extracts_it():
    (ex,), _ = parse("preference", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}])
    assert (ex.prompt, ex.chosen, ex.rejected) == ("The sky is", " blue.", " green.")
    # HH transcripts keep their turn structure
    (hh,), _ = parse("preference", [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}])
    assert hh.prompt == [{"role": "user", "content": "q"}] and (hh.chosen, hh.rejected) == ("a", "b")
    out, rep = parse("preference", [{"chosen": "abc", "rejected": "abcdef"}])
    assert not out and "one response is a prefix of the other" in rep.samples[0]["reason"]


def test_content_part_lists_equal_plain_strings(tiny_tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "yo"}]}]
    plain = [U, {"role": "assistant", "content": "yo"}]
    (a, b), _ = parse("sft", [{"messages": parts}, {"messages": plain}])
    enc = Encoder(tiny_tok, DataConfig())
    ia, ib = enc.encode("sft", [a, b], DataReport())
    assert ia["input_ids"] == ib["input_ids"] and ia["loss_mask"] == ib["loss_mask"]
    (p,), _ = parse("preference", [{"prompt": [parts[0]], "chosen": [{"role": "assistant", "content": [
        {"type": "text", "text": "yo"}]}], "rejected": [{"role": "assistant", "content": "no"}]}])
    assert p.prompt == [U] and p.chosen == "yo"
    # a part a text model cannot use is reported, not dropped silently
    img = [{"role": "user", "content": [{"type": "image", "url": "x.png"}, {"type": "text", "text": "?"}]},
           {"role": "assistant", "content": "a cat"}]
    out, rep = parse("sft", [{"messages": img}])
    assert not out and rep.samples[0]["reason"] == "message 0 content part 0 of type 'image' cannot be used by a text model"


TOOL_ROW = {"messages": [
    {"role": "user", "content": "weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "0", "name": "get_weather", "content": "sunny"},
    {"role": "assistant", "content": "It is sunny."}]}


def test_tool_calls_are_rendered_and_trained():
    tok = tiny_tokenizer(chat_template=NAMED_TEMPLATES["chatml"])
    (ex,), _ = parse("sft", [TOOL_ROW])
    (item,), = [Encoder(tok, DataConfig()).encode("sft", [ex], DataReport())]
    assert labelled(tok, item) == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                   '</tool_call><|im_end|>It is sunny.<|im_end|>')
    text = "".join(tok.convert_ids_to_tokens(item["input_ids"]))
    assert "<|im_start|>tool\nsunny<|im_end|>" in text  # the tool result is context, not a label
    # a tool-call completion ({prompt, completion}) and preference responses keep the call too
    (c,), _ = parse("sft", [{"prompt": "weather?", "completion": [TOOL_ROW["messages"][1]]}])
    (ci,) = Encoder(tok, DataConfig()).encode("sft", [c], DataReport())
    assert "get_weather" in labelled(tok, ci)


def test_a_template_that_drops_tool_calls_is_reported(tiny_tok):
    """The default tiny template ignores tool_calls: the turn would be trained as empty text."""
    (ex,), _ = parse("sft", [TOOL_ROW])
    rep = DataReport()
    assert Encoder(tiny_tok, DataConfig()).encode("sft", [ex], rep) == []
    assert "does not render tool_calls (function 'get_weather' missing)" in rep.samples[0]["reason"]
    assert "model.chat_template" in rep.samples[0]["reason"]


def test_chat_template_from_a_file(tmp_path, jsonl):
    """A base model without a chat template + chat data: model.chat_template=FILE makes it work, and the
    template is saved with the trained model's tokenizer."""
    from alignkit.cli import build_cli
    from alignkit.models.loading import load_tokenizer
    from alignkit.testing import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    cfg_file = base / "tokenizer_config.json"
    meta = json.loads(cfg_file.read_text())
    meta.pop("chat_template", None)
    cfg_file.write_text(json.dumps(meta))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    assert not load_tokenizer(ModelConfig(name_or_path=str(base))).chat_template
    tpl = tmp_path / "turns.jinja"
    tpl.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
                   "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    rows = [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ab"}]}] * 4
    data = jsonl("chat.jsonl", rows)
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(base), "--data", str(data), "--output",
                                           str(tmp_path / "no"), "--max-steps", "1", "log.progress=false"])
    assert res.exit_code == 1 and "model.chat_template" in res.output and "chatml" in res.output
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(base), "--data", str(data), "--output",
                                           str(tmp_path / "run"), "--max-steps", "1", "log.progress=false",
                                           f"model.chat_template={tpl}", "train.batch_size=2"])
    assert res.exit_code == 0, res.output
    saved = load_tokenizer(ModelConfig(name_or_path=str(tmp_path / "run" / "model")))
    assert saved.chat_template == tpl.read_text()
    assert saved.apply_chat_template([{"role": "user", "content": "q"}], tokenize=False,
                                     add_generation_prompt=True) == "[user] q\n[assistant] "
    with pytest.raises(FileNotFoundError, match="neither a file nor a named template"):
        load_tokenizer(ModelConfig(name_or_path=str(base), chat_template="no-such-template"))


def test_fields_a_command_cannot_use_are_reported():
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 8.0, "prompt_id": "x"},
            {"prompt": "q", "chosen": "c", "rejected": "d", "score_chosen": 7.0}]
    out, rep = parse("preference", rows)
    assert len(out) == 2 and dict(rep.unused) == {"score_chosen": 2, "prompt_id": 1}
    assert "  fields not used: prompt_id (1 rows), score_chosen (2 rows)" in rep.summary_lines()
    assert rep.to_dict()["unused_fields"] == {"score_chosen": 2, "prompt_id": 1}
    _, rep = parse("prompt", [{"prompt": "2+3?", "answer": "5"}])  # reward functions get every field
    assert not rep.unused
