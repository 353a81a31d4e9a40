"""The optimizer step: the global gradient norm and clipping folded into the fused AdamW kernel."""

import pytest
import torch
from accelerate import Accelerator

from alignkit.train.optim import ClippedStep, grad_norm
from tests.test_loop import make_trainer, sft_data  # noqa: F401  (fixture)


def _exact_norm(grads):
    return float(torch.stack([g.double().square().sum() for g in grads]).sum().sqrt())


def test_grad_norm_matches_float64():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(300, 40, generator=g) * 1e-3, torch.randn(7, generator=g),
             torch.randn(50, 60, generator=g).t(),  # not contiguous
             torch.randn(1000, generator=g).to(torch.bfloat16)]
    assert float(grad_norm(grads)) == pytest.approx(_exact_norm(grads), rel=1e-6)
    # a gradient whose squares overflow fp32 still gets its (finite) norm, so it is clipped, not skipped
    huge = [torch.full((100,), 3e19), torch.ones(10)]
    assert float(grad_norm(huge)) == pytest.approx(_exact_norm(huge), rel=1e-6)
    assert float(grad_norm([])) == 0.0


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    x = torch.randn(8, 16)
    model(x).square().sum().backward()
    return model


@pytest.mark.parametrize("max_norm", [0.05, 1e6, None])
def test_clipped_step_equals_clip_then_step(max_norm):
    """Same weights and same left-behind gradients as torch's clip_grad_norm_ followed by a fused step.

    The clipped step scales by the kernel's division (g / (1/c)) where torch multiplies (g * c): one
    rounding apart, which AdamW amplifies for gradients near its eps. So each step is compared from equal
    states: after the checks the reference takes our weights and moments."""
    ref, ours = _model_and_grads(), _model_and_grads()
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    opt = torch.optim.AdamW(ours.parameters(), lr=1e-2, fused=True)
    step = ClippedStep(Accelerator(cpu=True), opt)
    assert step.fast
    for k in range(3):
        if k:
            for m in (ref, ours):
                m(torch.randn(8, 16, generator=torch.Generator().manual_seed(k))).square().sum().backward()
        n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm if max_norm else float("inf"))
        n = step.norm(ours.parameters(), max_norm)
        assert float(n) == pytest.approx(float(n_ref), rel=1e-6)
        if max_norm == 0.05:
            assert float(n) > 0.05 * 10  # clipping really happens here
        opt_ref.step()
        step.step()
        assert not hasattr(opt, "grad_scale")  # the coefficient is this step's only
        for a, b in zip(ref.parameters(), ours.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-9)
            if max_norm == 0.05:
                assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
            else:  # no clipping: the very same step
                assert torch.equal(a, b)
        opt_ref.zero_grad()
        opt.zero_grad()
        with torch.no_grad():
            for a, b in zip(ref.parameters(), ours.parameters()):
                a.copy_(b)
                for key, value in opt.state[b].items():
                    opt_ref.state[a][key].copy_(value)


def test_clipped_step_falls_back_for_other_optimizers():
    model = _model_and_grads()
    before = [p.grad.clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = ClippedStep(Accelerator(cpu=True), opt)
    assert not step.fast
    n = step.norm(model.parameters(), 0.01)  # accelerate's clip_grad_norm_: clips in place
    assert float(n) == pytest.approx(_exact_norm(before), rel=1e-5)
    clipped = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float(clipped.norm()) == pytest.approx(0.01, rel=1e-4)
    step.step()


def test_trainer_clips_inside_the_fused_step(tmp_path, tiny_model, sft_data):  # noqa: F811
    """A real update: the loop takes the fast path, logs the pre-clipping norm, and the weights move by
    the clipped gradients (equal to clip-then-step on a copy)."""
    tr = make_trainer(tmp_path, tiny_model, sft_data, **{"optim.max_grad_norm": 0.01, "optim.lr": 1e-3})
    assert tr.clipped.fast
    (update,) = list(tr.task.plan(tr.model, tr._global_batch(0), tr.micro))
    model = tr.unwrapped()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = tr._update(update.micro_batches)
    moved = {n: p.detach().clone() for n, p in model.named_parameters()}
    # redo by hand: same gradients, torch's clipping, a fresh fused AdamW of the same settings
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    tr.accumulate(update.micro_batches)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    assert float(out["train/grad_norm"]) == pytest.approx(float(norm), rel=1e-5) and float(norm) > 0.1
    o = tr.cfg.optim
    ref = torch.optim.AdamW(model.parameters(), lr=tr.scheduler.get_last_lr()[0], betas=tuple(o.betas), eps=o.eps,
                            weight_decay=o.weight_decay, fused=True)
    ref.step()
    for n, p in model.named_parameters():
        assert torch.allclose(p, moved[n], rtol=1e-5, atol=1e-7), n
