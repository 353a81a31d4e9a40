"""Red-teaming: attacks found by a model, scored by a judge, repaired and re-tested (docs/red-teaming.md).

- :mod:`alignkit.redteam.metrics`: pure functions: attack extraction, attack success rate with its
  interval, BLEU novelty and self-BLEU diversity, the rule-based refusal detector;
- :mod:`alignkit.redteam.attack`: ``alignkit redteam`` (zero-shot, few-shot and RL attackers) and the
  ``redteam:`` reward kind that trains an attacker with the online-RL presets;
- :mod:`alignkit.redteam.repair`: ``alignkit redteam-pairs`` (revised answers versus failing ones, for
  DPO/SFT) and the ``alignkit demo --task redteam`` runner of ``builtin:redteam_repair``.

References: Perez et al. 2022, "Red Teaming Language Models with Language Models" (EMNLP; zero-shot,
few-shot and RL attackers, attack success rate and diversity); Hong et al. 2024, "Curiosity-driven
Red-teaming for Large Language Models" (ICLR; novelty bonus against the attacker's mode collapse);
Mazeika et al. 2024, "HarmBench: A Standardized Evaluation Framework for Automated Red Teaming and
Robust Refusal" (ICML; attack success rate judged by a classifier, greedy target decoding, per category).
"""
