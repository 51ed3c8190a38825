"""Memory claims, measured: after a run that crosses refreshes (and AdaptiveAdamW rank
changes), every parameter's optimizer state holds exactly the tensors of its method's state table
(docs/methods/*.md, "State and bytes": names, shapes, fp32) and nothing
else, so ``state_bytes()`` equals the analytic count and no hidden full-size buffer exists."""
import math

import pytest
import torch

from lowrank_fused.optim.adapm import adapm_block_names
from lowrank_fused.routing import METHODS

from _methods import backward, model, optimizer

RANK = 4
GALORE_FAMILY = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad")


def _low(m, n, r, side):
    return (r, n) if side == "left" else (m, r)


def _basis(m, n, r, side):
    return (m, r) if side == "left" else (r, n)


def _std_side(m, n):
    return "right" if m >= n else "left"


def expected(method, name, p, state, block=None):
    """{state key: shape} its method's state table gives this parameter."""
    shape = tuple(p.shape)
    projected = p.dim() == 2 and "layers" in name          # attn / mlp Linear weights
    dense = {"exp_avg": shape, "exp_avg_sq": shape}
    if method == "adamw":
        return dense
    if method == "adafactor":
        return ({"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
                if p.dim() >= 2 else {"exp_avg_sq": shape})
    if method in GALORE_FAMILY:
        if not projected:
            return dense
        m, n = shape
        side = _std_side(m, n)
        r = {"adaptive_adamw": state.get("rank"), "adarankgrad": state.get("rank")}.get(
            method, RANK)
        out = {"basis": _basis(m, n, r, side), "exp_avg": _low(m, n, r, side)}
        if method == "galore_kfac":                 # 5.6: F and its inverse root, no v
            out.update(kfac_factor=(r, r), kfac_root=(r, r))
        else:
            out["exp_avg_sq"] = _low(m, n, r, side)
        if method in ("adaptive_adamw", "rsadamw", "gha", "galore_kfac"):
            out["nl_prev"] = ()                     # 5.1: the limiter's scalar memory
        return out
    if method == "ldadam":
        if not projected:
            return dense
        m, n = shape
        side = "left" if m <= n else "right"        # 7: LDAdam's 'std' (squares on the left)
        return {"basis": _basis(m, n, RANK, side), "exp_avg": _low(m, n, RANK, side),
                "exp_avg_sq": _low(m, n, RANK, side), "error": shape}
    if method == "adamem":
        if not projected:                           # AdaMeM's routing: Adafactor elsewhere
            return ({"row": shape[:-1], "col": shape[-1:]} if p.dim() >= 2 else {"v": shape})
        m, n = sorted(shape)                        # 8.1: on the transpose when m > n
        return {"basis": (m, RANK), "M": (RANK, n), "a_row": (RANK,), "a_col": (n,), "c_os": (n,)}
    if method in ("adapm", "adapm_mini"):
        m, n = (shape[0], shape[1]) if p.dim() == 2 else (1, shape[0])
        mini = method == "adapm_mini"
        heads = 2
        v = ({"q": (heads,), "k": (heads,), "norm": (1,)}.get(block, (m,)) if mini
             else (m, n))
        if block in ("q", "k", "mlp"):
            return {"L": (m, RANK), "R": (RANK, n), "exp_avg_sq": v}
        if block in ("v", "lm_head", "norm"):
            return {"exp_avg": (m, n), "exp_avg_sq": v}
        return {"exp_avg_sq": v}                    # no-momentum blocks
    raise AssertionError(method)


@pytest.mark.parametrize("method", METHODS)
def test_state_is_exactly_the_spec_table(method):
    net = model()
    opt = optimizer(net, method)
    for t in range(5):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=True)
    blocks = adapm_block_names(net) if method.startswith("adapm") else {}
    total = 0
    for name, p in net.named_parameters():
        state = opt.state[p]
        tensors = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
        want = expected(method, name, p, state, blocks.get(name))
        assert tensors == want, f"{method}: {name} holds {tensors}, its state table says {want}"
        for k, v in state.items():
            if torch.is_tensor(v):
                assert v.dtype == torch.float32, f"{method}: {name}.{k} is {v.dtype}"
        total += 4 * sum(math.prod(s) for s in want.values())
    assert opt.state_bytes() == total
    if method == "adaptive_adamw":                  # the global budget is kept exactly
        ranks = [opt.state[p]["rank"] for g in opt.param_groups if "rank" in g
                 for p in g["params"]]
        assert sum(ranks) == RANK * len(ranks) and len(set(ranks)) > 1


@pytest.mark.parametrize("method", [m for m in METHODS if m not in ("adamw",)])
def test_low_rank_state_is_smaller_than_adamw(method):
    net = model(intermediate_size=96)
    opt = optimizer(net, method)
    backward(net, 0)
    opt.step()
    adamw = 8 * sum(p.numel() for p in net.parameters())
    assert opt.state_bytes() < adamw * (1.1 if method == "ldadam" else 1.0)
