"""Every preset end to end: with its default stage settings it raises a rule-checked [0, 1] reward on a
tiny learnable task within a few steps, and a run interrupted after a checkpoint and resumed ends with
bitwise the same weights as a straight run (rollout RNG, dynamic sampling's extra prompts, the reward
normalizer and the KL controller included)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from alignkit.train.rl_config import PRESETS
from tests.helpers import one_thread as _one_thread  # noqa: F401  (autouse: one thread per module)
from tests.helpers import write_jsonl
from tests.test_online_rl import prompt_rows

# share of digits among the visible characters: a rule-checked reward in [0, 1]; the random tiny model
# starts near 10/96
DIGITS_OPTS = {"kind": "python", "arg": "alignkit.rewards.toy:char_share", "options": {"chars": "0123456789"},
               "name": "digits"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("preset-runs")
    return write_jsonl(d / "train.jsonl", prompt_rows(64, 0)), write_jsonl(d / "eval.jsonl", prompt_rows(32, 1))


def run(preset, tiny_model, files, out, **extra):
    from alignkit.train.online import train_rl

    return train_rl(**{"preset": preset, "model.name_or_path": str(tiny_model), "data.path": str(files[0]),
                       "rewards": [DIGITS_OPTS], "generation.max_new_tokens": 8, "train.batch_size": 8,
                       "optim.lr": 1e-2, "log.progress": False, "log.samples": 0, **extra}, output=str(out))


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_raises_a_zero_one_reward_with_its_defaults(tmp_path, tiny_model, files, preset):
    s = run(preset, tiny_model, files, tmp_path / preset, **{"data.eval_path": str(files[1]), "eval_samples": 4,
                                                            "train.max_steps": 10})
    before, after = s["eval/rewards/mean_before"], s["eval/rewards/mean"]  # 32 held-out prompts x 4 samples
    print(f"{preset}: held-out digit share {before:.3f} -> {after:.3f}")
    assert 0.05 < before < 0.15
    assert after > before + 0.04, (before, after)


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_resume_mid_run_is_bitwise_identical(tmp_path, tiny_model, files, preset, monkeypatch):
    from tests.helpers import Crash, crash_after_save

    opts = {"train.max_steps": 3, "train.batch_size": 2, "generation.max_new_tokens": 4, "log.save_every": 1}
    run(preset, tiny_model, files, tmp_path / "straight", **opts)
    undo = crash_after_save(monkeypatch, 2)
    with pytest.raises(Crash):
        run(preset, tiny_model, files, tmp_path / "resumed", **opts)
    undo()
    run(preset, tiny_model, files, tmp_path / "resumed", resume="latest", **opts)
    a = load_file(tmp_path / "straight" / "model" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = {}
    for name in ("straight", "resumed"):
        rows[name] = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                      if '"rewards/mean"' in l]
    assert rows["straight"][-1]["rewards/mean"] == rows["resumed"][-1]["rewards/mean"]
