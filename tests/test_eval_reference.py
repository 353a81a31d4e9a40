"""Case 17 of issue 32: an eval without ``reference`` compares with the policy's base, not the embedded model."""

import json
import shutil

import pytest
import yaml

from alignkit.config import ConfigError
from alignkit.eval.evaluate import default_reference, evaluate


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from alignkit.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("base") / "model", seed=1)


def _run_dir(tmp_path, tiny_model, recorded):
    """A run directory as alignkit leaves it: OUTPUT/model and OUTPUT/config.yaml naming the start model."""
    run = tmp_path / "run"
    shutil.copytree(tiny_model, run / "model")
    (run / "config.yaml").write_text(yaml.safe_dump({"command": "dpo", "model": {"name_or_path": recorded}}))
    return run / "model"


def test_default_reference_is_the_run_s_recorded_model(tmp_path, tiny_model, base_model, jsonl):
    policy = _run_dir(tmp_path, tiny_model, str(base_model))
    assert default_reference(str(policy)) == str(base_model)
    prompts = jsonl("p.jsonl", [{"prompt": f"q{i} e"} for i in range(2)])
    out = tmp_path / "ev"
    # before: the embedded SmolLM2-135M became the reference (here: a different tokenizer, an error)
    m = evaluate({"model": {"name_or_path": str(policy)}, "data": {"path": str(prompts)}, "samples": 2,
                  "generation": {"max_new_tokens": 4}, "output": str(out)})
    doc = json.loads((out / "eval.json").read_text())
    assert doc["reference"] == str(base_model) and doc["reference_is_policy"] is False
    assert m["kl/ref"] != 0.0  # a real second model, not the policy itself


def test_default_reference_of_a_lora_adapter_is_its_base(tmp_path, base_model):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base_model),
                                                             "peft_type": "LORA"}))
    assert default_reference(str(adapter)) == str(base_model)


def test_run_trained_from_the_embedded_default_compares_with_it(tmp_path, tiny_model):
    assert default_reference(str(_run_dir(tmp_path, tiny_model, None))) is None  # None = the embedded model
    assert default_reference(None) is None


def test_no_recorded_base_asks_for_a_reference(tiny_model):
    with pytest.raises(ConfigError, match="pass --reference MODEL"):
        default_reference(str(tiny_model))
