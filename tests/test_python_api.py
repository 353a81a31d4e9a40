"""The object-level Python API (alignkit/api.py), TRL DPO recipe keys, peft variants, QLoRA and
Hub-layout data folders (issue 34, items 3-5)."""

import copy
import importlib.util
import json
import math

import pytest
import torch
import yaml

from tests.helpers import pref_rows, sft_rows, write_jsonl


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Recorder:
    """A plain callback: records every event."""

    def __init__(self):
        self.events = []

    def on_train_begin(self):
        self.events.append(("begin",))

    def on_step_end(self, step, metrics):
        self.events.append(("step", step, metrics["train/loss"]))

    def on_evaluate(self, step, metrics):
        self.events.append(("eval", step, dict(metrics)))

    def on_save(self, step, path):
        self.events.append(("save", step, path))

    def on_train_end(self, step, metrics):
        self.events.append(("end", step))


def test_dpo_with_dataset_and_model_objects_and_callbacks(tmp_path, tiny_tok):
    import alignkit
    from datasets import Dataset
    from transformers import TrainerCallback

    from alignkit.testing import tiny_llama

    class HF(TrainerCallback):
        def __init__(self):
            self.steps, self.logs, self.began, self.ended = [], [], 0, 0

        def on_train_begin(self, args, state, control, **kw):
            self.began += 1
            assert args.output_dir == str(tmp_path / "run")

        def on_step_end(self, args, state, control, **kw):
            self.steps.append(state.global_step)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(logs["train/loss"])

        def on_train_end(self, args, state, control, model=None, **kw):
            self.ended += 1
            assert model is not None

    model = tiny_llama(tiny_tok)  # built in memory: no checkpoint on disk
    start = copy.deepcopy(model.state_dict())
    rec, hf = Recorder(), HF()
    res = alignkit.train_dpo(model=model, processing_class=tiny_tok, train_dataset=Dataset.from_list(pref_rows(16, 0)),
                             eval_dataset=pref_rows(8, 1), callbacks=[rec, hf], output=str(tmp_path / "run"),
                             max_steps=3, per_device_train_batch_size=4, learning_rate=5e-3, beta=0.1,
                             **{"log.samples": 0, "train.precision": "fp32"})
    # callbacks: every step, in order, with the logged loss; evaluation before and after
    steps = [e for e in rec.events if e[0] == "step"]
    kinds = [e[0] for e in rec.events]  # the held-out numbers before training come first
    assert kinds == ["eval", "begin", "step", "step", "step", "eval", "end"] and rec.events[-1] == ("end", 3)
    assert [s[1] for s in steps] == [1, 2, 3]
    logged = [r for r in _records(tmp_path / "run" / "metrics.jsonl") if "train/loss" in r]
    assert [s[2] for s in steps] == pytest.approx([r["train/loss"] for r in logged])
    evals = [e for e in rec.events if e[0] == "eval"]
    assert [e[1] for e in evals] == [0, 3]
    # the default reference is a frozen copy of the given model: before training every pair ties
    assert evals[0][2]["eval/accuracy"] == 0.5 and res["eval/accuracy_before"] == 0.5
    assert hf.began == 1 and hf.ended == 1 and hf.steps == [1, 2, 3] and hf.logs == pytest.approx([s[2] for s in steps])
    # the result: the summary dict as before, plus the trained model, tokenizer, metrics and paths
    assert res["steps"] == 3 and res.metrics["train/loss"] == res["train/loss"]
    assert res.model is model and res.tokenizer is tiny_tok
    moved = max(float((model.state_dict()[k] - v).abs().max()) for k, v in start.items())
    assert moved > 1e-4
    assert res.paths["model"] == tmp_path / "run" / "model" and (res.paths["model"] / "model.safetensors").exists()
    # the datasets went through files in the run directory, named in the data report
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report[0]["source"].endswith("inputs/train.jsonl") and report[0]["examples"] == 16
    assert report[1]["source"].endswith("inputs/eval.jsonl") and report[1]["examples"] == 8
    assert json.loads(json.dumps(res))["steps"] == 3  # still a plain JSON-able summary


def test_sft_with_peft_model_datasetdict_and_trainer_callback_stop(tmp_path, tiny_tok):
    import alignkit
    from datasets import Dataset, DatasetDict
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    from alignkit.testing import tiny_llama

    class StopAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True
            return control

    model = get_peft_model(tiny_llama(tiny_tok), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           use_dora=True, task_type="CAUSAL_LM"))
    dd = DatasetDict({"train": Dataset.from_list(sft_rows(16, 0)), "test": Dataset.from_list(sft_rows(6, 1))})
    rec = Recorder()
    res = alignkit.train_sft(model=model, tokenizer=tiny_tok, train_dataset=dd, callbacks=[StopAt2(), rec],
                             output=str(tmp_path / "sft"), max_steps=5, per_device_train_batch_size=4, save_steps=1,
                             **{"log.samples": 0, "lora.save": "adapter"})
    assert res["steps"] == 2 and [e[1] for e in rec.events if e[0] == "step"] == [1, 2]
    assert [e[1:] for e in rec.events if e[0] == "save"] == [(k, tmp_path / "sft" / "checkpoints" / f"step-{k:08d}")
                                                             for k in (1, 2)]
    assert all(e[2].is_dir() for e in rec.events if e[0] == "save")
    assert res.model.peft_config["default"].use_dora  # the given adapters were trained, not replaced
    report = json.loads((tmp_path / "sft" / "data_report.json").read_text())
    assert (report[0]["split"], report[1]["split"]) == ("train", "test")  # DatasetDict: read by split name
    assert "eval/loss" in res and (tmp_path / "sft" / "model" / "adapter_config.json").exists()


def test_datasets_of_every_kind_become_files(tmp_path):
    from datasets import Dataset, DatasetDict, IterableDataset

    from alignkit.api import materialize

    rows = pref_rows(5, 0)
    for i, ds in enumerate([rows, Dataset.from_list(rows), IterableDataset.from_generator(lambda: iter(rows))]):
        where = materialize(ds, tmp_path / str(i), "train", "train_dataset")
        assert _records(tmp_path / str(i) / "inputs" / "train.jsonl") == rows and where["path"].endswith("train.jsonl")
    where = materialize(DatasetDict({"train_prefs": Dataset.from_list(rows), "test_prefs": Dataset.from_list(rows[:2])}),
                        tmp_path / "dd", "train", "train_dataset")
    assert where["splits"] == ["train_prefs", "test_prefs"]
    assert _records(tmp_path / "dd" / "inputs" / "train" / "test_prefs.jsonl") == rows[:2]
    with pytest.raises(TypeError, match="train_dataset: row 1 is a str, expected a dict"):
        materialize([rows[0], "x"], tmp_path / "bad", "train", "train_dataset")


def test_object_api_errors_are_one_line(tmp_path, tiny_tok):
    import alignkit
    from alignkit.testing import tiny_llama

    with pytest.raises(TypeError, match="model= was given without tokenizer="):
        alignkit.train_sft(model=tiny_llama(tiny_tok), train_dataset=sft_rows(4), output=str(tmp_path / "a"))
    with pytest.raises(TypeError, match="expected a datasets.Dataset, DatasetDict, IterableDataset or a list"):
        alignkit.train_sft(model=tiny_llama(tiny_tok), tokenizer=tiny_tok, train_dataset="rows.jsonl",
                           output=str(tmp_path / "b"))
    with pytest.raises(TypeError, match="model_name_or_path="):
        alignkit.train_dpo(model="some/model")


def test_help_lists_the_object_arguments():
    import inspect

    import alignkit

    for fn in (alignkit.train_sft, alignkit.train_rm, alignkit.train_dpo, alignkit.train_ppo,
               alignkit.train_grpo, alignkit.train_rloo, alignkit.train_rl):
        params = inspect.signature(fn).parameters
        for name in ("model", "tokenizer", "processing_class", "train_dataset", "eval_dataset", "ref_model",
                     "callbacks"):
            assert name in params, (fn.__name__, name)
        assert "datasets.Dataset" in fn.__doc__ and f"alignkit.{fn.__name__}(" in fn.__doc__
    assert "train_dataset" in alignkit.__doc__ and "TrainResult" in dir(alignkit)


# ------------------------------------------------------------------ TRL DPO recipe keys

def _hub_layout_prefs(root):
    """A folder laid out like HuggingFaceH4/ultrafeedback_binarized: data/{train,test}_prefs-*.parquet."""
    from datasets import Dataset

    (root / "data").mkdir(parents=True)
    rows = pref_rows(24, 3)
    Dataset.from_list(rows[:12]).to_parquet(str(root / "data" / "train_prefs-00000-of-00002.parquet"))
    Dataset.from_list(rows[12:20]).to_parquet(str(root / "data" / "train_prefs-00001-of-00002.parquet"))
    Dataset.from_list(rows[20:]).to_parquet(str(root / "data" / "test_prefs-00000-of-00001.parquet"))
    return root


def test_hub_layout_folder_is_read_with_its_split_names(tmp_path):
    from alignkit.data.load import read_rows, split_names, twin_split

    root = _hub_layout_prefs(tmp_path / "ufb")
    assert split_names(str(root)) == ["test_prefs", "train_prefs"]
    assert twin_split("train_prefs", split_names(str(root))) == "test_prefs"
    info = {}
    _, rows = read_rows(str(root), split="train_prefs", info=info)
    assert [n for n, _ in rows] == list(range(20)) and rows[12][1] == pref_rows(24, 3)[12]
    assert info["split"] == "train_prefs" and "data/train_prefs-00000-of-00002.parquet" in info["origin"]
    # JSON lines named by split, at the top level
    jl = tmp_path / "jl"
    jl.mkdir()
    write_jsonl(jl / "train.jsonl", pref_rows(3, 0))
    write_jsonl(jl / "validation.jsonl", pref_rows(2, 1))
    _, rows = read_rows(str(jl), split="train")
    assert [n for n, _ in rows] == [1, 2, 3]  # one file keeps its line numbers
    from alignkit.data.load import DataError

    with pytest.raises(DataError, match="no split 'dev' \\(its files give train, validation\\)"):
        read_rows(str(jl), split="dev")


TRL_DPO_RECIPE = """\
model_name_or_path: {model}
dataset_name: {data}
dataset_train_split: train_prefs
dataset_test_split: test_prefs
learning_rate: 5.0e-4
max_steps: 2
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
gradient_checkpointing: true
gradient_checkpointing_kwargs:
  use_reentrant: false
optim: adamw_torch
beta: 0.1
loss_type: sigmoid
max_length: 64
eval_strategy: no
logging_steps: 1
report_to: none
use_peft: true
lora_r: 8
lora_alpha: 16
use_rslora: true
use_dora: true
lora_task_type: CAUSAL_LM
lora_target_modules: [q_proj, v_proj]
output_dir: {out}
"""


def test_trl_dpo_recipe_runs_unchanged_cli_and_python(tmp_path, tiny_model):
    from click.testing import CliRunner

    import alignkit
    from alignkit.cli import build_cli

    data = _hub_layout_prefs(tmp_path / "ufb")
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(TRL_DPO_RECIPE.format(model=tiny_model, data=data, out=tmp_path / "cli"))
    res = CliRunner().invoke(build_cli(), ["dpo", "--config", str(cfg), "log.samples=0"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    resolved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert resolved["optim"]["optimizer"] == "adamw" and resolved["log"]["evaluate"] is False
    assert resolved["lora"]["use_rslora"] and resolved["lora"]["use_dora"] and resolved["lora"]["task_type"] == "CAUSAL_LM"
    assert resolved["model"]["gradient_checkpointing_kwargs"] == {"use_reentrant": False}
    records = _records(tmp_path / "cli" / "metrics.jsonl")
    assert not any(k.startswith("eval/") for r in records for k in r)  # eval_strategy: no -> no evaluation
    report = json.loads((tmp_path / "cli" / "data_report.json").read_text())
    assert [(r["role"], r["split"], r["examples"]) for r in report] == [("train", "train_prefs", 20),
                                                                        ("eval", "test_prefs", 4)]

    # the same recipe through the Python API: a dict of TRL keys
    recipe = yaml.safe_load(TRL_DPO_RECIPE.format(model=tiny_model, data=data, out=tmp_path / "py"))
    out = alignkit.train_dpo(recipe, **{"log.samples": 0, "lora.save": "adapter"})  # .model: the peft model
    pc = out.model.peft_config["default"]
    assert pc.use_dora and pc.use_rslora and set(pc.target_modules) == {"q_proj", "v_proj"}
    layer = out.model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(16 / math.sqrt(8))  # rsLoRA: alpha / sqrt(r)
    assert "default" in layer.lora_magnitude_vector  # DoRA's trained magnitude
    assert out["steps"] == 2 and not any(k.startswith("eval/") for k in out)


def test_eval_strategy_values():
    from alignkit.config import SFTConfig, as_config

    assert as_config(SFTConfig, {"eval_strategy": False}, {}).log.evaluate is False  # YAML's bare no
    assert as_config(SFTConfig, {"eval_strategy": "no"}, {}).log.evaluate is False
    assert as_config(SFTConfig, {"eval_strategy": "steps"}, {}).log.evaluate is True


# ------------------------------------------------------------------ optimizers

@pytest.mark.parametrize("name,cls", [("adamw_torch", "AdamW"), ("adamw_torch_fused", "AdamW"), ("sgd", "SGD"),
                                      ("adagrad", "Adagrad"), ("rmsprop", "RMSprop"), ("adafactor", "Adafactor")])
def test_optim_strings_map_to_optimizers(name, cls):
    from alignkit.config import SFTConfig, as_config
    from alignkit.train.optim import make_optimizer

    cfg = as_config(SFTConfig, {"optim": name, "learning_rate": 0.1}, {})
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = make_optimizer([{"params": [w]}], cfg.optim, torch.device("cpu"))
    assert type(opt).__name__ == cls
    if name == "sgd":  # plain SGD: w <- w - lr * g, as transformers builds it (no momentum)
        w.grad = torch.tensor([0.5, 1.0])
        opt.step()
        assert w.detach().tolist() == pytest.approx([1.0 - 0.05, -2.0 - 0.1])


def test_unknown_optim_string_is_one_line():
    from alignkit.config import ConfigError, SFTConfig, as_config

    with pytest.raises(ConfigError, match="optim.optimizer: .*unknown optimizer 'adamw_torchh' \\(did you mean adamw_torch\\?\\)"):
        as_config(SFTConfig, {"optim": "adamw_torchh"}, {})


# ------------------------------------------------------------------ peft variants and QLoRA

def test_dora_rslora_and_target_parameters_reach_peft(tiny_tok):
    from alignkit.config import ConfigError, LoraConfig
    from alignkit.models.loading import apply_lora
    from alignkit.testing import tiny_llama

    m = apply_lora(tiny_llama(tiny_tok), LoraConfig(enabled=True, r=4, alpha=8, use_rslora=True, use_dora=True,
                                                     target_modules=["q_proj"]))
    pc = m.peft_config["default"]
    assert pc.use_dora and pc.use_rslora and pc.task_type == "CAUSAL_LM"
    assert m.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(8 / 2)
    m = apply_lora(tiny_llama(tiny_tok), LoraConfig(enabled=True, r=4, target_parameters=["mlp.up_proj.weight"]))
    pc = m.peft_config["default"]
    assert list(pc.target_parameters) == ["mlp.up_proj.weight"] and not pc.target_modules
    assert any("up_proj" in n and "lora_A" in n for n, _ in m.named_parameters())
    with pytest.raises(ConfigError, match="lora.target_parameters: experts.w1 not found"):
        apply_lora(tiny_llama(tiny_tok), LoraConfig(enabled=True, target_parameters=["experts.w1"]))


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    from alignkit.config import ConfigError, ModelConfig
    from alignkit.models.loading import quantization_kwargs

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs bitsandbytes, an optional extra .*pip install 'alignkit\\[qlora\\]'"):
        quantization_kwargs(ModelConfig(load_in_4bit=True))


def _bnb_runs() -> str:
    """Why bitsandbytes cannot run a 4-bit layer here ("" when it can)."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'alignkit[qlora]')"
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(16, 16, quant_type="nf4")
        layer.load_state_dict(torch.nn.Linear(16, 16).state_dict())
        layer = layer.to("cuda" if torch.cuda.is_available() else "cpu")
        layer(torch.randn(2, 16, device=layer.weight.device))
    except Exception as e:  # noqa: BLE001 - any failure means no 4-bit kernels on this machine
        return f"bitsandbytes cannot run a 4-bit layer here: {type(e).__name__}: {e}"
    return ""


def test_qlora_nf4_double_quant_trains_lora(tmp_path):
    why = _bnb_runs()
    if why:
        pytest.skip(why)
    from bitsandbytes.nn import Linear4bit

    from alignkit.config import LoraConfig, ModelConfig
    from alignkit.models.loading import apply_lora, load_causal_lm
    from alignkit.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "m", hidden=64)  # 4-bit blocks are 64 values: a layer at least that wide
    m = load_causal_lm(ModelConfig(name_or_path=str(path), load_in_4bit=True, bnb_4bit_use_double_quant=True))
    q = m.model.layers[0].self_attn.q_proj
    assert isinstance(q, Linear4bit) and q.weight.quant_type == "nf4" and q.weight.quant_state.nested
    m = apply_lora(m, LoraConfig(enabled=True, r=4))
    before = {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)  # only the adapters train; the 4-bit base is frozen
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(3, 90, (2, 12))
    losses = []
    for _ in range(5):
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0]  # the adapters on the 4-bit base learn the batch


def test_grpo_with_model_object_uses_a_copy_as_reference(tmp_path, tiny_tok):
    import alignkit
    from datasets import Dataset

    from alignkit.testing import tiny_llama

    rec = Recorder()
    prompts = Dataset.from_list([{"prompt": f"say {c}:"} for c in "abcdefgh"])
    res = alignkit.train_grpo(model=tiny_llama(tiny_tok), tokenizer=tiny_tok, train_dataset=prompts,
                              callbacks=[rec], output=str(tmp_path / "grpo"), max_steps=2, num_generations=4,
                              beta=0.1, **{"train.batch_size": 2, "rewards": ["python:alignkit.rewards.toy:char_share"],
                                           "log.samples": 0, "generation.max_new_tokens": 6,
                                           "train.precision": "fp32"})
    steps = [e for e in rec.events if e[0] == "step"]
    assert [s[1] for s in steps] == [1, 2] and res["steps"] == 2
    first = _records(tmp_path / "grpo" / "metrics.jsonl")[0]
    assert first["kl/ref"] == pytest.approx(0.0, abs=1e-6)  # the reference is the given model before training


def test_qlora_dpo_run_end_to_end(tmp_path):
    why = _bnb_runs()
    if why:
        pytest.skip(why)
    from click.testing import CliRunner

    from alignkit.cli import build_cli
    from alignkit.testing import save_tiny_model

    path = save_tiny_model(tmp_path / "m", hidden=64)
    data = write_jsonl(tmp_path / "p.jsonl", pref_rows(8, 0))
    res = CliRunner().invoke(build_cli(), ["dpo", "--model", str(path), "--data", str(data), "--output",
                                           str(tmp_path / "q"), "--max-steps", "1", "--lora", "load_in_4bit=true",
                                           "use_bnb_nested_quant=true", "train.batch_size=4", "log.samples=0",
                                           "lora.save=adapter"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["reference"] == "adapter" and summary["train/loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert (tmp_path / "q" / "model" / "adapter_config.json").exists()


def test_every_top_level_name_resolves_to_its_module_object():
    """``alignkit.NAME`` is the object its module defines (the lazy table points at real names), the
    red-teaming, probe, eval and pipeline entry points included."""
    import importlib

    import alignkit

    for name, module in alignkit._API.items():
        assert getattr(alignkit, name) is getattr(importlib.import_module(module), name), name
    for name in ("run_redteam", "RedteamConfig", "run_redteam_pairs", "evaluate", "probe", "run_pipeline"):
        assert name in alignkit.__all__
