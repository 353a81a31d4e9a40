"""Preference commands: dpo (any loss) and short aliases that preset the loss."""

from alignkit.cli import TRAIN_FLAGS, Command, register_command

_FLAGS = {**TRAIN_FLAGS, "loss": "dpo.loss", "beta": "dpo.beta"}
_CFG, _RUN = "alignkit.train.preference:DPOConfig", "alignkit.train.preference:train_dpo"

register_command(Command("dpo", _CFG, _RUN, "Direct preference optimization with any loss of the DPO family.",
                         _FLAGS, choices={"loss": "alignkit.losses.preference:PREFERENCE_LOSSES"}))
for name, what in (("ipo", "IPO (Azar et al. 2023)"), ("simpo", "SimPO, reference-free (Meng et al. 2024)"),
                   ("orpo", "ORPO, one stage, no reference (Hong et al. 2024)"),
                   ("kto", "KTO on unpaired desirable/undesirable rows (Ethayarajh et al. 2024)")):
    register_command(Command(name, _CFG, _RUN, f"{what}: alias of `alignkit dpo --loss {name}`.",
                             TRAIN_FLAGS, defaults={"dpo.loss": name}))
