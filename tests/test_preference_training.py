"""DPO-family trainer: reference modes agree, every loss learns, CLI end to end."""

import json
import random
import re

import pytest
import torch

from alignkit.config import DataConfig, LoraConfig, ModelConfig
from alignkit.data import prepare
from alignkit.data.collate import collate_pairs
from alignkit.losses.preference import PREFERENCE_LOSSES
from alignkit.models.loading import apply_lora, load_causal_lm, load_tokenizer
from alignkit.train.preference import DPOOptions, PreferenceTask, train_dpo
from alignkit.train.reference import AdapterReference, ModelReference, PrecomputedReference, precompute
from tests.helpers import pref_rows, write_jsonl


@pytest.fixture(scope="module")
def pref_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prefs")
    for name, rows in (("train.jsonl", pref_rows(128, 0)), ("eval.jsonl", pref_rows(48, 1))):
        write_jsonl(d / name, rows)
    return d / "train.jsonl", d / "eval.jsonl"


def test_three_reference_modes_give_equal_losses(tiny_model, pref_files):
    mcfg = ModelConfig(name_or_path=str(tiny_model))
    tok = load_tokenizer(mcfg)
    data = prepare("preference", DataConfig(path=str(pref_files[1])), tok)
    items = data.train[:6]
    torch.manual_seed(0)
    policy = apply_lora(load_causal_lm(mcfg), LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # move the policy away from the reference so the test means something
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    opts = DPOOptions(loss="dpo", beta=0.3)
    batch = collate_pairs(items, tok.pad_token_id)
    model_ref = ModelReference(load_causal_lm(mcfg))
    losses = {}
    for ref in (model_ref, AdapterReference()):
        losses[ref.mode] = PreferenceTask(opts, tok.pad_token_id, ref).loss(policy, batch)[0]
    pre_items = [dict(x) for x in items]
    precompute(model_ref, pre_items, tok.pad_token_id, True, torch.device("cpu"))
    losses["precomputed"] = PreferenceTask(opts, tok.pad_token_id, PrecomputedReference()).loss(
        policy, collate_pairs(pre_items, tok.pad_token_id))[0]
    adapter_items = [dict(x) for x in items]  # precomputed by the policy with its adapter off
    precompute(AdapterReference(), adapter_items, tok.pad_token_id, True, torch.device("cpu"), policy=policy)
    losses["precomputed_adapter"] = PreferenceTask(opts, tok.pad_token_id, PrecomputedReference()).loss(
        policy, collate_pairs(adapter_items, tok.pad_token_id))[0]
    assert losses["model"].item() != pytest.approx(6 * 0.6931, abs=1e-3)  # not the trivial log 2 per pair
    assert losses["adapter"].item() == pytest.approx(losses["model"].item(), rel=1e-5)
    assert losses["precomputed"].item() == pytest.approx(losses["model"].item(), rel=1e-5)
    assert losses["precomputed_adapter"].item() == pytest.approx(losses["model"].item(), rel=1e-5)


# per loss: extra overrides where its defaults do not learn in the test's few steps (hinge/IPO saturate at
# their targets, so a larger beta helps). A loss not named here trains with its defaults: every registered
# loss is in the test as soon as it is registered.
SETTINGS = {
    "dpo": {}, "cdpo": {}, "robust": {}, "hinge": {"dpo.beta": 0.5}, "ipo": {"dpo.beta": 0.5},
    "simpo": {}, "orpo": {"dpo.beta": 1.0}, "kto": {},
    "exo_pair": {}, "nca_pair": {"dpo.beta": 0.5}, "bco_pair": {"dpo.beta": 0.5}, "sppo_hard": {"dpo.beta": 0.5},
    "aot": {}, "aot_unpaired": {}, "apo_zero": {"dpo.beta": 0.5}, "apo_down": {"dpo.beta": 0.5}, "discopop": {"dpo.hparams": {"discopop_tau": 0.2}},
    "sigmoid_norm": {"dpo.beta": 0.5},
}


def test_settings_name_registered_losses_only():
    assert set(SETTINGS) <= set(PREFERENCE_LOSSES.names())


@pytest.mark.parametrize("loss", PREFERENCE_LOSSES.names())
def test_every_loss_learns_preferences(tmp_path, tiny_model, pref_files, loss):
    s = train_dpo(**{"model.name_or_path": str(tiny_model), "data.path": str(pref_files[0]),
                     "data.eval_path": str(pref_files[1]), "dpo.loss": loss, "train.epochs": 2,
                     "train.batch_size": 8, "optim.lr": 2e-3, "log.progress": False, "log.samples": 0,
                     **SETTINGS.get(loss, {})}, output=str(tmp_path / loss))
    spec = PREFERENCE_LOSSES.get(loss)
    if spec.needs_reference:  # policy == reference at the start: every pair ties, accuracy 0.5
        assert s["eval/accuracy_before"] == pytest.approx(0.5), s
    else:  # a random model's length-normalized log-probs rank pairs about at chance
        assert 0.25 <= s["eval/accuracy_before"] <= 0.75, s
    assert s["eval/accuracy"] > 0.8 and s["eval/accuracy"] - s["eval/accuracy_before"] >= 0.2, s
    assert s["reference"] == ("model" if spec.needs_reference else "none")


def test_cli_kto_on_unpaired_rows_and_split_pairs(tmp_path, tiny_model, jsonl):
    from alignkit.cli import build_cli

    rng = random.Random(3)
    unpaired = [{"prompt": "q", "completion": "".join(rng.choice("aeiou") for _ in range(4)), "label": True}
                for _ in range(8)]
    unpaired += [{"prompt": "q", "completion": "".join(rng.choice("xyzqw") for _ in range(4)), "label": False}
                 for _ in range(8)]
    for name, rows in (("unpaired.jsonl", unpaired), ("pairs.jsonl", pref_rows(8, 5))):
        data = jsonl(name, rows)
        build_cli().main(["kto", "--model", str(tiny_model), "--data", str(data), "--output",
                          str(tmp_path / f"run_{name}"), "--max-steps", "2", "train.batch_size=4", "log.progress=false"],
                         standalone_mode=False)
        summary = json.loads((tmp_path / f"run_{name}" / "summary.json").read_text())
        assert summary["loss"] == "kto" and summary["steps"] == 2
        rows = [json.loads(l) for l in (tmp_path / f"run_{name}" / "metrics.jsonl").read_text().splitlines()]
        assert all("kto/z0" in r for r in rows if "train/loss" in r)


def test_cli_lora_adapter_reference_and_extra_losses(tmp_path, tiny_model, pref_files):
    from alignkit.cli import build_cli

    build_cli().main(["dpo", "--model", str(tiny_model), "--data", str(pref_files[1]), "--output",
                      str(tmp_path / "r"), "--max-steps", "2", "--lora", "--loss", "dpo",
                      "dpo.extra_losses={hinge: 0.5}", "dpo.sft_weight=0.1", "log.progress=false",
                      "dpo.reference=precomputed"], standalone_mode=False)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["reference"] == "precomputed"
    row = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"hinge/loss", "dpo/loss", "sft/nll", "logps/chosen", "rewards/margin"} <= set(row)


def test_unknown_loss_error_lists_choices():
    with pytest.raises(ValueError, match=re.escape("choose one of: " + ", ".join(PREFERENCE_LOSSES.names()))):
        DPOOptions(loss="nope")
    with pytest.raises(ValueError, match="cannot be combined"):
        DPOOptions(loss="kto", extra_losses={"dpo": 1.0})


@pytest.mark.hw
@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_precast_frozen_linears_is_bit_identical_under_autocast(kind):
    """A frozen reference whose linear weights are stored in bf16 once gives exactly the log-probs of the
    fp32 model under bf16 autocast (autocast rounds the same weights the same way on every call), with
    embeddings, norms and the (tied) head left in fp32."""
    import copy
    from types import SimpleNamespace

    from alignkit.data.layout import SeqBatch
    from alignkit.models.loading import precast_frozen_linears
    from alignkit.ops.logprobs import token_logprobs
    from alignkit.testing import tiny_causal_lm

    model = tiny_causal_lm(kind).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cast = copy.deepcopy(model)
    assert precast_frozen_linears(cast, SimpleNamespace(mixed_precision="no")) == 0
    n = precast_frozen_linears(cast, SimpleNamespace(mixed_precision="bf16"))
    linears = [m for m in cast.modules() if isinstance(m, torch.nn.Linear) and m is not cast.get_output_embeddings()]
    assert n == len(linears) > 0 and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert cast.get_output_embeddings().weight.dtype == torch.float32
    assert all(m.weight.dtype == torch.float32 for m in cast.modules() if isinstance(m, torch.nn.Embedding))
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    seq = SeqBatch(ids, torch.ones_like(ids), torch.ones_like(ids))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = token_logprobs(model, seq).logps
        got = token_logprobs(cast, seq).logps
    assert torch.equal(got, want)
    # the packing probe runs such a model under its autocast: it packs and shares prompts (it used to fail
    # on the dtype mismatch and turn packing off for the whole run)
    from alignkit.data.layout import Packing
    from alignkit.ops.packing import resolve_packing

    said = []
    assert resolve_packing(cast, True, True, say=said.append) == Packing(pack=True, share_prompt=True) and not said
