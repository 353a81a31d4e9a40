"""Preference signal from models instead of people, and self-improvement loops.

- :mod:`~alignkit.feedback.judge`: a pairwise LLM judge scored from next-token probabilities, asked in
  both orders to cancel position bias (RLAIF, Lee et al. 2023; Zheng et al. 2023).
- :mod:`~alignkit.feedback.label`: ``alignkit judge``, which labels pairs with soft labels.
- :mod:`~alignkit.feedback.judge_reward`: the ``judge:MODEL`` reward kind for ppo/grpo/bon.
- :mod:`~alignkit.feedback.constitution`: Constitutional AI, SL-CAI and RL-CAI (Bai et al. 2022).
- :mod:`~alignkit.feedback.iterative`: iterative / online DPO (Xu et al. 2023; Xiong et al. 2024).
- :mod:`~alignkit.feedback.spin`: self-play fine-tuning (Chen et al. 2024).

This package is imported by :mod:`alignkit.rewards` (to register ``judge:``), so this file stays
free of heavy imports.
"""
