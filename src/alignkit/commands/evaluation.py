"""Evaluation commands: eval, report, compare."""

from alignkit.cli import Command, register_command

register_command(Command(
    "eval", "alignkit.eval.evaluate:EvalConfig", "alignkit.eval.evaluate:run_eval_command",
    "Evaluate a policy against its reference on prompts (rewards, win rate, KL, length, diversity), or a "
    "reward model on held-out pairs (--reward-model: accuracy, calibration).",
    {"model": "model.name_or_path", "reference": "reference", "data": "data.path", "output": "output",
     "reward": "rewards", "gold": "gold", "samples": "samples", "reward_model": "reward_model",
     "reference_samples": "reference_samples", "probe": "probes"}))
register_command(Command("report", "alignkit.eval.runs:ReportConfig", "alignkit.eval.runs:report",
                         "Regenerate RUN_DIR/report.html (plots, alerts, samples) from the run's files.",
                         {"output": "output"}, positional="run_dir"))
register_command(Command("compare", "alignkit.eval.runs:CompareConfig", "alignkit.eval.runs:compare",
                         "Compare runs side by side (curves, final numbers with 95% intervals, reward-versus-KL "
                         "frontier) and test each against the starting model (--baseline, default the first run), "
                         "paired by prompt.",
                         {"output": "output", "baseline": "baseline"}, positional="runs"))
