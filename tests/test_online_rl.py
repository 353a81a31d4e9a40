"""Online-RL building blocks: exact first update (ratio 1, KL 0), rollout log-probs, reward placement,
reward read at the last real token, schedules, best-of-k estimator, rejection datasets, vLLM weight names."""

import copy
import itertools
import random

import pytest
import torch

from alignkit.config import LoraConfig, ModelConfig, as_config
from alignkit.data import prepare
from alignkit.data.layout import SeqBatch, pad_sequences
from alignkit.models.loading import apply_lora, load_causal_lm, load_tokenizer
from alignkit.ops.logprobs import token_logprobs
from alignkit.rewards import build_reward
from alignkit.rollout.generate import GenerationConfig, generate

CHAR = "python:alignkit.rewards.toy:char_share"


from tests.helpers import one_thread as _one_thread  # noqa: E402,F401  (autouse: one thread per module)
from tests.helpers import write_jsonl  # noqa: E402


def prompt_rows(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": "w:" + "".join(rng.choice("mnop") for _ in range(rng.randint(1, 6)))} for _ in range(n)]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    return write_jsonl(path, prompt_rows(32))


def ppo_setup(tiny_model, prompts_file, *, shared, lora, **ppo):
    from alignkit.train.online import RLTask
    from alignkit.train.ppo import PolicyWithValue, build_critic
    from alignkit.train.rl_config import PPOConfig

    ppo = {"num_generations": 1, **ppo}  # one sample per prompt, as these tests were written for
    cfg = as_config(PPOConfig, {"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(prompts_file)},
                                "rewards": [CHAR], "generation": {"max_new_tokens": 6}, "value": {"shared": shared},
                                "ppo": ppo}, {})
    tok = load_tokenizer(cfg.model)
    items = prepare("prompt", cfg.data, tok).train[:10]
    torch.manual_seed(0)
    policy = load_causal_lm(cfg.model)
    ref = None
    if lora:
        policy = apply_lora(policy, LoraConfig(enabled=True, r=4))
    else:
        ref = load_causal_lm(cfg.model).eval()  # the policy's dtype (fp32), as the trainers load it
    model = PolicyWithValue(policy, None if shared else build_critic(cfg, tok))
    task = RLTask(cfg, tok, build_reward(cfg.rewards), ref_model=ref, adapter_ref=lora)
    task.setup(None)
    return task, model, items


@pytest.mark.parametrize("shared,lora", [(True, False), (False, False), (True, True)])
def test_first_ppo_update_has_ratio_one_and_zero_kl(tiny_model, prompts_file, shared, lora):
    task, model, items = ppo_setup(tiny_model, prompts_file, shared=shared, lora=lora, epochs=2, num_minibatches=2)
    updates = task.plan(model, items, 3)
    first = next(updates)
    assert len(first.micro_batches) == 2  # 10 rows -> minibatch of 5 -> micro-batches of 3 + 2
    assert first.metrics["kl/ref"] == 0.0  # reference == policy before any update
    for mb in first.micro_batches:
        tl, values = task.forward(model, mb.seq)
        m = mb.mask.bool()
        assert m.sum() > 0
        assert torch.equal(tl.logps[m], mb.old_logps[m])  # bitwise: ratio exactly 1
        assert torch.equal(values[m], mb.old_values[m])
        _, metrics = task.loss(model, mb)
        assert metrics["policy/ratio_mean"].item() == 1.0
        assert metrics["policy/clip_frac"].item() == 0.0 and metrics["policy/approx_kl"].item() == 0.0
    assert len(list(updates)) == 3  # 2 epochs x 2 minibatches in all


def test_sequence_reward_lands_on_the_last_response_token(tiny_model, prompts_file):
    # beta=0, gamma=lam=1, zero value head, no whitening: every response token's advantage equals the
    # sequence reward, whether the response ended with EOS or was cut at max_new_tokens
    task, model, items = ppo_setup(tiny_model, prompts_file, shared=True, lora=False, kl_coef=0.0, lam=1.0,
                                   whiten_advantages=False, normalize_reward=False, epochs=1,
                                   num_minibatches=1)
    task.cfg.missing_eos_penalty = 0.25
    task.gen = task.gen.model_copy(update={"max_new_tokens": 3})
    task.reward = build_reward(["length:target=2"])  # distinct, non-zero rewards
    eos = task.tok.eos_token_id

    class Scripted:  # an engine with known outputs: some end with EOS, others are cut at 3 tokens
        def generate(self, prompts, cfg):
            return [[10, eos, 11] if i % 3 == 0 else [10, 11, eos] if i % 3 == 1 else [10, 11, 12]
                    for i in range(len(prompts))]

        def update_weights(self, model):
            pass

    task.engine = Scripted()
    (update,) = list(task.plan(model, items, 100))
    (mb,) = update.micro_batches
    texts_reward = torch.tensor(task.reward.last_total)
    m = mb.mask.bool()
    ended = torch.tensor([bool(mb.input_ids[i, mb.attention_mask[i].sum() - 1] == task.tok.eos_token_id)
                          for i in range(len(mb))])
    assert ended.any() and (~ended).any()  # both kinds present
    expected = texts_reward - 0.25 * (~ended).float()  # (N,) penalty for the cut-off ones
    for i in range(len(mb)):
        assert torch.allclose(mb.advantages[i][m[i]], expected[i].expand(int(m[i].sum())), atol=1e-6)
        assert (mb.advantages[i][~m[i]] == 0).all()
    assert expected.std() > 0


def test_rollout_logprobs_equal_fresh_token_logprobs(tiny_model, tiny_tok):
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model))).eval()
    prompts = [tiny_tok.encode(p) for p in ("a", "hello there", "xyz q")]  # different lengths: left padding
    torch.manual_seed(1)
    ro = generate(model, tiny_tok, prompts, GenerationConfig(max_new_tokens=7, temperature=0.8, batch_size=4,
                                                             dtype="model"), n=2)  # decode with these fp32 weights
    fresh = token_logprobs(model, ro.sequences, temperature=0.8).logps
    mask = ro.sequences.loss_mask[:, 1:].bool()
    assert torch.allclose(ro.logprobs[mask], fresh[mask], atol=1e-5)
    assert (ro.logprobs[~mask] == 0).all() and ro.logprobs[mask].lt(0).all()
    # each row alone (no padding) and left-padded agree with the right-padded batch
    for i in range(len(ro)):
        n = int(ro.sequences.attention_mask[i].sum())
        alone = SeqBatch(*(t[i:i + 1, :n] for t in (ro.sequences.input_ids, ro.sequences.attention_mask,
                                                      ro.sequences.loss_mask)))
        lp_alone = token_logprobs(model, alone, temperature=0.8).logps[0]
        assert torch.allclose(lp_alone, fresh[i, :n - 1], atol=1e-5)
        pad = ro.sequences.input_ids.shape[1] - n
        left = SeqBatch(torch.cat([torch.full((1, pad), tiny_tok.pad_token_id), alone.input_ids], 1),
                        torch.cat([torch.zeros(1, pad, dtype=torch.long), alone.attention_mask], 1),
                        torch.cat([torch.zeros(1, pad, dtype=torch.long), alone.loss_mask], 1))
        lp_left = token_logprobs(model, left, temperature=0.8).logps[0, pad:]
        assert torch.allclose(lp_left, lp_alone, atol=1e-5)


def _random_reward_model(tiny_model, tmp_path):
    from alignkit.models.loading import load_reward_model

    rm = load_reward_model(ModelConfig(name_or_path=str(tiny_model)))
    torch.manual_seed(3)
    torch.nn.init.normal_(rm.score.weight, std=1.0)  # a zero head would make every score 0
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(ModelConfig(name_or_path=str(tiny_model))).save_pretrained(tmp_path / "rm")
    return rm.eval(), tmp_path / "rm"


def test_reward_read_at_last_real_token_with_pad_eq_eos_truncation_and_left_padding(tiny_model, tiny_tok, tmp_path):
    from alignkit.models.reward import reward_scores

    rm, path = _random_reward_model(tiny_model, tmp_path)
    assert tiny_tok.pad_token_id == tiny_tok.eos_token_id
    eos = tiny_tok.eos_token_id
    seqs = [tiny_tok.encode("q:ab") + [eos],  # ended with EOS (== pad)
            tiny_tok.encode("q:abcdefgh"),  # truncated: no EOS
            tiny_tok.encode("q:a") + [eos]]
    alone = torch.stack([reward_scores(rm, pad_sequences([s], [[0] * len(s)], eos))[0] for s in seqs])
    with torch.no_grad():  # the head at the last real token, by hand
        manual = torch.stack([rm.score(rm.model(torch.tensor([s])).last_hidden_state[0, -1]).squeeze()
                              for s in seqs])
    right = reward_scores(rm, pad_sequences(seqs, [[0] * len(s) for s in seqs], eos))
    T = max(map(len, seqs))
    left = SeqBatch(torch.tensor([[eos] * (T - len(s)) + s for s in seqs]),
                    torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs]), torch.zeros(3, T, dtype=torch.long))
    assert torch.allclose(right, alone, atol=1e-5) and torch.allclose(reward_scores(rm, left), alone, atol=1e-5)
    assert torch.allclose(alone, manual, atol=1e-5)
    assert alone.std() > 0.01  # the three scores differ: the test can tell positions apart
    # the model: reward source on text agrees with scoring one completion at a time
    reward = build_reward([f"model:{path}"])
    completions = ["ab", "abcdefgh", "a", "zz z"]
    batch = reward(["q:"] * 4, completions, None)
    single = [reward(["q:"], [c], None)[0] for c in completions]
    assert batch == pytest.approx(single, abs=1e-5) and len(set(round(x, 4) for x in batch)) == 4


def test_response_space_round_trip_and_last_index():
    from alignkit.advantages import from_response_space, to_response_space
    from alignkit.train.rl_batch import last_response_index, response_index

    # prompts of 2 and 4 tokens, responses of 3 and 1 tokens, T = 5 -> label width 4
    x = torch.tensor([[0., 10, 11, 12], [0, 0, 0, 20]])
    index, valid = response_index([2, 4], [3, 1], 4)
    r = to_response_space(x, index, valid)
    assert r.tolist() == [[10, 11, 12], [20, 0, 0]]
    assert torch.equal(from_response_space(r, index, valid, 4), x)
    assert last_response_index([2, 4], [3, 1]).tolist() == [3, 3]


def test_schedule_covers_every_row_once_per_epoch():
    from alignkit.train.online import RLTask

    class T(RLTask):
        def __init__(self):
            pass

        def update_shape(self):
            return 3, 2

    torch.manual_seed(0)
    sched = T().schedule(11, 4, lengths=[5] * 11)
    assert len(sched) == 6
    for e in range(3):
        rows = [r for upd in sched[2 * e:2 * e + 2] for mb in upd for r in mb]
        assert sorted(rows) == list(range(11))
    assert [len(mb) for mb in sched[0]] == [4, 2] or [len(mb) for mb in sched[0]] == [4, 1]
    assert sched[0] != sched[2]  # reshuffled each epoch


def test_expected_best_of_k_matches_enumeration():
    from alignkit.rollout.sampling import expected_best_of_k

    rng = random.Random(0)
    vals = [rng.random() for _ in range(7)]
    for k in (1, 2, 3, 7):
        brute = [max(c) for c in itertools.combinations(vals, k)]
        assert expected_best_of_k(vals, k) == pytest.approx(sum(brute) / len(brute), rel=1e-12)
    assert expected_best_of_k([1, 2, 3], 2) == pytest.approx(8 / 3)
    assert expected_best_of_k([1, 2, 3], 1) == pytest.approx(2.0)


def test_rejection_datasets_drop_and_count_ties():
    from alignkit.rollout.sampling import Scored, rejection_datasets

    items = [{"prompt": "p0"}, {"prompt": [{"role": "user", "content": "p1"}]}, {"prompt": "p2"}]
    s = Scored(items, [["a", "b", "c"], ["d", "e", "f"], ["g", "h", "i"]],
               torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.3, 0.3], [0.2, 0.25, 0.4]], dtype=torch.float64), {},
               torch.ones(3, 3, dtype=torch.bool))
    sft, pairs, counts = rejection_datasets(s, min_margin=0.3)
    assert [r["completion"] for r in sft] == ["b", "d", "i"]
    assert sft[1]["prompt"] == [{"role": "user", "content": "p1"}]  # original form kept
    assert pairs == [{"prompt": "p0", "chosen": "b", "rejected": "a", "reward_chosen": 0.9, "reward_rejected": 0.1}]
    assert counts["ties_dropped"] == 1 and counts["below_margin_dropped"] == 1 and counts["pairs"] == 1


def test_vllm_weight_export_merges_lora(tiny_model):
    from alignkit.rollout.vllm_engine import hf_weights_for_vllm

    base = load_causal_lm(ModelConfig(name_or_path=str(tiny_model)))
    plain = dict(hf_weights_for_vllm(base))
    assert plain.keys() == base.state_dict().keys()
    lora = apply_lora(copy.deepcopy(base), LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    exported = dict(hf_weights_for_vllm(lora))
    merged = copy.deepcopy(lora).merge_and_unload().state_dict()
    assert exported.keys() == merged.keys()
    changed = 0
    for k, v in merged.items():
        assert torch.allclose(exported[k], v, atol=1e-6), k
        changed += int(not torch.equal(v, base.state_dict()[k]))
    assert changed >= 4  # the adapted projections really differ from the base weights


def test_schedule_by_token_budget_groups_consecutive_rows_that_fit():
    from alignkit.train.online import RLTask

    class T(RLTask):
        def __init__(self):
            self.max_tokens = 10

        def update_shape(self):
            return 1, 1

    lengths = [4, 3, 5, 2, 9, 12, 1]
    torch.manual_seed(0)
    perm = torch.randperm(7).tolist()
    torch.manual_seed(0)
    (update,) = T().schedule(7, 2, lengths=lengths)
    assert [r for mb in update for r in mb] == perm  # every row once, in the shuffled order
    for mb in update:  # each micro-batch fits, or is a single row over the budget
        assert sum(lengths[r] for r in mb) <= 10 or len(mb) == 1
    # by hand: consecutive rows while the running total stays within 10
    want, cur, used = [], [], 0
    for r in perm:
        if cur and used + lengths[r] > 10:
            want, cur, used = want + [cur], [], 0
        cur, used = cur + [r], used + lengths[r]
    assert update == want + [cur]


@pytest.mark.hw
def test_reward_scorer_shares_prompts_and_scores_like_rows(tiny_model, tmp_path):
    """RewardScorer lays a chunk out as a prefix tree where the layout probe allows (four completions of
    two prompts with a common beginning): in fp32 the scores are each row's own (1e-5); with dtype=auto
    where bf16 is native, an fp32 model with bf16 linear layers under autocast, within bf16 rounding of
    the fp32 scores; a cut to max_length keeps the tail of prompt + completion, as before."""
    from alignkit.models.loading import native_bf16
    from alignkit.models.reward import RewardScorer

    _, path = _random_reward_model(tiny_model, tmp_path)
    prompts = ["tell me about mondays", "tell me about rain", "tell me about mondays", "hi"]
    completions = ["they are long", "it is wet", "a fresh start", "hello"]
    fp32 = RewardScorer(str(path), device="cpu", dtype="float32", batch_size=4)
    parts = [fp32.encode_parts(p, c) for p, c in zip(prompts, completions)]
    rows = fp32.score_ids([p + r for p, r in parts])
    assert fp32(prompts, completions) == pytest.approx(rows, abs=1e-5) and fp32._share
    assert len(set(round(x, 3) for x in rows)) == 4
    short = RewardScorer(str(path), device="cpu", dtype="float32", max_length=6)
    p, r = short.encode_parts(prompts[0], completions[0])
    assert p + r == (parts[0][0] + parts[0][1])[-6:]
    auto = RewardScorer(str(path), device="cpu", batch_size=4)
    if native_bf16("cpu"):
        assert {q.dtype for q in auto.model.parameters()} == {torch.float32, torch.bfloat16}
        spread = max(rows) - min(rows)
        assert auto(prompts, completions) == pytest.approx(rows, abs=0.05 * spread)
    else:
        assert auto(prompts, completions) == pytest.approx(rows, abs=1e-5)
