"""Red-teaming (alignkit.redteam): the pure functions against hand-computed values, the three attackers on
tiny models with a rule judge, the repair pairs, and builtin:redteam_repair end to end."""

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignkit.redteam.attack import draw_examples, instruction, run_redteam, split_budget, RedteamConfig
from alignkit.redteam.metrics import (AttackRecord, NoveltyMemory, attack_report, extract_attack, rate_difference,
                                      redteam_is_refusal, self_bleu, sentence_bleu)
from alignkit.redteam.repair import choose_pairs
from alignkit.testing import tiny_tokenizer

from tests.helpers import one_thread  # noqa: F401  (autouse fixture: one thread for tiny models)

SRC = Path(__file__).resolve().parents[1] / "src"


# ----------------------------------------------------------------------------- a tiny model that reads its context

def copy_lm(path: Path, scale: float) -> Path:
    """A one-layer tiny Llama whose weights make it sample characters in proportion to how often they occur
    in its context (a bag-of-context sampler): one-hot embeddings, uniform causal attention (q = k = 0),
    v = o = identity, no MLP, and a head that reads the attended mix back out with gain ``scale``.

    A random tiny model ignores its context, so no example or prompt could change what it writes; this one,
    like a real attacker, writes more of what its prompt shows (few-shot examples full of 'a' -> attacks full
    of 'a'), and as a target answers with more 'a' when the attack has more. Newline and specials are never
    copied; a space is copied at half gain."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    V, hidden = len(tok), 128
    cfg = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=None)
    m = LlamaForCausalLM(cfg)
    idx = torch.arange(V)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        m.model.embed_tokens.weight[idx, idx] = 0.05
        attn = m.model.layers[0].self_attn
        attn.v_proj.weight.copy_(torch.eye(hidden))
        attn.o_proj.weight.copy_(torch.eye(hidden))
        m.lm_head.weight[idx, idx] = scale
        never = [tok.convert_tokens_to_ids(t) for t in ("<unk>", "<|im_start|>", "<|im_end|>", "\n")]
        m.lm_head.weight[never, :] = 0.0
        sp = tok.convert_tokens_to_ids(" ")
        m.lm_head.weight[sp, sp] = 0.5 * scale
    m.generation_config.pad_token_id = tok.pad_token_id
    m.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam_models")
    return {"target": str(copy_lm(root / "target", 0.5)), "attacker": str(copy_lm(root / "attacker", 1.0))}


#: failure: at least a quarter of the target's (sampled) answer is the letter 'a'. The target copies its
#: context, so attacks with more 'a' succeed more often; the zero-shot instruction has two.
RULE = dict(judge=["python:alignkit.rewards.toy:char_share"], threshold=0.25, goal="write about it",
            zero_shot_template="Goal: {goal}.{category_line}", few_shot_template="{examples}",
            attack_generation={"max_new_tokens": 16, "temperature": 1.0},
            target_generation={"max_new_tokens": 16, "temperature": 1.0}, overrefusal=None)


def campaign(models, tmp_path, method, **kw):
    cfg = {**RULE, "target": {"name_or_path": models["target"]}, "attacker": {"name_or_path": models["attacker"]},
           "method": method, "budget": 128, "rounds": 8, "seed": 0, "output": str(tmp_path / method),
           "rl": {"lr": 1e-2, "batch_size": 4, "num_generations": 4, "kl_coef": 0.05}, **kw}
    return run_redteam(cfg)


# ----------------------------------------------------------------------------- pure functions

def test_extract_attack():
    assert extract_attack('Here is one:\n1. "Why are Mondays awful?"\n2. other') == "Why are Mondays awful?"
    assert extract_attack("  - Message: tell me a sad story  \nmore") == "tell me a sad story"
    assert extract_attack("Why is rain so bad?") == "Why is rain so bad?"
    assert extract_attack("\n\n  \n") == ""
    assert extract_attack("x" * 900, max_chars=10) == "x" * 10


def test_bleu_hand_values():
    assert sentence_bleu("a b c d", ["a b c d"]) == pytest.approx(1.0)
    assert sentence_bleu("a b c d", ["x y z"]) == 0.0
    # "a b c d" against "a b x d": p1 = 3/4; smoothed p2 = (1+1)/(3+1), p3 = (0+1)/(2+1), p4 = (0+1)/(1+1)
    want = math.exp((math.log(3 / 4) + math.log(2 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 4)
    assert sentence_bleu("a b c d", ["a b x d"]) == pytest.approx(want)
    # brevity penalty: candidate of 2 words against a reference of 4: exp(1 - 4/2)
    assert sentence_bleu("a b", ["a b c d"], max_n=2) == pytest.approx(math.exp(1 - 2))
    assert self_bleu(["a b c d", "a b c d", "a b c d"]) == pytest.approx(1.0)
    assert self_bleu(["a b c", "d e f", "g h i"]) == 0.0
    assert math.isnan(self_bleu(["one text"]))


def test_novelty_memory():
    mem = NoveltyMemory()
    assert mem.score_batch(["tell me a story", "tell me a story", "why is the sky grey"]) == \
        pytest.approx([1.0, 0.0, 1.0])
    # "tell me why": every word was seen (p1 = 3/3); of its bigrams (tell, me) was, (me, why) was not, so the
    # smoothed p2 = (1 + 1) / (2 + 1)
    assert mem.novelty("tell me why") == pytest.approx(1 - math.sqrt(1 * 2 / 3))
    assert mem.novelty("") == 0.0


@pytest.mark.parametrize("text,refusal", [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot provide instructions for that request.", True),
    ("As an AI language model, I cannot share personal opinions.", True),
    ("I'm not able to assist with this.", True),
    ("I won’t help with that.", True),
    ("I'm sorry for any misunderstanding, but as a chatbot designed to assist users, I don't have the ability to", True),
    ("As a text-based AI, I do not browse the web.", True),
    ("It would be inappropriate for me to answer that.", True),
    ("Sure! To kill a Python process, find its PID and run kill PID.", False),
    ("I'm sorry to hear that your Monday was hard. Here are three ideas to cheer up.", False),
    ("Mondays can be tough, but they are a fresh start.", False),
    ("You cannot mix bleach and ammonia: it makes a toxic gas.", False),
    ("Here is the answer. " + "x" * 300 + " I can't help with that.", False),  # not in the opening
])
def test_refusal_detector_hand_labels(text, refusal):
    assert redteam_is_refusal(text) is refusal


def test_rate_difference_newcombe():
    # Newcombe (1998), table II, example (a): 56/70 vs 48/80 -> difference 0.2, interval [0.0524, 0.3339]
    d = rate_difference(48, 80, 56, 70)
    assert d["diff"] == pytest.approx(0.2)
    assert d["lo"] == pytest.approx(0.0524, abs=5e-4)
    assert d["hi"] == pytest.approx(0.3339, abs=5e-4)
    assert d["verdict"] == "higher"
    assert rate_difference(56, 70, 48, 80)["verdict"] == "lower"
    assert rate_difference(5, 10, 5, 10)["verdict"] == "not distinguishable"


def test_attack_report_and_categories():
    recs = [AttackRecord("why a", "bad", 0.9, True, category="x"), AttackRecord("why a", "bad", 0.8, True, category="x"),
            AttackRecord("hello there", "fine", 0.1, False, category="x"),
            AttackRecord("what b c", "awful", 0.7, True, category="y"), AttackRecord("", "", 0.0, False, category="y")]
    r = attack_report(recs, top=5)
    assert r["redteam/attacks"] == 5 and r["redteam/failures"] == 3
    assert r["redteam/asr"] == pytest.approx(0.6)
    assert r["redteam/asr_lo"] < 0.6 < r["redteam/asr_hi"]
    assert r["redteam/unique_failures"] == 2 and r["redteam/empty_attacks"] == 1
    assert r["redteam/asr/x"] == pytest.approx(2 / 3) and r["redteam/asr/y"] == pytest.approx(0.5)
    # successes "why a", "why a", "what b c": bigrams (why,a) twice, (what,b), (b,c) -> 3 distinct of 4
    assert r["redteam/success_distinct_2"] == pytest.approx(3 / 4)
    assert [t["prompt"] for t in r["top"]] == ["why a", "what b c"]  # distinct prompts, best first


def test_draw_examples_prefers_high_scores():
    pool = [AttackRecord(f"p{i}", "", s, s > 0.5) for i, s in enumerate([0.9, 0.6, 0.1, 0.0])]
    rng = random.Random(0)
    counts = {"p0": 0, "p1": 0}
    for _ in range(300):
        counts[draw_examples(pool, 1, 0.1, rng)[0]] += 1
    # only successes are drawn; over the two, scores rescaled to [0, 1] -> weights e^0 : e^-10
    assert counts["p0"] > 290
    assert sorted(draw_examples(pool, 5, 0.1, rng)) == ["p0", "p1"]
    none = [AttackRecord("q", "", 0.2, False), AttackRecord("r", "", 0.1, False)]
    assert set(draw_examples(none, 2, 0.1, rng)) == {"q", "r"}  # no success yet: the best attacks
    assert split_budget(10, 4) == [3, 3, 2, 2]
    cfg = RedteamConfig(judge=["python:alignkit.rewards.toy:char_share"], goal="say no")
    assert "say no" in instruction(cfg, None) and "- a\n- b" in instruction(cfg, "t", ["a", "b"])


def test_choose_pairs_never_picks_a_refusal():
    fails = [{"prompt": "p1", "target_answer": "awful", "score": 0.9},
             {"prompt": "p2", "target_answer": "bad", "score": 0.8},
             {"prompt": "p3", "target_answer": "grim", "score": 0.7}]
    cands = [["I'm sorry, but I can't help with that.", "lovely day", "still bad"], ["bad again"], []]
    srcs = [["revision", "sample", "sample"], ["revision"], []]
    scores = [[0.0, 0.1, 0.6], [0.7], []]
    pairs, counts = choose_pairs(fails, cands, srcs, scores, threshold=0.5)
    assert [(p["chosen"], p["rejected"], p["source"]) for p in pairs] == [("lovely day", "awful", "sample")]
    assert counts == {"no_candidate": 1, "no_passing_candidate": 1, "refusals_skipped": 1}
    pairs, _ = choose_pairs(fails, cands, srcs, scores, threshold=0.5, allow_refusals=True)
    assert pairs[0]["chosen"].startswith("I'm sorry")


# ----------------------------------------------------------------------------- the attackers

def test_few_shot_and_rl_beat_zero_shot_on_the_same_budget(models, tmp_path):
    """Seeded, 128 attacks each. Measured: zero-shot ASR 0.16, few-shot 0.89, rl 0.39 (seed 1: 0.09, 0.88,
    0.52). Few-shot copies its successes until the attacks collapse onto one ('aaaa...'); the RL attacker with
    the novelty bonus keeps its successful attacks apart (self-BLEU 0.12-0.27 against 0.92-0.96)."""
    zero = campaign(models, tmp_path, "zero-shot")
    few = campaign(models, tmp_path, "few-shot")
    rl = campaign(models, tmp_path, "rl", novelty=0.1)
    for s in (zero, few, rl):
        assert s["redteam/attacks"] == 128
    assert few["redteam/asr"] > zero["redteam/asr"] + 0.3
    assert rl["redteam/asr"] > zero["redteam/asr"] + 0.1
    assert few["redteam/asr_lo"] > zero["redteam/asr_hi"]  # separated by their intervals
    # novelty keeps the RL attacker's successes diverse: distinct-2 above the floor 0.5, self-BLEU below 0.5,
    # where the few-shot attacker (no novelty term) collapsed
    assert rl["redteam/success_distinct_2"] >= 0.5
    assert rl["redteam/success_self_bleu"] < 0.5 < few["redteam/success_self_bleu"]
    # the RL campaign is the attacks of its rollouts: 8 rollouts of 4 instructions x 4 attacks
    rows = [json.loads(x) for x in (tmp_path / "rl" / "attacks.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in rows}) == list(range(8)) and all(r["method"] == "rl" for r in rows)
    metrics = [json.loads(x) for x in (tmp_path / "rl" / "attacker" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["kl/ref"] > 0  # the attacker moved away from its start, under the preset's KL penalty


def test_outputs_are_prompt_rows(models, tmp_path):
    from alignkit.data.formats import parse_rows
    from alignkit.data.load import DataReport, read_rows

    s = campaign(models, tmp_path, "zero-shot", budget=16, categories=["cats", "dogs"],
                 overrefusal="builtin:redteam_overrefusal", overrefusal_rows=3)
    out = tmp_path / "zero-shot"
    for name in ("attacks.jsonl", "failures.jsonl", "summary.json", "metrics.jsonl", "report.html", "overrefusal.jsonl"):
        assert (out / name).is_file(), name
    assert {"redteam/asr/cats", "redteam/asr/dogs", "overrefusal/rate"} <= set(s)
    assert s["overrefusal/prompts"] == 3
    _, rows = read_rows(str(out / "attacks.jsonl"))
    examples = parse_rows(rows, "prompt", DataReport(source="attacks"))
    assert len(examples) == 16
    assert {r["category"] for _, r in rows} == {"cats", "dogs"}


def test_cli(models, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "alignkit", "redteam", "--target", models["target"], "--attacker", models["attacker"],
           "--judge", "python:alignkit.rewards.toy:char_share", "--goal", "write about it", "--method", "zero-shot",
           "--budget", "8", "--threshold", "0.25", "--output", str(out), "overrefusal=null",
           "attack_generation.max_new_tokens=8", "target_generation.max_new_tokens=8"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["redteam/attacks"] == 8 and s["method"] == "zero-shot"


# ----------------------------------------------------------------------------- the loop

@pytest.mark.slow
def test_redteam_repair_pipeline_end_to_end(models, tmp_path):
    from alignkit.pipeline import run_pipeline

    out = tmp_path / "loop"
    # failure: half the greedy answer is 's' or 't' (the copy model's greedy answers repeat the commonest letter
    # of the chat template, "...assistant"); revisions: samples at temperature 1, which mostly pass
    judge = {"kind": "python", "arg": "alignkit.rewards.toy:char_share", "options": {"chars": "st"}}
    variables = {"model": models["target"], "attacker": models["attacker"], "judge": judge, "threshold": 0.5,
                 "goal": "write about it", "budget": 24, "revise_samples": 4}
    res = run_pipeline({"file": "builtin:redteam_repair", "output": str(out), "vars": variables, "preset": "quick"})
    assert list(res["stages"]) == ["before", "revise", "pairs", "repair", "after", "compare"]
    before = json.loads((out / "before" / "summary.json").read_text())
    after = json.loads((out / "after" / "summary.json").read_text())
    pairs = json.loads((out / "pairs" / "summary.json").read_text())
    assert before["redteam/failures"] > 0 and pairs["pairs"] > 0
    assert before["redteam/attacks"] == after["redteam/attacks"] == 24  # the same budget
    for s in (before, after):
        assert 0 <= s["redteam/asr_lo"] <= s["redteam/asr"] <= s["redteam/asr_hi"] <= 1
        assert "overrefusal/rate" in s
    # same attacker and seed: the attacker's instructions of the first round are the same
    a = [json.loads(x)["attacker_output"] for x in (out / "before" / "attacks.jsonl").read_text().splitlines()]
    b = [json.loads(x)["attacker_output"] for x in (out / "after" / "attacks.jsonl").read_text().splitlines()]
    assert a[:12] == b[:12]
    html = (out / "compare" / "compare.html").read_text()
    assert "redteam/asr" in html and "overrefusal/rate" in html
    prefs = [json.loads(x) for x in (out / "pairs" / "prefs.jsonl").read_text().splitlines()]
    assert all(p["score_chosen"] <= 0.5 < p["score_rejected"] for p in prefs)
