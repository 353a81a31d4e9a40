"""Foundation commands: sft, rm, score."""

from alignkit.cli import TRAIN_FLAGS, Command, register_command

register_command(Command("sft", "alignkit.config:SFTConfig", "alignkit.train.sft:train_sft",
                         "Supervised fine-tuning on {prompt, completion}, {messages} or {text} rows.", TRAIN_FLAGS))
register_command(Command("rm", "alignkit.config:RMConfig", "alignkit.train.reward:train_rm",
                         "Train a reward model on preference pairs or rankings (Bradley-Terry or Plackett-Luce).",
                         {**TRAIN_FLAGS, "loss": "rm.loss"}, choices={"loss": "alignkit.losses.reward:RANKING_LOSSES"}))
register_command(Command("score", "alignkit.config:ScoreConfig", "alignkit.score:score",
                         "Score rows with a reward model (one score per response).",
                         {"reward_model": "reward_model", "data": "data.path", "output": "output"}))
