"""Chat templates for tokenizers that have none (``model.chat_template``): a Jinja file or a name.

The named templates render ``tool_calls`` on assistant turns (as ``<tool_call>`` JSON, the Hermes /
Qwen convention) and ``tool`` results, and end every assistant turn with the tokenizer's EOS token
so a trained model learns to stop. transformers renders with ``trim_blocks``: a newline right after a
``{% ... %}`` tag is removed, so the templates write it as ``{{ '\\n' }}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

# one assistant/user/system/tool turn's tool calls, shared by the named templates
_TOOL_CALLS = (
    "{%- if m.get('tool_calls') %}{% for tc in m['tool_calls'] %}{% set f = tc.get('function', tc) %}"
    "{% if m['content'] or not loop.first %}{{ '\\n' }}{% endif %}<tool_call>\n{\"name\": \"{{ f['name'] }}\", \"arguments\": "
    "{% if f.get('arguments') is string %}{{ f['arguments'] }}{% else %}{{ (f.get('arguments') or {}) | tojson }}"
    "{% endif %}}\n</tool_call>{% endfor %}{% endif %}"
)

# the row's tool schemas (a `tools` field), as a system turn before the conversation (merged into the
# conversation's own system turn when it starts with one), one JSON schema per line in <tools> tags
_TOOLS_SYSTEM = (
    "{%- set skip_first = tools and messages and messages[0]['role'] == 'system' %}"
    "{%- if tools %}<|im_start|>system\n{% if skip_first %}{{ messages[0]['content'] or '' }}{{ '\\n\\n' }}{% endif %}"
    "You can call the functions below; their JSON schemas:{{ '\\n' }}<tools>{{ '\\n' }}"
    "{% for t in tools %}{{ t | tojson }}{{ '\\n' }}{% endfor %}</tools>{{ '\\n' }}"
    "To call one, answer with <tool_call>{{ '\\n' }}{\"name\": NAME, \"arguments\": {...}}{{ '\\n' }}</tool_call>"
    "<|im_end|>{{ '\\n' }}{% endif %}"
)

NAMED_TEMPLATES = {
    # ChatML (Qwen, SmolLM2, Hermes): <|im_start|>role\ncontent<|im_end|>; tools as Hermes/Qwen put them
    "chatml": (
        _TOOLS_SYSTEM + "{% for m in messages %}{% if not (loop.first and skip_first) %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}" + _TOOL_CALLS
        + "<|im_end|>{% if m['role'] == 'assistant' and eos_token != '<|im_end|>' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    # Zephyr: <|user|>\ncontent</s>
    "zephyr": (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] or '' }}" + _TOOL_CALLS
        + "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    # plain text turns for base models: "User: ...\nAssistant: ...<eos>"
    "simple": (
        "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] or '' }}" + _TOOL_CALLS
        + "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}"
    ),
}

TEMPLATE_HINT = ("set model.chat_template to a Jinja file or one of: " + ", ".join(NAMED_TEMPLATES))


def resolve_chat_template(value: Optional[str]) -> Optional[str]:
    """The Jinja text of ``model.chat_template``: a named template or the contents of a file."""
    if not value:
        return None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text()
        if not text.strip():
            raise ValueError(f"model.chat_template: {path} is empty")
        return text
    if "{%" in value or "{{" in value:  # the template itself, e.g. from a Python dict
        return value
    raise FileNotFoundError(f"model.chat_template: {value!r} is neither a file nor a named template "
                            f"({', '.join(NAMED_TEMPLATES)})")
