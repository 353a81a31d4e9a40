"""Peak memory and time of per-token log-probs (forward + backward) against two peers, same run.

Peers:
  naive     model(...).logits -> float() -> log_softmax over [B, T, V] -> gather (a plain trainer)
  selective model(...).logits in the model dtype, log-softmax one row at a time in fp32 (the
            "selective log-softmax" idea used by several RLHF libraries)
  alignkit  alignkit.ops.logprobs.token_logprobs: head applied to label positions only, in
            checkpointed chunks, so no [B, T, V] tensor exists at all

Usage: python bench/logprobs_memory.py [--device cuda] [--batch 8 --seq 1024 --vocab 49152]
Prints one line per method and the ratios against alignkit. Memory is measured on CUDA only.
"""

from __future__ import annotations

import argparse
import time

import torch

from alignkit.data.layout import SeqBatch
from alignkit.ops.logprobs import token_logprobs


def naive(model, b: SeqBatch):
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(-1, b.input_ids[:, 1:, None]).squeeze(-1)
    return (lp * b.loss_mask[:, 1:]).sum()


def selective(model, b: SeqBatch):
    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1]
    labels = b.input_ids[:, 1:]
    rows = [torch.log_softmax(l.float(), -1).gather(-1, y[:, None]).squeeze(-1) for l, y in zip(logits, labels)]
    return (torch.stack(rows) * b.loss_mask[:, 1:]).sum()


CHUNK = 1024


def ours(model, b: SeqBatch):
    return token_logprobs(model, b, chunk_size=CHUNK).sum().sum()


def measure(fn, model, b, device, iters):
    for _ in range(2):  # warm-up
        fn(model, b).backward()
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = fn(model, b)
        loss.backward()
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / iters
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if device.type == "cuda" else float("nan")
    return float(loss.detach()), dt, peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=1024, help="alignkit's chunk size (label positions)")
    args = ap.parse_args()
    global CHUNK
    CHUNK = args.chunk
    from transformers import LlamaConfig, LlamaForCausalLM

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                      num_hidden_layers=args.layers, num_attention_heads=9 if args.hidden % 9 == 0 else 8,
                      num_key_value_heads=3 if args.hidden % 9 == 0 else 8, max_position_embeddings=args.seq)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    attn = torch.ones_like(ids)
    mask = torch.zeros_like(ids)
    mask[:, args.seq // 4:] = 1  # a quarter of each sequence is prompt
    b = SeqBatch(ids, attn, mask)
    print(f"device={device} dtype={dtype} B={args.batch} T={args.seq} V={args.vocab} layers={args.layers} "
          f"chunk={args.chunk}")
    res = {}
    for name, fn in (("alignkit", ours), ("selective", selective), ("naive", naive)):
        try:
            res[name] = measure(fn, model, b, device, args.iters)
        except torch.OutOfMemoryError:
            res[name] = (float("nan"), float("nan"), float("inf"))
            torch.cuda.empty_cache()
        loss, dt, peak = res[name]
        print(f"{name:10s} value={loss:.4g} time/iter={dt * 1000:.1f} ms  peak extra memory={peak:.3f} GiB")
    a = res["alignkit"]
    for name in ("selective", "naive"):
        r = res[name]
        print(f"ratio {name}/alignkit: time {r[1] / a[1]:.2f}x  memory {r[2] / a[2]:.2f}x")
    rel = abs(res["naive"][0] - a[0]) / max(abs(res["naive"][0]), 1e-9)
    print(f"agreement: |naive - alignkit| / |naive| = {rel:.2e}")


if __name__ == "__main__":
    main()
