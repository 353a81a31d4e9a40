"""Hub-ready outputs: model card, base model id, dtype kept, adapter reward models, push (mocked)."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from alignkit.cli import build_cli
from alignkit.config import SFTConfig
from alignkit.hub import EMBEDDED_HUB_ID, base_model_id, model_card
from tests.helpers import pref_rows


def cli(*args):
    res = CliRunner().invoke(build_cli(), [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def front_matter(text):
    import yaml

    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def saved_dtypes(model_dir):
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {f.get_tensor(k).dtype for k in f.keys()}


def test_base_model_is_its_hub_id(tmp_path):
    assert base_model_id(None) == base_model_id("smollm2-135m") == EMBEDDED_HUB_ID
    assert base_model_id("Qwen/Qwen2-0.5B-Instruct") == "Qwen/Qwen2-0.5B-Instruct"
    (tmp_path / "m").mkdir()
    assert base_model_id(str(tmp_path / "m")) == str((tmp_path / "m").resolve())


def test_model_card_fields_for_a_hub_base_and_dataset():
    cfg = SFTConfig(output="runs/my-sft", model={"name_or_path": "Qwen/Qwen2-0.5B"},
                    data={"path": "trl-lib/Capybara"}, optim={"lr": 2e-5}, lora={"enabled": True, "r": 8})
    card = model_card(cfg, {"train/loss": 1.25, "steps": 10, "eval/loss": 1.5})
    meta = front_matter(card)
    assert meta == {"base_model": "Qwen/Qwen2-0.5B", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["alignkit", "sft"], "datasets": ["trl-lib/Capybara"]}
    assert "[Qwen/Qwen2-0.5B](https://huggingface.co/Qwen/Qwen2-0.5B)" in card
    for line in ("| learning rate | 2e-05 |", "| LoRA r | 8 |", "| train/loss | 1.25 |", "| eval/loss | 1.5 |",
                 "- Method: `sft`", "full weights (LoRA merged)", "AutoModelForCausalLM.from_pretrained(",
                 "alignkit version: 0."):
        assert line in card, line


def test_model_card_on_every_model_dir_and_dtype_kept(tmp_path, jsonl):
    """A bf16 base stays bf16: after full fine-tuning and after a LoRA merge; model.dtype=float32 asks
    otherwise. Every model/ gets a README.md card naming base, method, data, hyper-parameters, metrics."""
    from alignkit.testing import save_tiny_model

    base = save_tiny_model(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).save_pretrained(base)
    assert saved_dtypes(base) == {torch.bfloat16}
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    common = ["--model", base, "--data", data, "--max-steps", 1, "train.batch_size=2", "log.progress=false"]
    cli("sft", *common, "--output", tmp_path / "full")
    cli("sft", *common, "--output", tmp_path / "lora", "--lora")
    cli("sft", *common, "--output", tmp_path / "fp32", "model.dtype=float32")
    assert saved_dtypes(tmp_path / "full" / "model") == {torch.bfloat16}
    assert saved_dtypes(tmp_path / "lora" / "model") == {torch.bfloat16}
    assert saved_dtypes(tmp_path / "fp32" / "model") == {torch.float32}
    card = (tmp_path / "lora" / "model" / "README.md").read_text()
    assert front_matter(card)["base_model"] == str(base.resolve())
    summary = json.loads((tmp_path / "lora" / "summary.json").read_text())
    assert f"| train/loss | {summary['train/loss']:.4g} |" in card
    assert "d.jsonl: 4 rows read, 4 examples kept" in card and "| LoRA | True |" in card


def test_push_to_hub_up_to_the_upload_call(tmp_path, tiny_model, jsonl, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, **kw):
            calls.append(("create_repo", kw))
            return huggingface_hub.RepoUrl("https://huggingface.co/me/tiny-sft")

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw, sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir())))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    res = cli("sft", "--model", tiny_model, "--data", data, "--output", tmp_path / "run", "--max-steps", 1,
              "log.progress=false", "--push-to-hub", "--hub_model_id", "me/tiny-sft", "--hub_private_repo")
    assert calls[0] == ("create_repo", {"repo_id": "me/tiny-sft", "private": True, "repo_type": "model",
                                        "exist_ok": True})
    name, kw, files = calls[1]
    assert kw["repo_id"] == "me/tiny-sft" and kw["folder_path"] == str(tmp_path / "run" / "model")
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert "pushed to https://huggingface.co/me/tiny-sft" in res.output


def test_adapter_reward_model_scores_the_same_batched_and_single(tmp_path, tiny_model, jsonl):
    """An adapter-mode RM records its base, saves its config (num_labels=1, the tokenizer's pad id) and,
    loaded with peft, scores a padded batch exactly like each row alone, and like alignkit's scorer."""
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from alignkit.models.reward import load_reward_scorer

    data = jsonl("p.jsonl", pref_rows(16, 0))
    out = tmp_path / "rm"
    cli("rm", "--model", tiny_model, "--data", data, "--output", out, "--max-steps", 3, "--lora", "lora.save=adapter",
        "optim.lr=0.05", "train.batch_size=4", "log.progress=false")
    model_dir = out / "model"
    adapter = json.loads((model_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model.resolve())
    tok = AutoTokenizer.from_pretrained(model_dir)
    saved = json.loads((model_dir / "reward_config.json").read_text())
    assert saved["pad_token_id"] == tok.pad_token_id != tok.eos_token_id and saved["num_labels"] == 1
    assert "AutoPeftModelForSequenceClassification" in (model_dir / "README.md").read_text()

    model = AutoPeftModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, pad_token_id=saved["pad_token_id"]).eval()
    texts = ["say:m aeiou", "say:mnop xy", "say:o a"]
    enc = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    with torch.no_grad():
        single = [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in enc]
        batch = tok.pad({"input_ids": enc}, return_tensors="pt")
        batched = model(**batch).logits[:, 0].tolist()
    assert batched == pytest.approx(single, abs=1e-5)
    assert len(set(round(x, 4) for x in single)) == 3  # a trained head, not a constant
    ours = load_reward_scorer(str(model_dir), dtype="float32").score_ids(enc)  # auto: bf16 where native
    assert ours == pytest.approx(single, abs=1e-5)


def test_base_model_from_a_hub_cache_snapshot_or_its_config(tmp_path):
    snap = tmp_path / "hub" / "models--Qwen--Qwen2-0.5B" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    assert base_model_id(str(snap)) == "Qwen/Qwen2-0.5B"
    named = tmp_path / "dl"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "meta-llama/Llama-3.2-1B"}))
    assert base_model_id(str(named)) == "meta-llama/Llama-3.2-1B"
    converted = tmp_path / "conv"
    converted.mkdir()
    (converted / "config.json").write_text(json.dumps({"_name_or_path": "SmolLM2-135M-Instruct"}))
    assert base_model_id(str(converted)) == EMBEDDED_HUB_ID
    local = tmp_path / "mine"
    local.mkdir()
    (local / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path / "elsewhere")}))
    assert base_model_id(str(local)) == str(local.resolve())  # a local model stays a local path


def test_online_card_lists_rewards_generation_and_alerts_not_offline_fields():
    from alignkit.train.rl_config import GRPOConfig

    cfg = GRPOConfig(output="runs/g", model={"name_or_path": "default"}, data={"path": "p.jsonl"},
                     rewards=["length:target=20@0.5", {"kind": "regex", "arg": "^<think>", "name": "format"}],
                     generation={"max_new_tokens": 48, "temperature": 0.7, "top_p": 0.9})
    alerts = [{"step": 3, "kind": "kl_blowup", "message": "KL 12.5 | above 10"}]
    card = model_card(cfg, {"steps": 5}, alerts=alerts)
    assert front_matter(card)["base_model"] == EMBEDDED_HUB_ID
    for line in ("| length | length | `target=20` | 0.5 |", "| format | regex | `^<think>` | 1 |",
                 "| max_new_tokens | 48 |", "| temperature | 0.7 |", "| top_p | 0.9 |", "| num_generations | 8 |",
                 "| kl_coef | 0.04 |", "| 3 | kl_blowup | KL 12.5 \\| above 10 |"):
        assert line in card, line
    assert "gamma" not in card and "max length" not in card  # no critic, and rollouts are cut by max_new_tokens
    assert "No training alert fired" in model_card(cfg, {"steps": 5}, alerts=[])
    ppo = model_card(__import__("alignkit.train.rl_config", fromlist=["PPOConfig"]).PPOConfig(
        output="runs/p", data={"path": "p.jsonl"}, rewards=["length:target=20"]), {})
    assert "| gamma | 1 |" in ppo  # with a critic (gae) gamma means something


def _hub_error(kind):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    req = httpx.Request("POST", "https://huggingface.co/api/repos/create")
    if kind == "network":
        try:  # what a DNS failure looks like from huggingface_hub: httpx's ConnectError wrapped
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution", request=req)
        except httpx.ConnectError as inner:
            try:
                raise OSError("request failed") from inner
            except OSError as outer:
                return outer
    if kind == "auth_missing":
        return LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
    status = {"auth": 401, "permission": 403}[kind]
    return HfHubHTTPError(f"{status} Client Error", response=httpx.Response(status, request=req))


@pytest.mark.parametrize("kind,cause,advice", [
    ("network", "network", "could not reach the Hugging Face Hub"),
    ("auth", "auth", "hf auth login"),
    ("auth_missing", "auth", "hf auth login"),
    ("permission", "permission", "write access"),
])
def test_failed_push_keeps_the_run_complete_and_names_the_cause(tmp_path, tiny_model, jsonl, monkeypatch, kind,
                                                                  cause, advice):
    import huggingface_hub

    err = _hub_error(kind)

    class FailingApi:
        def create_repo(self, **kw):
            raise err

    monkeypatch.setattr(huggingface_hub, "HfApi", FailingApi)
    data = jsonl("d.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    out = tmp_path / "run"
    res = CliRunner().invoke(build_cli(), ["sft", "--model", str(tiny_model), "--data", str(data), "--output", str(out),
                                           "--max-steps", "1", "log.progress=false", "--push-to-hub",
                                           "--hub_model_id", "me/tiny"])
    assert res.exit_code == 1 and res.exception is not None and isinstance(res.exception, SystemExit)
    assert f"failed ({cause})" in res.output and advice in res.output, res.output
    assert "Traceback" not in res.output and "hf upload me/tiny" in res.output
    if cause != "auth":
        assert "hf auth login" not in res.output  # a DNS failure is not a login problem
    for name in ("report.html", "summary.json", "model/model.safetensors", "model/README.md"):
        assert (out / name).exists(), name
    assert not (out / ".alignkit.lock").exists()
