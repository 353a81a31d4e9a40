"""Case 16 of issue 32: no ``${...}`` survives resolution to become a literal directory or value."""

import pytest
import yaml

from alignkit.config import ConfigError
from alignkit.pipeline import PipelineConfig, check_stages, load_spec, run_stages


def _write(path, doc):
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_pipeline_output_from_a_variable_is_resolved(tmp_path):
    out = tmp_path / "runs" / "mine"
    f = _write(tmp_path / "p.yaml", {"output": "${vars.out}", "vars": {"out": str(out)},
                                     "stages": [{"name": "a", "command": "sft", "config": {}}]})
    spec = load_spec(PipelineConfig(file=f))
    assert spec.output == str(out)
    (_, _, data), = check_stages(spec, f)
    assert data["output"] == str(out / "a")
    assert "${" not in data["output"]


def test_pipeline_output_may_only_name_variables(tmp_path):
    f = _write(tmp_path / "p.yaml", {"output": "${vars.nope}", "stages": [{"name": "a", "command": "sft"}]})
    with pytest.raises(ConfigError, match=r"output: \$\{vars.nope\}: no variable 'nope'"):
        load_spec(PipelineConfig(file=f))
    f = _write(tmp_path / "p.yaml", {"output": "${output}/x", "stages": [{"name": "a", "command": "sft"}]})
    with pytest.raises(ConfigError, match="variables only"):
        load_spec(PipelineConfig(file=f))


@pytest.mark.parametrize("config,vars,field", [
    ({"output": "${vars.out}"}, {"out": "${vars.base}/x", "base": "b"}, "output"),  # a variable's value
    ({"data": {"path": "${vars.d"}}, {}, "data.path"),  # a brace never closed
])
def test_unresolved_reference_in_a_stage_is_an_error(tmp_path, config, vars, field):
    f = _write(tmp_path / "p.yaml", {"output": str(tmp_path / "o"), "vars": vars,
                                     "stages": [{"name": "first", "command": "sft", "config": config}]})
    spec = load_spec(PipelineConfig(file=f))
    with pytest.raises(ConfigError) as err:
        check_stages(spec, f)
    msg = str(err.value)
    assert "stage 'first' (sft)" in msg and f"{field}: unresolved reference" in msg
    with pytest.raises(Exception, match=f"stage 'first' \\(sft\\): {field}: unresolved"):  # the runner too
        run_stages(spec)
    assert not any("$" in p.name for p in tmp_path.rglob("*"))
