"""The presets of the one online-RL task (issue 14): each preset's first update against an independent
slow reference written from the papers' formulas, GSPO's sequence ratio and REINFORCE++'s baseline
against their formulas, DAPO's dynamic sampling and overlong shaping, preset/override resolution, the
critic's own learning rate and warm-up, and the metric-key module."""

import math

import pytest
import torch

from alignkit.advantages import ADVANTAGES, AdvantageInputs
from alignkit.config import ModelConfig, as_config
from alignkit.data import prepare
from alignkit.models.loading import load_causal_lm, load_tokenizer
from alignkit.ops.logprobs import token_logprobs
from alignkit.rewards import build_reward
from alignkit.train.rl_config import PRESETS, GRPOConfig, PPOConfig, RLConfig, RLOOConfig
from tests.helpers import one_thread as _one_thread  # noqa: F401  (autouse: one thread per module)
from tests.helpers import write_jsonl
from tests.test_online_rl import prompt_rows

CHAR = "python:alignkit.rewards.toy:char_share"
REWARDS = [CHAR, "length:target=3,unit=chars@0.1"]  # distinct rewards within a group on a random tiny model


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    from alignkit.testing import save_tiny_model

    d = tmp_path_factory.mktemp("presets")
    ref = save_tiny_model(d / "ref", seed=1)  # a reference that differs from the policy: KL != 0 at step 0
    return write_jsonl(d / "p.jsonl", prompt_rows(16, 0)), ref


def make_task(tiny_model, prompts, ref_path, preset, **rl):
    from alignkit.train.online import RLTask
    from alignkit.train.ppo import PolicyWithValue

    cfg = as_config(RLConfig, {"preset": preset, "model": {"name_or_path": str(tiny_model)},
                               "data": {"path": str(prompts)}, "rewards": REWARDS, "missing_eos_penalty": 0.1,
                               "generation": {"max_new_tokens": 6}, "value": {"shared": True}, "rl": rl}, {})
    tok = load_tokenizer(cfg.model)
    items = prepare("prompt", cfg.data, tok).train
    torch.manual_seed(0)
    policy = load_causal_lm(cfg.model)
    o = cfg.algo
    ref = None
    if o.kl_placement != "none" and o.kl_coef > 0:
        ref = load_causal_lm(ModelConfig(name_or_path=str(ref_path))).eval()
    model = PolicyWithValue(policy, None) if ADVANTAGES.get(o.advantage).needs_critic else policy
    task = RLTask(cfg, tok, build_reward(cfg.rewards), ref_model=ref, prompts=items)
    task.setup(None)
    return task, model, policy, items[:4]


# ------------------------------------------------------------------ the slow reference
def kl_token(lp, rl, kind):
    x = rl - lp  # log(pi_ref / pi)
    return {"k1": -x, "k2": 0.5 * x * x, "k3": torch.exp(x) - x - 1}[kind]


def whiten_list(values):
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


# ------------------------------------------------------------------ each estimator's slow reference
# fn(options, sequence scores, per-token rewards (one list per row), G) -> (advantages per row and token,
# value targets per row and token or None), in float64 Python from the paper's formula
def _slow_gae(o, seq, tok_r, G):  # zero value head: delta_t = r_t, A_t = sum_l (gamma*lam)^l r_{t+l}
    adv = [[sum((o.gamma * o.lam) ** (k - t) * r[k] for k in range(t, len(r))) for t in range(len(r))]
           for r in tok_r]
    return adv, [list(a) for a in adv]


def _slow_group(o, seq, tok_r, G):  # (r - mean_g) / std_g (sample std), Dr. GRPO without the division
    adv = []
    for g in range(0, len(seq), G):
        grp = seq[g:g + G]
        mean = sum(grp) / G
        std = math.sqrt(sum((x - mean) ** 2 for x in grp) / (G - 1))
        adv += [[(x - mean) / (std + 1e-6) if o.scale_by_std else x - mean] * len(tok_r[g + j])
                for j, x in enumerate(grp)]
    return adv, None


def _slow_leave_one_out(o, seq, tok_r, G):  # r_i - mean of the others
    adv = []
    for g in range(0, len(seq), G):
        grp = seq[g:g + G]
        adv += [[x - (sum(grp) - x) / (G - 1)] * len(tok_r[g + j]) for j, x in enumerate(grp)]
    return adv, None


def _slow_batch_baseline(o, seq, tok_r, G):  # reward-to-go, then (A - mean) / std over every token of the batch
    rtg = [[sum(r[t:]) for t in range(len(r))] for r in tok_r]
    flat = whiten_list([a for row in rtg for a in row])
    out, k = [], 0
    for row in rtg:
        out.append(flat[k:k + len(row)])
        k += len(row)
    return out, None


def _slow_batch_mean(o, seq, tok_r, G):  # r_i - mean of the whole batch (one process here)
    mean = sum(seq) / len(seq)
    return [[x - mean] * len(r) for x, r in zip(seq, tok_r)], None


SLOW_ADVANTAGES = {"gae": _slow_gae, "group": _slow_group, "leave_one_out": _slow_leave_one_out,
                   "batch_baseline": _slow_batch_baseline, "batch_mean": _slow_batch_mean}


# each policy loss at ratio 1 (the first update): advantages (T,) and log-probs with grad (T,) -> per-token loss
SLOW_POLICY_LOSSES = {
    "clipped_token": lambda a, lp: -a * torch.exp(lp - lp.detach()),  # PPO eq. 7 at r = 1
    # GSPO: s_i = exp(mean_t log ratio), one value per response on each of its tokens
    "clipped_sequence": lambda a, lp: (-a[0] * torch.exp((lp - lp.detach()).mean())).expand(len(lp)),
    "reinforce": lambda a, lp: -a * lp,  # -A log pi
}


def reference_loss(task, ro, policy, ref_model):
    """The loss of the first update, row by row in float64 from the formulas, with autograd on the policy."""
    o, cfg = task.opts, task.cfg
    N, G, L = len(ro), o.num_generations, cfg.generation.max_new_tokens
    raw = task.reward([""] * N, ro.texts, [{}] * N)  # the reward functions read only the texts here
    lp, rl = [], []  # per row: response-token log-probs (with grad) and reference log-probs
    for i in range(N):
        n = int(ro.sequences.attention_mask[i].sum())
        row = type(ro.sequences)(*(t[i:i + 1, :n] for t in (ro.sequences.input_ids, ro.sequences.attention_mask,
                                                              ro.sequences.loss_mask)))
        m = row.loss_mask[0, 1:].bool()
        lp.append(token_logprobs(policy, row).logps[0][m].double())
        if ref_model is not None:
            with torch.no_grad():
                rl.append(token_logprobs(ref_model, row).logps[0][m].double())
    # reward shaping: missing-EOS penalty, DAPO eq. 13 overlong zone, running (here: batch) normalization
    s = []
    for i in range(N):
        r = raw[i] - (0.0 if bool(ro.ended[i]) else cfg.missing_eos_penalty)
        cache = round(o.overlong_buffer * L)
        if cache and len(lp[i]) > L - cache:
            r += o.overlong_penalty * ((L - cache) - len(lp[i])) / cache
        s.append(r)
    if o.normalize_reward:
        mean = sum(s) / N
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (N - 1))
        s = [(x - mean) / (std + 1e-8) for x in s]
    beta = o.kl_coef if rl else 0.0
    kl = [kl_token(lp[i].detach(), rl[i], o.kl_estimator) if rl else torch.zeros(len(lp[i]), dtype=torch.float64)
          for i in range(N)]
    # KL placement -> per-token rewards r_t and sequence scores
    tok_r = []
    for i in range(N):
        r_t = [0.0] * len(lp[i])
        if o.kl_placement == "token_reward":
            r_t = [-beta * float(k) for k in kl[i]]
        elif o.kl_placement == "sequence_reward":
            s[i] -= beta * float(kl[i].sum())
        r_t[-1] += s[i]
        tok_r.append(r_t)
    seq = [sum(r) for r in tok_r]  # the sequence score the group methods compare
    # advantages: the estimator's slow reference (a registered estimator without one fails here)
    adv, returns = SLOW_ADVANTAGES[o.advantage](o, seq, tok_r, G)
    if o.whiten_advantages and not ADVANTAGES.get(o.advantage).normalized:
        flat = whiten_list([a for row in adv for a in row])
        k, adv = 0, [list(row) for row in adv]
        for row in adv:
            for t in range(len(row)):
                row[t], k = flat[k], k + 1
    # per-token policy loss at ratio 1 (value and gradient), plus the KL loss term
    per_tok = []
    for i in range(N):
        a = torch.tensor(adv[i], dtype=torch.float64)
        f = SLOW_POLICY_LOSSES[o.policy_loss](a, lp[i])  # a registered loss without a reference fails here
        if o.kl_placement == "loss" and rl:
            f = f + beta * kl_token(lp[i], rl[i], o.kl_estimator)
        per_tok.append(f)
    n_tok = sum(len(f) for f in per_tok)
    agg = {"token_mean": lambda: sum(f.sum() for f in per_tok) / n_tok,
           "sequence_mean": lambda: sum(f.mean() for f in per_tok) / N,
           "sum_norm": lambda: sum(f.sum() / L for f in per_tok) / N,
           "sum": lambda: sum(f.sum() for f in per_tok) / N}[o.aggregation]
    loss = agg()
    value = 0.0
    if returns is not None:  # a critic with a zero head: V = V_old = 0, loss 0.5 * R_t^2, token mean
        value = o.vf_coef * sum(0.5 * r * r for row in returns for r in row) / n_tok
    return loss, value


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_first_update_matches_a_slow_reference(setup, tiny_model, preset):
    prompts, ref_path = setup
    # one update per rollout so the first update sees the whole rollout; a KL coefficient on every
    # preset that places one (a reference that differs from the policy makes every KL term count)
    over = {"epochs": 1, "num_minibatches": 1, "dynamic_sampling": False}
    if PRESETS.get(preset).settings["kl_placement"] != "none":
        over["kl_coef"] = 0.3
    task, model, policy, items = make_task(tiny_model, prompts, ref_path, preset, **over)
    captured = {}
    sample = task.sample

    def sample_and_keep(*a, **k):
        out = sample(*a, **k)
        captured["ro"] = out[0]
        return out

    task.sample = sample_and_keep
    (update,) = list(task.plan(model, items, 3))
    total = sum(task.loss(model, mb)[0] for mb in update.micro_batches)
    units = sum(task.units(mb) for mb in update.micro_batches)
    fast = total / units
    model.zero_grad()
    fast.backward()
    fast_grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    ro = captured["ro"]
    ref_loss, ref_value = reference_loss(task, ro, policy, task.ref_model)
    assert float(fast.detach()) == pytest.approx(float(ref_loss.detach()) + ref_value, rel=1e-4, abs=1e-5)
    ref_loss.backward()
    ref_grads = [p.grad for p in policy.parameters()]
    scale = max(float(g.abs().max()) for g in ref_grads)
    assert scale > 1e-4  # a real gradient
    for a, b in zip(fast_grads, ref_grads):
        assert torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-5 * scale)
    if task.has_reference:
        m = {**update.metrics, **loop_metrics(task, model, update)}
        assert m["kl/ref"] != 0.0 and m["kl/coef"] == pytest.approx(0.3)


def loop_metrics(task, model, update):
    """The loss metrics of an update as the loop logs them: per-unit means over its micro-batches."""
    outs = [task.loss(model, mb)[1] for mb in update.micro_batches]
    ws = [task.units(mb) for mb in update.micro_batches]
    return {k: sum(float(o[k]) * w for o, w in zip(outs, ws)) / sum(ws) for k in outs[0]}


@pytest.mark.parametrize("preset", ["grpo", "dr_grpo", "gspo"])  # token and sequence ratios, three aggregations
def test_on_policy_runs_skip_the_old_logprob_pass_and_log_the_same_kl(setup, tiny_model, preset, monkeypatch):
    """One update per rollout with a fixed loss-placed KL: no no-grad policy pass before training, and the
    kl/entropy metrics taken from the loss pass equal those of the separate pass (which PPO-style runs
    still make)."""
    import alignkit.train.online as online

    prompts, ref_path = setup
    runs = {}
    for on_policy in (True, False):
        task, model, policy, items = make_task(tiny_model, prompts, ref_path, preset, epochs=1, num_minibatches=1,
                                               dynamic_sampling=False, kl_coef=0.3, kl_placement="loss")
        assert task.on_policy_stats
        if not on_policy:
            monkeypatch.setattr(online.RLTask, "on_policy_stats", property(lambda self: False))
        calls = []
        real = online.row_logprobs
        monkeypatch.setattr(online, "row_logprobs",
                            lambda m, *a, **k: calls.append(m is policy) or real(m, *a, **k))
        torch.manual_seed(0)
        (update,) = list(task.plan(model, items, 3))
        policy_passes_in_plan = sum(calls)
        runs[on_policy] = ({**update.metrics, **loop_metrics(task, model, update)},
                           policy_passes_in_plan, len(update.micro_batches))
        monkeypatch.undo()
    (fast, n_fast, _), (slow, n_slow, n_micro) = runs[True], runs[False]
    assert n_fast == 0 and n_slow == n_micro > 1  # the separate pass: one per micro-batch
    for k in ("kl/ref", "kl/ref_token", "kl/penalty", "kl/coef", "policy/entropy"):
        assert fast[k] == pytest.approx(slow[k], rel=1e-5, abs=1e-6), k
    assert fast["kl/ref"] != 0.0


# ------------------------------------------------------------------ the papers' formulas
def test_gspo_sequence_ratio_and_loss_follow_the_paper():
    from alignkit.losses.policy import gspo_loss, gspo_sequence_ratio

    torch.manual_seed(0)
    lp = torch.randn(3, 5, dtype=torch.float64) * 0.1 - 2
    old = lp + torch.randn(3, 5, dtype=torch.float64) * 0.05
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    ratio = gspo_sequence_ratio(lp, old, mask)
    for i in range(3):  # s_i = (prod_t pi/pi_old) ** (1/|y_i|)  (Zheng et al. 2025, eq. 7)
        prod, n = 1.0, 0
        for t in range(5):
            if mask[i, t]:
                prod *= math.exp(float(lp[i, t])) / math.exp(float(old[i, t]))
                n += 1
        assert float(ratio[i]) == pytest.approx(prod ** (1 / n), rel=1e-12)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    out = gspo_loss(lp, old, adv, mask, clip_eps=0.01, clip_eps_high=0.02, aggregation="sequence_mean")
    want = [-min(float(ratio[i]) * float(adv[i]), min(max(float(ratio[i]), 0.99), 1.02) * float(adv[i]))
            for i in range(3)]  # eq. 5: -min(s A, clip(s, 1-eps, 1+eps_high) A)
    assert out.losses.tolist() == pytest.approx(want, rel=1e-12)
    # the gradient of one response is A_i * s_i * mean_t grad log pi (unclipped), 0 where clipped
    lp.requires_grad_(True)
    gspo_loss(lp, old, adv, mask, clip_eps=10, clip_eps_high=10).losses.sum().backward()
    i, n = 1, 5
    assert lp.grad[i].tolist() == pytest.approx([-float(adv[i] * ratio[i]) / n] * n, rel=1e-9)


def test_reinforce_pp_baseline_follows_the_paper():
    from alignkit.advantages import batch_baseline_advantages, reward_to_go, reward_to_go_reference
    from alignkit.train.rl_stages import place_kl

    torch.manual_seed(0)
    N, T = 4, 6
    mask = torch.zeros(N, T)
    spans = [(1, 4), (0, 6), (2, 3), (3, 6)]  # responses at different offsets (after prompts)
    for i, (a, b) in enumerate(spans):
        mask[i, a:b] = 1
    kl = torch.rand(N, T) * mask
    scores = torch.tensor([1.0, 0.0, 0.5, 0.2])
    last = torch.tensor([b - 1 for _, b in spans])
    beta = 0.1
    _, token_rewards = place_kl("token_reward", scores, kl, beta, last)
    assert torch.allclose(reward_to_go(token_rewards, mask).double(), reward_to_go_reference(token_rewards, mask))
    adv = batch_baseline_advantages(token_rewards, mask)
    # Hu 2025, sec. 3: A_t = r(x, y) - beta * sum_{i >= t} KL_i, normalized over the whole batch
    raw = {}
    for i, (a, b) in enumerate(spans):
        for t in range(a, b):
            raw[(i, t)] = float(scores[i]) - beta * float(kl[i, t:b].sum())
    vals = list(raw.values())
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    for (i, t), v in raw.items():
        assert float(adv[i, t]) == pytest.approx((v - mean) / std, rel=1e-5, abs=1e-6)
    assert (adv[mask == 0] == 0).all()


# ------------------------------------------------------------------ every registered advantage estimator
# one small rollout, worked by hand: 2 prompts x G = 2 samples, responses of 2, 3, 1 and 2 tokens from column 0
HAND_INPUT = dict(
    scores=[1.0, 3.0, 2.0, 6.0],  # the sequence scores a response is judged by
    token_rewards=[[0.5, 1.0, 0.0], [0.0, 0.0, 3.0], [2.0, 0.0, 0.0], [0.0, 6.0, 0.0]],
    mask=[[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]],
    values=[[0.5, 0.5, 0.0], [0.5, 0.5, 0.5], [0.5, 0.0, 0.0], [0.5, 0.5, 0.0]],
    lengths=[2, 3, 1, 2])
# reward-to-go of the token rewards over each response: [1.5, 1], [3, 3, 3], [2], [6, 6]
_RTG = [1.5, 1.0, 3.0, 3.0, 3.0, 2.0, 6.0, 6.0]
_RTG_W = whiten_list(_RTG)
#: estimator -> (hyper-parameters, hand-computed advantages); a registered estimator missing here fails
HAND_ADVANTAGES = {
    # gamma 1, lam 0.5, V = 0.5 on every token, 0 after the last: delta_t = r_t + V_{t+1} - V_t,
    # A_t = delta_t + 0.5 A_{t+1}; row 1: delta = [0, 0, 2.5] -> A = [0.625, 1.25, 2.5]
    "gae": (dict(gamma=1.0, lam=0.5), [[0.75, 0.5, 0.0], [0.625, 1.25, 2.5], [1.5, 0.0, 0.0], [2.75, 5.5, 0.0]]),
    # groups [1, 3] and [2, 6]: (r - mean) / sample std = -+1 / sqrt(2) and -+2 / sqrt(8)
    "group": (dict(scale_by_std=True, std_scope="group"), [-2 ** -0.5, 2 ** -0.5, -2 ** -0.5, 2 ** -0.5]),
    # r_i - the other sample of its group
    "leave_one_out": ({}, [-2.0, 2.0, -4.0, 4.0]),
    # reward-to-go, whitened over the 8 response tokens of the batch (mean 3.1875, sample std 1.8886)
    "batch_baseline": (dict(whiten_scope="process"), [_RTG_W[0:2] + [0.0], _RTG_W[2:5], [_RTG_W[5], 0.0, 0.0],
                                                      _RTG_W[6:8] + [0.0]]),
    # r_i - the batch mean (1 + 3 + 2 + 6) / 4 = 3, not divided
    "batch_mean": ({}, [-2.0, 0.0, -1.0, 3.0]),
}


def test_batch_mean_baseline_is_the_mean_over_every_process():
    """Two processes of two rows each: the baseline is the mean of all four scores, from one reduction."""
    scores = torch.tensor(HAND_INPUT["scores"])
    halves = [scores[:2], scores[2:]]
    summed = lambda t: sum(torch.stack([h.double().new_tensor(float(h.numel())), h.double().sum()])  # noqa: E731
                           for h in halves)
    fn = ADVANTAGES.get("batch_mean").fn
    got = [fn(AdvantageInputs(h, torch.zeros(2, 1), torch.ones(2, 1), 2, reduce=summed))["advantages"] for h in halves]
    assert torch.cat(got).tolist() == pytest.approx([-2.0, 0.0, -1.0, 3.0], abs=1e-6)
    alone = fn(AdvantageInputs(halves[0], torch.zeros(2, 1), torch.ones(2, 1), 2))["advantages"]
    assert alone.tolist() == pytest.approx([-1.0, 1.0])  # one process: its own mean (1 + 3) / 2


@pytest.mark.parametrize("name", ADVANTAGES.names())
def test_every_advantage_estimator_matches_its_hand_computed_value(name):
    from alignkit.train.rl_batch import response_index

    assert name in HAND_ADVANTAGES, f"advantage estimator {name!r} has no hand-computed value in HAND_ADVANTAGES"
    assert name in SLOW_ADVANTAGES, f"advantage estimator {name!r} has no slow reference in SLOW_ADVANTAGES"
    spec = ADVANTAGES.get(name)
    hp, want = HAND_ADVANTAGES[name]
    assert set(hp) == set(spec.hparams)  # the estimator's declared hyper-parameters, all given
    h = {k: torch.tensor(v, dtype=torch.float32) for k, v in HAND_INPUT.items() if k != "lengths"}
    a = AdvantageInputs(h["scores"], h["token_rewards"], h["mask"], group_size=2,
                        values=h["values"] if spec.needs_critic else None,
                        response_index=response_index([1] * 4, HAND_INPUT["lengths"], 3))
    out = spec.fn(a, **hp)
    adv = out["advantages"]
    assert adv.dim() == (2 if spec.token_level else 1)
    assert adv.tolist() == [pytest.approx(row, abs=1e-5) for row in want] if spec.token_level \
        else adv.tolist() == pytest.approx(want, abs=1e-5)
    assert ("returns" in out) == spec.needs_critic
    if spec.normalized:  # zero mean, unit variance over the response tokens: whitening would change nothing
        tok = adv[h["mask"].bool()] if adv.dim() == 2 else adv
        assert float(tok.mean()) == pytest.approx(0.0, abs=1e-6) and float(tok.std()) == pytest.approx(1.0, abs=1e-4)


def test_every_policy_loss_has_a_slow_reference():
    from alignkit.losses.policy import RL_POLICY_LOSSES

    assert sorted(SLOW_POLICY_LOSSES) == RL_POLICY_LOSSES.names()


def test_no_string_test_of_a_stage_name_in_train():
    """Behaviour comes from the registries' declared fields, never from comparing a configured name."""
    import re
    from pathlib import Path

    from alignkit.losses.policy import AGGREGATIONS, RL_POLICY_LOSSES
    from alignkit.train.rl_stages import KL_PLACEMENTS

    names = {n for reg in (ADVANTAGES, KL_PLACEMENTS, RL_POLICY_LOSSES, AGGREGATIONS) for n in reg.names()}
    alt = "|".join(re.escape(n) for n in sorted(names))
    name = rf"""["']({alt})["']"""
    test = re.compile(rf"(==|!=)\s*{name}|{name}\s*(==|!=)|\bin\s*[(\[{{][^)\]}}]*{name}")
    train = Path(__file__).resolve().parents[1] / "src" / "alignkit" / "train"
    found = [f"{p.name}:{k + 1}: {line.strip()}" for p in sorted(train.glob("*.py"))
             for k, line in enumerate(p.read_text().splitlines()) if test.search(line)]
    assert not found, "string tests of stage names:\n" + "\n".join(found)


def test_overlong_penalty_is_dapo_eq_13():
    from alignkit.train.rl_stages import overlong_penalty

    # L_max = 10, buffer 0.2 -> L_cache = 2: free up to 8 tokens, then -1/2 per token
    got = overlong_penalty(torch.tensor([3.0, 8, 9, 10]), 10, 0.2, factor=1.0)
    assert got.tolist() == [0.0, 0.0, -0.5, -1.0]
    assert overlong_penalty(torch.tensor([10.0]), 10, 0.0).tolist() == [0.0]


# ------------------------------------------------------------------ dynamic sampling
class ScriptedEngine:
    """Prompts whose text ends in an even digit get identical answers (no signal), others differ."""

    def __init__(self, tok, G):
        self.tok, self.G, self.calls = tok, G, 0

    def generate(self, prompts, cfg):
        self.calls += 1
        eos = self.tok.eos_token_id
        out = []
        for k, p in enumerate(prompts):
            flat = int(p[-1]) % 2 == 0 and self.informative_off
            out.append([self.tok.convert_tokens_to_ids("a")] * (1 if flat else 1 + k % self.G) + [eos])
        return out

    informative_off = True

    def update_weights(self, model):
        pass


def test_dynamic_sampling_fills_the_batch_and_stops_at_its_cap(setup, tiny_model):
    prompts, ref_path = setup
    task, model, policy, items = make_task(tiny_model, prompts, ref_path, "dapo", num_generations=2,
                                           max_sampling_rounds=6)
    task.reward = build_reward(["length:target=1,unit=chars"])  # "a" scores 0, longer answers less
    eng = task.engine = ScriptedEngine(task.tok, 2)
    torch.manual_seed(0)
    ro, raw, m = task.sample(model, items)
    assert len(ro) == 2 * len(items)  # the batch is full ...
    groups = raw.view(-1, 2)
    assert (groups.max(1).values > groups.min(1).values).all()  # ... of informative groups only
    assert m["sampling/short_groups"] == 0 and m["sampling/rounds"] == eng.calls
    flat_first = sum(int(it["prompt_ids"][-1]) % 2 == 0 for it in items)
    assert m["sampling/dropped_groups"] >= flat_first  # at least the step's own flat prompts were dropped
    # every group flat: sampling stops at the cap and tops the batch up with dropped groups, counted
    eng.calls = 0
    task.reward = build_reward(["length:target=100@0"])  # a constant 0 reward: no group has signal
    ro, raw, m = task.sample(model, items)
    assert eng.calls == 6 and m["sampling/rounds"] == 6
    assert m["sampling/short_groups"] == len(items) and len(ro) == 2 * len(items)
    assert m["sampling/dropped_groups"] == 6 * len(items)


# ------------------------------------------------------------------ presets, overrides, CLI names
def test_presets_fill_what_the_user_leaves_out():
    base = {"rewards": [CHAR]}
    c = as_config(GRPOConfig, base, {"preset": "dapo", "grpo.clip_eps_high": 0.3})
    assert c.algo.dynamic_sampling and c.algo.aggregation == "token_mean" and c.algo.clip_eps_high == 0.3
    c = as_config(GRPOConfig, base, {"grpo.beta": 0.1})  # today's flag name still works
    assert c.algo.kl_coef == 0.1 and c.algo.advantage == "group" and c.algo.kl_estimator == "k3"
    assert as_config(PPOConfig, base, {}).algo.advantage == "gae"
    assert as_config(RLOOConfig, base, {}).algo.policy_loss == "reinforce"
    c = as_config(RLConfig, base, {"preset": "reinforce_pp"})
    assert c.algo.advantage == "batch_baseline" and c.algo.kl_placement == "token_reward"
    with pytest.raises(Exception, match="num_generations"):
        as_config(RLConfig, base, {"preset": "rloo", "rl.num_generations": 1})


def test_a_preset_is_checked_when_it_is_filed():
    from alignkit.train.rl_config import add_preset

    with pytest.raises(ValueError, match="(?s)preset 'bad'.*advantge"):  # a misspelled option
        add_preset("bad", "x", advantge="group")
    with pytest.raises(ValueError, match="(?s)preset 'bad'.*batch_baseline"):  # an unknown stage: the choices listed
        add_preset("bad", "x", advantage="nope")
    assert "bad" not in PRESETS
    with pytest.raises(ValueError, match="unknown online-RL preset 'nope'; choose one of: dapo, dr_grpo"):
        as_config(RLConfig, {"rewards": [CHAR]}, {"preset": "nope"})


def test_every_preset_is_a_cli_command_or_preset():
    from alignkit.cli import COMMANDS, build_cli

    build_cli()
    names = {c.name: c for c in COMMANDS}
    for cmd in ("ppo", "grpo", "rloo", "rl", "dapo", "dr-grpo", "gspo", "reinforce-pp"):
        assert cmd in names
    assert names["gspo"].defaults == {"preset": "gspo"}


# ------------------------------------------------------------------ critic optimizer group and warm-up
def test_critic_learning_rate_and_warmup(setup, tiny_model):
    from alignkit.train.online import RLTask
    from alignkit.train.ppo import PolicyWithValue

    prompts, _ = setup
    cfg = as_config(PPOConfig, {"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(prompts)},
                                "rewards": REWARDS, "generation": {"max_new_tokens": 5},
                                "value": {"shared": True, "lr": 0.5, "warmup_steps": 1},
                                "ppo": {"epochs": 1, "num_minibatches": 1, "num_generations": 1, "kl_coef": 0.0,
                                        "normalize_reward": False}}, {})
    tok = load_tokenizer(cfg.model)
    items = prepare("prompt", cfg.data, tok).train[:4]
    policy = load_causal_lm(cfg.model)
    model = PolicyWithValue(policy, None)
    task = RLTask(cfg, tok, build_reward(cfg.rewards))
    task.setup(None)
    groups = task.param_groups(model)
    assert groups[1]["lr"] == 0.5 and "lr" not in groups[0]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.value_head.parameters()}
    assert len(groups[0]["params"]) == len(list(policy.parameters()))
    torch.manual_seed(0)
    (update,) = list(task.plan(model, items, 8))  # warm-up step: the critic alone
    loss = sum(task.loss(model, mb)[0] for mb in update.micro_batches)
    loss.backward()
    assert all(p.grad is None for p in policy.parameters())
    assert model.value_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    (update,) = list(task.plan(model, items, 8))  # after warm-up: the policy learns too
    sum(task.loss(model, mb)[0] for mb in update.micro_batches).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert task.state_dict()["steps_done"] == 2


# ------------------------------------------------------------------ metric keys
def test_metric_keys_are_defined_once_and_documented():
    from pathlib import Path

    from alignkit.train import metric_keys as K

    assert K.KL_REF == "kl/ref" and K.METRICS["kl/ref"].unit == "nats/sequence"
    assert K.METRICS["kl/ref_token"].unit == "nats/token"
    assert K.unit_of("eval/kl/ref") == "nats/sequence" and K.unit_of("rewards/length") == "reward"
    doc = (Path(__file__).resolve().parents[1] / "docs" / "online-rl.md").read_text()
    assert K.markdown_table() in doc  # the docs' table is the module's


def test_token_budget_micro_batches_keep_the_rl_update(setup, tiny_model):
    """train.max_tokens_per_batch regroups a rollout's rows into micro-batches by tokens; normalization by
    global units keeps the loss and the gradient of the update."""
    prompts, ref_path = setup
    out = {}
    for budget in (None, 40):
        task, model, policy, items = make_task(tiny_model, prompts, ref_path, "grpo", kl_coef=0.3, num_minibatches=1)
        task.max_tokens = budget
        torch.manual_seed(0)
        (update,) = list(task.plan(model, items, 2))
        total = sum(task.loss(model, mb)[0] for mb in update.micro_batches)
        loss = total / sum(task.units(mb) for mb in update.micro_batches)
        model.zero_grad()
        loss.backward()
        out[budget] = (float(loss.detach()), [p.grad.clone() for p in policy.parameters()],
                       [len(mb) for mb in update.micro_batches])
        G = task.samples_per_prompt
    # without a budget a micro-batch holds 2 prompts (the micro-batch size) with all their G samples
    assert G > 1 and out[None][2] == [2 * G] * (sum(out[None][2]) // (2 * G)) and len(out[None][2]) > 1
    assert out[40][2] != out[None][2]
    assert out[40][0] == pytest.approx(out[None][0], rel=1e-5, abs=1e-6)
    for a, b in zip(out[40][1], out[None][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("preset", ["grpo", "gspo", "rloo", "reinforce_pp"])
def test_group_prompt_sharing_keeps_the_rl_update(setup, tiny_model, preset):
    """A group's samples share their prompt in the loss, old-log-prob and reference passes (one prompt per
    group in the micro-batch's rows): the rollout metrics, the loss and the gradient of the first update
    equal those of rows with a prompt each (fp32), and the shared micro-batches hold fewer tokens."""
    from alignkit.train.online import share_group_prompts

    prompts, ref_path = setup
    out = {}
    for share in (False, True):
        task, model, policy, items = make_task(tiny_model, prompts, ref_path, preset, kl_coef=0.3,
                                               dynamic_sampling=False)
        assert share_group_prompts(task.cfg, policy, task.ref_model)  # the probe passes on the tiny model
        task.share_prompts = share
        torch.manual_seed(0)
        update = next(iter(task.plan(model, items, 4)))
        total = sum(task.loss(model, mb)[0] for mb in update.micro_batches)
        loss = total / sum(task.units(mb) for mb in update.micro_batches)
        model.zero_grad()
        loss.backward()
        tokens = sum((mb.shared.batch if share else mb.seq).input_ids.numel() for mb in update.micro_batches)
        out[share] = (float(loss.detach()), [p.grad.clone() for p in policy.parameters()], update.metrics,
                      loop_metrics(task, model, update), tokens)
    (l0, g0, m0, lm0, n0), (l1, g1, m1, lm1, n1) = out[False], out[True]
    assert n1 < 0.8 * n0
    assert l1 == pytest.approx(l0, rel=1e-5, abs=1e-6)
    assert max(float(g.abs().max()) for g in g0) > 1e-4
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for k in set(m0) | set(lm0):
        want, got = {**m0, **lm0}[k], {**m1, **lm1}[k]
        assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-6), k


def test_shared_schedule_keeps_groups_together():
    """With prefix sharing a minibatch's rows are ordered group by group (first appearance; the shuffle
    kept within a group); the rows of each minibatch are the ones of the plain schedule."""
    from alignkit.train.online import RLTask

    class T(RLTask):
        def __init__(self):
            pass

        def update_shape(self):
            return 1, 2

    groups = [r // 3 for r in range(12)]  # 4 prompts x 3 samples
    torch.manual_seed(0)
    plain = T().schedule(12, 3, lengths=[5] * 12)
    torch.manual_seed(0)
    grouped = T().schedule(12, 3, lengths=[5] * 12, groups=groups)
    torch.manual_seed(0)
    order = torch.randperm(12).tolist()
    for mb_plain, mb_grouped, half in zip(plain, grouped, (order[:6], order[6:])):
        rows = [r for mb in mb_grouped for r in mb]
        assert sorted(rows) == sorted(r for mb in mb_plain for r in mb) == sorted(half)
        first = list(dict.fromkeys(groups[r] for r in half))
        assert rows == sorted(half, key=lambda r: first.index(groups[r]))


# ------------------------------------------------------------------ TRL's batch keys with several updates
def test_trl_batch_with_several_updates_gets_rollout_log_probs_for_every_row(setup, tiny_model):
    """per_device_train_batch_size x steps_per_generation trained in 4 updates: the behaviour-policy and
    reference passes cover every row of the rollout (they used to cover the first minibatch only, as if
    num_minibatches, which these keys replace, were the number of updates)."""
    from alignkit.train.online import RLTask

    prompts, ref_path = setup
    cfg = as_config(GRPOConfig, {"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(prompts)},
                                 "rewards": REWARDS, "generation": {"max_new_tokens": 6},
                                 "completions_per_device": 4, "steps_per_generation": 4,
                                 "grpo": {"num_generations": 4, "num_minibatches": 1, "kl_coef": 0.04}}, {})
    tok = load_tokenizer(cfg.model)
    items = prepare("prompt", cfg.data, tok).train
    torch.manual_seed(0)
    model = load_causal_lm(cfg.model)
    ref = load_causal_lm(ModelConfig(name_or_path=str(ref_path))).eval()
    task = RLTask(cfg, tok, build_reward(cfg.rewards), ref_model=ref, prompts=items)
    task.setup(None)
    assert task.update_shape() == (1, 4) and task.several_updates and not task.on_policy_stats
    updates = list(task.plan(model, items[:4], 4))
    assert len(updates) == 4
    rows = 0
    for update in updates:
        for mb in update.micro_batches:
            m = mb.loss_mask[:, 1:].bool()
            rows += m.shape[0]
            # at the first update the weights are the rollout's: the old log-probs are the policy's own
            assert mb.old_logps is not None and mb.ref_logps is not None
            assert (mb.old_logps[m] < 0).all() and (mb.ref_logps[m] < 0).all()
    assert rows == 16
