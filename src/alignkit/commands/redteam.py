"""Red-teaming commands: redteam, redteam-pairs (docs/red-teaming.md)."""

from alignkit.cli import Command, register_command

register_command(Command(
    "redteam", "alignkit.redteam.attack:RedteamConfig", "alignkit.redteam.attack:run_redteam",
    "Red-team a model: an attacker model proposes prompts (zero-shot, few-shot or RL), a judge scores the "
    "target's answers; attack success rate with its interval, diversity, over-refusal, attacks.jsonl.",
    {"target": "target.name_or_path", "attacker": "attacker.name_or_path", "judge": "judge", "goal": "goal",
     "method": "method", "budget": "budget", "output": "output", "threshold": "threshold"}))
register_command(Command(
    "redteam-pairs", "alignkit.redteam.repair:RedteamPairsConfig", "alignkit.redteam.repair:run_redteam_pairs",
    "Repair data from a red-team run: each failing answer against a revision the judge passes "
    "(cai-sl revisions and/or fresh samples) -> prefs.jsonl for dpo, sft.jsonl for sft.",
    {"failures": "failures", "revisions": "revisions", "model": "model.name_or_path", "judge": "judge",
     "output": "output"}))
