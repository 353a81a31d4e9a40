"""GPU-only paths (bf16 autocast, CUDA placement). Skipped where no CUDA device is present."""

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bf16_sft_and_dpo_train_on_gpu(tmp_path, tiny_model, jsonl):
    from alignkit.train.preference import train_dpo
    from alignkit.train.sft import train_sft
    from tests.helpers import sft_rows
    from tests.helpers import pref_rows

    data = jsonl("sft.jsonl", sft_rows(64))
    s = train_sft(**{"model.name_or_path": str(tiny_model), "data.path": str(data), "data.eval_fraction": 0.25,
                     "train.epochs": 6, "optim.lr": 3e-3, "log.progress": False}, output=str(tmp_path / "sft"))
    cfg = (tmp_path / "sft" / "config.yaml").read_text()
    assert "precision: auto" in cfg
    assert s["eval/loss"] < 0.7 * s["eval/loss_before"], s
    rows = [json.loads(l) for l in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("train/skipped_steps") is None for r in rows)
    prefs = jsonl("p.jsonl", pref_rows(96, 0))
    held = jsonl("h.jsonl", pref_rows(32, 1))
    d = train_dpo(**{"model.name_or_path": str(tiny_model), "data.path": str(prefs), "data.eval_path": str(held),
                     "train.epochs": 2, "optim.lr": 2e-3, "log.progress": False}, output=str(tmp_path / "dpo"))
    assert d["eval/accuracy"] > 0.8, d


def test_bf16_chunked_logprobs_close_to_fp32_reference(tiny_tok):
    from alignkit.data.layout import pad_sequences
    from alignkit.ops.logprobs import reference_logprobs, token_logprobs
    from alignkit.testing import tiny_llama

    model = tiny_llama(tiny_tok).cuda()
    b = pad_sequences([[5, 6, 7, 8, 9, 10] * 8, [11, 12, 13] * 5], [[0] * 10 + [1] * 38, [0] * 5 + [1] * 10],
                      0).to("cuda")
    ref = reference_logprobs(model, b).sum()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast = token_logprobs(model, b, chunk_size=7).sum()
    assert torch.allclose(fast, ref, rtol=2e-2, atol=0.3)
