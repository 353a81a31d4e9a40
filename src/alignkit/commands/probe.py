"""Bias probes: `alignkit probe` (docs/red-teaming.md)."""

from alignkit.cli import Command, register_command

register_command(Command(
    "probe", "alignkit.eval.probes:ProbeConfig", "alignkit.eval.probes:run_probe_command",
    "Bias probes for a reward model or judge: does it pay for length, flattery, format, hedging, refusals "
    "or position when the content stays the same? Rate, mean shift, 95% interval and a verdict per probe.",
    {"reward": "rewards", "probe": "probes", "data": "data", "pairs": "pairs", "perturb": "perturb",
     "output": "output", "max_items": "max_items"}))
