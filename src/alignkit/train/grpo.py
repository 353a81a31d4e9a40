"""Critic-free online RL: GRPO (``alignkit grpo``) and RLOO (``alignkit rloo``).

Both sample G responses per prompt and judge each against the others of its group, so no value model
is needed:

* GRPO (Shao et al. 2024, sec. 4.1.2, eq. 3-4): ``A_i = (r_i - mean_g) / std_g`` (``scale_by_std=false``
  drops the division: Dr. GRPO, Liu et al. 2025), clipped surrogate, and ``beta * k3`` KL to the
  reference *as a loss term*; ``beta = 0`` loads no reference. Token aggregation is a named choice.
* RLOO (Ahmadian et al. 2024, eq. 9): REINFORCE with the leave-one-out baseline
  ``A_i = r_i - mean_{j != i} r_j``; an optional KL penalty is folded into the sequence reward
  (``r_i - kl_coef * sum_t KL_t``), as in Ahmadian et al. sec. 3.
"""

from __future__ import annotations

from typing import Any, Dict, Union

from alignkit.api import object_api
from alignkit.config import as_config
from alignkit.train.online import run_online
from alignkit.train.rl_config import GRPOConfig, RLOOConfig


@object_api(GRPOConfig, "online")
def train_grpo(config: Union[GRPOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run GRPO (or any preset given as ``preset``); the Python twin of ``alignkit grpo``."""
    return run_online(as_config(GRPOConfig, config, overrides))


@object_api(RLOOConfig, "online")
def train_rloo(config: Union[RLOOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run RLOO; the Python twin of ``alignkit rloo``."""
    return run_online(as_config(RLOOConfig, config, overrides))
