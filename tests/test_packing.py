"""Padding-free packing and prefix sharing give the padded numbers: losses and gradients (fp32, 1e-5)
for SFT, reward models and every preference loss under every reference mode; token-budget micro-batches
keep the update; a model that cannot pack exactly falls back with a message."""

import copy

import pytest
import torch

from alignkit.config import DataConfig, LoraConfig, ModelConfig
from alignkit.data import prepare
from alignkit.data.layout import (PADDED, Packing, layout_pairs, layout_prompted, pack_units, pad_sequences,
                                  prompt_tree_units, share_row_prompts)
from alignkit.losses.preference import PREFERENCE_LOSSES
from alignkit.models.loading import apply_lora, load_causal_lm, load_tokenizer
from alignkit.ops.logprobs import reference_logprobs, token_logprobs
from alignkit.ops.packing import resolve_packing
from alignkit.testing import TINY_ARCHITECTURES, tiny_causal_lm
from alignkit.train.preference import DPOOptions, PreferenceTask, assign_kl_partners
from alignkit.train.reference import AdapterReference, ModelReference, PrecomputedReference, precompute
from alignkit.train.sft import SFTTask
from tests.helpers import pref_rows, ranking_rows, sft_rows, write_jsonl

PACKED = Packing(pack=True)
SHARED = Packing(pack=True, share_prompt=True)
TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
            if p.requires_grad]


def _loss_and_grads(task, model, items):
    model.zero_grad()
    loss, _ = task.loss(model, task.collate(items))
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_grads_close(x, y):
    """Gradients within 1e-5 of each tensor's scale: a prefix shared by many responses sums their
    gradients in one fp32 accumulation (the padded layout sums them per copy), so an entry that cancels
    to ~1 next to entries of ~500 (an embedding's) carries the rounding of the large ones (~1e-7 of them).
    A missing or extra contribution is the size of an entry, far outside this."""
    torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5 * max(1.0, float(y.abs().max())))


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], **TOL)
    for x, y in zip(a[1], b[1]):
        _assert_grads_close(x, y)


def test_pack_layout_by_hand():
    """Two sequences and one shared-prompt pair: positions, labels, blocks and label sources."""
    units = [[([1, 2, 3], [0, 1, 1], 0, None)], [([4, 5], [0, 1], 1, None)], [([6, 7, 8, 9], [0, 0, 1, 1], 2, None)]]
    b = pack_units(units, pad_id=0, num_seqs=3, row_tokens=5)
    assert b.input_ids.tolist() == [[6, 7, 8, 9, 0], [1, 2, 3, 4, 5]]  # first fit, longest first; order kept in a row
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 0], [0, 1, 1, 0, 1]]  # a sequence's first token is no label
    assert b.seq_index.tolist() == [[2, 2, 2, 2, -1], [0, 0, 0, 1, 1]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]] and len(b) == 3
    s = layout_pairs([[7, 8]], [[9, 10]], [[11]], 0, SHARED)
    assert s.input_ids.tolist() == [[7, 8, 9, 10, 11]]
    assert s.position_ids.tolist() == [[0, 1, 2, 3, 2]]  # the rejected response sits right after the prompt
    assert s.loss_mask.tolist() == [[0, 0, 1, 1, 1]]
    assert s.label_from.tolist()[0][2:] == [1, 2, 1]  # token 11 is predicted from the prompt's last token
    assert s.seq_index.tolist() == [[-1, -1, 0, 0, 1]]
    assert s.block.tolist() == [[0, 0, 1, 1, 2]] and s.block_end.tolist() == [[3, 3, 2, 2, 3]]


def test_prefix_tree_layout_by_hand():
    """Prompts with a common beginning share it: [1, 2, 3] once, prompt [1, 2, 3, 4] once for its two
    responses, [1, 2, 3, 5, 6] below the same root; [7, 8] shares nothing and stays a plain sequence."""
    groups = [([1, 2, 3, 4], [([10, 11], 0)]), ([1, 2, 3, 5, 6], [([12], 1)]), ([1, 2, 3, 4], [([13, 14, 15], 2)]),
              ([7, 8], [([16], 3)])]
    b = layout_prompted(groups, 0, SHARED)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 10, 11, 13, 14, 15, 5, 6, 12, 7, 8, 16]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 4, 5, 6, 3, 4, 5, 0, 1, 2]]
    assert b.seq_index.tolist() == [[-1, -1, -1, -1, 0, 0, 2, 2, 2, -1, -1, 1, 3, 3, 3]]
    assert b.loss_mask.tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 1]]
    # each segment's first token is predicted from its parent's last: 13 from 4, 5 from 3, 12 from 6
    assert b.label_from.tolist() == [[0, 0, 1, 2, 3, 4, 3, 6, 7, 2, 9, 10, 11, 12, 13]]
    assert b.block.tolist() == [[0, 0, 0, 1, 2, 2, 3, 3, 3, 4, 4, 5, 6, 6, 6]]
    assert b.block_end.tolist() == [[6, 6, 6, 4, 3, 3, 4, 4, 4, 6, 6, 6, 7, 7, 7]]
    from alignkit.ops.packing import shared_attention_mask

    model = tiny_causal_lm("llama")
    seen = shared_attention_mask(model, b, torch.float32)[0, 0]  # (q, k)
    assert seen[11].nonzero().squeeze(1).tolist() == [0, 1, 2, 9, 10, 11]  # 12 sees [1, 2, 3] [5, 6] and itself
    assert seen[6].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 6]  # 13 sees its prompt, not 10, 11
    assert seen[14].nonzero().squeeze(1).tolist() == [12, 13, 14]
    with pytest.raises(ValueError, match="depth-first"):  # a segment whose parent's subtree was left
        pack_units([[([1], [0], -1, None), ([2], [0], -1, 0), ([3], [1], 0, 1), ([4], [0], -1, None),
                     ([5], [1], 1, 1)]], 0, 2)


def test_prompt_tree_units_stop_where_attention_costs_more():
    """Sharing c tokens saves c; a longer unit pays for its attention: 500-token prompts sharing 10
    tokens stay apart, sharing 400 they join (each prompt's tokens are laid out once either way)."""
    def groups(shared):
        return [(list(range(3, 3 + shared)) + [1000 + 1000 * i + j for j in range(500 - shared)], [([7, 8], i)])
                for i in range(6)]

    apart = prompt_tree_units([(p, [(r, [1] * len(r), i) for r, i in rs]) for p, rs in groups(10)])
    joined = prompt_tree_units([(p, [(r, [1] * len(r), i) for r, i in rs]) for p, rs in groups(400)])
    assert len(apart) == 6 and all(len(u) == 1 for u in apart)
    assert len(joined) < 6 and sum(len(seg[0]) for u in joined for seg in u) < 6 * 502 - 400


@pytest.mark.parametrize("kind", TINY_ARCHITECTURES)
def test_packed_and_shared_logprobs_equal_padded_on_every_architecture(kind):
    """Sliding windows (Mistral, Gemma 2), softcaps, learned absolute positions (GPT-2): per-sequence
    log-prob sums and their gradients are the padded ones, chunked head and full logits alike."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(3, 90, (n,), generator=g).tolist()  # noqa: E731
    S, a, b = rnd(4), rnd(1), rnd(5)
    # a two-level prompt tree (S + a, S + b, S + a again: a prompt shared by two pairs) and a prompt of its own
    P, C, R = [S + a, S + b, rnd(3), S + a], [rnd(n) for n in (4, 8, 6, 2)], [rnd(n) for n in (7, 3, 5, 9)]
    model = tiny_causal_lm(kind)
    assert resolve_packing(model, True, True) == SHARED
    weights = torch.arange(1.0, 9.0)
    out = {}
    for name, packing in (("padded", PADDED), ("packed", PACKED), ("shared", SHARED)):
        for chunk in (0, 5):
            b = layout_pairs(P, C, R, 0, packing)
            model.zero_grad()
            tl = token_logprobs(model, b, chunk_size=chunk)
            (tl.sum() * weights).sum().backward()
            out[name, chunk] = (tl.sum().detach(), _grads(model), tl.lengths())
    for key, (s, g_, n) in out.items():
        _assert_same((s, g_), out["padded", 0][:2])
        assert n.tolist() == out["padded", 0][2].tolist()
    shared = layout_pairs(P, C, R, 0, SHARED)
    assert int(((shared.seq_index == -1) & (shared.attention_mask == 1)).sum()) == 4 + 1 + 5 + 3  # each once
    torch.testing.assert_close(reference_logprobs(model, shared).sum(), out["padded", 0][0], **TOL)
    assert shared.input_ids.numel() < layout_pairs(P, C, R, 0, PADDED).input_ids.numel()


def test_share_row_prompts_by_hand():
    """Online-RL rows (prompt + response, right-padded): two rows of one prompt become one unit, a row
    with its own prompt stays a sequence; each label maps back to its row and column."""
    rows = [[5, 6, 7, 8], [5, 6, 9], [4, 7, 8, 8], [5, 6, 3, 2, 1]]
    masks = [[0, 0, 1, 1], [0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 0, 1]]  # a 0 inside a response stays 0
    sr = share_row_prompts(pad_sequences(rows, masks, 0), 0)
    b = sr.batch
    flat = b.input_ids.flatten().tolist()
    assert flat.count(5) == 1 and flat.count(4) == 1  # prompt [5, 6] once for rows 0, 1, 3
    assert b.num_seqs == 4 and b.shared
    # every label of row i, column t (token t + 1) comes back to (i, t), with its token
    want = sorted((i, t) for i, m in enumerate(masks) for t in range(len(m) - 1) if m[t + 1])
    assert sorted(zip(sr.row.tolist(), sr.col.tolist())) == want
    labels = b.input_ids[:, 1:].reshape(-1)[sr.src]
    assert labels.tolist() == [rows[i][t + 1] for i, t in zip(sr.row.tolist(), sr.col.tolist())]
    assert share_row_prompts(pad_sequences([[1, 2, 3], [4, 5]], [[0, 1, 1], [0, 1]], 0), 0) is None


@pytest.mark.parametrize("kind", TINY_ARCHITECTURES)
def test_group_prompt_sharing_equals_rows_on_every_architecture(kind):
    """Four samples of one prompt and one other prompt: per-token log-probs and entropy mapped back to
    the rows' label space, and the gradient of a weighted sum, equal the padded rows'."""
    g = torch.Generator().manual_seed(1)
    rnd = lambda n: torch.randint(3, 90, (n,), generator=g).tolist()  # noqa: E731
    p = rnd(6)
    q = p[:4] + rnd(2)  # another prompt with the same beginning (a system prompt): shared too
    rows = [p + rnd(n) for n in (5, 2, 7, 4)] + [q + rnd(3)]
    masks = [[0] * 6 + [1] * (len(r) - 6) for r in rows[:4]] + [[0] * 6 + [1] * 3]
    seq = pad_sequences(rows, masks, 0)
    sr = share_row_prompts(seq, 0)
    assert int(((sr.batch.seq_index == -1) & (sr.batch.attention_mask == 1)).sum()) == 6 + 2
    model = tiny_causal_lm(kind)
    w = torch.randn(seq.input_ids.shape[0], seq.input_ids.shape[1] - 1, generator=g)
    out = []
    for shared in (False, True):
        model.zero_grad()
        tl = token_logprobs(model, sr.batch if shared else seq, with_entropy=True, chunk_size=4)
        lp, ent = (sr.to_rows(tl.logps), sr.to_rows(tl.entropy)) if shared else (tl.logps, tl.entropy)
        ((lp + 0.1 * ent) * w).sum().backward()
        out.append((lp.detach(), ent.detach() * seq.loss_mask[:, 1:], _grads(model)))
    torch.testing.assert_close(out[1][0], out[0][0], **TOL)
    torch.testing.assert_close(out[1][1], out[0][1], **TOL)
    for a, b in zip(out[1][2], out[0][2]):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shared_value_head_on_shared_rows_equals_rows(kind):
    """PPO's policy + shared value head on rows whose prompts have a common beginning (one sample each,
    as PPO samples): log-probs, entropy and values at the labels, and the gradient of a weighted sum,
    equal the padded rows' (values off the labels are 0 and never read by GAE or the value loss)."""
    from alignkit.ops import attention
    from alignkit.train.ppo import PolicyWithValue

    g = torch.Generator().manual_seed(2)
    rnd = lambda n: torch.randint(3, 90, (n,), generator=g).tolist()  # noqa: E731
    system = rnd(7)
    prompts = [system + rnd(n) for n in (3, 5, 2)] + [rnd(4)]
    rows = [p + rnd(n) for p, n in zip(prompts, (6, 3, 8, 5))]
    masks = [[0] * len(p) + [1] * (len(r) - len(p)) for p, r in zip(prompts, rows)]
    seq = pad_sequences(rows, masks, 0)
    sr = share_row_prompts(seq, 0)
    # the system part once, each prompt's rest once; the fourth prompt shares nothing and stays a plain row
    assert int(((sr.batch.seq_index == -1) & (sr.batch.attention_mask == 1)).sum()) == 7 + 3 + 5 + 2
    policy = tiny_causal_lm(kind)
    attention.use_for(policy)  # segment attention where the host takes it (CPU)
    model = PolicyWithValue(policy)
    with torch.no_grad():
        model.value_head.weight.normal_(0, 0.3)
    label = seq.loss_mask[:, 1:].float()
    w = torch.randn(label.shape, generator=g)
    out = []
    for shared in (None, sr):
        model.zero_grad()
        tl, values = model(seq.input_ids, seq.attention_mask, seq.loss_mask, shared=shared)
        ((tl.logps + 0.1 * tl.entropy + values) * w * label).sum().backward()
        out.append((tl.logps.detach() * label, tl.entropy.detach() * label, values.detach() * label,
                    [q.grad.clone() for q in model.parameters() if q.grad is not None]))
    for a, b in zip(out[1][:3], out[0][:3]):
        torch.testing.assert_close(a, b, **TOL)
    assert len(out[1][3]) == len(out[0][3])
    for a, b in zip(out[1][3], out[0][3]):
        _assert_grads_close(a, b)


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model)))


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_sft_packed_equals_padded(tiny_model, tok, tmp_path, reduction):
    data = prepare("sft", DataConfig(path=str(write_jsonl(tmp_path / "s.jsonl", sft_rows(12)))), tok)
    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model)))
    padded, packed = (SFTTask(tok.pad_token_id, reduction, 4, p) for p in (PADDED, PACKED))
    b = packed.collate(data.train)
    assert b.input_ids.shape[0] < len(data.train) and packed.units(b) == padded.units(padded.collate(data.train))
    _assert_same(_loss_and_grads(packed, model, data.train), _loss_and_grads(padded, model, data.train))


@pytest.mark.parametrize("loss", ["bradley_terry", "plackett_luce"])
def test_reward_model_packed_and_shared_equal_padded(tiny_model, tok, tmp_path, loss):
    from alignkit.models.loading import load_reward_model
    from alignkit.train.reward import RewardTask, group_rankings

    rows = pref_rows(4, 0) + ranking_rows(3, 1, k=3)
    data = prepare("preference", DataConfig(path=str(write_jsonl(tmp_path / "r.jsonl", rows))), tok)
    items, _ = group_rankings(data.train)
    model = load_reward_model(ModelConfig(name_or_path=str(tiny_model)), pad_token_id=tok.pad_token_id)
    with torch.no_grad():  # a zero head would make every gradient but the head's zero
        model.score.weight.normal_(0, 0.5)
    assert resolve_packing(model, True, True) == SHARED
    res = {p: _loss_and_grads(RewardTask(tok.pad_token_id, 0.1, loss, p), model, items)
           for p in (PADDED, PACKED, SHARED)}
    _assert_same(res[PACKED], res[PADDED])
    _assert_same(res[SHARED], res[PADDED])


def _policy(tiny_model):
    torch.manual_seed(0)
    policy = apply_lora(load_causal_lm(ModelConfig(name_or_path=str(tiny_model))), LoraConfig(enabled=True, r=4))
    with torch.no_grad():  # move the policy away from the reference so the test means something
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return policy


@pytest.fixture(scope="module")
def pref_items(tiny_model, tok, tmp_path_factory):
    path = write_jsonl(tmp_path_factory.mktemp("p") / "p.jsonl", pref_rows(6, 3))
    return prepare("preference", DataConfig(path=str(path)), tok).train


@pytest.mark.parametrize("loss", [n for n in PREFERENCE_LOSSES.names() if PREFERENCE_LOSSES.get(n).paired])
def test_every_paired_loss_and_reference_mode_shared_equals_separate(tiny_model, tok, pref_items, loss):
    """Prefix-shared = packed = padded for each paired loss, with the reference as a frozen model, the
    adapter switched off, and precomputed (its pass packed and shared too); an SFT term included."""
    policy = _policy(tiny_model)
    # discopop's default tau (0.05) multiplies fp32 rounding of the margin by 1/tau inside its sigmoid;
    # at 0.2 the layouts are compared at the tolerance every other loss meets
    hparams = {"discopop_tau": 0.2} if loss == "discopop" else {}
    opts = DPOOptions(loss=loss, sft_weight=0.5, beta=0.5, hparams=hparams)
    frozen = ModelReference(load_causal_lm(ModelConfig(name_or_path=str(tiny_model))), 4)
    refs = {"model": lambda p: frozen, "adapter": lambda p: AdapterReference(4), "none": lambda p: None}
    spec = PREFERENCE_LOSSES.get(loss)
    modes = ["model", "adapter", "precomputed"] if spec.needs_reference else ["none"]
    for mode in modes:
        res = {}
        for packing in (PADDED, PACKED, SHARED):
            items = [dict(x) for x in pref_items]
            if mode == "precomputed":
                precompute(AdapterReference(4), items, tok.pad_token_id, True, torch.device("cpu"), batch_size=4,
                           policy=policy, packing=packing)
                ref = PrecomputedReference()
            else:
                ref = refs[mode](packing)
            task = PreferenceTask(opts, tok.pad_token_id, ref, 4, packing)
            res[packing] = _loss_and_grads(task, policy, items)
        assert res[PADDED][0] != pytest.approx(0.0)
        _assert_same(res[PACKED], res[PADDED])
        _assert_same(res[SHARED], res[PADDED])


def test_kto_packed_equals_padded(tiny_model, tok, tmp_path):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in pref_rows(4, 5)]
    rows += [{"prompt": r["prompt"], "completion": r["rejected"], "label": False} for r in pref_rows(4, 6)]
    items = prepare("unpaired", DataConfig(path=str(write_jsonl(tmp_path / "k.jsonl", rows))), tok).train
    assign_kl_partners(items, 0)
    policy = _policy(tiny_model)
    res = {p: _loss_and_grads(PreferenceTask(DPOOptions(loss="kto"), tok.pad_token_id, AdapterReference(4), 4, p),
                              policy, items) for p in (PADDED, PACKED)}
    _assert_same(res[PACKED], res[PADDED])


def test_token_budget_keeps_the_update(tiny_model, tok, pref_items):
    """Micro-batches by a token budget (train.max_tokens_per_batch) accumulate to the one-batch update,
    since the loop normalizes by global units (pairs) whatever the split."""
    from alignkit.train.loop import Task

    policy = _policy(tiny_model)
    one = PreferenceTask(DPOOptions(loss="dpo"), tok.pad_token_id, AdapterReference(4), 4, SHARED)
    budget = copy.copy(one)
    budget.max_tokens = 40
    chunks = budget.split(pref_items, 8)
    assert len(chunks) > 2 and [x for c in chunks for x in c] == pref_items
    assert all(sum(map(budget.item_tokens, c)) <= 40 or len(c) == 1 for c in chunks)
    whole = _loss_and_grads(one, policy, pref_items)
    policy.zero_grad()
    total = 0.0
    for c in chunks:  # what Trainer.accumulate does: each micro-batch's sum over the global unit count
        loss, _ = budget.loss(policy, budget.collate(c))
        (loss / len(pref_items)).backward()
        total += float(loss.detach())
    torch.testing.assert_close(torch.tensor(total), whole[0], **TOL)
    for x, y in zip(_grads(policy), whole[1]):
        torch.testing.assert_close(x * len(pref_items), y, **TOL)
    assert Task().split(list(range(5)), 2) == [[0, 1], [2, 3], [4]]  # no budget: a row count


def test_a_model_that_cannot_pack_falls_back_with_a_message():
    model = tiny_causal_lm("llama")
    forward = model.forward

    def ignores_position_ids(*a, position_ids=None, attention_mask=None, **kw):  # e.g. an ALiBi-style model
        return forward(*a, **kw)

    model.forward = ignores_position_ids
    said = []
    assert resolve_packing(model, True, True, 512, say=said.append) == Packing(max_tokens=512)
    assert len(said) == 1 and "LlamaForCausalLM" in said[0] and "padded batches" in said[0]


def test_sft_trainer_token_budget_4x2_equals_8(tmp_path, tiny_model):
    """The shared loop with packing and a token budget: same update as one padded micro-batch of 8."""
    from alignkit.config import SFTConfig, as_config
    from alignkit.train.common import start_run
    from alignkit.train.loop import Trainer

    data = write_jsonl(tmp_path / "s.jsonl", sft_rows(16))
    grads = []
    for i, (packing, budget) in enumerate(((PADDED, None), (PACKED, 40))):
        cfg = as_config(SFTConfig, {"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(data)},
                                    "output": str(tmp_path / f"r{i}"), "log": {"progress": False},
                                    "train": {"precision": "fp32", "batch_size": 8}}, {})
        acc = start_run(cfg)
        tok = load_tokenizer(cfg.model)
        prep = prepare("sft", cfg.data, tok)
        task = SFTTask(tok.pad_token_id, "token", 4, Packing(pack=packing.pack, max_tokens=budget))
        tr = Trainer(cfg, task, load_causal_lm(cfg.model), prep.train, accelerator=acc, tokenizer=tok)
        (update,) = list(tr.task.plan(tr.model, tr._global_batch(0), tr.micro))
        assert (len(update.micro_batches) > 1) == bool(budget)
        tr.accumulate(update.micro_batches)
        grads.append([p.grad.clone() for p in tr.model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, **TOL)


def test_batched_logprobs_with_shared_prompts_equals_rows():
    """The eval's reference pass: eight samples of each of three prompts, in chunks that split a group
    (batch_size 5); log-probs with each prompt run once per chunk equal the padded rows' (fp32, 1e-5),
    and 0 stays 0 off the response tokens."""
    from alignkit.rollout.generate import batched_logprobs

    model = tiny_causal_lm("llama", seed=3).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 90, (n,), generator=g).tolist() for n in (5, 7, 4)]
    rows, masks = [], []
    for p in prompts:
        for _ in range(8):
            r = torch.randint(1, 90, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
            rows.append(p + r)
            masks.append([0] * len(p) + [1] * len(r))
    batch = pad_sequences(rows, masks, 0)
    assert resolve_packing(model, True, share_prompt=True).share_prompt
    plain = batched_logprobs(model, batch, batch_size=5)
    shared = batched_logprobs(model, batch, batch_size=5, share_prompts=True)
    torch.testing.assert_close(shared, plain, **TOL)
    labels = batch.loss_mask[:, 1:] == 1
    assert bool((plain[~labels] == 0).all()) and bool((plain[labels] < 0).all())
