"""AdaPM / AdaPM-mini steady step of a whole class (lowrank_fused/ops_adapm_grouped.py,
kernels/grouped_adapm_update.py): the grouped Triton launches equal the single-matrix Triton op
of every member bit for bit (what the step engine relies on), the grouped reference equals the
single reference, Triton matches the reference within the dtype's tolerance, and with the
on-device ``skip`` flag set nothing a member writes changes. Fresh random inputs, members with
different scalars, outputs poisoned where the kernels write them."""
import math

import pytest
import torch

from lowrank_fused import ops_adapm_grouped as og
from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, tolerance
from _cases import orthonormal

COUNT = 3
M, N, RANK = 12, 20, 4


def scalars(count, clip, t0=3):
    """Per-member scalars: distinct steps (bias corrections), lrs and decays."""
    b1, b2 = 0.9, 0.95
    out = {k: [] for k in og.ROWS}
    for b in range(count):
        t = t0 + b
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        e_coef = 1.0 / (1 - b1)
        for name, v in (("beta1", b1), ("c1", c1), ("s_coef", 1.0 / c1), ("e_coef", e_coef),
                        ("coef_g", e_coef * (1 - b1)), ("v_keep", b2), ("v_add", 1 - b2),
                        ("eps", 1e-8), ("c2", c2), ("sqrt_c2", math.sqrt(c2)),
                        ("lr", 0.05 * (b + 1)), ("pre_scale", 1 - 0.01 * b),
                        ("clip", 0.8 if clip == "elementwise" else math.inf)):
            out[name].append(v)
    return out


def members(kind, nb, dtype, state, seed):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: scale * torch.randn(*s, generator=gen)   # noqa: E731
    out = []
    for b in range(COUNT):
        d = dict(W=rnd(M, N, scale=0.05).to(dtype), G=rnd(M, N).to(dtype))
        d["V"] = (torch.rand((M, N) if nb is None else (nb,), generator=gen) + 0.05).to(state)
        if kind == "lowrank":
            d["L"] = orthonormal(M, RANK, "cpu", generator=gen).to(state)
            d["R"] = rnd(RANK, N).to(state)
            d["Rg"] = d["L"].float().t() @ d["G"].float()
        elif kind == "full":
            d["M"] = rnd(M, N, scale=0.1).to(state)
        out.append(d)
    return out


def clone(ms):
    return [{k: v.clone() for k, v in d.items()} for d in ms]


def same_bits(a, b):
    as_int = {2: torch.int16, 4: torch.int32}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(as_int), b.view(as_int))


def run_grouped(kind, ms, rows, backend, skip=None):
    Ws, Gs, Vs = [d["W"] for d in ms], [d["G"] for d in ms], [d["V"] for d in ms]
    if kind == "lowrank":
        # the scratch the right operand is folded into starts poisoned
        Bs = [torch.full((RANK, N), float("nan")) for _ in ms]
        bound = og.BoundAdapmClass(Ws, Gs, Vs, Ls=[d["L"] for d in ms],
                                   Rs=[d["R"] for d in ms], Rgs=[d["Rg"] for d in ms], Bs=Bs,
                                   backend=backend)
    else:
        Ms = [d["M"] for d in ms] if kind == "full" else None
        bound = og.BoundAdapmClass(Ws, Gs, Vs, Ms=Ms, backend=backend)
    means = getattr(bound.impl, "means", None)
    if means is not None:               # the block-mean scratch starts poisoned too
        means.rowsq.fill_(float("nan"))
        means.h.fill_(float("nan"))
    bound(Gs, rows, skip=skip)


def run_single(kind, ms, s, clip, backend):
    for b, d in enumerate(ms):
        common = dict(v_keep=s["v_keep"][b], v_add=s["v_add"][b], eps=s["eps"][b],
                      c2=s["c2"][b], lr=s["lr"][b], pre_scale=s["pre_scale"][b],
                      clip_mode=clip, clip_threshold=0.8)
        if kind == "lowrank":
            lookup("adapm_update", backend)(d["W"], d["G"], d["L"], d["R"], d["Rg"], d["V"],
                                            beta1=s["beta1"][b], s_coef=s["s_coef"][b],
                                            e_coef=s["e_coef"][b], **common)
        else:
            lookup("adapm_dense_update", backend)(d["W"], d["G"], d.get("M"), d["V"],
                                                  beta1=s["beta1"][b], c1=s["c1"][b],
                                                  **common)


WRITTEN = {"lowrank": ("W", "V", "R"), "full": ("W", "V", "M"), "none": ("W", "V")}
CASES = [(k, nb, dt, st, clip)
         for k in ("lowrank", "full", "none")
         for nb, dt, st, clip in ((None, torch.float32, torch.float32, "elementwise"),
                                  (M, torch.bfloat16, torch.float32, "none"),
                                  (3, torch.bfloat16, torch.bfloat16, "elementwise"),
                                  (1, torch.float32, torch.float32, "elementwise"))]


@pytest.mark.parametrize("kind,nb,dtype,state,clip", CASES,
                         ids=[f"{k}-nb{nb}-{str(dt)[6:]}-{str(st)[6:]}-{c}"
                              for k, nb, dt, st, c in CASES])
def test_grouped_equals_single_and_reference(kind, nb, dtype, state, clip):
    ms = members(kind, nb, dtype, state, seed=hash((kind, nb, clip)) % 1000)
    s = scalars(COUNT, clip)
    rows = og.adapm_rows(COUNT, **s)
    results = {}
    for how, backend in (("grouped", "triton"), ("single", "triton"),
                         ("grouped", "reference"), ("single", "reference")):
        x = clone(ms)
        if how == "grouped":
            run_grouped(kind, x, rows, backend)
        else:
            run_single(kind, x, s, clip, backend)
        results[how, backend] = x
    for b in range(COUNT):
        for name in WRITTEN[kind]:
            g, one = results["grouped", "triton"][b][name], results["single", "triton"][b][name]
            assert same_bits(g, one), f"member {b} {name}: grouped Triton differs from the " \
                                      f"single launcher"
            gr, sr = results["grouped", "reference"][b][name], \
                results["single", "reference"][b][name]
            assert torch.equal(gr, sr), f"member {b} {name}: grouped reference"
            assert_parity(g, gr, rtol=tolerance(g.dtype), name=f"{name}[{b}]")
            assert not torch.equal(g, ms[b][name]), f"member {b} {name} was not written"


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("kind,nb", [("lowrank", None), ("full", 3), ("none", None)])
def test_skip_leaves_every_member_bit_identical(backend, kind, nb):
    ms = members(kind, nb, torch.float32, torch.float32, seed=7)
    ms[1]["G"][0, 0] = float("nan")
    if kind == "lowrank":
        ms[1]["Rg"][0, 0] = float("nan")
    before = clone(ms)
    rows = og.adapm_rows(COUNT, **scalars(COUNT, "elementwise"))
    run_grouped(kind, ms, rows, backend, skip=torch.tensor(True))
    for b in range(COUNT):
        for name, t in ms[b].items():
            assert same_bits(t, before[b][name]), f"member {b} {name} changed on a skipped step"
    run_grouped(kind, ms, rows, backend, skip=torch.tensor(False))
    assert not torch.equal(ms[0]["W"], before[0]["W"])


def test_bad_input_raises_naming_it_and_writes_nothing():
    ms = members("full", None, torch.float32, torch.float32, seed=3)
    before = clone(ms)
    rows = og.adapm_rows(COUNT, **scalars(COUNT, "elementwise"))
    Ws, Gs, Vs = [d["W"] for d in ms], [d["G"] for d in ms], [d["V"] for d in ms]
    Ms = [d["M"] for d in ms]
    with pytest.raises(ValueError, match=r"Vs\[2\]"):
        og.grouped_adapm_dense_update(Ws, Gs, Ms, Vs[:2] + [Vs[2][:, :5]], rows)
    with pytest.raises(TypeError, match=r"Gs\[1\]"):
        og.grouped_adapm_dense_update(Ws, [Gs[0], Gs[1].double(), Gs[2]], Ms, Vs, rows)
    with pytest.raises(ValueError, match=r"Ws\[0\] and Ws\[1\] overlap"):
        og.grouped_adapm_dense_update([Ws[0], Ws[0], Ws[2]], Gs, Ms, Vs, rows)
    with pytest.raises(ValueError, match="coef_g has 2 values"):
        og.adapm_rows(COUNT, coef_g=[1.0, 2.0])
    with pytest.raises(TypeError, match="skip"):
        og.grouped_adapm_dense_update(Ws, Gs, Ms, Vs, rows, skip=True)
    for b in range(COUNT):
        for name, t in ms[b].items():
            assert torch.equal(t, before[b][name]), f"{name}[{b}] touched by a bad call"
