"""`alignkit eval`: the aggregation against hand-computed values, and the wiring on tiny models."""

import contextlib
import json
import math

import pytest

from tests.gold_toy import SPEC
from tests.helpers import write_jsonl
import torch

from alignkit.eval.evaluate import per_token_kl, summarize
from alignkit.eval.rm_eval import pair_metrics, score_pairs


def test_per_token_kl_k1_and_k3_by_hand():
    # two sequences: 2 response tokens, then 1 (the third column is padding / prompt)
    lp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -7.0, -7.0]])
    ref = torch.tensor([[-1.5, -2.5, -1.0], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    k1 = per_token_kl(lp, ref, mask, "k1")
    assert k1 == [[0.5, 0.5], [0.5]]  # log pi - log pi_ref on the masked tokens only
    k3 = per_token_kl(lp, ref, mask, "k3")
    # k3 = exp(r) - r - 1 with r = ref - lp = -0.5: 0.60653 + 0.5 - 1 = 0.10653
    assert k3[0][0] == pytest.approx(math.exp(-0.5) - 0.5, abs=1e-6)
    m = summarize(["a b", "c"], [2, 1], [True, False], [0, 1], k1, {})
    assert m["kl/ref"] == pytest.approx((1.0 + 0.5) / 2)  # per-sequence sums, averaged
    assert m["kl/ref_token"] == pytest.approx(1.5 / 3)  # all tokens pooled
    assert m["kl/ref_max"] == pytest.approx(1.0)


def test_summarize_every_metric_by_hand():
    # prompt 0 has two samples, prompt 1 two samples
    texts = ["a b c", "a b d", "x y x y x y", "z"]
    index = [0, 0, 1, 1]
    lengths = [4, 4, 7, 2]
    ended = [True, True, False, True]
    gold = [0.5, 0.1, -0.2, 0.9]
    ref_gold = [0.3, 0.3, 0.0, 0.9]  # wins: 0.5>0.3, 0.1<0.3, -0.2<0.0, tie -> (1 + 0 + 0 + 0.5) / 4
    m = summarize(texts, lengths, ended, index, None, {"gold": gold}, {"gold": ref_gold}, index, "gold",
                  repetition_n=2)
    assert m["rewards/gold"] == pytest.approx(0.325)
    assert m["reference/rewards/gold"] == pytest.approx(0.375)
    assert m["rewards/gold_std"] == pytest.approx(math.sqrt(((0.175) ** 2 + 0.225 ** 2 + 0.525 ** 2 + 0.575 ** 2) / 4))
    assert m["win_rate/gold"] == pytest.approx(0.375)
    assert "kl/ref" not in m
    assert m["length/mean"] == pytest.approx(4.25) and m["length/max"] == 7 and m["length/p50"] == 4
    # pearson(gold, lengths) computed by hand
    mx, my = 0.325, 4.25
    dx = [g - mx for g in gold]
    dy = [v - my for v in lengths]
    r = sum(a * b for a, b in zip(dx, dy)) / math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dy))
    assert m["length/reward_corr_gold"] == pytest.approx(r)
    # distinct-1 per prompt: {a,b,c,d}/6 = 0.6667; {x,y,z}/7 = 0.4286 -> mean
    assert m["diversity/distinct_1"] == pytest.approx((4 / 6 + 3 / 7) / 2)
    # distinct-2: {ab,bc,bd}/4 = 0.75; {xy,yx}/5 = 0.4 ("z" has no bigram)
    assert m["diversity/distinct_2"] == pytest.approx((0.75 + 0.4) / 2)
    # self-similarity: jaccard({ab,bc},{ab,bd}) = 1/3; ({xy,yx}, {}) = 0
    assert m["diversity/self_similarity"] == pytest.approx((1 / 3 + 0.0) / 2)
    # repetition (n=2): "x y x y x y" repeats 3 of 5 bigrams, the others 0
    assert m["text/repetition_rate"] == pytest.approx(0.6 / 4)
    assert m["text/eos_rate"] == pytest.approx(0.75)
    assert m["num_prompts"] == 2 and m["num_samples"] == 4
    assert "rewards/proxy_gold_corr" not in m  # no proxy given
    # with a proxy: its Pearson correlation with the gold over the N samples
    proxy = [1.0, 0.0, 0.0, 1.0]  # mean 0.5; dx as above
    mp = summarize(texts, lengths, ended, index, None, {"gold": gold, "proxy": proxy}, repetition_n=2)
    dp = [p - 0.5 for p in proxy]
    r = sum(a * b for a, b in zip(dx, dp)) / math.sqrt(sum(a * a for a in dx) * sum(b * b for b in dp))
    assert mp["rewards/proxy_gold_corr"] == pytest.approx(r)


def test_summarize_intervals_over_prompts_by_hand():
    # prompts 0 and 1, two samples each; prompt means: gold 0.3 and 0.35, reference 0.3 and 0.45
    index = [0, 0, 1, 1]
    gold = [0.5, 0.1, -0.2, 0.9]
    ref_gold = [0.3, 0.3, 0.0, 0.9]
    kl = [[0.5, 0.5], [1.0], [2.0, 1.0, 1.0], [0.0]]  # per-sequence sums 1, 1, 4, 0 -> prompt means 1, 2
    m = summarize(["a", "b", "c", "d"], [1, 1, 1, 1], [True] * 4, index, kl, {"gold": gold},
                  {"gold": ref_gold}, index, "gold")
    t1 = 12.706205  # t quantile 0.975 with 1 degree of freedom (two prompts)
    # gold: mean of prompt means 0.325, s = 0.0353553, se = s / sqrt(2) = 0.025
    assert m["rewards/gold"] == pytest.approx(0.325)
    assert m["rewards/gold_se"] == pytest.approx(0.025)
    assert m["rewards/gold_lo"] == pytest.approx(0.325 - t1 * 0.025, abs=1e-5)
    assert m["rewards/gold_hi"] == pytest.approx(0.325 + t1 * 0.025, abs=1e-5)
    assert m["rewards/gold_n"] == 2
    # reference 0.3, 0.45: se = 0.075
    assert m["reference/rewards/gold_se"] == pytest.approx(0.075)
    # gain paired by prompt: 0 and -0.1 -> mean -0.05, se 0.05, t = -1 with 1 df: p = 0.5
    assert m["gain/gold"] == pytest.approx(-0.05)
    assert m["gain/gold_se"] == pytest.approx(0.05)
    assert m["gain/gold_lo"] == pytest.approx(-0.05 - t1 * 0.05, abs=1e-5)
    assert m["gain/gold_p"] == pytest.approx(0.5, abs=1e-6)
    # win rate per prompt: (1 + 0) / 2 = 0.5 and (0 + 0.5) / 2 = 0.25 -> se = 0.125
    assert m["win_rate/gold"] == pytest.approx(0.375)
    assert m["win_rate/gold_se"] == pytest.approx(0.125)
    assert m["win_rate/gold_lo"] == 0.0 and m["win_rate/gold_hi"] == 1.0  # 0.375 ± 1.59, clipped to [0, 1]
    # KL per sequence: mean 1.5, prompt means 1 and 2 -> se 0.5
    assert m["kl/ref"] == pytest.approx(1.5)
    assert m["kl/ref_se"] == pytest.approx(0.5)
    assert m["kl/ref_lo"] == pytest.approx(1.5 - t1 * 0.5, abs=1e-5)


def test_summarize_gain_is_the_paired_test_and_a_real_gain_is_better():
    # 6 prompts, the policy 0.2 above the reference on each, plus noise of either sign: a clear gain
    index = [i for i in range(6) for _ in range(2)]
    ref = [0.1 * (i % 3) for i in range(12)]
    noise = [0.01, -0.01, 0.02, 0.0, -0.02, 0.01, 0.0, 0.01, -0.01, 0.0, 0.02, -0.02]
    pol = [r + 0.2 + e for r, e in zip(ref, noise)]
    m = summarize(["x"] * 12, [1] * 12, [True] * 12, index, None, {"gold": pol}, {"gold": ref}, index, "gold")
    from alignkit.eval.stats import paired_comparison, read_interval, verdict_of

    pc = paired_comparison(ref, pol, index)
    assert m["gain/gold"] == pytest.approx(pc.diff.mean) and m["gain/gold_lo"] == pytest.approx(pc.diff.lo)
    assert m["gain/gold_lo"] > 0 and verdict_of(read_interval(m, "gain/gold")) == "better"
    assert m["gain/gold_p"] < 1e-4
    # every prompt's win rate: (2 of 2 won) -> 1 each: interval [1, 1]; one prompt only: no interval
    assert (m["win_rate/gold"], m["win_rate/gold_lo"], m["win_rate/gold_hi"]) == (1.0, 1.0, 1.0)
    one = summarize(["x", "y"], [1, 1], [True] * 2, [0, 0], None, {"gold": [1.0, 0.0]}, {"gold": [0.5, 0.5]},
                    [0, 0], "gold")
    assert one["win_rate/gold"] == 0.5 and math.isnan(one["win_rate/gold_lo"]) and one["win_rate/gold_n"] == 1


def test_win_rate_pairs_sample_j_with_reference_sample_j_mod_count():
    # the reference has one sample per prompt: every policy sample of a prompt meets it
    m = summarize(["a", "b", "c"], [1, 1, 1], [True] * 3, [0, 0, 1], None, {"proxy": [1.0, -1.0, 2.0]},
                  {"proxy": [0.0, 3.0]}, [0, 1], "proxy")
    assert m["win_rate/proxy"] == pytest.approx((1 + 0 + 0) / 3)


def test_reward_model_calibration_by_hand(tmp_path):
    """A handcrafted scorer: pair score differences +2, -1 and 0."""
    from alignkit.eval.evaluate import EvalConfig
    from alignkit.eval.rm_eval import evaluate_reward_model

    table = {"great": 2.0, "meh": 0.0, "bad": 0.0, "ok": 1.0, "same1": 1.0, "same2": 1.0}
    scorer = lambda prompts, texts: [table[t] for t in texts]  # noqa: E731
    rows = [{"prompt": "p1", "chosen": "great", "rejected": "meh"},
            {"prompt": "p2", "chosen": "bad", "rejected": "ok"},
            {"prompt": "p3", "chosen": "same1", "rejected": "same2"}]
    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, rows)
    cfg = EvalConfig(reward_model="handmade", data={"path": str(data)}, output=str(tmp_path / "out"))
    res = evaluate_reward_model(cfg, scorer=scorer)
    s = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    assert res["rm/accuracy"] == pytest.approx(0.5)  # right, wrong, tie
    assert res["rm/margin"] == pytest.approx(1 / 3)
    assert res["rm/prob_chosen"] == pytest.approx((s(2) + s(-1) + 0.5) / 3)
    # predictions both ways: (.8808, 1) (.1192, 0) (.2689, 1) (.7311, 0) (.5, 1) (.5, 0); the two 0.5s share a
    # bin whose mean prediction equals its observed rate, so ECE = (2 * (1 - s(2)) + 2 * s(1)) / 6
    assert res["rm/ece"] == pytest.approx((2 * (1 - s(2)) + 2 * s(1)) / 6)
    doc = json.loads((tmp_path / "out" / "eval.json").read_text())
    bins = {round(b["lo"], 1): b for b in doc["calibration"] if b["count"]}
    assert set(bins) == {0.1, 0.2, 0.5, 0.7, 0.8}
    assert bins[0.5]["count"] == 2 and bins[0.5]["observed"] == 0.5
    assert bins[0.8]["mean_predicted"] == pytest.approx(s(2)) and bins[0.8]["observed"] == 1.0
    scored = [json.loads(x) for x in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert [r["score_chosen"] for r in scored] == [2.0, 0.0, 1.0]
    assert (tmp_path / "out" / "report.html").is_file()
    assert pair_metrics([1.0], [0.0])["rm/accuracy"] == 1.0
    assert score_pairs(scorer, ["p"], ["great"], ["ok"]) == ([2.0], [1.0])


GOLD = SPEC  # continuous toy gold reward (tests/gold_toy.py)


def _gold_spec():
    return GOLD


@pytest.fixture(scope="module")
def tiny_ref(tmp_path_factory):
    from alignkit.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("ref") / "model", seed=1)


@pytest.mark.hw
def test_eval_on_tiny_models_matches_recomputation(tiny_model, tiny_ref, tmp_path, jsonl):
    """Every aggregate in eval.json is recomputed from samples.jsonl and an independent log-prob pass."""
    from transformers import AutoModelForCausalLM

    from alignkit.config import DataConfig, ModelConfig
    from alignkit.data.layout import pad_sequences
    from alignkit.data.tokenize import Encoder
    from alignkit.eval.evaluate import evaluate
    from alignkit.models.loading import load_tokenizer
    from alignkit.ops.logprobs import reference_logprobs

    prompts = jsonl("p.jsonl", [{"prompt": [{"role": "user", "content": f"q{i} e"}]} for i in range(3)])
    out = tmp_path / "ev"
    # fp32 (auto loads frozen models in bf16 where bf16 is native): the recomputation below is fp32
    m = evaluate({"model": {"name_or_path": str(tiny_model), "dtype": "float32"}, "reference": str(tiny_ref),
                  "data": {"path": str(prompts)}, "samples": 3, "gold": [_gold_spec()],
                  "rewards": ["length:max=4"], "generation": {"max_new_tokens": 12, "dtype": "model"},
                  "output": str(out)})
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    pol = [r for r in rows if r["tag"] == "policy"]
    ref = [r for r in rows if r["tag"] == "reference"]
    assert len(pol) == len(ref) == 9
    gold = [r["rewards"]["gold"] for r in pol]
    assert m["rewards/gold"] == pytest.approx(sum(gold) / 9)
    assert m["reference/rewards/gold"] == pytest.approx(sum(r["rewards"]["gold"] for r in ref) / 9)
    wins = [1.0 if a["reward"] > b["reward"] else 0.5 if a["reward"] == b["reward"] else 0.0 for a, b in zip(pol, ref)]
    assert m["win_rate/gold"] == pytest.approx(sum(wins) / 9)
    assert m["length/mean"] == pytest.approx(sum(r["tokens"] for r in pol) / 9)
    assert m["text/eos_rate"] == pytest.approx(sum(r["ended"] for r in pol) / 9)
    # KL from scratch: full-softmax log-probs of each response under both models
    enc = Encoder(load_tokenizer(ModelConfig(name_or_path=str(tiny_model))), DataConfig())
    pm = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    rm = AutoModelForCausalLM.from_pretrained(tiny_ref).eval()
    kls = []
    for r in pol:
        p_ids = enc.encode_prompt_ids([{"role": "user", "content": r["prompt"]}])
        b = pad_sequences([p_ids + r["response_ids"]], [[0] * len(p_ids) + [1] * len(r["response_ids"])], 0)
        with torch.no_grad():
            kls.append(float((reference_logprobs(pm, b).logps - reference_logprobs(rm, b).logps).sum()))
        assert r["kl"] == pytest.approx(kls[-1], abs=1e-4)
    assert m["kl/ref"] == pytest.approx(sum(kls) / 9, abs=1e-5)
    assert m["kl/ref_token"] == pytest.approx(sum(kls) / sum(r["tokens"] for r in pol), abs=1e-5)
    doc = json.loads((out / "eval.json").read_text())
    assert doc["judge"] == "gold" and doc["reference_is_policy"] is False
    line = json.loads((out / "metrics.jsonl").read_text())
    assert line["eval/rewards/gold"] == m["rewards/gold"] and line["eval/kl/ref"] == m["kl/ref"]

    # the same evaluation reusing these reference samples gives the same reference numbers
    out2 = tmp_path / "ev2"
    base = tmp_path / "base"
    mb = evaluate({"model": {"name_or_path": str(tiny_ref)}, "reference": str(tiny_ref), "data": {"path": str(prompts)},
                   "samples": 3, "gold": [_gold_spec()], "generation": {"max_new_tokens": 12}, "output": str(base)})
    assert mb["kl/ref"] == 0.0 and mb["win_rate/gold"] == 0.5  # the policy is its own reference
    m2 = evaluate({"model": {"name_or_path": str(tiny_model)}, "reference": str(tiny_ref),
                   "reference_samples": str(base / "samples.jsonl"), "data": {"path": str(prompts)}, "samples": 3,
                   "gold": [_gold_spec()], "generation": {"max_new_tokens": 12}, "output": str(out2)})
    assert m2["reference/rewards/gold"] == pytest.approx(mb["rewards/gold"])
    assert m2["rewards/gold"] == pytest.approx(m["rewards/gold"])  # same seed, same policy samples

    # the stored rewards are reused, not scored again: shift them in the file and the shift shows
    rows = [json.loads(x) for x in (base / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        r["rewards"]["gold"] += 1.0
    write_jsonl(base / "samples.jsonl", rows)
    common = {"model": {"name_or_path": str(tiny_model)}, "reference": str(tiny_ref), "samples": 3,
              "reference_samples": str(base / "samples.jsonl"), "data": {"path": str(prompts)},
              "generation": {"max_new_tokens": 12}}
    m3 = evaluate({**common, "gold": [_gold_spec()], "output": str(tmp_path / "ev3")})
    assert m3["reference/rewards/gold"] == pytest.approx(mb["rewards/gold"] + 1.0)
    # a different gold spec than the one that scored the file: scored again
    other = _gold_spec() + "@2"  # weight 2
    m4 = evaluate({**common, "gold": [other], "output": str(tmp_path / "ev4")})
    assert m4["reference/rewards/gold"] == pytest.approx(2.0 * mb["rewards/gold"])


def test_eval_cli_prints_table_and_writes_files(tiny_model, tmp_path, jsonl):
    from click.testing import CliRunner

    from alignkit.cli import build_cli

    prompts = jsonl("p.jsonl", [{"prompt": "hello"}, {"prompt": "world"}])
    res = CliRunner().invoke(build_cli(), ["eval", "--model", str(tiny_model), "--reference", str(tiny_model),
                                           "--data", str(prompts), "--gold", GOLD, "--samples", "2",
                                           "--output", str(tmp_path / "e"), "generation.max_new_tokens=6"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "rewards/gold" in res.output and "diversity/distinct_2" in res.output
    doc = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert doc["gold"] == [SPEC + "@1"] and doc["metrics"]["num_samples"] == 4.0


def test_vader_gold_reward_values():
    pytest.importorskip("vaderSentiment", reason="the demo's gold reward needs vaderSentiment (alignkit[demo])")
    from alignkit.rewards import build_reward

    gold = build_reward("python:alignkit.rewards.sentiment:vader_compound")
    scores = gold(["p"] * 4, ["What a wonderful day!", "This is a table.", "I hate rain.", "   "])
    assert scores == pytest.approx([0.6114, 0.0, -0.5719, 0.0])


@pytest.mark.hw
def test_eval_reference_runs_as_a_training_reference(tiny_ref):
    """Where bf16 is native and model.dtype is auto, the eval's reference keeps fp32 embeddings, norms
    and head with its linear layers stored in bf16, under bf16 autocast: bit for bit the log-probs of the
    fp32 model under autocast (what a training run's frozen reference gives), and it passes the shared
    layout probe. Elsewhere it is the plain model."""
    from alignkit.config import ModelConfig
    from alignkit.data.layout import pad_sequences
    from alignkit.eval.evaluate import _load_lm, _load_reference
    from alignkit.models.loading import native_bf16
    from alignkit.ops.logprobs import token_logprobs
    from alignkit.ops.packing import resolve_packing

    base = ModelConfig(name_or_path=str(tiny_ref))
    ref, precision = _load_reference(str(tiny_ref), base)
    seq = pad_sequences([[5, 6, 7, 8, 9], [5, 6, 10, 11]], [[0, 0, 1, 1, 1], [0, 0, 1, 1]], 0)
    if not native_bf16(next(ref.parameters()).device.type):
        assert isinstance(precision, contextlib.nullcontext)
        return
    head = ref.get_output_embeddings()
    linears = [m.weight.dtype for m in ref.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert linears and set(linears) == {torch.bfloat16}
    assert ref.get_input_embeddings().weight.dtype == torch.float32 and head.weight.dtype == torch.float32
    fp32 = _load_lm(str(tiny_ref), base.model_copy(update={"dtype": "float32"}))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = token_logprobs(fp32, seq).logps
    with torch.no_grad(), precision:
        got = token_logprobs(ref, seq).logps
    assert torch.equal(got, want)
    assert resolve_packing(ref, True, share_prompt=True).share_prompt
