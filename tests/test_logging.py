"""Console logs and trackers: plain step lines in batch logs, an 80-column progress layout, phase
indicators, one W&B run per training call, and one-line install hints for missing trackers."""

import io
import json
import re
import sys
import types

import pytest

from alignkit.train.logging import MetricLogger, MissingPackage, metrics_text, phase
from alignkit.train.sft import SFTConfig, train_sft
from tests.helpers import sft_rows, write_jsonl


def _sft(tmp_path, tiny_model, name, steps=4, **over):
    data = write_jsonl(tmp_path / "d.jsonl", sft_rows(24))
    heldout = write_jsonl(tmp_path / "e.jsonl", sft_rows(4, seed=1))
    return train_sft({"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(data), "eval_path": str(heldout)},
                      "output": str(tmp_path / name), "train": {"max_steps": steps, "batch_size": 4},
                      "log": {"samples": 1, "sample_tokens": 4}, **over})


def test_batch_log_has_one_plain_line_per_logged_step(tmp_path, tiny_model, capsys):
    # under pytest stdout is a capture buffer, not a terminal: exactly what a batch system's log sees
    _sft(tmp_path, tiny_model, "run", steps=5)
    out = capsys.readouterr().out
    steps = re.findall(r"^\[sft\] step (\d+)/5 loss=(\S+) lr=\S+ \| [\d.]+ s/step \| ETA \d:\d\d:\d\d$", out, re.M)
    assert [int(s) for s, _ in steps] == [1, 2, 3, 4, 5]
    logged = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r["train/loss"] for r in logged if "train/loss" in r]
    assert [float(l) for _, l in steps] == pytest.approx(train, abs=1e-4)  # the same numbers as metrics.jsonl
    # every long phase announces itself and says how long it took; no ANSI escapes in a log file
    for what in ("evaluating 4 examples", "sampling 1 report answers (before training)",
                 "sampling 1 report answers (after training)", "saving the model"):
        assert f"[sft] {what} ..." in out and re.search(rf"\[sft\] {re.escape(what)}: done in [\d.]+ s", out), what
    assert re.search(r"^\[sft\] eval step 5 loss=\S+$", out, re.M)
    assert "\x1b[" not in out and "━" not in out


def test_progress_bar_fits_80_columns(tmp_path, monkeypatch):
    from rich.console import Console, Group

    from alignkit.train import logging as lg

    console = Console(file=io.StringIO(), width=80, force_terminal=True, force_jupyter=False)
    monkeypatch.setattr(lg, "_console", lambda: console)
    cfg = SFTConfig(output=str(tmp_path / "r"))
    logger = MetricLogger(tmp_path / "r", cfg, is_main=True)
    logger.start(total=4000, done=0)
    metrics = {"train/loss": 0.693147, "rewards/accuracy": 0.53125, "rewards/margin": 0.0123,
               "rewards/mean": -1.25, "kl/ref": 3.21, "train/lr": 1e-5}
    logger.advance(1234, metrics)
    lines = [ "".join(seg.text for seg in line).rstrip()
             for line in console.render_lines(Group(*logger.progress.get_renderables()), console.options)]
    logger.close()
    text = "\n".join(lines)
    assert all(len(l) <= 80 for l in lines), text
    assert re.search(r"1234/4000 .*ETA", lines[0]), text  # count, elapsed and ETA on the bar's row
    assert re.search(r"ETA (-:--:--|\d:\d\d:\d\d)$", lines[0]), text  # the ETA is not cut
    assert metrics_text(metrics) in text  # every metric name and value in full on the next row
    assert "acc=0.5312" in text and "lr=1.00e-05" in text
    # a phase inside training (a checkpoint, an evaluation) gets a row of its own, the bar keeps its width
    logger.start(total=4000, done=0)
    logger.advance(1234, metrics)
    with logger.phase("saving checkpoint step-00001234 of a run with a long name", total=3) as p:
        p.advance()
        lines = ["".join(seg.text for seg in line).rstrip()
                 for line in console.render_lines(Group(*logger.progress.get_renderables()), console.options)]
    logger.close()
    assert all(len(l) <= 80 for l in lines) and re.search(r"ETA (-:--:--|\d:\d\d:\d\d)$", lines[0]), lines
    assert re.search(r"━{20}", lines[0].replace("╸", "━").replace("╺", "━")), lines  # a 20-column bar
    assert re.search(r"\[sft\] saving checkpoint step-00001234 of a run with a long name 1/3 \d:\d\d:\d\d",
                     " ".join(lines[2:])), lines


def test_phase_without_a_terminal_prints_start_and_end_lines(capsys):
    # a terminal phase draws through rich (transient), a non-terminal one prints start and end lines
    with phase("warming up", label="x", total=3) as p:
        for _ in range(3):
            p.advance()
    out = capsys.readouterr().out
    assert out.startswith("[x] warming up ...\n") and "[x] warming up: done in" in out
    with phase("quiet", enabled=False) as p:
        p.advance()
    assert capsys.readouterr().out == ""


def test_phase_in_a_terminal_is_a_spinner_with_a_count(monkeypatch):
    from rich.console import Console

    from alignkit.train import logging as lg

    console = Console(file=io.StringIO(), width=80, force_terminal=True, force_jupyter=False)
    monkeypatch.setattr(lg, "_console", lambda: console)
    with phase("evaluating 48 examples", label="sft", total=48) as p:
        p.advance(12)
        text = "".join(seg.text for line in console.render_lines(p.progress.get_renderable(), console.options)
                       for seg in line)
    assert "[sft] evaluating 48 examples" in text and "12/48" in text  # the label is text, not a style tag


class FakeWandb(types.ModuleType):
    """The part of wandb's API alignkit uses, recording calls (for when wandb is not installed)."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kw):
        run = types.SimpleNamespace(kw=kw, logged=[], finished=False)
        run.log = lambda m, step=None: run.logged.append((step, dict(m)))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_two_training_calls_in_one_process_make_two_finished_wandb_runs(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    try:
        import wandb
    except ImportError:  # the fake keeps the contract checked where wandb cannot be installed
        wandb = FakeWandb()
        monkeypatch.setitem(sys.modules, "wandb", wandb)
    seen, logged = [], {}
    real_init = wandb.init

    def init(**kw):  # spy on the runs alignkit opens and on what it logs to each
        run = real_init(**kw)
        seen.append(run)
        real_log = run.log
        logged[id(run)] = []

        def log(m, step=None, **k):
            logged[id(run)].append((step, set(m)))
            return real_log(m, step=step, **k)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init)
    for name in ("first", "second"):
        _sft(tmp_path, tiny_model, name, steps=3, log={"report_to": ["wandb"], "progress": False, "samples": 0})
    assert len(seen) == 2 and seen[0] is not seen[1]
    for run in seen:  # each run got its own three steps and its final evaluation
        assert [s for s, keys in logged[id(run)] if "train/loss" in keys] == [1, 2, 3]
        assert [s for s, keys in logged[id(run)] if "eval/loss" in keys] == [0, 3]
    if isinstance(wandb, FakeWandb):
        assert [r.finished for r in seen] == [True, True]
        assert [r.kw["name"] for r in seen] == ["first", "second"]
        return
    # real wandb, offline: two runs with their own ids and directories, both finished, none left open
    assert seen[0].id != seen[1].id and (seen[0].name, seen[1].name) == ("first", "second")
    assert all(run._is_finished for run in seen) and wandb.run is None
    for run, name in zip(seen, ("first", "second")):
        assert len(list((tmp_path / name / "wandb").glob(f"offline-run-*-{run.id}/run-{run.id}.wandb"))) == 1


@pytest.mark.parametrize("kind,package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                          ("trackio", "trackio")])
def test_missing_tracker_package_gives_a_one_line_install_hint(tmp_path, tiny_model, jsonl, monkeypatch, kind,
                                                               package):
    from click.testing import CliRunner

    from alignkit.cli import build_cli

    # a None entry in sys.modules makes `import X` raise ImportError, as if X were not installed
    for mod in ("tensorboard", "torch.utils.tensorboard", "wandb", "trackio"):
        monkeypatch.setitem(sys.modules, mod, None)
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(tiny_model), "--data", str(data), "--output",
                                           str(tmp_path / "run"), "--max-steps", "1", f"log.report_to=[{kind}]"])
    assert res.exit_code == 1
    err = [l for l in res.output.splitlines() if l.strip()]
    assert err[-1] == (f"Error: log.report_to={kind} needs the '{package}' package, which is not installed: "
                       f"pip install {package}"), res.output
    assert "Traceback" not in res.output
    with pytest.raises(MissingPackage, match=f"pip install {package}"):
        _sft(tmp_path, tiny_model, "api", steps=1, log={"report_to": [kind]})


def test_tensorboard_gets_hparams(tmp_path, tiny_model):
    pytest.importorskip("tensorboard")  # a test extra; CI installs it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _sft(tmp_path, tiny_model, "tb", steps=2, log={"report_to": ["tensorboard"], "progress": False})
    ea = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    ea.Reload()
    assert len(ea.Scalars("train/loss")) == 2
    plugin = ea.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(plugin)
    from tensorboard.plugins.hparams import plugin_data_pb2

    start = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["optim.lr"].number_value > 0 and hp["command"].string_value == "sft"
    exp = plugin_data_pb2.HParamsPluginData.FromString(plugin["_hparams_/experiment"])
    assert "hparam/eval/loss" in {m.name.tag for m in exp.experiment.metric_infos}


def test_trackio_gets_the_metrics_and_is_finished(tmp_path, monkeypatch):
    # trackio (Hugging Face's local tracker) shares wandb's API; a recording module stands in for it
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "trackio", fake)
    cfg = SFTConfig(output=str(tmp_path / "r"), log={"report_to": ["trackio"], "run_name": "try", "progress": False})
    logger = MetricLogger(tmp_path / "r", cfg, is_main=True)
    logger.log(1, {"train/loss": 0.5, "bad": float("nan")})
    logger.close()
    logger.close()  # idempotent: finished once
    (run,) = fake.runs
    assert run.kw["name"] == "try" and run.kw["config"]["output"] == str(tmp_path / "r")
    assert run.logged == [(1, {"train/loss": 0.5})] and run.finished  # non-finite values are not sent
