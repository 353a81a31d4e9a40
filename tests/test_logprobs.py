"""Chunked log-probs equal the full log-softmax (values and gradients), under any padding."""

import torch

from alignkit.data.collate import SeqBatch, pad_sequences
from alignkit.ops.logprobs import reference_logprobs, token_logprobs
from alignkit.testing import tiny_llama


def _batch(tok):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]]
    masks = [[0, 0, 1, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    return pad_sequences(seqs, masks, tok.pad_token_id)


def test_chunked_matches_reference_values_and_grads(tiny_tok):
    model = tiny_llama(tiny_tok)
    b = _batch(tiny_tok)
    fast = token_logprobs(model, b, chunk_size=3, with_entropy=True)
    fast.sum().sum().backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = reference_logprobs(model, b)
    ref.sum().sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    assert torch.allclose(fast.logps, ref.logps, atol=1e-5)
    assert torch.allclose(fast.entropy * fast.mask, ref.entropy * ref.mask, atol=1e-5)
    assert fast.lengths().tolist() == [4.0, 2.0, 5.0]
    for a, r in zip(g_fast, g_ref):
        assert torch.allclose(a, r, atol=1e-5)


def test_left_right_and_no_padding_agree(tiny_tok):
    model = tiny_llama(tiny_tok).eval()
    seq, mask = [5, 6, 7, 8, 9], [0, 0, 1, 1, 1]
    alone = token_logprobs(model, pad_sequences([seq], [mask], 0)).sum()
    right = token_logprobs(model, pad_sequences([seq, [1] * 8], [mask, [0] * 8], 0)).sum()[0]
    # left padding: 3 pad tokens in front, masks shifted accordingly
    pad = tiny_tok.pad_token_id
    left = SeqBatch(torch.tensor([[pad] * 3 + seq]), torch.tensor([[0] * 3 + [1] * 5]), torch.tensor([[0] * 3 + mask]))
    left_lp = token_logprobs(model, left).sum()[0]
    assert torch.allclose(alone[0], right, atol=1e-5)
    assert torch.allclose(alone[0], left_lp, atol=1e-5)
