"""Constitutional AI: the constitution file, SL-CAI chain bookkeeping, RL-CAI labels, CLI end to end."""

import json
import random

import pytest

from alignkit.data.load import DataError
from alignkit.feedback import constitution as cai
from alignkit.feedback.constitution import critique_revise, load_constitution
from alignkit.rollout.generate import GenerationConfig


def test_default_constitution_ships_and_loads():
    principles = load_constitution()
    assert 6 <= len(principles) <= 8
    names = [p.name for p in principles]
    assert len(set(names)) == len(names) and {"harm", "honesty", "helpfulness"} <= set(names)
    assert all(p.critique.strip() and p.revision.strip() and p.preference for p in principles)
    assert [p.name for p in load_constitution(only=["honesty", "harm"])] == ["harm", "honesty"]


def test_constitution_errors_name_file_principle_and_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("- {name: a, critique: c, revision: r}\n- {name: b, critique: c}\n")
    with pytest.raises(DataError, match=r"c\.yaml: principle 1 \(b\): field 'revision': Field required"):
        load_constitution(str(bad))
    bad.write_text("principles:\n- {name: a, critique: c, revision: r}\n- {name: a, critique: c, revision: r}\n")
    with pytest.raises(DataError, match=r"duplicate principle names \['a'\]"):
        load_constitution(str(bad))
    bad.write_text("- {name: a, critique: c, revision: r, extra: 1}\n")
    with pytest.raises(DataError, match="field 'extra'"):
        load_constitution(str(bad))
    with pytest.raises(DataError, match=r"\['nope'\] not in constitution"):
        load_constitution(only=["nope"])
    with pytest.raises(DataError, match="no such file"):
        load_constitution(str(tmp_path / "missing.yaml"))


class ScriptedSampler:
    """Stands in for sampling: returns scripted texts per call and records the decoded conversations."""

    def __init__(self, tok, script):
        self.tok, self.script, self.seen = tok, list(script), []

    def __call__(self, model, tok, prompt_ids, gen, n=1):
        self.seen.append([self.tok.decode(ids) for ids in prompt_ids])
        texts = self.script.pop(0)
        return texts, [t != "rev2-1" for t in texts]  # one unfinished final


def test_chain_bookkeeping_with_scripted_samples(monkeypatch, tiny_tok):
    principles = load_constitution()
    sampler = ScriptedSampler(tiny_tok, [
        ["init0", "init1"],            # initial responses
        ["crit1-0", "crit1-1"],        # round 1 critiques
        ["rev1-0", ""],                # round 1 revisions: prompt 1's is empty -> keeps init1
        ["crit2-0", "crit2-1"],
        ["rev2-0", "rev2-1"],
    ])
    monkeypatch.setattr(cai, "sample_with_ended", sampler)
    chains, counts = critique_revise(None, tiny_tok, ["p0", [{"role": "user", "content": "p1"}]], principles, 2,
                                     GenerationConfig(), random.Random(0))
    rng = random.Random(0)
    drawn = [[rng.choice(principles) for _ in range(2)] for _ in range(2)]  # round by round, prompt by prompt
    assert counts == {"truncated_conversations": 0, "empty_critiques": 0, "empty_revisions": 1}
    c0, c1 = chains
    assert c0["initial"] == "init0" and c0["final"] == "rev2-0"
    assert [s["round"] for s in c0["steps"]] == [1, 2]
    assert [s["principle"] for s in c0["steps"]] == [drawn[0][0].name, drawn[1][0].name]
    assert c1["steps"][0]["revision"] == "" and c1["steps"][0]["kept_previous"] is True
    assert c1["final"] == "rev2-1" and c1["final_ended"] is False and c0["final_ended"] is True
    assert c0["steps"][1]["critique_request"] == drawn[1][0].critique
    # round 2 of prompt 1 critiques the response it kept (init1), not the empty revision
    crit2_conv = sampler.seen[3][1]
    assert "init1" in crit2_conv and drawn[1][1].critique in crit2_conv
    # a revision request sees the critique it answers
    rev1_conv = sampler.seen[2][0]
    assert "crit1-0" in rev1_conv and drawn[0][0].revision in rev1_conv and rev1_conv.count("<|im_start|>user") == 3


@pytest.fixture
def prompts(jsonl):
    return jsonl("prompts.jsonl", [{"prompt": "How do I pick a lock?"},
                                   {"prompt": [{"role": "user", "content": "Tell me a joke"}]},
                                   {"prompt": "Write a poem"}, {"question": "no prompt"}])


def test_cli_cai_sl_on_a_tiny_model(tmp_path, tiny_model, prompts):
    from alignkit.cli import build_cli

    out = tmp_path / "sl"
    build_cli().main(["cai-sl", "--model", str(tiny_model), "--data", str(prompts), "--output", str(out),
                      "--rounds", "2", "generation.max_new_tokens=8", "cai.principles=[harm, honesty]",
                      "cai.keep_unfinished=true"],
                     standalone_mode=False)
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(chains) == 3 and summary["rows_dropped"] == 1 and summary["rounds"] == 2
    for c in chains:
        assert len(c["steps"]) == 2 and {s["principle"] for s in c["steps"]} <= {"harm", "honesty"}
        assert all({"critique", "revision", "critique_request", "revision_request"} <= set(s) for s in c["steps"])
        revised = [s["revision"] for s in c["steps"] if not s["kept_previous"]]
        assert c["final"] == (revised[-1] if revised else c["initial"])
    # the SFT file holds (prompt, final revision), in order, for every non-empty final
    assert [(r["prompt"], r["completion"]) for r in sft] == [(c["prompt"], c["final"]) for c in chains if c["final"]]
    assert summary["sft_rows"] == len(sft) and summary["dropped_empty_final"] == 3 - len(sft)
    assert summary["unfinished_final"] == sum(1 for c in chains if c["final"] and not c["final_ended"])
    assert summary["dropped_unfinished_final"] == 0  # keep_unfinished=true
    # and it trains: alignkit sft reads it
    build_cli().main(["sft", "--model", str(tiny_model), "--data", str(out / "sft.jsonl"), "--output",
                      str(tmp_path / "sft"), "--max-steps", "1", "log.progress=false", "log.samples=0"],
                     standalone_mode=False)
    assert (tmp_path / "sft" / "model").is_dir()


def test_cli_cai_rl_on_a_tiny_model(tmp_path, tiny_model, prompts):
    from alignkit.cli import build_cli

    out = tmp_path / "rl"
    build_cli().main(["cai-rl", "--model", str(tiny_model), "--data", str(prompts), "--output", str(out),
                      "generation.max_new_tokens=8", "cai.principles_per_pair=3", "judge.inconsistent=keep"],
                     standalone_mode=False)
    rows = [json.loads(line) for line in (out / "preferences.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    before = summary["dropped_before_judging"]
    assert summary["pairs_judged"] + before["empty_response"] + before["identical_responses"] == 3
    assert summary["pairs_kept"] == len(rows) == summary["pairs_judged"]  # keep mode drops nothing
    for r in rows:
        assert len(r["principles"]) == len(set(r["principles"])) == 3
        assert 0.5 <= r["soft_label"] <= 1 and r["chosen"] != r["rejected"]
        assert r["soft_label"] == pytest.approx(max(r["judge"]["prob_a"], 1 - r["judge"]["prob_a"]), abs=1e-6)
    # a template without {principle} cannot carry the constitution
    with pytest.raises(ValueError, match=r"must use \{principle\}"):
        cai.run_cai_rl({"data": {"path": str(prompts)}, "output": str(out),
                        "judge": {"template": "{prompt} A: {response_a} B: {response_b}"}})
