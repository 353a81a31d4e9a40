"""LLM judge: order swapping cancels position bias, aggregation and counting, the next-token path on a
tiny model, soft labels reaching the losses, and the judge: reward kind."""

import json
import math

import pytest
import torch

from alignkit.config import DataConfig, ModelConfig
from alignkit.feedback.judge import (DEFAULT_TEMPLATE, JudgeOptions, JudgeQuery, LMJudge, Verdict, decide,
                                     judge_both_orders, load_template)
from alignkit.feedback.label import label_pairs, parse_pairs
from alignkit.data.load import DataReport


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


class FakeJudge:
    """P(position A better) = sigma(s(first) - s(second) + bias), s = number of '+' characters."""

    def __init__(self, bias):
        self.bias, self.calls = bias, 0

    def first_probs(self, queries):
        self.calls += 1
        return [sig(q.first.count("+") - q.second.count("+") + self.bias) for q in queries]


def pair(a, b, prompt="p"):
    return {"row": 1, "prompt": prompt, "a": a, "b": b, "given": None, "extra": {}}


def test_position_bias_cancels_for_equal_responses():
    judge = FakeJudge(bias=1.5)
    (v,) = judge_both_orders(judge, [JudgeQuery("p", "x+", "y+")])  # equal quality, different text
    assert judge.calls == 1  # both orders in one batched call
    assert v.p_ab == pytest.approx(sig(1.5)) and v.p_ba == pytest.approx(sig(1.5))  # 0.8176: biased
    assert v.prob_a == pytest.approx(0.5, abs=1e-12)  # the average is exactly unbiased
    assert not v.consistent  # each order prefers position A, i.e. a different response
    assert v.position_bias == pytest.approx(sig(1.5) - 0.5)


def test_order_average_by_hand_and_antisymmetry():
    judge = FakeJudge(bias=1.0)
    ab, ba = judge_both_orders(judge, [JudgeQuery("p", "+++", ""), JudgeQuery("p", "", "+++")])
    # d = 3: p = (sigma(3 + 1) + 1 - sigma(-3 + 1)) / 2 = (0.982014 + 0.880797) / 2
    assert ab.prob_a == pytest.approx((sig(4) + 1 - sig(-2)) / 2) == pytest.approx(0.931406, abs=1e-6)
    assert ab.consistent and ba.consistent
    assert ab.prob_a + ba.prob_a == pytest.approx(1.0)  # p(a > b) = 1 - p(b > a)
    # a single order would have said 0.982 and 0.119: the bias shifts both up
    assert ab.p_ab == pytest.approx(0.982014, abs=1e-6) and ba.p_ab == pytest.approx(sig(-2))


@pytest.mark.parametrize("mode, kept, ties", [("drop", 2, 0), ("tie", 5, 3), ("keep", 5, 0)])
def test_inconsistent_verdicts_are_counted_and_handled(mode, kept, ties):
    # quality differences d = 3, -3, 0, 0, 0 at position bias 1.0: for d = 0 both orders prefer position A,
    # i.e. each order prefers a different response: inconsistent
    pairs = [pair("+++", "a"), pair("b", "+++"), pair("x", "y"), pair("+x", "z+"), pair("++", "++c")]
    rows, summary = label_pairs(FakeJudge(bias=1.0), pairs, JudgeOptions(inconsistent=mode))
    assert summary["pairs_judged"] == 5
    assert summary["inconsistent"] == 3  # d = 0 three times (x/y, +x/z+, ++/++c)
    assert summary["pairs_kept"] == len(rows) == kept
    assert summary["ties_marked"] == ties
    assert summary.get("dropped", {}).get("inconsistent_dropped", 0) == (3 if mode == "drop" else 0)
    assert summary["consistency_rate"] == pytest.approx(2 / 5)
    # hand values: bias per pair (sigma(d+1) + sigma(1-d))/2 - 0.5, d = 3, -3, 0, 0, 0
    expect_bias = (2 * ((sig(4) + sig(-2)) / 2 - 0.5) + 3 * (sig(1) - 0.5)) / 5
    assert summary["position_bias"] == pytest.approx(expect_bias)
    first, second = rows[0], rows[1]
    assert (first["chosen"], first["rejected"]) == ("+++", "a")
    assert (second["chosen"], second["rejected"]) == ("+++", "b")  # oriented: the better one is chosen
    assert first["soft_label"] == second["soft_label"] == pytest.approx(0.931406, abs=1e-6)
    if mode == "tie":
        assert [r["soft_label"] for r in rows[2:]] == [0.5, 0.5, 0.5]
        assert rows[2]["chosen"] == "x" and rows[2]["judge"]["status"] == "tie"
    if mode == "keep":
        assert all(r["soft_label"] == pytest.approx(0.5) for r in rows[2:])
        assert {r["judge"]["status"] for r in rows[2:]} == {"inconsistent_kept"}


def test_min_confidence_and_clamp():
    v = Verdict(0.62, 0.46)  # consistent, p = (0.62 + 0.54) / 2 = 0.58
    assert decide(v).soft_label == pytest.approx(0.58)
    assert decide(v, min_confidence=0.1).status == "undecided"
    assert decide(Verdict(0.99, 0.01), max_label=0.6).soft_label == 0.6
    b = decide(Verdict(0.2, 0.9))  # prefers b: oriented, soft label >= 0.5
    assert not b.a_chosen and b.soft_label == pytest.approx(0.85)
    assert decide(Verdict(float("nan"), 0.3)).status == "too_long"


def test_parse_pairs_shapes_and_bad_rows():
    rows = [(1, {"prompt": "p", "response_a": "x", "response_b": "y", "id": 7}),
            (2, {"prompt": "p", "chosen": "c", "rejected": "r"}),
            (3, {"prompt": "p", "responses": ["u", "v", "w"]}),
            (4, {"prompt": "p", "response_a": "x"}),
            (5, {"prompt": "p", "response_a": "x", "response_b": "x"}),
            (6, {"question": "?"})]
    report = DataReport(source="f.jsonl")
    pairs = parse_pairs(rows, report, "reference")
    assert len(pairs) == 1 + 1 + 3 and pairs[1]["given"] is True and pairs[0]["extra"] == {"id": 7}
    assert report.n_dropped == 3
    assert {(s["row"], s.get("field")) for s in report.samples} == {(4, "response_b"), (5, "response_b"), (6, None)}


def test_template_validation(tmp_path):
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \['answer'\]"):
        JudgeOptions(template="{prompt} {response_a} {response_b} {answer}")
    with pytest.raises(ValueError, match=r"needs \{response_b\}"):
        JudgeOptions(template="{prompt} {response_a}")
    with pytest.raises(ValueError, match="neither a file nor a template"):
        JudgeOptions(template=str(tmp_path / "missing.txt"))
    f = tmp_path / "t.txt"
    f.write_text("Q: {prompt}\n1) {response_a}\n2) {response_b}\nBetter:")
    assert load_template(str(f)).startswith("Q: ")
    with pytest.raises(ValueError, match="two different"):
        JudgeOptions(options=["A", "A"])


# ----------------------------------------------------------------------------- the real next-token path

@pytest.fixture(scope="module")
def lm(tiny_model):
    from alignkit.models.loading import load_causal_lm, load_tokenizer

    mcfg = ModelConfig(name_or_path=str(tiny_model))
    return load_causal_lm(mcfg).eval(), load_tokenizer(mcfg)


def test_next_token_probabilities_on_a_tiny_model(lm):
    model, tok = lm
    judge = LMJudge(model, tok, JudgeOptions())
    assert tok.convert_ids_to_tokens(judge.option_ids) == ["A", "B"]
    queries = [JudgeQuery("hi", "hello there", "go"), JudgeQuery("a much longer prompt here", "x", "yz"),
               JudgeQuery([{"role": "user", "content": "q"}], "1", "2")]
    probs = judge.first_probs(queries)
    # by hand: softmax over the two option logits at the last position of the rendered prompt
    for q, p in zip(queries, probs):
        ids = torch.tensor([judge.encode(judge.render(q))])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        pa = torch.softmax(logits[judge.option_ids], -1)[0].item()
        assert p == pytest.approx(pa, abs=1e-5)  # batching with left padding changes nothing
        assert 0 < p < 1
    # the two options' probabilities sum to 1: asking for B first gives 1 - P(A)
    flipped = LMJudge(model, tok, JudgeOptions(options=["B", "A"])).first_probs(queries)
    assert [a + b for a, b in zip(probs, flipped)] == pytest.approx([1.0] * 3, abs=1e-6)
    # swapping the orders: (a, b) and (b, a) are the same two questions, so the verdicts mirror
    v_ab, v_ba = judge_both_orders(judge, [JudgeQuery("hi", "hello there", "go"), JudgeQuery("hi", "go", "hello there")])
    assert v_ab.p_ab == pytest.approx(v_ba.p_ba, abs=1e-6) and v_ab.p_ba == pytest.approx(v_ba.p_ab, abs=1e-6)
    assert v_ab.prob_a + v_ba.prob_a == pytest.approx(1.0, abs=1e-6)
    # identical responses: exactly 0.5 whatever the judge's bias
    (same,) = judge_both_orders(judge, [JudgeQuery("hi", "same", "same")])
    assert same.prob_a == pytest.approx(0.5, abs=1e-7)


def test_too_long_prompts_are_dropped_and_counted(lm):
    model, tok = lm
    judge = LMJudge(model, tok, JudgeOptions())
    n_short = len(judge.encode(judge.render(JudgeQuery("short", "other", "p"))))
    assert n_short > len(DEFAULT_TEMPLATE)  # one token per character here
    opts = JudgeOptions(max_length=n_short + 50, inconsistent="keep")  # a random judge is mostly inconsistent
    _, summary = label_pairs(LMJudge(model, tok, opts), [pair("short", "other"), pair("x" * 200, "y")], opts)
    assert summary["dropped"] == {"too_long": 1} and summary["pairs_kept"] == 1 and summary["pairs_judged"] == 2


def test_reference_placeholder_needs_the_field(lm):
    model, tok = lm
    opts = JudgeOptions(template="Gold: {reference}\n{prompt}\nA: {response_a}\nB: {response_b}\n")
    judge = LMJudge(model, tok, opts)
    assert 0 < judge.first_probs([JudgeQuery("p", "a", "b", reference="42")])[0] < 1
    with pytest.raises(ValueError, match="'reference' field"):
        judge.first_probs([JudgeQuery("p", "a", "b")])


# ----------------------------------------------------------------------------- soft labels reach the losses

def test_soft_labels_flow_into_dpo_and_rm_losses(tmp_path, lm, tiny_model):
    from alignkit.data import prepare
    from alignkit.data.collate import collate_pairs
    from alignkit.data.load import write_jsonl
    from alignkit.losses.reward import bradley_terry_loss
    from alignkit.models.loading import load_causal_lm
    from alignkit.train.preference import DPOOptions, PreferenceTask
    from alignkit.train.reference import ModelReference

    model, tok = lm
    # the judge writes soft labels: 0.931406 for the clear pair, 0.5 for the tie
    rows, _ = label_pairs(FakeJudge(1.0), [pair("+++", "a"), pair("x", "y")], JudgeOptions(inconsistent="tie"))
    path = tmp_path / "prefs.jsonl"
    assert write_jsonl(path, rows) == 2
    items = prepare("preference", DataConfig(path=str(path)), tok).train
    assert [it["soft_label"] for it in items] == pytest.approx([0.931406, 0.5], abs=1e-6)
    batch = collate_pairs(items, tok.pad_token_id)

    policy = load_causal_lm(ModelConfig(name_or_path=str(tiny_model)))
    task = PreferenceTask(DPOOptions(loss="dpo", beta=0.5), tok.pad_token_id,
                          ModelReference(load_causal_lm(ModelConfig(name_or_path=str(tiny_model)))))

    def grad_norm(b):
        policy.zero_grad()
        loss, _ = task.loss(policy, b)
        loss.backward()
        return loss.item(), sum(p.grad.norm() ** 2 for p in policy.parameters() if p.grad is not None).sqrt().item()

    tie = collate_pairs(items[1:], tok.pad_token_id)
    loss_tie, g_tie = grad_norm(tie)
    assert loss_tie == pytest.approx(math.log(2), abs=1e-5) and g_tie < 1e-6  # policy == reference: h = 0
    hard = collate_pairs([dict(items[1], soft_label=1.0)], tok.pad_token_id)
    _, g_hard = grad_norm(hard)
    assert g_hard > 1e-3  # a hard label pushes the margin even at h = 0
    loss_soft, _ = grad_norm(batch)
    loss_hard, _ = grad_norm(collate_pairs([dict(x, soft_label=1.0) for x in items], tok.pad_token_id))
    assert loss_soft == pytest.approx(loss_hard) == pytest.approx(2 * math.log(2), abs=1e-5)  # equal at h = 0

    # the gradient on the margin is beta (sigma(beta h) - p): zero for p = 0.5 at h = 0, -beta/2 for p = 1
    pc = torch.tensor([0.0, 0.0], requires_grad=True)
    from alignkit.losses import dpo_loss

    dpo_loss(pc, torch.zeros(2), torch.zeros(2), torch.zeros(2), beta=0.5, labels=batch.soft_label).losses.sum().backward()
    assert pc.grad.tolist() == pytest.approx([0.5 * (0.5 - 0.931406), 0.0], abs=1e-6)
    # reward model loss: the same with rewards r_w - r_l; away from 0 the soft loss differs from the hard one
    rw = torch.tensor([2.0, 2.0], requires_grad=True)
    soft = bradley_terry_loss(rw, torch.zeros(2), labels=batch.soft_label).losses
    soft.sum().backward()
    assert rw.grad.tolist() == pytest.approx([sig(2) - 0.931406, sig(2) - 0.5], abs=1e-6)
    hard_rm = bradley_terry_loss(rw.detach(), torch.zeros(2)).losses
    assert soft[1].item() == pytest.approx(0.5 * (-math.log(sig(2)) - math.log(sig(-2))), abs=1e-6)
    assert soft[1].item() > hard_rm[1].item() + 0.9  # the tie penalizes a confident margin


# ----------------------------------------------------------------------------- judge: reward kind

def test_judge_reward_kind(tiny_model):
    from alignkit.rewards import REWARD_KINDS, build_reward

    assert "judge" in REWARD_KINDS
    reward = build_reward([{"kind": "judge", "arg": str(tiny_model), "options": {"reference_field": "answer"}}])
    prompts, comps = ["q1", "q2", "q3"], ["42", "7", "abc"]
    rows = [{"answer": "42"}, {"answer": "8"}, {"answer": "abd"}]
    scores = reward(prompts, comps, rows)
    assert scores[0] == pytest.approx(0.5, abs=1e-6)  # the completion is the reference: exactly even
    assert all(0 < s < 1 for s in scores)
    logodds = build_reward([f"judge:{tiny_model};reference_field=answer,output=logodds"])(prompts, comps, rows)
    assert logodds == pytest.approx([math.log(s / (1 - s)) for s in scores], abs=1e-4)
    with pytest.raises(ValueError, match="has no field 'answer'"):
        reward(["q"], ["x"], [{}])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]"):
        build_reward([f"judge:{tiny_model};bogus=1"])

    # no reference field: the reference policy's greedy answer, generated once per prompt and cached
    ref = build_reward([{"kind": "judge", "arg": str(tiny_model), "options": {"max_new_tokens": 6}}])
    source = ref.components[0][2]
    s1 = ref(["q1", "q1", "q2"], ["a", "b", "c"], [{}, {}, {}])
    assert len(source.cache) == 2 and all(0 < s < 1 for s in s1)
    greedy = source.cache[json.dumps("q1")]
    assert ref(["q1"], [greedy], [{}]) == pytest.approx([0.5], abs=1e-6)  # its own answer ties
    assert len(source.cache) == 2


# ----------------------------------------------------------------------------- CLI end to end

def test_cli_judge_then_rm_and_dpo(tmp_path, tiny_model, jsonl):
    from alignkit.cli import build_cli

    data = jsonl("pairs.jsonl", [
        {"prompt": "Say hi", "response_a": "hello there", "response_b": "go away", "id": "r1"},
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Pick"}], "responses": ["x", "y", "z"]},
        {"prompt": "bad row"},
    ])
    out = tmp_path / "judged"
    build_cli().main(["judge", "--model", str(tiny_model), "--data", str(data), "--output", str(out),
                      "--inconsistent", "tie"], standalone_mode=False)
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    assert summary["pairs_judged"] == 5 and summary["rows_dropped"] == 1 and len(rows) == 5  # tie mode keeps all
    assert summary["ties_marked"] == summary["inconsistent"]
    assert "agreement_with_given_labels" in summary
    assert rows[0]["id"] == "r1" and {"p_ab", "p_ba", "prob_a", "consistent", "status"} <= set(rows[0]["judge"])
    assert all(0.5 <= r["soft_label"] <= 1 for r in rows)
    for cmd in ("rm", "dpo"):  # the output is training data for both, soft labels included
        build_cli().main([cmd, "--model", str(tiny_model), "--data", str(out / "preferences.jsonl"), "--output",
                          str(tmp_path / cmd), "--max-steps", "1", "train.batch_size=5", "log.progress=false",
                          "log.samples=0"], standalone_mode=False)
        assert json.loads((tmp_path / cmd / "summary.json").read_text())["steps"] == 1
