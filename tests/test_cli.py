"""CLI: help from the config docstrings, clear errors naming the field, YAML + overrides."""

import yaml
from click.testing import CliRunner

from alignkit.cli import build_cli
from alignkit.config import RMConfig, SFTConfig


def run(args):
    return CliRunner().invoke(build_cli(), args, catch_exceptions=False)


def test_help_documents_every_field():
    res = run(["sft", "--help"])
    assert res.exit_code == 0
    for cls in (SFTConfig,):
        from alignkit.cli import _leaf_fields

        for name, f in _leaf_fields(cls):
            assert f"  {name} (" in res.output, name
            assert f.description, f"{name} has no docstring"
    assert "Peak learning rate." in res.output
    assert "optim.scheduler (cosine|linear|constant" in res.output


def test_every_field_of_every_command_has_a_docstring():
    from alignkit.cli import COMMANDS, _leaf_fields, _load

    build_cli()
    assert {"sft", "rm", "score"} <= {c.name for c in COMMANDS}
    for cmd in COMMANDS:
        for name, f in _leaf_fields(_load(cmd.config)):
            assert (f.description or "").strip(), f"{cmd.name}: {name}"


def test_invalid_value_names_the_field(tmp_path):
    res = CliRunner().invoke(build_cli(), ["sft", "optim.lr=-1", "--output", str(tmp_path)])
    assert res.exit_code == 2
    assert "optim.lr: Input should be greater than 0" in res.output
    res = CliRunner().invoke(build_cli(), ["rm", "train.batchsize=4"])
    assert "train.batchsize: unknown field" in res.output
    res = CliRunner().invoke(build_cli(), ["sft", "notanoverride"])
    assert "is not of the form key=value" in res.output


def test_missing_data_is_a_clear_error(tmp_path, tiny_model):
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(tiny_model), "--data", str(tmp_path / "nope.jsonl"),
                                           "--output", str(tmp_path / "o")])
    assert res.exit_code == 1 and "nope.jsonl: no such file or directory" in res.output


def test_yaml_config_overrides_and_resolved_config(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"optim": {"lr": 0.01}, "train": {"batch_size": 2}, "log": {"progress": False}}))
    res = run(["sft", "--config", str(cfg), "--model", str(tiny_model), "--data", str(data), "--output",
               str(tmp_path / "run"), "--max-steps", "2", "optim.lr=0.002", "--lora", "lora.r=4"])
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["optim"]["lr"] == 0.002  # the command line wins over the file
    assert resolved["train"]["batch_size"] == 2 and resolved["train"]["max_steps"] == 2
    assert resolved["lora"] == {**resolved["lora"], "enabled": True, "r": 4}
    assert resolved["command"] == "sft"
    # a merged LoRA model is a plain causal LM again
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")


def test_lora_adapter_save(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    res = run(["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "run"),
               "--max-steps", "1", "--lora", "lora.save=adapter", "log.progress=false"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "run" / "model" / "adapter_config.json").exists()
    assert RMConfig().lora.save == "merged"


def test_tensorboard_tracker_writes_events(tmp_path, tiny_model, jsonl):
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    res = run(["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(tmp_path / "run"),
               "--max-steps", "2", "log.report_to=[tensorboard]", "log.progress=false"])
    assert res.exit_code == 0, res.output
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    ea.Reload()
    losses = [e.value for e in ea.Scalars("train/loss")]
    metrics = [l for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "train/loss" in l]
    assert len(losses) == len(metrics) == 2
