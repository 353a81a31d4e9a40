"""Pipeline commands: pipeline, demo, and the data stages sample-pairs and label."""

from alignkit.cli import Command, register_command

register_command(Command("pipeline", "alignkit.pipeline:PipelineConfig", "alignkit.pipeline:run_pipeline_command",
                         "Run a multi-stage pipeline file (skips finished stages, resumes an interrupted one).",
                         {"output": "output", "preset": "preset", "force": "force", "stop_after": "stop_after"},
                         positional="file"))
register_command(Command("demo", "alignkit.demo:DemoConfig", "alignkit.demo:run_demo",
                         "The classical pipeline on the embedded model in minutes on a CPU: sample pairs, label "
                         "them with a sentiment gold reward, train a reward model, DPO and PPO, evaluate, report. "
                         "--task reasoning: GRPO (DAPO preset) on rule-checked arithmetic, held-out accuracy before/after.",
                         {"output": "output", "model": "model", "quick": "quick", "force": "force", "task": "task",
                          "seed": "seed", "precision": "precision"}))
register_command(Command("sample-pairs", "alignkit.labeling:SamplePairsConfig", "alignkit.labeling:sample_pairs",
                         "Sample n responses per prompt (rows {prompt, completions}) for labelling.",
                         {"model": "model.name_or_path", "data": "data.path", "output": "output", "n": "n"}))
register_command(Command("label", "alignkit.labeling:LabelConfig", "alignkit.labeling:label",
                         "Label sampled responses with reward sources -> preference pairs (prefs.jsonl).",
                         {"samples": "samples", "reward": "rewards", "output": "output"}))
