"""Bias probes (`alignkit probe`) and the marker detectors they share with eval and online RL."""

import json
import random
import re
import zlib

import pytest

from alignkit.eval import markers as MK
from alignkit.eval.probes import (PERTURBATIONS, ProbeItem, holm, load_probe_items, perturb_items, probe,
                                  probe_results, score_pairs)

SCORERS = '''
import random, zlib
from alignkit.eval.markers import has_agreement

def length(prompts, completions, **kw):
    return [len(c.split()) / 10 for c in completions]

def short(prompts, completions, **kw):
    return [-len(c) / 100 for c in completions]

def agree(prompts, completions, **kw):
    return [float(has_agreement(c)) for c in completions]

def constant(prompts, completions, **kw):
    return [0.25] * len(completions)

def shout(prompt, response, rng):
    return {"upper": response.upper()} if len(response) > 60 else None
'''


@pytest.fixture
def scorers(tmp_path):
    path = tmp_path / "scorers.py"
    path.write_text(SCORERS)
    return path


def _by_probe(doc):
    return {r["probe"]: r for r in doc["probes"]}


# ----------------------------------------------------------------------------- detectors, hand-labelled
HEDGED = ["I might be wrong, but the answer is 4.", "I'm not entirely sure, but it is Paris.",
          "Perhaps the meeting is on Monday.", "To the best of my knowledge, it was 1945.",
          "It's possible that the file is locked.", "Please double-check this, as I may be mistaken.",
          "I believe it opens at nine."]
NOT_HEDGED = ["The answer is 4.", "Paris is the capital of France.", "I think you should use Python.",
              "Surely it works.", "Make sure the file is closed."]
REFUSALS = ["I'm sorry, but I can't help with that request.", "I cannot provide instructions for that.",
            "I apologize, but I am not able to provide that information.", "As an AI, I cannot do that.",
            "I must decline to answer this.", "Sorry, I won't assist with that.",
            "I\u2019m not able to help with this request.", "It would be inappropriate for me to answer that.",
            "That request is against my guidelines, so I will not continue."]
NOT_REFUSALS = ["Use kill -9 followed by the process id to stop it.", "It is safe to eat raw carrots.",
                "I'm sorry to hear that. Here is how to fix it: restart the router.",
                "You cannot divide by zero, so the expression is undefined.",
                "Sure! First, open the terminal. " + "x " * 120 + "I can't help but smile.", ""]


def test_hedge_detector_on_hand_labelled_examples():
    assert [MK.has_hedge(t) for t in HEDGED] == [True] * len(HEDGED)
    assert [MK.has_hedge(t) for t in NOT_HEDGED] == [False] * len(NOT_HEDGED)
    assert MK.hedge_count("Perhaps. I might be wrong. I'm not sure.") == 3


def test_refusal_detector_on_hand_labelled_examples():
    assert [MK.is_refusal(t) for t in REFUSALS] == [True] * len(REFUSALS)
    assert [MK.is_refusal(t) for t in NOT_REFUSALS] == [False] * len(NOT_REFUSALS)


def test_format_and_agreement_detectors():
    assert MK.has_list("Steps:\n- open it\n- close it") and MK.has_list("1. a\n2. b")
    assert not MK.has_list("- only one item") and not MK.has_list("a - b - c")
    assert MK.has_emphasis("This is **important**.") and MK.has_emphasis("## Answer\ntext")
    assert not MK.has_emphasis("2 * 3 * 4 = 24") and not MK.has_emphasis("#hashtag")
    assert MK.has_emoji("Done \u2705") and MK.has_emoji("\U0001F4A1 idea") and not MK.has_emoji("plain :)")
    assert MK.has_agreement("You're absolutely right, it is 5.") and MK.has_agreement("Great question! It is 5.")
    assert MK.has_agreement("I agree with you.") and not MK.has_agreement("The right answer is 5.")


def test_marker_correlations_hand_computed():
    # rewards 1, 2, 3 against hedges 0, 0, 1: r = 0.866; lengths 1, 2, 3: r = 1; lists constant: left out
    out = MK.marker_correlations([1.0, 2.0, 3.0], ["a", "b", "Perhaps c"], [1, 2, 3])
    assert out["rewards/corr_length"] == pytest.approx(1.0)
    assert out["rewards/corr_hedging"] == pytest.approx(0.8660254)
    assert "rewards/corr_list" not in out and "rewards/corr_agreement" not in out


# ----------------------------------------------------------------------------- perturbations
def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def test_content_kept_perturbations_keep_every_word():
    items, skipped = load_probe_items("builtin:probe_bias")
    assert len(items) == 32 and skipped == 0 and sum(it.opinion is not None for it in items) == 10
    pairs = perturb_items(items, list(PERTURBATIONS.values()), seed=0)
    variants = {(p.probe, p.variant) for p in pairs}
    assert ("sycophancy", "agree_with_opinion") in variants and ("format", "bullets") in variants
    for p in pairs:
        orig, pert = _words(p.original), _words(p.perturbed)
        if PERTURBATIONS[p.probe].content_kept:
            rest = list(pert)
            for w in orig:  # every word of the original, in order, in the perturbed text
                assert w in rest, (p.probe, p.variant, w)
                rest = rest[rest.index(w) + 1:]
            assert len(pert) >= len(orig)
        else:
            assert MK.is_refusal(p.perturbed)
    # one probe's pair does not depend on which other items are perturbed
    again = perturb_items(items[5:6], [PERTURBATIONS["length"]], seed=0)
    assert [p.perturbed for p in again] == [p.perturbed for p in pairs if p.probe == "length" and p.item == items[5].id]


def test_holm_hand_values():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, float("nan"), 0.001]) == pytest.approx([0.5, float("nan"), 0.002], nan_ok=True)


# ----------------------------------------------------------------------------- scorers with a known bias
def test_length_scorer_is_flagged_with_the_right_sign(tmp_path, scorers):
    doc = probe(rewards=[f"python:{scorers}:length"], output=str(tmp_path / "long"))
    r = _by_probe(doc)
    assert r["length"]["verdict"] == "biased" and r["length"]["direction"] == "prefers perturbed"
    assert r["length"]["shift"]["lo"] > 0 and r["length"]["rate"]["mean"] == 1.0
    # a refusal is shorter than the answers: a length scorer prefers the answer, which is no bias
    assert r["refusal"]["shift"]["mean"] < 0 and r["refusal"]["verdict"] == "not shown"
    assert r["length"]["test"].startswith("paired two-sided t test")
    # the opposite bias (pays for brevity) is flagged too, with the opposite sign
    doc = probe(rewards=[f"python:{scorers}:short"], output=str(tmp_path / "short"), probes=["length"])
    (r,) = doc["probes"]
    assert r["verdict"] == "biased" and r["direction"] == "prefers original" and r["shift"]["hi"] < 0
    assert r["rate"]["mean"] == 0.0


def test_agreement_scorer_is_flagged_for_sycophancy_only(tmp_path, scorers):
    doc = probe(rewards=[f"python:{scorers}:agree"], output=str(tmp_path / "p"))
    r = _by_probe(doc)
    assert r["sycophancy"]["verdict"] == "biased" and r["sycophancy"]["shift"]["mean"] == pytest.approx(1.0)
    assert {k for k, v in r.items() if v["verdict"] == "biased"} == {"sycophancy"}
    variants = {v["variant"]: v for v in r["sycophancy"]["variants"]}
    assert variants["agree_with_opinion"]["n_pairs"] == 10 and variants["flattering_opener"]["n_pairs"] == 32
    saved = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert saved["probes"] == json.loads(json.dumps(doc["probes"]))
    assert sum(1 for _ in open(tmp_path / "p" / "pairs.jsonl")) == sum(x["n_pairs"] for x in doc["probes"])


def test_constant_scorer_is_never_flagged(tmp_path, scorers):
    import alignkit

    doc = alignkit.probe(rewards=[f"python:{scorers}:constant"], output=str(tmp_path / "p"))  # the public API
    assert all(r["verdict"] == "not shown" and r["p_value"] == 1.0 for r in doc["probes"])


class NoiseScorer:
    """Unbiased: a score that is a fixed random function of prompt and response (seeded), blind to the
    probes. (Keyed by the response alone, the two fixed refusal texts get one score each for every
    prompt, and the refusal probe then reports that draw, rightly, as a preference of this scorer:
    23 of 100 seeds.)"""

    def __init__(self, seed):
        self.seed = seed

    def __call__(self, prompts, completions, rows=None):
        return [random.Random(zlib.crc32(f"{self.seed}:{p}:{c}".encode())).gauss(0, 1)
                for p, c in zip(prompts, completions)]


def test_unbiased_scorer_false_positive_rate_over_seeds():
    """40 seeds of a noise scorer: the share of runs with any probe flagged (family-wise, Holm) stays
    near alpha = 0.05 (measured over seeds 0-99: 4 of 100 runs, 5 of 500 probe verdicts)."""
    items, _ = load_probe_items("builtin:probe_bias")
    probes = list(PERTURBATIONS.values())
    pairs_template = perturb_items(items, probes, seed=0)
    runs_flagged, verdicts_flagged, total = 0, 0, 0
    for seed in range(40):
        pairs = [type(p)(**{**p.__dict__, "scores": {}}) for p in pairs_template]
        score_pairs(pairs, NoiseScorer(seed))
        res = probe_results(pairs, "pointwise", 0.05, {p.name: p.content_kept for p in probes})
        flagged = [r for r in res if r["verdict"] == "biased"]
        runs_flagged += bool(flagged)
        verdicts_flagged += len(flagged)
        total += len(res)
    assert runs_flagged / 40 <= 0.1, runs_flagged
    assert verdicts_flagged / total <= 0.05, verdicts_flagged


class FakeJudge:
    """P(A) = sigmoid(bias + s(A) - s(B)), s = words / 10 * length_weight."""

    def __init__(self, bias=0.0, length_weight=0.0):
        self.bias, self.w = bias, length_weight

    def first_probs(self, queries):
        import math

        return [1 / (1 + math.exp(-(self.bias + self.w * (len(q.first.split()) - len(q.second.split())) / 10)))
                for q in queries]


def test_pairwise_judge_position_and_length(tmp_path):
    doc = probe(output=str(tmp_path / "a"), scorer=FakeJudge(bias=0.8))
    r = _by_probe(doc)
    assert doc["mode"] == "pairwise"
    # a pure position bias: the order-averaged verdict is exactly a tie, so no content probe moves
    assert r["position"]["verdict"] == "biased" and r["position"]["direction"] == "prefers position A"
    assert r["position"]["shift"]["mean"] == pytest.approx(1 / (1 + 2.718281828 ** -0.8) - 0.5, abs=1e-6)
    assert all(r[k]["verdict"] == "not shown" and r[k]["shift"]["mean"] == pytest.approx(0, abs=1e-12)
               for k in PERTURBATIONS)
    doc = probe(output=str(tmp_path / "b"), scorer=FakeJudge(length_weight=1.0), probes=["length", "position"])
    r = _by_probe(doc)
    assert r["length"]["verdict"] == "biased" and r["length"]["shift"]["lo"] > 0
    assert r["position"]["verdict"] == "not shown"


def test_cli_pairs_file_perturbation_and_escaped_report(tmp_path, scorers):
    from alignkit.cli import build_cli

    pairs = tmp_path / "mine.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"q{i}", "original": "<b>short</b>",
                                         "perturbed": "<script>alert(1)</script> much longer answer here"}) + "\n"
                             for i in range(6)))
    out = tmp_path / "p"
    build_cli().main(["probe", "--reward", f"python:{scorers}:length", "--pairs", str(pairs), "--perturb",
                      f"{scorers}:shout", "--probe", "length", "--max-items", "8", "--output", str(out)],
                     standalone_mode=False)
    doc = json.loads((out / "probe.json").read_text())
    r = _by_probe(doc)
    assert set(r) == {"length", "mine", "shout"} and r["length"]["n_items"] == 8
    assert r["mine"]["n_pairs"] == 6 and r["mine"]["rate"]["mean"] == 1.0
    html = (out / "report.html").read_text()
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert 'data-probe="length"' in html and "biased" in html


def test_bad_pairs_row_names_file_row_and_field(tmp_path, scorers):
    from alignkit.data.load import DataError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "original": "a", "perturbed": "b"}) + "\n"
                   + json.dumps({"prompt": "p", "original": "a"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl, row 2: field 'perturbed'"):
        probe(rewards=[f"python:{scorers}:length"], pairs=[str(bad)], probe_set=None, output=str(tmp_path / "o"))


def test_data_option_probes_user_responses_and_audits_preferences(tmp_path, scorers):
    rng = random.Random(0)
    rows = []
    for i in range(20):
        base = f"The answer to question {i} is {rng.randint(1, 99)}."
        rows.append({"prompt": f"Question {i}?", "chosen": base + " It is a common question with a short answer.",
                     "rejected": base})
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = probe(rewards=[f"python:{scorers}:constant"], data=[str(data)], probe_set=None, output=str(tmp_path / "o"))
    assert doc["sources"][str(data)] == {"items": 20, "skipped": 0}
    audit = {a["marker"]: a for a in doc["data_audit"][str(data)]["markers"]}
    assert audit["length"]["verdict"] == "better" and audit["length"]["diff"]["mean"] == pytest.approx(9.0)
    assert audit["length"]["rate_chosen_more"]["mean"] == 1.0
    assert "Data audit" in (tmp_path / "o" / "report.html").read_text()


def test_position_probe_needs_a_judge(tmp_path, scorers):
    from alignkit.config import ConfigError

    with pytest.raises(ConfigError, match="position probe needs a pairwise judge"):
        probe(rewards=[f"python:{scorers}:length"], probes=["position"], output=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="unknown probe"):
        probe(rewards=[f"python:{scorers}:length"], probes=["verbosity"], output=str(tmp_path / "o"))


@pytest.mark.slow
def test_reward_model_trained_on_longer_chosen_is_flagged_for_length(tmp_path, tiny_model):
    """A tiny reward model trained where the chosen answer is always the longer one learns to pay for
    length, and the length probe says so (right sign). Six steps; 50 s on a loaded 2-core machine."""
    from alignkit.train.reward import train_rm

    rng = random.Random(0)
    words = "the cat sat on a mat and ran to big red box".split()
    rows = []
    for _ in range(48):
        short = " ".join(rng.choice(words) for _ in range(rng.randint(2, 5)))
        extra = " ".join(rng.choice(words) for _ in range(rng.randint(4, 8)))
        rows.append({"prompt": "q:", "chosen": f"{short} {extra}", "rejected": short})
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train_rm(**{"model.name_or_path": str(tiny_model), "data.path": str(data), "train.epochs": 1,
                "train.batch_size": 8, "optim.lr": 3e-3, "log.progress": False}, output=str(tmp_path / "rm"))
    items = [{"id": f"i{i}", "prompt": "q:", "response": " ".join(rng.choice(words) for _ in range(4)) + "."}
             for i in range(24)]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    doc = probe(rewards=[f"model:{tmp_path / 'rm' / 'model'}"], probe_set=str(tmp_path / "items.jsonl"),
                probes=["length"], output=str(tmp_path / "probe"))
    (r,) = doc["probes"]
    assert r["verdict"] == "biased" and r["direction"] == "prefers perturbed" and r["rate"]["mean"] > 0.8, r


def test_data_rows_of_every_shape_and_skipped_rows_counted(tmp_path):
    rows = [{"prompt": "p1", "completion": "c1"},
            {"messages": [{"role": "user", "content": "p2"}, {"role": "assistant", "content": "c2"}]},
            {"prompt": "p3", "chosen": [{"role": "assistant", "content": "c3"}], "rejected": "r3"},
            {"prompt": "p4"}, {"prompt": "p5", "response": "   "}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, skipped = load_probe_items(str(path))
    assert [(it.prompt, it.response) for it in items] == [
        ("p1", "c1"), ([{"role": "user", "content": "p2"}], "c2"), ("p3", "c3")]
    assert skipped == 2 and items[0].id == "d:1"
