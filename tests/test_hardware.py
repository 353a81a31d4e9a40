"""The CPU-class probe behind every hardware-specific path (alignkit.hardware): flags, the settings that
cap them (ALIGNKIT_CPU_ISA, ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), oneDNN's own answer, non-x86
machines, and the lean-decode switch (issue 31, item 1)."""

import os

import pytest
import torch

from alignkit import hardware
from alignkit.models import loading
from alignkit.ops.packed_linear import packing_works

pytestmark = pytest.mark.hw


@pytest.fixture
def chip(monkeypatch):
    """A fake x86 chip: set its flags; nothing in the environment caps it unless the test says so."""
    flags = set()
    monkeypatch.setattr(hardware, "_has", lambda flag: flag in flags)
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    for var in ("ALIGNKIT_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)
    return flags


def test_the_class_is_the_lowest_of_chip_settings_and_onednn(chip, monkeypatch):
    assert hardware.cpu_isa() == "generic"
    chip.update({"_is_avx2_supported"})
    assert hardware.cpu_isa() == "avx2"
    chip.update({"_is_avx512_supported", "_is_avx512_bf16_supported", "_is_amx_tile_supported"})
    assert hardware.cpu_isa() == "amx" and hardware.isa_cap() is None
    # torch's cpuinfo keeps reporting the chip under oneDNN's limit: the limit is read from its variable
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert hardware.cpu_isa() == "avx512_bf16"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert hardware.cpu_isa() == "avx2" and not hardware.isa_allows("avx512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")  # oneDNN's "no limit"
    assert hardware.cpu_isa() == "amx"
    # ATen's dispatch level (ATEN_CPU_CAPABILITY) caps too
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert hardware.cpu_isa() == "avx2"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    # our own cap, and a bad value named
    monkeypatch.setenv("ALIGNKIT_CPU_ISA", "avx512")
    assert hardware.cpu_isa() == "avx512"
    monkeypatch.setenv("ALIGNKIT_CPU_ISA", "AUTO")
    assert hardware.cpu_isa() == "amx"
    monkeypatch.setenv("ALIGNKIT_CPU_ISA", "avx3")
    with pytest.raises(ValueError, match="ALIGNKIT_CPU_ISA='avx3': expected auto or one of generic, avx2"):
        hardware.cpu_isa()
    monkeypatch.delenv("ALIGNKIT_CPU_ISA")
    # the bf16 classes need oneDNN's bf16 kernels for real, whatever the flags say
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: False)
    assert hardware.cpu_isa() == "avx512"


def test_not_x86_is_other_and_never_native_bf16_on_a_cpu(chip, monkeypatch):
    chip.update({"_is_amx_tile_supported"})  # whatever a flag says off x86
    monkeypatch.setattr(hardware, "is_x86", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "SVE256")
    assert hardware.chip_isa() == "other" and hardware.cpu_isa() == "other" and hardware.isa_cap() is None
    assert not loading.native_bf16("cpu")
    assert hardware.describe()["cpu_isa"] == "other"


def test_avx2_setting_forces_every_fallback_on_this_machine(monkeypatch):
    """ALIGNKIT_CPU_ISA=avx2 makes the real probes (no fakes) answer as on an AVX2-only CPU."""
    monkeypatch.setenv("ALIGNKIT_CPU_ISA", "avx2")
    assert hardware.cpu_isa() in ("avx2", "generic", "other")
    assert not loading.native_bf16("cpu") and not packing_works()


def test_onednn_probe_agrees_with_the_op():
    """onednn_bf16 is the op itself: where it says yes, packing a bf16 weight works; where no, it raises."""
    w = torch.ones(8, 8, dtype=torch.bfloat16)
    if hardware.onednn_bf16():
        torch.ops.mkldnn._reorder_linear_weight(w, 1)
    else:
        with pytest.raises(RuntimeError):
            torch.ops.mkldnn._reorder_linear_weight(w, 1)


@pytest.mark.skipif(not os.environ.get("ALIGNKIT_EXPECT_CPU_ISA"), reason="set by CI's emulated pass only")
def test_the_emulated_pass_really_emulates():
    """CI's second pass runs under ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 and sets
    ALIGNKIT_EXPECT_CPU_ISA=avx2: fail loudly if the probes stop answering as on that CPU."""
    expected = os.environ["ALIGNKIT_EXPECT_CPU_ISA"]
    assert "ALIGNKIT_CPU_ISA" not in os.environ  # the emulation must come from torch's variables
    assert hardware.cpu_isa() == expected, hardware.describe()
    if expected in ("avx2", "generic"):
        assert not hardware.onednn_bf16() and not packing_works() and not loading.native_bf16("cpu")


def test_lean_decode_switch(monkeypatch):
    """ALIGNKIT_LEAN_DECODE=off: the engine decodes with the model's own forward (the lean step's
    fallback), with the same tokens as with lean steps."""
    from alignkit.rollout import lean as lean_mod
    from alignkit.rollout.engine import FastEngine
    from alignkit.rollout.generate import GenerationConfig
    from alignkit.testing import tiny_causal_lm

    model = tiny_causal_lm("llama").eval()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    cfg = GenerationConfig(max_new_tokens=8, temperature=0, batch_size=2)
    steps = {"n": 0}
    real = lean_mod.LeanStep.step

    def counted(self, *a, **k):
        steps["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(lean_mod.LeanStep, "step", counted)
    lean_tokens = FastEngine().generate(model, prompts, cfg, [0], 0)[0]
    assert steps["n"] > 0
    for off in ("off", "0"):
        monkeypatch.setenv("ALIGNKIT_LEAN_DECODE", off)
        steps["n"] = 0
        assert hardware.lean_decode_allowed() is False
        assert FastEngine().generate(model, prompts, cfg, [0], 0)[0] == lean_tokens
        assert steps["n"] == 0
    monkeypatch.setenv("ALIGNKIT_LEAN_DECODE", "maybe")
    with pytest.raises(ValueError, match="ALIGNKIT_LEAN_DECODE='maybe'"):
        hardware.lean_decode_allowed()
