"""Soak: 2,000 steps of every method on a tiny model (CPU, reference backend; a shorter run
through the Triton kernels): losses and weights always finite, no growth of process memory or
of live Python objects after warm-up, and state bytes constant except where ranks
legitimately change (AdaptiveAdamW's allocation, AdaRankGrad's adaptive rank)."""
import gc
import math
import os

import pytest
import torch
import torch.nn as nn

import lowrank_fused as lf
from lowrank_fused.routing import METHODS

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2000
WARMUP = 300
RANK_CHANGING = ("adaptive_adamw", "adarankgrad")


class TinyNet(nn.Module):
    """First and last layers dense (AdaMeM leaves them out), two projected 40 x 40 layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(24, 40)
        self.attn = nn.Linear(40, 40)
        self.norm = nn.LayerNorm(40)
        self.mlp = nn.Linear(40, 40, bias=False)
        self.out = nn.Linear(40, 8)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + torch.tanh(self.attn(self.norm(h)))
        return self.out(h + torch.tanh(self.mlp(h)))


def _kwargs(method):
    if method in ("adamw", "adafactor"):
        return {}
    kw = dict(rank=4)
    if method in ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adamem"):
        kw["update_proj_gap"] = 50                     # 40 refreshes in the soak
    if method == "adarankgrad":
        kw.update(t_min=5, t_max=50)
    return kw


def _rss_bytes():
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _soak(method, steps, backend):
    torch.manual_seed(0)
    net = TinyNet()
    opt = lf.make_optimizer(net, method, backend=backend, **_kwargs(method))
    g = torch.Generator().manual_seed(1)
    X = torch.randn(64, 24, generator=g)
    Y = torch.sin(X[:, :8] * 2.0) + 0.1 * X[:, 8:16]
    losses, marks = [], {}
    for t in range(steps):
        idx = torch.randint(0, 64, (16,), generator=g)
        loss = ((net(X[idx]) - Y[idx]) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        assert math.isfinite(losses[-1]), f"{method}: loss {losses[-1]} at step {t}"
        if t in (WARMUP, steps - 1):
            gc.collect()
            marks[t] = (_rss_bytes(), len(gc.get_objects()), opt.state_bytes())
        if t > 0 and method not in RANK_CHANGING and t % 97 == 0:
            assert opt.state_bytes() == marks.get("bytes", opt.state_bytes()), \
                f"{method}: state bytes changed at step {t}"
            marks["bytes"] = opt.state_bytes()
    for name, p in net.named_parameters():
        assert torch.isfinite(p).all(), f"{method}: {name} not finite"
    return net, opt, losses, marks


@pytest.mark.parametrize("method", METHODS)
def test_soak_2000_steps(method):
    net, opt, losses, marks = _soak(method, STEPS, "reference")
    (rss0, objs0, bytes0), (rss1, objs1, bytes1) = marks[WARMUP], marks[STEPS - 1]
    assert rss1 - rss0 < 16 * 2**20, f"{method}: RSS grew {(rss1 - rss0) / 2**20:.1f} MiB"
    assert objs1 - objs0 < 500, f"{method}: {objs1 - objs0} more live Python objects"
    adamw = 8 * sum(p.numel() for p in net.parameters())
    if method in RANK_CHANGING:
        assert bytes1 <= adamw
    else:
        assert bytes1 == bytes0
    early, late = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert late < 0.5 * early, f"{method}: loss {early:.3f} -> {late:.3f}"


@pytest.mark.parametrize("method", ["galore", "adamw"])
def test_soak_through_triton_kernels(method):
    """The same on backend="triton" (the interpreter without a GPU), 150 steps."""
    net, opt, losses, _ = _soak(method, 150, "triton")
    assert sum(losses[-20:]) < sum(losses[:20])
