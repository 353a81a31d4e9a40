"""AI-feedback commands: judge, cai-sl, cai-rl, iterative-dpo, spin (docs/feedback.md)."""

from alignkit.cli import TRAIN_FLAGS, Command, register_command

_IO = {"model": "model.name_or_path", "data": "data.path", "output": "output"}
_LOSS = {"loss": "alignkit.losses.preference:PREFERENCE_LOSSES"}

register_command(Command(
    "judge", "alignkit.feedback.label:JudgeConfig", "alignkit.feedback.label:run_judge",
    "Label response pairs with an LLM judge (both orders, soft labels) for `alignkit rm` / `alignkit dpo`.",
    {"model": "judge.model.name_or_path", "data": "data.path", "output": "output", "template": "judge.template",
     "inconsistent": "judge.inconsistent"}))
register_command(Command(
    "cai-sl", "alignkit.feedback.constitution:CAISLConfig", "alignkit.feedback.constitution:run_cai_sl",
    "SL-CAI: critique and revise sampled responses against a constitution; write an SFT dataset.",
    {**_IO, "constitution": "cai.constitution", "rounds": "cai.rounds"}))
register_command(Command(
    "cai-rl", "alignkit.feedback.constitution:CAIRLConfig", "alignkit.feedback.constitution:run_cai_rl",
    "RL-CAI: sample response pairs and label them with a judge against constitutional principles.",
    {**_IO, "constitution": "cai.constitution", "judge_model": "judge.model.name_or_path"}))
register_command(Command(
    "iterative-dpo", "alignkit.feedback.iterative:IterativeDPOConfig",
    "alignkit.feedback.iterative:run_iterative_dpo",
    "Iterative / online DPO: sample k responses, score them, best vs worst pairs, a DPO round; repeat.",
    {**TRAIN_FLAGS, "reward": "iterative.reward", "rounds": "iterative.rounds", "loss": "dpo.loss",
     "beta": "dpo.beta"}, choices=_LOSS))
register_command(Command(
    "spin", "alignkit.feedback.spin:SPINConfig", "alignkit.feedback.spin:run_spin",
    "SPIN self-play fine-tuning: the data's response beats the model's own generation, DPO loss, iterated.",
    {**TRAIN_FLAGS, "rounds": "spin.rounds", "beta": "dpo.beta"}))
