"""Pipelines: references, stage skipping, reruns after a change, resuming an interrupted stage."""

import json

import pytest

from tests.gold_toy import SPEC
import yaml

from alignkit.config import ConfigError
from alignkit.pipeline import PipelineConfig, load_spec, run_pipeline


def write_pipeline(path, stages, output, vars=None):
    path.write_text(yaml.safe_dump({"output": str(output), "vars": vars or {}, "stages": stages}))
    return path


def test_references_are_checked_before_anything_runs(tmp_path):
    bad_later = [{"name": "a", "command": "label", "config": {"samples": "${stages.b.output}", "rewards": ["x:y"]}},
                 {"name": "b", "command": "sample_pairs", "config": {}}]
    p = write_pipeline(tmp_path / "p.yaml", bad_later, tmp_path / "out")
    with pytest.raises(ConfigError, match="'b' is not an earlier stage"):
        load_spec(PipelineConfig(file=str(p)))
    p = write_pipeline(tmp_path / "p.yaml", [{"name": "a", "command": "sft", "config": {"x": "${vars.nope}"}}],
                       tmp_path / "out")
    with pytest.raises(ConfigError, match="no variable 'nope'"):
        load_spec(PipelineConfig(file=str(p)))
    p = write_pipeline(tmp_path / "p.yaml", [{"name": "a", "command": "frobnicate", "config": {}}], tmp_path / "out")
    with pytest.raises(ConfigError, match="unknown pipeline command 'frobnicate'"):
        load_spec(PipelineConfig(file=str(p)))
    p = write_pipeline(tmp_path / "p.yaml", [{"name": "a", "command": "sft", "config": {"x": "${stages.a.weights}"}}],
                       tmp_path / "out")
    with pytest.raises(ConfigError, match="not an earlier stage"):
        load_spec(PipelineConfig(file=str(p)))


def test_a_command_line_variable_the_pipeline_never_uses_is_an_error(tmp_path):
    """vars.KEY given on the command line must be declared by the file or referenced by a stage: a
    misspelled or renamed variable fails up front instead of being ignored."""
    stages = [{"name": "a", "command": "sft", "config": {"x": "${vars.used}", "y": "${vars.extra}"}}]
    p = write_pipeline(tmp_path / "p.yaml", stages, tmp_path / "out", vars={"used": 1, "declared_only": 2})
    spec = load_spec(PipelineConfig(file=str(p), vars={"used": 3, "declared_only": 4, "extra": 5}))
    assert spec.vars == {"used": 3, "declared_only": 4, "extra": 5}  # declared, or referenced though undeclared
    with pytest.raises(ConfigError, match=r"vars.uesd is not a variable of this pipeline \(have: declared_only, "
                                          r"extra, used\)"):
        load_spec(PipelineConfig(file=str(p), vars={"uesd": 3, "extra": 5}))
    # the demo's variable renamed in issue 31 (rm_margin -> pair_margin) is refused by name
    with pytest.raises(ConfigError, match="vars.rm_margin is not a variable"):
        load_spec(PipelineConfig(file="builtin:demo_pipeline", vars={"rm_margin": 0.5}))


def test_resolve_keeps_types_and_formats_strings(tmp_path):
    from alignkit.pipeline import PipelineSpec, resolve

    spec = PipelineSpec(output=str(tmp_path), vars={"model": None, "n": 3, "gold": "python:m:f"},
                        stages=[{"name": "s", "command": "sft"}])
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "summary.json").write_text(json.dumps({"steps": 7}))
    outs = {"s": tmp_path / "s"}
    got = resolve({"a": "${vars.model}", "b": "${vars.n}", "c": ["${vars.gold}@0.5"], "d": "${stages.s.model}",
                   "e": "x-${stages.s.summary.steps}", "f": "${output}/y"}, spec, outs)
    assert got == {"a": None, "b": 3, "c": ["python:m:f@0.5"], "d": str(tmp_path / "s" / "model"), "e": "x-7",
                   "f": f"{tmp_path}/y"}


def _data_stages(prompts, model, gold, n=2):
    return [
        {"name": "pairs", "command": "sample_pairs",
         "config": {"model": {"name_or_path": str(model)}, "data": {"path": str(prompts)}, "n": n,
                    "generation": {"max_new_tokens": "${vars.tokens}"}}},
        {"name": "labels", "command": "label",
         "config": {"samples": "${stages.pairs.output}/samples.jsonl", "rewards": [gold]}},
    ]


GOLD = SPEC  # continuous toy gold reward (tests/gold_toy.py)


def test_second_invocation_skips_everything_and_a_change_reruns_downstream(tiny_model, tmp_path, jsonl):
    prompts = jsonl("p.jsonl", [{"prompt": f"say e {i}"} for i in range(6)])
    out = tmp_path / "pipe"
    p = write_pipeline(tmp_path / "p.yaml", _data_stages(prompts, tiny_model, GOLD, n=4), out, {"tokens": 10})
    first = run_pipeline(PipelineConfig(file=str(p)))
    assert first["stages"] == {"pairs": "ran", "labels": "ran"}
    prefs = [json.loads(x) for x in (out / "labels" / "prefs.jsonl").read_text().splitlines()]
    assert prefs and all(r["score_chosen"] > r["score_rejected"] for r in prefs)
    stamps = {s: (out / s / "DONE").stat().st_mtime_ns for s in ("pairs", "labels")}
    files = {s: (out / s / "summary.json").read_text() for s in ("pairs", "labels")}

    second = run_pipeline(PipelineConfig(file=str(p)))
    assert second["stages"] == {"pairs": "skipped", "labels": "skipped"}
    assert {s: (out / s / "DONE").stat().st_mtime_ns for s in stamps} == stamps  # nothing rewritten
    assert {s: (out / s / "summary.json").read_text() for s in files} == files
    events = [json.loads(x) for x in (out / "pipeline.jsonl").read_text().splitlines()]
    assert [e["action"] for e in events] == ["ran", "ran", "skipped", "skipped"]

    # a changed variable changes the first stage's config: it reruns, and so does everything after it
    third = run_pipeline(PipelineConfig(file=str(p), vars={"tokens": 8}))
    assert third["stages"] == {"pairs": "ran", "labels": "ran"}
    # --force reruns everything even when nothing changed
    assert run_pipeline(PipelineConfig(file=str(p), vars={"tokens": 8}, force=True))["stages"] == \
        {"pairs": "ran", "labels": "ran"}


def test_interrupted_stage_resumes_from_its_checkpoint(tiny_model, tmp_path, jsonl, monkeypatch):
    from alignkit.train.loop import Trainer

    rows = [{"prompt": f"q{i}", "completion": f"answer {i}"} for i in range(16)]
    data = jsonl("sft.jsonl", rows)
    sft = {"name": "sft", "command": "sft",
           "config": {"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(data), "max_length": 64},
                      "train": {"max_steps": 6, "batch_size": 4}, "optim": {"lr": 1e-3},
                      "log": {"save_every": 2, "progress": False, "samples": 0}}}
    after = {"name": "score_after", "command": "label",
             "config": {"samples": "${stages.pairs.output}", "rewards": [GOLD]}}
    pairs = {"name": "pairs", "command": "sample_pairs",
             "config": {"model": {"name_or_path": "${stages.sft.model}"}, "data": {"path": str(data)}, "n": 3,
                        "generation": {"max_new_tokens": 8}}}
    out = tmp_path / "pipe"
    p = write_pipeline(tmp_path / "p.yaml", [sft, pairs, after], out)

    class Crash(RuntimeError):
        pass

    save = Trainer._save

    def save_then_crash(self):
        save(self)
        if self.step == 4:
            raise Crash("power cut after the step-4 checkpoint")

    monkeypatch.setattr(Trainer, "_save", save_then_crash)
    with pytest.raises(Crash):
        run_pipeline(PipelineConfig(file=str(p)))
    assert not (out / "sft" / "DONE").exists()
    assert sorted(x.name for x in (out / "sft" / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    monkeypatch.setattr(Trainer, "_save", save)

    started_at = []
    resume = Trainer._resume

    def spy(self, where):
        resume(self, where)
        started_at.append(self.step)

    monkeypatch.setattr(Trainer, "_resume", spy)
    res = run_pipeline(PipelineConfig(file=str(p)))
    assert res["stages"] == {"sft": "resumed", "pairs": "ran", "score_after": "ran"}
    assert started_at == [4]  # the trainer started from the checkpoint, not from step 0
    steps = [json.loads(x)["step"] for x in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [s for s in steps]
    assert sorted(set(train_steps)) == [1, 2, 3, 4, 5, 6] and len(train_steps) == len(set(train_steps))
    assert json.loads((out / "sft" / "summary.json").read_text())["steps"] == 6
    assert yaml.safe_load((out / "sft" / "config.yaml").read_text())["resume"] == "latest"
    events = [json.loads(x) for x in (out / "pipeline.jsonl").read_text().splitlines()]
    assert [(e["stage"], e["action"]) for e in events] == [
        ("sft", "failed"), ("sft", "resumed"), ("pairs", "ran"), ("score_after", "ran")]
    # and now everything is done
    assert set(run_pipeline(PipelineConfig(file=str(p)))["stages"].values()) == {"skipped"}


def test_pipeline_cli_positional_file_and_stop_after(tiny_model, tmp_path, jsonl):
    from click.testing import CliRunner

    from alignkit.cli import build_cli

    prompts = jsonl("p.jsonl", [{"prompt": f"say e {i}"} for i in range(4)])
    p = write_pipeline(tmp_path / "p.yaml", _data_stages(prompts, tiny_model, GOLD, n=3), tmp_path / "x",
                       {"tokens": 6})
    res = CliRunner().invoke(build_cli(), ["pipeline", str(p), f"output={tmp_path / 'y'}", "--stop-after", "pairs"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "y" / "pairs" / "DONE").exists() and not (tmp_path / "y" / "labels").exists()
    rows = [json.loads(x) for x in (tmp_path / "y" / "pairs" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(len(r["completions"]) == 3 for r in rows)


def test_make_pairs_by_hand():
    from alignkit.labeling import make_pairs

    assert make_pairs([0.2, 0.9, -0.1]) == [(1, 2)]
    assert make_pairs([0.2, 0.9, -0.1], "all") == [(1, 0), (0, 2), (1, 2)]
    # gaps: 0.7, 0.3 (0.30000000000000004 in floats), 1.0; only the 0.3 gap is below 0.35
    assert make_pairs([0.2, 0.9, -0.1], "all", min_margin=0.35) == [(1, 0), (1, 2)]
    assert make_pairs([0.5, 0.5]) == []  # a tie carries no preference


def test_a_typo_in_the_last_stage_fails_before_the_first_stage_runs(tiny_model, tmp_path, jsonl):
    """Every stage is checked up front: fields, references (summary values as placeholders) and the
    imports of python: rewards. Nothing is written, not even the first stage's directory."""
    prompts = jsonl("p.jsonl", [{"prompt": f"say e {i}"} for i in range(4)])
    stages = _data_stages(prompts, tiny_model, GOLD) + [
        {"name": "score", "command": "label",  # a python reward whose function name has a typo
         "config": {"samples": "${stages.pairs.output}/samples.jsonl",
                    "rewards": ["python:alignkit.rewards.toy:char_shar"]}},
        {"name": "dpo", "command": "dpo",
         "config": {"model": {"name_or_path": "${stages.pairs.output}"},  # a directory made later: fine
                    "data": {"path": "${stages.labels.output}/prefs.jsonl"},
                    "train": {"max_steps": "${stages.labels.summary.pairs}"},  # known only later: fine
                    "learning_rate": 0.01,  # a TRL name: an alias of optim.lr, fine
                    "dpo": {"betaa": 0.1}}},  # the typo
    ]
    out = tmp_path / "pipe"
    p = write_pipeline(tmp_path / "p.yaml", stages, out, {"tokens": 4})
    with pytest.raises(ConfigError) as info:
        run_pipeline(PipelineConfig(file=str(p)))
    msg = str(info.value)
    assert "nothing was run" in msg and "2 problem(s)" in msg
    assert "stage 'dpo' (dpo)" in msg and "dpo.betaa: unknown field (did you mean dpo.beta?)" in msg
    assert "stage 'score' (label)" in msg and "rewards.0" in msg and "char_shar" in msg
    assert "max_steps" not in msg  # the summary placeholder is not an error
    assert not out.exists()  # stage 1 never started: no directory, no pipeline.jsonl
    # the same file without the typos runs as far as asked
    stages[2]["config"]["rewards"] = [GOLD]
    del stages[3]["config"]["dpo"]
    write_pipeline(tmp_path / "p.yaml", stages, out, {"tokens": 4})
    res = run_pipeline(PipelineConfig(file=str(p), stop_after="pairs"))
    assert res["stages"] == {"pairs": "ran"}


def test_the_bundled_demo_pipeline_passes_the_up_front_check():
    from alignkit.pipeline import check_stages

    spec = load_spec(PipelineConfig(file="builtin:demo_pipeline", preset="quick"))
    checked = check_stages(spec)
    assert [name for name, _, _ in checked] == [st.name for st in spec.stages]
