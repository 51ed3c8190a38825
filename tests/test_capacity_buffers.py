"""Capacity buffers (K2's runtime rank; ``lowrank_fused.optim._capacity``):
AdaptiveAdamW and AdaRankGrad with ``capacity_buffers=True`` keep each matrix's basis and
moments in one buffer sized for its largest rank, so rank changes at a refresh write into the
same memory. The trajectory must be bit-identical to the reallocating default, the addresses
fixed across rank changes, ``state_bytes`` the capacity, and a checkpoint resume must land back
in buffers and continue bit-identically."""
import io

import pytest
import torch

from lowrank_fused.optim import _capacity
from lowrank_fused.optim.adarankgrad import AdaRankGrad
from lowrank_fused.optim.adaptive_adamw import AdaptiveAdamW

# left- and right-projected matrices, odd sizes, two of one shape
SHAPES = [(40, 24), (24, 57), (33, 31), (24, 57)]
KEYS = ("basis", "exp_avg", "exp_avg_sq")

CASES = {
    "adaptive_svd": (AdaptiveAdamW, dict(update_proj_gap=4, max_rank=11)),
    "adaptive_randomized": (AdaptiveAdamW, dict(update_proj_gap=4, max_rank=11,
                                                projector="randomized")),
    "adarankgrad": (AdaRankGrad, dict(t_min=2, t_max=4, eta_th=0.9, proj_oversample=3)),
}


def _rank(opt, p):
    st = opt.state[p]
    return st["rank"]


def _grads(step, dtype):
    """Gradients of a step-dependent effective rank per layer (low rank plus a little noise),
    so IASS selects different ranks and the allocation moves rank between layers."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for i, (m, n) in enumerate(SHAPES):
        k = 1 + (step // 4 + i) % 4        # refreshes come every 4 steps
        G = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)
        out.append((G + 0.05 * torch.randn(m, n, generator=g)).to(dtype))
    return out


def _make(case, capacity, backend="reference", dtype=torch.float32, **extra):
    cls, kw = CASES[case]
    kw = {**kw, **extra}
    g = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    opt = cls([{"params": params, "rank": 5}], lr=1e-2, backend=backend,
              capacity_buffers=capacity, **kw)
    return params, opt


def _run(params, opt, steps, start=0):
    ranks, ptrs = [], []
    for t in range(start, start + steps):
        for p, G in zip(params, _grads(t, params[0].dtype)):
            p.grad = G
        opt.step()
        ranks.append(tuple(_rank(opt, p) for p in params))
        ptrs.append(tuple(opt.state[p][k].data_ptr() for p in params for k in KEYS))
    return ranks, ptrs


@pytest.mark.parametrize("case", list(CASES))
def test_capacity_buffers_are_bit_identical_and_never_move(case):
    a, opt_a = _make(case, False)
    b, opt_b = _make(case, True)
    ranks_a, _ = _run(a, opt_a, 13)
    ranks_b, ptrs_b = _run(b, opt_b, 13)
    assert ranks_a == ranks_b
    assert len(set(ranks_a)) > 1, "the test needs rank changes"
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    for x, y in zip(a, b):
        for k in KEYS:
            assert torch.equal(opt_a.state[x][k], opt_b.state[y][k])
            assert opt_b.state[y][k].is_contiguous()
            assert opt_b.state[y][k].shape == opt_a.state[x][k].shape
    assert len(set(ptrs_b)) == 1, "a rank change moved a capacity buffer"


def _capacity_rank(case, shape):
    if case == "adarankgrad":
        return min(5, *shape)
    return min(min(shape), 11, 5 * len(SHAPES) - len(SHAPES) + 1)


@pytest.mark.parametrize("case", list(CASES))
def test_state_bytes_count_the_capacity(case):
    params, opt = _make(case, True)
    _run(params, opt, 5)
    expect = 0
    for p, shape in zip(params, SHAPES):
        cap = _capacity_rank(case, shape)
        # P spans the projected (smaller) dimension, M and V the other one, all fp32
        expect += 4 * cap * (min(shape) + 2 * max(shape))
        for k in KEYS:
            assert _capacity.capacity(opt.state[p][k]) >= opt.state[p][k].numel()
        expect += sum(v.numel() * v.element_size() for k, v in opt.state[p].items()
                      if torch.is_tensor(v) and k not in KEYS)
    assert opt.state_bytes() == expect


@pytest.mark.parametrize("case", ["adaptive_svd", "adarankgrad"])
def test_resume_goes_back_into_buffers_and_continues_bit_identically(case):
    a, opt_a = _make(case, True)
    _run(a, opt_a, 6)
    buf = io.BytesIO()
    torch.save({"p": [p.detach().clone() for p in a], "opt": opt_a.state_dict()}, buf)
    _run(a, opt_a, 7, start=6)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b, opt_b = _make(case, True)
    with torch.no_grad():
        for p, v in zip(b, saved["p"]):
            p.copy_(v)
    opt_b.load_state_dict(saved["opt"])
    for p, shape in zip(b, SHAPES):
        r, cap = _rank(opt_b, p), _capacity_rank(case, shape)
        for k in KEYS:
            t = opt_b.state[p][k]
            assert _capacity.capacity(t) == t.numel() // r * cap
    _, ptrs = _run(b, opt_b, 7, start=6)
    assert len(set(ptrs)) == 1
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_capacity_buffers_on_triton_bf16():
    """The fused backend on bf16 parameters: the kernels see the same tensors either way."""
    a, opt_a = _make("adaptive_svd", False, backend="triton", dtype=torch.bfloat16)
    b, opt_b = _make("adaptive_svd", True, backend="triton", dtype=torch.bfloat16)
    ranks, _ = _run(a, opt_a, 9)
    assert _run(b, opt_b, 9)[0] == ranks and len(set(ranks)) > 1
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_max_rank_caps_every_allocation():
    params, opt = _make("adaptive_svd", False, max_rank=6)
    ranks, _ = _run(params, opt, 9)
    assert all(max(r) <= 6 and sum(r) == 5 * len(SHAPES) for r in ranks)
    assert any(max(r) == 6 for r in ranks)


def test_bad_capacity_arguments_are_refused():
    p = torch.nn.Parameter(torch.randn(20, 30))
    with pytest.raises(ValueError, match="capacity_buffers must be True or False"):
        AdaptiveAdamW([{"params": [p], "rank": 4}], capacity_buffers=1)
    with pytest.raises(ValueError, match="capacity_buffers must be True or False"):
        AdaRankGrad([{"params": [p], "rank": 4}], capacity_buffers="yes")
    with pytest.raises(ValueError, match="max_rank must be None or an int >= 1"):
        AdaptiveAdamW([{"params": [p], "rank": 4}], max_rank=2.5)
    with pytest.raises(ValueError, match="max_rank must be >= rank"):
        AdaptiveAdamW([{"params": [p], "rank": 4}], max_rank=3)


def test_place_reuses_only_a_large_enough_buffer():
    x = _capacity.zeros((3, 4), 40, dtype=torch.float32, device="cpu")
    assert _capacity.capacity(x) == 40 and x.shape == (3, 4)
    v = torch.randn(4, 5)
    y = _capacity.place(x, v, 40)
    assert y.data_ptr() == x.data_ptr() and torch.equal(y, v)
    # a value read from the buffer itself (a transposed view) is copied out first
    z = _capacity.place(y, y.t(), 40)
    assert z.data_ptr() == x.data_ptr() and torch.equal(z, v.t())
    # too small, other dtype: a new buffer
    w = _capacity.place(z, torch.randn(9, 5), 40)
    assert w.data_ptr() != x.data_ptr() and _capacity.capacity(w) == 45
    u = _capacity.place(w, torch.randn(2, 2, dtype=torch.float64), 40)
    assert u.dtype == torch.float64 and _capacity.capacity(u) == 40
