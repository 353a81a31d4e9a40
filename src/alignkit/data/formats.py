"""Recognize row shapes and normalize them to typed examples.

Shapes (detected per row, so files may mix them):

- SFT: ``{prompt, completion}``, ``{messages: [...]}`` (chat), ``{text}``.
- Preferences: ``{prompt, chosen, rejected}`` with strings or message lists (UltraFeedback-binarized:
  a prompt string plus whole conversations in chosen/rejected), and Anthropic HH
  (``{chosen, rejected}`` full transcripts with "\\n\\nHuman:" / "\\n\\nAssistant:" turns whose shared
  prefix is the prompt). Optional ``soft_label`` (probability that chosen is preferred) and margins.
- Rankings: ``{prompt, responses: [best, ..., worst]}`` expand to every implied pair.
- Unpaired feedback: ``{prompt, completion, label: bool}`` (KTO); preference pairs split into two rows.
- Prompts for online RL: ``{prompt, ...}`` with the extra fields kept for reward functions.

- Implicit prompts (as TRL extracts them): ``{chosen, rejected}`` conversations whose shared message
  prefix is the prompt, and plain strings whose shared text prefix is the prompt.

A prompt is either a plain string or a list of chat messages ``[{"role", "content"}]``. Message content
may be a list of parts (``[{"type": "text", "text": ...}]``; the text parts are joined); a part that is
not text (an image) cannot be used by a text model and drops the row with that reason. Assistant turns
keep their ``tool_calls`` and tool turns their ``tool_call_id``/``name``: the chat template renders them.
Rows that fit no shape are dropped and counted in the :class:`DataReport` with their row number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from alignkit.data.load import DataReport

Message = Dict[str, Any]
Prompt = Union[str, List[Message]]
Response = Union[str, Message]  # an assistant message when it carries tool_calls
TEXT_PARTS = ("text", "input_text", "output_text")
ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass
class SFTExample:
    row: int
    prompt: Optional[Prompt] = None  # None with `messages`
    completion: Optional[Response] = None
    messages: Optional[List[Message]] = None  # loss on every assistant turn
    tools: Optional[List[Dict[str, Any]]] = None  # tool schemas passed to the chat template


@dataclass
class PreferenceExample:
    row: int
    prompt: Prompt
    chosen: Response
    rejected: Response
    soft_label: float = 1.0  # P(chosen is preferred); 1.0 is a hard label
    margin: Optional[float] = None
    fields: Dict[str, Any] = field(default_factory=dict)


@dataclass
class UnpairedExample:
    row: int
    prompt: Prompt
    completion: Response
    label: bool  # True = desirable


@dataclass
class PromptExample:
    row: int
    prompt: Prompt
    fields: Dict[str, Any] = field(default_factory=dict)


class RowError(Exception):
    """A row does not fit: ``reason`` goes into the report, ``field`` names the culprit."""

    def __init__(self, reason: str, fieldname: Optional[str] = None):
        super().__init__(reason)
        self.reason, self.field = reason, fieldname


# ---------------------------------------------------------------- validation helpers

def _content(value: Any, i: int, fieldname: str) -> Optional[str]:
    """Message content: a string, None (a tool-call turn), or a list of parts whose text parts are joined."""
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise RowError(f"message {i} content is not a string or a list of parts", fieldname)
    texts = []
    for j, part in enumerate(value):
        if isinstance(part, str):
            texts.append(part)
            continue
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise RowError(f"message {i} content part {j} of type {kind!r} cannot be used by a text model", fieldname)
        text = part.get("text")
        if not isinstance(text, str):
            raise RowError(f"message {i} content part {j} has no text", fieldname)
        texts.append(text)
    return "".join(texts)


def _tool_calls(value: Any, i: int, fieldname: str) -> List[Dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"message {i} tool_calls is not a non-empty list", fieldname)
    for j, call in enumerate(value):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise RowError(f"message {i} tool call {j} has no function name", fieldname)
    return value


def _messages(value: Any, fieldname: str) -> List[Message]:
    if not isinstance(value, list) or not value:
        raise RowError("expected a non-empty list of messages", fieldname)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            raise RowError(f"message {i} needs 'role' and 'content'", fieldname)
        if m["role"] not in ROLES:
            raise RowError(f"message {i} has unknown role {m['role']!r}", fieldname)
        msg = dict(m)  # other keys (tool_call_id, name, reasoning_content, ...) go to the template as they are
        msg["content"] = _content(m.get("content"), i, fieldname)
        if m.get("tool_calls"):
            if m["role"] != "assistant":
                raise RowError(f"message {i} has tool_calls but role {m['role']!r}", fieldname)
            msg["tool_calls"] = _tool_calls(m["tool_calls"], i, fieldname)
        else:
            msg.pop("tool_calls", None)
            if msg["content"] is None:
                raise RowError(f"message {i} has neither content nor tool_calls", fieldname)
        out.append(msg)
    return out


def as_response(message: Message) -> Response:
    """An assistant turn as a response: its text, or the whole message when it carries tool calls."""
    return message if message.get("tool_calls") else message["content"]


def _text(value: Any, fieldname: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(f"expected a string, got {type(value).__name__}", fieldname)
    if not allow_empty and not value.strip():
        raise RowError("empty text", fieldname)
    return value


def _prompt(value: Any, fieldname: str = "prompt") -> Prompt:
    if isinstance(value, list):
        msgs = _messages(value, fieldname)
        if msgs[-1]["role"] == "assistant":
            raise RowError("prompt messages end with an assistant turn", fieldname)
        return msgs
    return _text(value, fieldname)


# ---------------------------------------------------------------- Anthropic HH transcripts

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh(transcript: str, fieldname: str) -> List[Message]:
    """Split an HH transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into messages."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3:
        raise RowError("no '\\n\\nHuman:'/'\\n\\nAssistant:' turns (and no prompt field)", fieldname)
    msgs = []
    for role, content in zip(parts[1::2], parts[2::2]):
        msgs.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return msgs


def _common_text_prefix(chosen: str, rejected: str) -> Tuple[str, str, str]:
    """TRL's implicit prompt of two plain strings: their shared prefix, ending before the last space."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n < min(len(chosen), len(rejected)) and n > 0 and chosen[n - 1] == " ":
        n -= 1  # the space belongs to the responses
    if n == 0:
        raise RowError("no shared prompt: chosen and rejected have no common prefix (and no prompt field)", "chosen")
    if n == len(chosen) or n == len(rejected):
        raise RowError("one response is a prefix of the other: no implicit prompt can be split off", "chosen")
    return chosen[:n], chosen[n:], rejected[n:]


def _split_conversations(chosen: List[Message], rejected: List[Message]) -> Tuple[List[Message], Response, Response]:
    """Shared message prefix is the prompt; each side must end in exactly one assistant turn."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    # the shared prefix may swallow an identical final assistant turn: back off to the last user turn
    while n > 0 and chosen[n - 1]["role"] == "assistant":
        n -= 1
    prompt, c_rest, r_rest = chosen[:n], chosen[n:], rejected[n:]
    for name, rest in (("chosen", c_rest), ("rejected", r_rest)):
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise RowError("conversations must differ only in their final assistant turn", name)
    if not prompt:
        raise RowError("no shared prompt before the final assistant turn", "chosen")
    return prompt, as_response(c_rest[0]), as_response(r_rest[0])


def _response(value: Any, fieldname: str) -> Union[str, List[Message]]:
    return _messages(value, fieldname) if isinstance(value, list) else _text(value, fieldname)


def _pair(row: Dict[str, Any]) -> Tuple[Prompt, Response, Response]:
    chosen = _response(row["chosen"], "chosen")
    rejected = _response(row["rejected"], "rejected")
    prompt = row.get("prompt")
    if isinstance(chosen, list) or isinstance(rejected, list):
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise RowError("chosen and rejected must both be strings or both message lists", "rejected")
        if prompt is not None and chosen[0]["role"] == "assistant":
            # responses given as bare assistant turns after a separate prompt
            p = _prompt(prompt)
            p = p if isinstance(p, list) else [{"role": "user", "content": p}]
            chosen, rejected = p + chosen, p + rejected
        # otherwise (UltraFeedback) the conversations repeat the prompt: their shared prefix is it
        return _split_conversations(chosen, rejected)
    if prompt is None:
        if _HH_TURN.search(chosen) and _HH_TURN.search(rejected):  # Anthropic HH: the shared transcript prefix
            return _split_conversations(parse_hh(chosen, "chosen"), parse_hh(rejected, "rejected"))
        return _common_text_prefix(chosen, rejected)  # plain strings: the shared text prefix (as TRL)
    return _prompt(prompt), chosen, rejected


def _soft_label(row: Dict[str, Any]) -> float:
    if "soft_label" not in row or row["soft_label"] is None:
        return 1.0
    try:
        p = float(row["soft_label"])
    except (TypeError, ValueError):
        raise RowError("soft_label is not a number", "soft_label") from None
    if not 0.0 <= p <= 1.0:
        raise RowError(f"soft_label {p} is outside [0, 1]", "soft_label")
    return p


# ---------------------------------------------------------------- per-kind parsers

def _no_shape(row: Dict[str, Any], kind: str, expected: str, shapes: Sequence[Tuple[str, ...]]) -> "RowError":
    """A row that fits no shape of ``kind``. When it has part of a shape (``{prompt, chosen}`` of
    ``{prompt, chosen, rejected}``), the error names the missing field(s) of the closest shape (the one
    with the most fields present, then the fewest missing), and the report's field is the first of them."""
    best = max(shapes, key=lambda s: (sum(f in row for f in s), -sum(f not in row for f in s)))
    missing = [f for f in best if f not in row]
    if not any(f in row for f in best) or not missing:
        return RowError(f"fits no {kind} shape: expected {expected}")
    names = " and ".join(repr(f) for f in missing)
    return RowError(f"fits no {kind} shape: missing field {names} (has {', '.join(sorted(map(str, row)))}; "
                    f"expected {expected})", missing[0])


def parse_sft(row: Dict[str, Any], n: int) -> List[SFTExample]:
    if "messages" in row:
        msgs = _messages(row["messages"], "messages")
        if not any(m["role"] == "assistant" for m in msgs):
            raise RowError("no assistant message to learn from", "messages")
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise RowError("tools is not a list of tool schemas", "tools")
        return [SFTExample(n, messages=msgs, tools=tools or None)]
    if "prompt" in row and "completion" in row:
        prompt = _prompt(row["prompt"]) if row["prompt"] != "" else ""
        comp = row["completion"]
        if isinstance(comp, list):  # conversational completion: [{"role": "assistant", ...}]
            msgs = _messages(comp, "completion")
            if len(msgs) != 1 or msgs[0]["role"] != "assistant":
                raise RowError("completion messages must be one assistant turn", "completion")
            comp = as_response(msgs[0])
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if isinstance(comp, dict):  # a tool-call turn
                return [SFTExample(n, prompt=prompt, completion=comp)]
        return [SFTExample(n, prompt=prompt, completion=_text(comp, "completion"))]
    if "text" in row:
        return [SFTExample(n, prompt="", completion=_text(row["text"], "text"))]
    raise _no_shape(row, "SFT", "{prompt, completion}, {messages} or {text}", (("prompt", "completion"),))


def parse_preference(row: Dict[str, Any], n: int, margin_field: Optional[str] = None) -> List[PreferenceExample]:
    extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "responses", "soft_label")}
    margin = None
    if margin_field:
        if row.get(margin_field) is None:
            raise RowError("missing margin", margin_field)
        try:
            margin = float(row[margin_field])
        except (TypeError, ValueError):
            raise RowError("margin is not a number", margin_field) from None
    if "responses" in row and "prompt" in row:
        responses = row["responses"]
        if not isinstance(responses, list) or len(responses) < 2:
            raise RowError("a ranking needs at least two responses, best first", "responses")
        prompt = _prompt(row["prompt"])
        texts = [_text(r if not isinstance(r, dict) else _content(r.get("content"), i, f"responses[{i}]"),
                       f"responses[{i}]") for i, r in enumerate(responses)]
        pairs = [PreferenceExample(n, prompt, texts[i], texts[j], margin=margin, fields=extra)
                 for i in range(len(texts)) for j in range(i + 1, len(texts)) if texts[i] != texts[j]]
        if not pairs:
            raise RowError("all ranked responses are identical", "responses")
        return pairs
    if "chosen" in row and "rejected" in row:
        prompt, chosen, rejected = _pair(row)
        if chosen == rejected:
            raise RowError("chosen equals rejected", "rejected")
        return [PreferenceExample(n, prompt, chosen, rejected, _soft_label(row), margin, extra)]
    raise _no_shape(row, "preference", "{prompt, chosen, rejected}, HH {chosen, rejected} or a ranking "
                    "{prompt, responses}", (("prompt", "chosen", "rejected"), ("chosen", "rejected"),
                                             ("prompt", "responses")))


def parse_unpaired(row: Dict[str, Any], n: int) -> List[UnpairedExample]:
    if "completion" in row and "label" in row:
        label = row["label"]
        if isinstance(label, str) and label.lower() in ("true", "false"):
            label = label.lower() == "true"
        if not isinstance(label, bool) and label not in (0, 1):
            raise RowError("label must be true/false", "label")
        comp = row["completion"]
        if isinstance(comp, list):
            comp = as_response(_messages(comp, "completion")[-1])
        return [UnpairedExample(n, _prompt(row.get("prompt", "")) if row.get("prompt") else "",
                                comp if isinstance(comp, dict) else _text(comp, "completion"), bool(label))]
    if "chosen" in row and "rejected" in row:  # a pair becomes one desirable and one undesirable row
        prompt, chosen, rejected = _pair(row)
        if chosen == rejected:
            raise RowError("chosen equals rejected", "rejected")
        return [UnpairedExample(n, prompt, chosen, True), UnpairedExample(n, prompt, rejected, False)]
    raise _no_shape(row, "unpaired", "{prompt, completion, label} or a preference pair",
                    (("prompt", "completion", "label"), ("chosen", "rejected")))


def parse_prompt(row: Dict[str, Any], n: int) -> List[PromptExample]:
    if "prompt" in row:
        prompt = _prompt(row["prompt"])
    elif "messages" in row:
        msgs = _messages(row["messages"], "messages")
        while msgs and msgs[-1]["role"] == "assistant":  # drop reference answers at the end
            msgs = msgs[:-1]
        if not msgs:
            raise RowError("no user turn", "messages")
        prompt = msgs
    elif "chosen" in row and "rejected" in row:
        prompt = _pair(row)[0]
    else:
        raise RowError("fits no prompt shape: expected {prompt, ...} or {messages}")
    fields = {k: v for k, v in row.items() if k not in ("prompt", "messages")}
    return [PromptExample(n, prompt, fields)]


# the row fields each kind reads; others are counted in the report as not used (prompt rows keep every
# field for the reward functions, so nothing is unused there)
USED_FIELDS = {"sft": frozenset({"messages", "prompt", "completion", "text", "tools"}),
               "preference": frozenset({"prompt", "chosen", "rejected", "responses", "soft_label"}),
               "unpaired": frozenset({"prompt", "completion", "label", "chosen", "rejected"}),
               "prompt": None}

PARSERS = {"sft": parse_sft, "preference": parse_preference, "unpaired": parse_unpaired, "prompt": parse_prompt}


def parse_rows(rows: Sequence[Tuple[int, Dict[str, Any]]], kind: str, report: DataReport, **kwargs) -> list:
    """Normalize raw rows to examples of ``kind``; bad rows are dropped into ``report``."""
    parser = PARSERS[kind]
    used = USED_FIELDS[kind]
    if used is not None and kwargs.get("margin_field"):
        used = used | {kwargs["margin_field"]}
    out: list = []
    for n, row in rows:
        report.rows_read += 1
        try:
            out.extend(parser(row, n, **kwargs))
        except RowError as e:
            report.drop(n, e.reason, e.field)
            continue
        if kind == "sft" and row.get("prompt") == "" and "completion" in row:
            report.note(n, "empty prompt: trained as plain text (loss on the whole completion)", "prompt")
        if used is not None:
            report.note_unused(k for k in row if k not in used)
    return out
