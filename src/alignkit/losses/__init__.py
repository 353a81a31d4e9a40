"""Every loss of alignkit as a pure function: tensors in, ``LossOutput(losses (B,), metrics)`` out.

    from alignkit.losses import dpo_loss
    out = dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   beta=0.1, label_smoothing=0.0)
    out.losses.mean().backward()

Preference losses (:mod:`alignkit.losses.preference`, the ``alignkit dpo --loss NAME`` registry
:data:`PREFERENCE_LOSSES`): ``dpo_loss``, ``cdpo_loss``, ``robust_loss``, ``ipo_loss``, ``hinge_loss``,
``simpo_loss``, ``orpo_loss``, and TRL's other loss types in :mod:`alignkit.losses.preference_variants`
(``exo_pair_loss``, ``nca_pair_loss``, ``bco_pair_loss``, ``sppo_hard_loss``, ``aot_loss``,
``aot_unpaired_loss``, ``apo_zero_loss``, ``apo_down_loss``, ``discopop_loss``, ``sigmoid_norm_loss``) (paired:
``(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, hyper-parameters)``)
and ``kto_loss`` (unpaired): each registered loss is exported here under its name plus ``_loss``, read from
the registry (no list to extend); ``nll_term`` and ``combine``
for weighted sums. Online RL (:mod:`alignkit.losses.policy`, :mod:`alignkit.losses.value`):
``ppo_loss``, ``grpo_loss``, ``rloo_loss``, ``value_loss``. Reward models
(:mod:`alignkit.losses.reward`): ``bradley_terry_loss``,
``all_pairs_bradley_terry_loss``, ``plackett_luce_loss``. Each docstring cites its paper and equation.
"""

from alignkit.losses import preference, preference_variants
from alignkit.losses.base import LossOutput, LossSpec, Registry
from alignkit.losses.policy import POLICY_LOSSES, aggregate_token_losses, grpo_loss, ppo_loss, rloo_loss
from alignkit.losses.preference import PREFERENCE_LOSSES, SOFT_LABEL_LOSSES, combine, loss_hparams, nll_term
from alignkit.losses.reward import RANKING_LOSSES, all_pairs_bradley_terry_loss, bradley_terry_loss, plackett_luce_loss
from alignkit.losses.value import explained_variance, value_loss

#: the modules whose import fills :data:`PREFERENCE_LOSSES` (a new loss goes in one of them)
PREFERENCE_LOSS_MODULES = (preference, preference_variants)
#: every registered preference loss under its name plus ``_loss`` (``dpo_loss``, ``kto_loss``, ...): read
#: from the registry, so a new loss is public as soon as its module registers it
PREFERENCE_LOSS_FUNCTIONS = {f"{name}_loss": spec.fn for name, spec in PREFERENCE_LOSSES.items()}
globals().update(PREFERENCE_LOSS_FUNCTIONS)

__all__ = [
    "LossOutput", "LossSpec", "Registry",
    "PREFERENCE_LOSSES", "SOFT_LABEL_LOSSES", "PREFERENCE_LOSS_FUNCTIONS", "loss_hparams", "nll_term", "combine",
    "POLICY_LOSSES", "aggregate_token_losses", "ppo_loss", "grpo_loss", "rloo_loss",
    "value_loss", "explained_variance",
    "RANKING_LOSSES", "bradley_terry_loss", "all_pairs_bradley_terry_loss", "plackett_luce_loss",
]
__all__ += sorted(PREFERENCE_LOSS_FUNCTIONS)
