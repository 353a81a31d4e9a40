"""Tokenize examples: chat template, prompt/response masks, truncation (counted, never silent).

Every encoded response ends with the EOS token and EOS counts as a label even when pad == eos:
masks come from the lengths we build here, never from comparing ids with the pad id.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from alignkit.config import DataConfig
from alignkit.data.formats import (Message, PreferenceExample, Prompt, PromptExample, Response, RowError,
                                   SFTExample, UnpairedExample)
from alignkit.data.load import DataError, DataReport
from alignkit.data.templates import TEMPLATE_HINT


class Encoder:
    """Turns examples into token ids with the tokenizer's chat template where the data is chat."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tok = tokenizer
        self.cfg = cfg
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise DataError("the tokenizer has no EOS token; responses could never end")
        self.max_len = cfg.max_length
        self.max_prompt = cfg.max_prompt_length or cfg.max_length // 2

    # ------------------------------------------------------------ text rendering
    def _as_chat(self, prompt: Prompt) -> Optional[List[Message]]:
        """Messages when this prompt goes through the chat template, else None."""
        if isinstance(prompt, list):
            if self.cfg.chat_template == "never":
                raise RowError("message list but data.chat_template=never", "prompt")
            return prompt
        if self.cfg.chat_template == "always" and prompt != "":
            return [{"role": "user", "content": prompt}]
        return None

    def _template(self, messages: List[Message], generation_prompt: bool, tools=None) -> str:
        if not getattr(self.tok, "chat_template", None):
            raise DataError("chat data needs a chat template, and this tokenizer has none: "
                            f"{TEMPLATE_HINT} (e.g. model.chat_template=chatml), or give plain "
                            "{prompt, completion} strings")
        kw = {"tools": tools} if tools else {}
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                **kw)
        except Exception as e:  # noqa: BLE001 - a template that cannot render this row (jinja UndefinedError, ...)
            from jinja2 import TemplateError
            from jinja2.exceptions import SecurityError

            # the sandbox stopping the template is about the template, not this row: one error for the run
            if isinstance(e, SecurityError) or not isinstance(e, (TemplateError, TypeError, KeyError,
                                                                  AttributeError, IndexError)):
                raise
            what = " ".join(str(e).split())[:160]
            raise RowError(f"the chat template cannot render this row ({type(e).__name__}: {what}); "
                           f"{TEMPLATE_HINT} (chatml renders tool calls and tools)", "messages") from None

    def tools_left_out(self, messages: List[Message], tools) -> List[str]:
        """Names of the row's tool schemas when the chat template leaves them out of the text: it renders
        the conversation the same with and without ``tools``."""
        if not tools:
            return []
        if self._template(messages, False, tools) != self._template(messages, False, None):
            return []
        return [str(t.get("function", t).get("name", "?")) if isinstance(t, dict) else "?" for t in tools]

    @staticmethod
    def _check_rendered(message: Message, rendered: str, fieldname: str) -> None:
        """A turn's tool calls must reach the text (a template that ignores them would train an empty
        or partial turn): every function name has to appear in the rendered turn."""
        for call in message.get("tool_calls") or []:
            name = call.get("function", call)["name"]
            if name not in rendered:
                raise RowError(f"the chat template does not render tool_calls (function {name!r} missing); "
                               f"{TEMPLATE_HINT}", fieldname)

    def _ids(self, text: str, special: bool = False) -> List[int]:
        return self.tok(text, add_special_tokens=special)["input_ids"] if text else []

    def _end_at_eos(self, ids: List[int]) -> List[int]:
        """Cut what a template adds after the last EOS (e.g. a newline); add EOS if it is missing."""
        if self.eos_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.eos_id)
            return ids[: last + 1]
        return ids + [self.eos_id]

    def render_prompt(self, prompt: Prompt) -> str:
        """The exact text a model sees before its response (for generation)."""
        chat = self._as_chat(prompt)
        return self._template(chat, True) if chat is not None else prompt

    def encode_prompt_ids(self, prompt: Prompt) -> List[int]:
        chat = self._as_chat(prompt)
        if chat is not None:
            return self._ids(self._template(chat, True))
        return self._ids(prompt, special=True)

    def encode_response(self, prompt: Prompt, response: Response) -> Tuple[List[int], List[int]]:
        """(prompt ids, response ids) with the response ending in EOS. ``response`` is a text or an
        assistant message (with tool_calls), which needs the chat template."""
        chat = self._as_chat(prompt)
        if chat is None and isinstance(response, dict):
            if self.cfg.chat_template == "never":
                raise RowError("a tool-call response needs the chat template (data.chat_template=never)", "completion")
            chat = [{"role": "user", "content": prompt}] if prompt else []
        if chat is None:
            return self._ids(prompt, special=True), self._ids(response) + [self.eos_id]
        turn = response if isinstance(response, dict) else {"role": "assistant", "content": response}
        p_text = self._template(chat, True)
        full = self._template(chat + [turn], False)
        if not full.startswith(p_text):
            raise RowError("the chat template does not render the prompt as a prefix of the conversation")
        self._check_rendered(turn, full[len(p_text):], "completion")
        return self._ids(p_text), self._end_at_eos(self._ids(full[len(p_text):]))

    def encode_conversation(self, messages: List[Message], tools=None) -> Tuple[List[int], List[int]]:
        """(ids, loss mask) with a label on every assistant turn, up to and including its EOS."""
        if self.cfg.chat_template == "never":
            raise RowError("message list but data.chat_template=never", "messages")
        ids: List[int] = []
        mask: List[int] = []
        done = ""  # text covered so far
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self._template(messages[:i], True, tools)
            full = self._template(messages[: i + 1], False, tools)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise RowError("the chat template does not render earlier turns as a prefix", "messages")
            self._check_rendered(m, full[len(prefix):], "messages")
            ctx = self._ids(prefix[len(done):])
            resp = self._ids(full[len(prefix):])
            if self.eos_id in resp:  # labels stop at EOS; the template's trailing text is context
                cut = len(resp) - resp[::-1].index(self.eos_id)
                resp, tail = resp[:cut], resp[cut:]
            else:
                tail = []
            if i == len(messages) - 1:
                tail = []  # nothing follows the last turn: end the sequence at its EOS
            ids += ctx + resp + tail
            mask += [0] * len(ctx) + [1] * len(resp) + [0] * len(tail)
            done = full
        if ids and self.eos_id not in [t for t, k in zip(ids, mask) if k]:
            ids.append(self.eos_id)
            mask.append(1)
        return ids, mask

    # ------------------------------------------------------------ truncation
    def fit(self, prompt_ids: List[int], responses: List[List[int]], row: int, report: DataReport):
        """Apply the truncation policy to a prompt and its responses; None means drop."""
        longest = max(len(r) for r in responses)
        if len(prompt_ids) + longest <= self.max_len:
            return prompt_ids, responses
        if self.cfg.truncation == "drop":
            report.drop(row, f"longer than data.max_length={self.max_len}")
            return None
        if len(prompt_ids) + longest > self.max_len and len(prompt_ids) > self.max_prompt:
            prompt_ids = prompt_ids[-self.max_prompt:]  # keep the end of the prompt: it is what the response answers
        room = self.max_len - len(prompt_ids)
        responses = [r[:room] for r in responses]
        if room <= 0 or min(len(r) for r in responses) == 0:
            report.drop(row, "no response tokens left after truncation")
            return None
        report.truncate(row, f"longer than data.max_length={self.max_len}")
        return prompt_ids, responses

    # ------------------------------------------------------------ per kind
    def sft(self, ex: SFTExample, report: DataReport) -> Optional[Dict[str, Any]]:
        if ex.messages is not None:
            ids, mask = self.encode_conversation(ex.messages, ex.tools)
            missing = self.tools_left_out(ex.messages, ex.tools)
            if missing:  # kept (the turns are fine) but never silently: the schemas are not in the text
                report.note(ex.row, f"the chat template leaves out the row's tools schemas ({', '.join(missing)}); "
                            f"model.chat_template=chatml includes them", "tools")
            if len(ids) > self.max_len:
                if self.cfg.truncation == "drop":
                    report.drop(ex.row, f"longer than data.max_length={self.max_len}")
                    return None
                ids, mask = ids[: self.max_len], mask[: self.max_len]
                if not any(mask[1:]):
                    report.drop(ex.row, "no response tokens left after truncation")
                    return None
                report.truncate(ex.row, f"longer than data.max_length={self.max_len}")
            return {"input_ids": ids, "loss_mask": mask, "row": ex.row}
        p, r = self.encode_response(ex.prompt, ex.completion)
        fitted = self.fit(p, [r], ex.row, report)
        if fitted is None:
            return None
        p, (r,) = fitted
        mask = [0] * len(p) + [1] * len(r)
        if not p:  # plain text: the first token has nothing to be predicted from
            mask[0] = 0
        return {"input_ids": p + r, "loss_mask": mask, "row": ex.row}

    def preference(self, ex: PreferenceExample, report: DataReport) -> Optional[Dict[str, Any]]:
        p, c = self.encode_response(ex.prompt, ex.chosen)
        p2, r = self.encode_response(ex.prompt, ex.rejected)
        assert p == p2
        fitted = self.fit(p, [c, r], ex.row, report)
        if fitted is None:
            return None
        p, (c, r) = fitted
        out = {"prompt_ids": p, "chosen_ids": c, "rejected_ids": r, "soft_label": ex.soft_label, "row": ex.row}
        if ex.margin is not None:
            out["margin"] = ex.margin
        return out

    def unpaired(self, ex: UnpairedExample, report: DataReport) -> Optional[Dict[str, Any]]:
        p, c = self.encode_response(ex.prompt, ex.completion)
        fitted = self.fit(p, [c], ex.row, report)
        if fitted is None:
            return None
        p, (c,) = fitted
        return {"prompt_ids": p, "completion_ids": c, "label": ex.label, "row": ex.row}

    def prompt(self, ex: PromptExample, report: DataReport) -> Optional[Dict[str, Any]]:
        ids = self.encode_prompt_ids(ex.prompt)
        if len(ids) > self.max_prompt:
            if self.cfg.truncation == "drop":
                report.drop(ex.row, f"prompt longer than max_prompt_length={self.max_prompt}")
                return None
            ids = ids[-self.max_prompt:]
            report.truncate(ex.row, f"prompt longer than max_prompt_length={self.max_prompt}")
        return {"prompt_ids": ids, "prompt": ex.prompt, "prompt_text": self.render_prompt(ex.prompt),
                "fields": ex.fields, "row": ex.row}

    def encode(self, kind: str, examples: list, report: DataReport) -> List[Dict[str, Any]]:
        fn = getattr(self, kind)
        out = []
        for ex in examples:
            try:
                enc = fn(ex, report)
            except RowError as e:
                report.drop(ex.row, e.reason, e.field)
                continue
            if enc is not None:
                out.append(enc)
        report.examples += len(out)
        return out
