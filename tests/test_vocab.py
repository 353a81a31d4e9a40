"""Familiar vocabulary: TRL / transformers names as aliases, did-you-mean, scalars for one-item lists."""

import json

import pytest
import yaml
from click.testing import CliRunner

from alignkit.aliases import ALIASES, cli_tokens_to_overrides
from alignkit.cli import build_cli
from alignkit.config import ConfigError, RMConfig, SFTConfig, as_config, load_config


def test_trl_names_map_to_our_fields_in_yaml_overrides_and_python(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text(yaml.safe_dump({
        "model_name_or_path": "m", "dataset_name": "d.jsonl", "learning_rate": 5e-7,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "num_train_epochs": 2,
        "max_length": 512, "max_prompt_length": 128, "output_dir": "o", "seed": 3, "bf16": True,
        "gradient_checkpointing": True, "logging_steps": 5, "save_steps": 10, "report_to": "none",
        "lora_r": 8, "use_peft": True, "warmup_ratio": 0.1, "lr_scheduler_type": "constant_with_warmup",
        "adam_beta2": 0.99, "max_grad_norm": 0.5, "optim": {"weight_decay": 0.1},
        "dataset_config": "en", "dataset_train_split": "train_prefs", "dataset_test_split": "test_prefs"}))
    cfg = load_config(SFTConfig, y, ["optim.learning_rate=2e-6"])
    assert (cfg.model.name_or_path, cfg.data.path, cfg.output) == ("m", "d.jsonl", "o")
    assert (cfg.train.batch_size, cfg.train.grad_accum, cfg.train.epochs, cfg.train.seed) == (2, 4, 2.0, 3)
    assert cfg.train.precision == "bf16" and cfg.model.gradient_checkpointing
    assert (cfg.data.max_length, cfg.data.max_prompt_length) == (512, 128)
    assert (cfg.data.subset, cfg.data.split, cfg.data.eval_split) == ("en", "train_prefs", "test_prefs")
    assert cfg.optim.lr == 2e-6  # the override (section-local alias) wins over the YAML value
    assert cfg.optim.scheduler == "constant" and cfg.optim.warmup_ratio == 0.1
    assert cfg.optim.betas == [0.9, 0.99] and cfg.optim.max_grad_norm == 0.5 and cfg.optim.weight_decay == 0.1
    assert (cfg.log.every, cfg.log.save_every, cfg.log.report_to) == (5, 10, [])
    assert cfg.lora.enabled and cfg.lora.r == 8
    # the Python API takes the same names
    assert as_config(SFTConfig, {"learning_rate": 1e-3}, {"per_device_train_batch_size": 3}).train.batch_size == 3


def test_alias_targets_exist_or_are_command_specific():
    """Every alias names a real field of some command (a typo in the table would silently do nothing)."""
    from alignkit.aliases import _field_type
    from alignkit.cli import COMMANDS, _load

    build_cli()
    classes = {c.config: _load(c.config) for c in COMMANDS}
    for name, alias in ALIASES.items():
        found = [t for t in alias.targets if any(_field_type(cls, t)[0] for cls in classes.values())]
        assert found, name


def test_two_spellings_with_different_values_are_an_error():
    with pytest.raises(ConfigError, match="both set optim.lr"):
        as_config(SFTConfig, {"learning_rate": 1e-3, "optim": {"lr": 2e-3}}, {})
    assert as_config(SFTConfig, {"learning_rate": 1e-3, "optim": {"lr": 1e-3}}, {}).optim.lr == 1e-3


def test_alias_without_meaning_for_the_command_is_reported():
    with pytest.raises(ConfigError, match="'beta'.*no meaning for this command \\(sft\\)"):
        load_config(SFTConfig, None, ["beta=0.1"])


def test_ignored_trl_keys_are_reported(caplog):
    with caplog.at_level("WARNING", logger="alignkit"):
        cfg = as_config(SFTConfig, {"remove_unused_columns": False, "eval_strategy": "steps"}, {})
    assert cfg.command == "sft"
    text = caplog.text
    assert "remove_unused_columns=False ignored" in text and "eval_strategy='steps' ignored" in text


@pytest.mark.parametrize("key,hint", [
    ("train.batchsize", "did you mean train.batch_size?"),
    ("lr", "did you mean optim.lr?"),
    ("optim.learning_rat", "did you mean optim.lr, also spelled learning_rate?"),
    ("per_device_train_batchsize", "did you mean train.batch_size, also spelled per_device_train_batch_size?"),
    ("optim.zzzz", "fields of optim: betas, eps, lr,"),
])
def test_did_you_mean_on_every_unknown_key(key, hint):
    with pytest.raises(ConfigError) as e:
        load_config(RMConfig, None, [f"{key}=1"])
    assert f"{key}: unknown field" in str(e.value) and hint in str(e.value)


def test_scalar_where_a_one_item_list_is_expected():
    cfg = load_config(SFTConfig, None, ["log.report_to=tensorboard"])
    assert cfg.log.report_to == ["tensorboard"]
    assert as_config(SFTConfig, {"log": {"report_to": "wandb"}}, {}).log.report_to == ["wandb"]
    # a field that takes a string or a list keeps the string
    assert as_config(SFTConfig, {"lora": {"target_modules": "q_proj"}}, {}).lora.target_modules == "q_proj"


def test_trl_style_flags_become_overrides():
    assert cli_tokens_to_overrides(["--learning_rate", "5e-7", "--gradient_checkpointing", "--no_bf16",
                                    "--per-device-train-batch-size=2", "optim.eps=1e-6", "RUN"]) == [
        "learning_rate=5e-7", "gradient_checkpointing=true", "bf16=false", "per_device_train_batch_size=2",
        "optim.eps=1e-6", "RUN"]


def test_cli_did_you_mean_for_an_unknown_flag(tmp_path):
    res = CliRunner().invoke(build_cli(), ["sft", "--lerning_rate", "1e-5"])
    assert res.exit_code == 2 and "lerning_rate: unknown field (did you mean optim.lr" in res.output


def ultrafeedback_rows(n):
    """UltraFeedback-binarized rows: a prompt string and whole conversations in chosen/rejected."""
    rows = []
    for i in range(n):
        prompt = f"say {'mnop'[i % 4]}{i}"
        rows.append({"prompt": prompt, "prompt_id": f"id{i}",
                     "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "aeiou"[: 2 + i % 4]}],
                     "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": "xyzq"[: 1 + i % 4]}],
                     "score_chosen": 8.0, "score_rejected": 3.0})
    return rows


def test_trl_dpo_yaml_runs_unchanged(tmp_path, tiny_model, jsonl):
    """A DPO config as TRL's docs write one, and UltraFeedback-style data: only the command name changes
    (`trl dpo --config dpo.yaml` -> `alignkit dpo --config dpo.yaml`)."""
    data = jsonl("ultrafeedback.jsonl", ultrafeedback_rows(8))
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"""\
# TRL DPO recipe
model_name_or_path: {tiny_model}
dataset_name: {data}
dataset_train_split: train
learning_rate: 5.0e-4
num_train_epochs: 1
max_steps: 3
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
gradient_checkpointing: true
beta: 0.1
loss_type: sigmoid
max_length: 128
max_prompt_length: 64
lr_scheduler_type: cosine
warmup_ratio: 0.1
logging_steps: 1
save_steps: 2
eval_strategy: "no"
bf16: true
seed: 42
report_to: none
use_peft: true
lora_r: 8
lora_alpha: 16
lora_target_modules: all-linear
output_dir: {tmp_path / 'Qwen2-0.5B-DPO'}
""")
    res = CliRunner().invoke(build_cli(), ["dpo", "--config", str(cfg)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = tmp_path / "Qwen2-0.5B-DPO"
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["optim"]["lr"] == 5e-4 and resolved["dpo"]["beta"] == 0.1 and resolved["dpo"]["loss"] == "dpo"
    assert resolved["lora"] == {**resolved["lora"], "enabled": True, "r": 8, "alpha": 16.0}
    assert resolved["train"]["precision"] == "bf16" and resolved["log"]["save_every"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert (out / "model" / "config.json").exists() and any((out / "checkpoints").glob("step-*2"))
