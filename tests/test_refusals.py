"""Case 15 of issue 32: sandbox and unpickling refusals are one ``Error:`` line, not a traceback."""

import os

import click
import pytest
import torch
from click.testing import CliRunner

from alignkit.cli import build_cli, run_reporting_errors


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_unpickling_refusal_is_one_line_naming_the_file(tmp_path):
    bad = tmp_path / "optimizer.bin"
    marker = tmp_path / "PWNED"
    torch.save({"state": _Payload(marker)}, bad)
    with pytest.raises(click.ClickException) as err:  # the CLI prints it as "Error: ..." with exit code 1
        run_reporting_errors(lambda: torch.load(bad, weights_only=True))
    msg = err.value.message
    assert "\n" not in msg and f"refused to unpickle {bad}" in msg and "system" in msg
    assert "weights_only=False" not in msg  # never the advice to turn the protection off
    assert not marker.exists()


def test_wrapped_unpickling_refusal_still_one_line(tmp_path):
    bad = tmp_path / "rng.pkl"
    torch.save(_Payload(tmp_path / "PWNED"), bad)

    def load():
        try:
            torch.load(bad, weights_only=True)
        except Exception as e:
            raise RuntimeError("could not load the checkpoint") from e

    with pytest.raises(click.ClickException, match="refused to unpickle"):
        run_reporting_errors(load)


def test_other_errors_keep_their_traceback():
    with pytest.raises(ZeroDivisionError):
        run_reporting_errors(lambda: 1 / 0)


def test_hostile_chat_template_is_one_error_line(tiny_model, tmp_path, jsonl):
    data = jsonl("d.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                           {"role": "assistant", "content": "yo"}]} for i in range(4)])
    evil = tmp_path / "evil.jinja"
    evil.write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}"
                    "{% for m in messages %}{{ m.content }}{% endfor %}")
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(tiny_model), "--data", str(data),
                                           f"model.chat_template={evil}", "train.max_steps=1",
                                           "--output", str(tmp_path / "o")])
    assert res.exit_code == 1, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("Error:")]
    assert len(errors) == 1 and "stopped by the sandbox" in errors[0] and "__class__" in errors[0]
    assert "Traceback" not in res.output


def test_model_without_safetensors_is_one_error_line(tiny_model, tmp_path, jsonl):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"w": _Payload(marker)}, bad / "pytorch_model.bin")
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}])
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(bad), "--data", str(data), "train.max_steps=1",
                                           "--output", str(tmp_path / "o")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    errors = [x for x in res.output.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "safetensors only" in errors[0]
    assert not marker.exists()
