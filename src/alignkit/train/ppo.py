"""PPO with a value model for language models (``alignkit ppo``).

Schulman et al. 2017 (PPO), as applied to LMs by Ziegler et al. 2019 and Ouyang et al. 2022:

* per-token reward ``r_t = -beta * KL_t + [t = last] * R(x, y)`` with ``KL_t`` an estimate of
  ``log pi(y_t) - log pi_ref(y_t)`` (Ziegler et al. 2019, eq. 2; k1 by default);
* GAE advantages and returns (Schulman et al. 2016, eq. 16), whitened over the rollout;
* clipped surrogate (PPO eq. 7), clipped value loss, entropy bonus, several epochs of minibatches;
* ``beta`` fixed or adapted towards a target KL (Ziegler et al. 2019, eq. 2), saved in checkpoints.

PPO is the ``ppo`` preset of the one online-RL task (:mod:`alignkit.train.online`); its value model
(:class:`PolicyWithValue`, :func:`build_critic`) is in :mod:`alignkit.train.critic`.
"""

from __future__ import annotations

from typing import Any, Dict, Union

from alignkit.api import object_api
from alignkit.config import as_config
from alignkit.train.critic import PolicyWithValue, build_critic, critic_values
from alignkit.train.online import run_online
from alignkit.train.rl_config import PPOConfig


@object_api(PPOConfig, "online")
def train_ppo(config: Union[PPOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run PPO; the Python twin of ``alignkit ppo``. Returns the summary (final metrics, paths)."""
    return run_online(as_config(PPOConfig, config, overrides))


__all__ = ["train_ppo", "PolicyWithValue", "build_critic", "critic_values"]  # the value model re-exported
