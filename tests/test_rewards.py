"""Reward sources: spec parsing, rule verifiers, python callables, composite, ensembles."""

import math
import sys
import types

import pytest

from alignkit.rewards import (REWARD_KINDS, CompositeReward, RewardSpec, build_reward, combine_scores,
                              extract_answer, parse_number)
from alignkit.rewards.answer import answers_match, is_correct
from alignkit.rewards import scorers


def score(spec, completions, rows=None, options=None):
    if options is not None:
        spec = RewardSpec.parse(spec).model_copy(update={"options": options})
    reward = build_reward([spec])
    return reward(["p"] * len(completions), completions, rows)


# ----------------------------------------------------------------------------- spec parsing

def test_registry_lists_all_kinds():
    assert {"model", "ensemble", "match", "regex", "length", "python"} <= set(REWARD_KINDS)
    assert "match:FIELD" in REWARD_KINDS.describe()


@pytest.mark.parametrize("text, kind, arg, weight", [
    ("match:answer", "match", "answer", 1.0),
    ("match:answer@0.5", "match", "answer", 0.5),
    ("length:max=100@-2", "length", "max=100", -2.0),
    ("length:max=100@1e-1", "length", "max=100", 0.1),
    ("python:my.module:fn@2", "python", "my.module:fn", 2.0),
    ("python:/tmp/x.py:fn", "python", "/tmp/x.py:fn", 1.0),
    (r"regex:\w+@\w+\.com", "regex", r"\w+@\w+\.com", 1.0),
    (r"regex:\w+@\w+\.com@0.25", "regex", r"\w+@\w+\.com", 0.25),
    ("regex:v@2@1", "regex", "v@2", 1.0),  # a pattern ending in @<digits> needs an explicit weight
    ("ensemble:a,b;mean_minus_std=0.5@3", "ensemble", "a,b;mean_minus_std=0.5", 3.0),
])
def test_parse_shorthand(text, kind, arg, weight):
    spec = RewardSpec.parse(text)
    assert (spec.kind, spec.arg, spec.weight) == (kind, arg, weight)


def test_parse_errors_name_spec_and_kinds():
    with pytest.raises(ValueError) as e:
        RewardSpec.parse("bogus:x@2")
    msg = str(e.value)
    assert "bogus:x@2" in msg and "'bogus'" in msg and "match" in msg and "ensemble" in msg
    with pytest.raises(ValueError, match="empty reward spec"):
        RewardSpec.parse("  ")
    with pytest.raises(ValueError, match="known kinds"):  # YAML form validates too
        RewardSpec.model_validate({"kind": "nope"})
    with pytest.raises(ValueError):
        RewardSpec(kind="match", arg="a", weight=float("nan"))


def test_yaml_form_and_coerce():
    specs = [{"kind": "match", "arg": "answer", "weight": 2.0},
             {"kind": "regex", "arg": "x", "options": {"full_match": True}}]
    reward = build_reward(specs)
    assert [w for _, w, _ in reward.components] == [2.0, 1.0]
    assert reward(["p"], ["x"], [{"answer": "y"}]) == [1.0]  # full match "x", wrong answer


def test_arg_errors():
    with pytest.raises(ValueError, match="needs"):
        build_reward(["match:"])
    with pytest.raises(ValueError, match="invalid regular expression"):
        build_reward(["regex:(unclosed"])
    with pytest.raises(ValueError, match="at least one of"):
        build_reward(["length:"])
    with pytest.raises(ValueError, match="unknown length keys"):
        build_reward(["length:maxx=3"])
    with pytest.raises(ValueError, match="> 0"):
        build_reward(["length:target=0"])
    with pytest.raises(ValueError, match="unit"):
        build_reward(["length:max=3,unit=tokens"])


# ----------------------------------------------------------------------------- match

@pytest.mark.parametrize("text, expected", [
    ("blah <answer>7</answer> then <answer> 42 </answer>", "42"),
    ("so \\boxed{\\frac{3}{4}} and finally \\boxed{12}", "12"),
    ("nested \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("The answer is 42.", "42"),
    ("The answer is 42. I hope this helps.", "42"),
    ("Answer: Paris", "Paris"),
    ("#### 1,000", "1,000"),
    ("3 apples plus 4 apples make 7 apples", "7"),
    ("Paris", "Paris"),
    ("<answer>\\boxed{5}</answer> but \\boxed{6}", "5"),  # <answer> wins over \boxed
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("s, value", [
    ("1,000", 1000.0), ("$1,000.", 1000.0), ("50%", 50.0), ("3/4", 0.75), ("\\frac{3}{4}", 0.75),
    ("-2.5e3", -2500.0), (".5", 0.5), ("12.", 12.0), ("nan", None), ("inf", None), ("Paris", None),
    ("1/0", None),
])
def test_parse_number(s, value):
    assert parse_number(s) == value


@pytest.mark.parametrize("completion, gold, ok", [
    ("<answer>42</answer>", "42", True),
    ("<answer>41</answer>", "42", False),
    ("\\boxed{1000}", "1,000", True),
    ("The answer is 1,000.", 1000, True),
    ("The answer is 0.5", "1/2", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", True),
    ("The answer is 42 apples.", "42", True),
    ("Answer: paris.", "Paris", True),
    ("Answer: London", "Paris", False),
    ("I computed 0.33333 so", "1/3", False),  # 1e-5 relative: beyond tolerance
    ("I computed 0.3333333 so", "1/3", True),  # 1e-7 relative
    ("So 7", "Janet sold 3 and kept 4. #### 7", True),  # GSM8K-style reference
])
def test_is_correct(completion, gold, ok):
    assert is_correct(completion, gold) is ok


def test_match_reward_values_and_missing_field():
    rows = [{"answer": "42"}, {"answer": 7}, {"answer": "Paris"}]
    out = score("match:answer", ["The answer is 42.", "\\boxed{8}", "<answer> paris </answer>"], rows)
    assert out == [1.0, 0.0, 1.0]
    with pytest.raises(KeyError, match=r"row 1 has no field 'answer'"):
        score("match:answer", ["1", "2"], [{"answer": "1"}, {"solution": "2"}])


def test_match_math_verify_option():
    pytest.importorskip("math_verify")
    out = score("match:answer", ["\\boxed{\\sqrt{4}}"], [{"answer": "2"}], options={"use_math_verify": True})
    assert out == [1.0]


def test_answers_match_string_normalization():
    assert answers_match("  New   York! ", "new york")
    assert not answers_match("New York City", "new york")


# ----------------------------------------------------------------------------- regex, length

def test_regex_search_and_full_match():
    fmt = r"<think>.*</think>\s*<answer>.*</answer>"
    good = "<think>a\nb</think>\n<answer>4</answer>"
    assert score(f"regex:{fmt}", [good, "<answer>4</answer>", "x " + good]) == [1.0, 0.0, 1.0]
    out = score(f"regex:{fmt}", [good + "\n", "x " + good], options={"full_match": True})
    assert out == [1.0, 0.0]


def test_length():
    texts = ["w " * 40, "w " * 50, "w " * 75, "x" * 20]
    assert score("length:target=50", texts) == [-0.2, 0.0, -0.5, -0.98]
    assert score("length:max=50", texts) == [0.0, 0.0, -0.5, 0.0]
    assert score("length:min=10,unit=chars", ["abc", "a" * 12]) == [-0.7, 0.0]
    # terms add: 75 words with max=50 (-0.5) and target=60 (-0.25)
    assert score("length:max=50,target=60", ["w " * 75]) == [-0.75]
    with pytest.raises(ValueError, match="given twice"):
        score("length:max=5", ["a"], options={"max": 6})


# ----------------------------------------------------------------------------- python

def test_python_callable_from_file(tmp_path):
    f = tmp_path / "my_reward.py"
    f.write_text(
        "def contains_ref(prompts, completions, ref, bonus=0.0, **kw):\n"
        "    return [float(r in c) + bonus for c, r in zip(completions, ref)]\n"
        "def wrong_len(prompts, completions, **kw):\n"
        "    return [1.0]\n"
        "def nan(prompts, completions, **kw):\n"
        "    return [float('nan')] * len(completions)\n")
    rows = [{"ref": "cat"}, {"ref": "dog"}]
    assert score(f"python:{f}:contains_ref", ["a cat", "a cat"], rows) == [1.0, 0.0]
    assert score(f"python:{f}:contains_ref", ["a cat", "a dog"], rows, options={"bonus": 0.5}) == [1.5, 1.5]
    with pytest.raises(ValueError, match=r"wrong_len.*returned 1 scores for 2"):
        score(f"python:{f}:wrong_len", ["a", "b"], rows)
    with pytest.raises(ValueError, match=r"nan.*non-finite"):
        score(f"python:{f}:nan", ["a"], [{}])
    with pytest.raises(ValueError, match="has no attribute"):
        build_reward([f"python:{f}:missing"])
    with pytest.raises(ValueError, match="not found"):
        build_reward([f"python:{tmp_path}/absent.py:fn"])


def test_python_callable_from_module_and_toy():
    out = score("python:alignkit.rewards.toy:char_share", ["aab b", "   ", "xyz"])
    assert out == [0.5, 0.0, 0.0]
    assert score("python:alignkit.rewards.toy:char_share", ["eex"], options={"char": "e"}) == [2 / 3]
    with pytest.raises(ImportError, match="cannot import"):
        build_reward(["python:no_such_module_xyz:fn"])
    with pytest.raises(ValueError, match="module:function"):
        build_reward(["python:justaname"])


def test_python_rows_transposed_with_none_for_missing(monkeypatch):
    seen = {}

    def fn(prompts, completions, **fields):
        seen.update(fields)
        return [0.0] * len(completions)

    mod = types.ModuleType("fake_reward_mod")
    mod.fn = fn
    monkeypatch.setitem(sys.modules, "fake_reward_mod", mod)
    score("python:fake_reward_mod:fn", ["a", "b"], [{"x": 1}, {"x": 2, "y": 3}])
    assert seen == {"x": [1, 2], "y": [None, 3]}


# ----------------------------------------------------------------------------- composite

def test_composite_weighting_and_last_components():
    reward = build_reward(["match:answer@2", r"regex:<answer>.*</answer>@0.5", "length:max=2@-0"])
    comps = ["<answer>4</answer>", "it is 5 <answer>5</answer> ok fine"]
    out = reward(["q", "q"], comps, [{"answer": 4}, {"answer": 4}])
    assert out == [2.5, 0.5]
    assert reward.last_components == {"match": [1.0, 0.0], "regex": [1.0, 1.0], "length": [0.0, -2.0]}
    m = reward.metrics()
    assert m["rewards/match"] == 0.5 and m["rewards/length"] == -1.0 and m["rewards/total"] == 1.5


def test_composite_duplicate_kinds_get_distinct_names():
    reward = build_reward(["length:max=1", "length:min=3", RewardSpec(kind="regex", arg="a", name="has_a")])
    assert reward.names == ["length_0", "length_1", "has_a"]
    out = reward(["p"], ["a b"], None)
    assert reward.last_components == {"length_0": [-1.0], "length_1": [-1 / 3], "has_a": [1.0]}
    assert math.isclose(out[0], -1 - 1 / 3 + 1)


def test_composite_checks_lengths_and_finiteness():
    class Bad:
        name = "bad"

        def __call__(self, prompts, completions, rows):
            return [math.inf] * len(completions)

    reward = CompositeReward([("bad", 1.0, Bad())])
    with pytest.raises(ValueError, match=r"reward source 'bad'.*non-finite"):
        reward(["p"], ["c"])
    with pytest.raises(ValueError, match="2 prompts for 1"):
        reward(["p", "q"], ["c"])
    with pytest.raises(ValueError, match="at least one component"):
        build_reward([])


# ----------------------------------------------------------------------------- model / ensemble

FAKE_SCORES = {  # path -> score per completion text
    "rm_a": {"x": 1.0, "y": 0.0},
    "rm_b": {"x": 3.0, "y": 0.0},
    "rm_c": {"x": 2.0, "y": 3.0},
}


def fake_load_reward_scorer(path, **options):
    bias = options.get("bias", 0.0)

    def scorer(prompts, completions):
        assert len(prompts) == len(completions)
        return [FAKE_SCORES[path][c] + bias for c in completions]

    return scorer


@pytest.fixture
def fake_reward_module(monkeypatch):
    """A stand-in for alignkit.models.reward so no model is loaded."""
    mod = types.ModuleType("alignkit.models.reward")
    mod.load_reward_scorer = fake_load_reward_scorer
    import alignkit.models

    monkeypatch.setitem(sys.modules, "alignkit.models.reward", mod)
    monkeypatch.setattr(alignkit.models, "reward", mod, raising=False)
    return mod


def test_model_kind_uses_load_reward_scorer(fake_reward_module):
    assert score("model:rm_c", ["x", "y"]) == [2.0, 3.0]
    assert score("model:rm_c", ["x"], options={"bias": 0.5}) == [2.5]  # options reach the loader


def test_model_kind_via_hook(monkeypatch):
    monkeypatch.setattr(scorers, "_load_scorer", fake_load_reward_scorer)
    assert score("model:rm_a@2", ["x", "y"]) == [2.0, 0.0]


def test_ensemble_combine_modes(fake_reward_module):
    comps = ["x", "y"]
    # x: members (1, 3, 2) -> mean 2, min 1, pop std sqrt(2/3); y: (0, 0, 3) -> mean 1, min 0, std sqrt(2)
    assert score("ensemble:rm_a,rm_b,rm_c", comps) == [2.0, 1.0]
    assert score("ensemble:rm_a,rm_b,rm_c;min", comps) == [1.0, 0.0]
    out = score("ensemble:rm_a,rm_b,rm_c;mean_minus_std=0.5", comps)
    assert out == pytest.approx([2 - 0.5 * math.sqrt(2 / 3), 1 - 0.5 * math.sqrt(2)])
    out = score("ensemble:rm_a,rm_b", comps, options={"combine": "mean_minus_std"})  # k defaults to 1
    assert out == [2.0 - 1.0, 0.0]
    reward = build_reward([{"kind": "ensemble", "options": {"paths": ["rm_a", "rm_b"], "combine": "min"}}])
    assert reward(["p", "p"], comps) == [1.0, 0.0]
    ens = reward.components[0][2]
    assert ens.last_members == {"rm_a": [1.0, 0.0], "rm_b": [3.0, 0.0]} and ens.last_std == [1.0, 0.0]


def test_ensemble_errors(fake_reward_module):
    with pytest.raises(ValueError, match="unknown combine 'median'"):
        build_reward(["ensemble:rm_a,rm_b;median"])
    with pytest.raises(ValueError, match="given twice"):
        score("ensemble:rm_a,rm_b;min", ["x"], options={"combine": "mean"})
    with pytest.raises(ValueError, match="needs"):
        build_reward(["ensemble:"])


def test_combine_scores_direct():
    assert combine_scores([[1.0, 4.0], [3.0, 4.0]], "mean_minus_std", k=2.0) == [0.0, 4.0]
