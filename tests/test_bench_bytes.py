"""The benchmark byte model (bench/bytes.py) against the table of docs/bytes.md for
m, n, r = 4096, 11008, 128 (MiB), and its
generalisation to other element sizes and the right-projected form."""
import pytest

from bench import bytes as B

M, N, R = 4096, 11008, 128
A, S, C = M * N, R * N, M * R


def mib(x):
    return round(x / 2 ** 20)


@pytest.mark.parametrize("fn, eager, floor", [
    (lambda: B.project_bytes(M, N, R), 437, 93),
    (lambda: B.adam_moments_bytes(M, N, R), 97, 32),
    (lambda: B.backproject_update_bytes(M, N, R), 1039, 179),
    (lambda: B.galore_step_bytes(M, N, R), 1574, 305),
])
def test_section_10_table_mib(fn, eager, floor):
    b = fn()
    assert (mib(b.eager), mib(b.floor)) == (eager, floor)


def test_section_10_formulas_exact():
    assert B.project_bytes(M, N, R) == B.Bytes(2 * A + 4 * C + 4 * S, 10 * A + 4 * C + 4 * S)
    assert B.adam_moments_bytes(M, N, R) == B.Bytes(24 * S, 72 * S)
    assert B.backproject_update_bytes(M, N, R) == B.Bytes(4 * A + 4 * C + 4 * S,
                                                          24 * A + 4 * C + 4 * S)
    assert B.galore_step_bytes(M, N, R) == B.Bytes(6 * A + 24 * S + 8 * C + 8 * S,
                                                   10 * A + 72 * S + 24 * A + 8 * C + 8 * S)


def test_dense_adamw_22A():
    b = B.adamw_bytes(M, N)
    assert b.floor == 22 * A
    assert mib(b.floor) == 946


def test_fp32_parameters():
    # fp32 G and W: no cast pass in eager K1, W is 4 B in K3, AdamW moves 28A
    assert B.project_bytes(M, N, R, g_bytes=4) == B.Bytes(4 * A + 4 * C + 4 * S,
                                                          4 * A + 4 * C + 4 * S)
    assert B.backproject_update_bytes(M, N, R, w_bytes=4) == B.Bytes(8 * A + 4 * C + 4 * S,
                                                                     32 * A + 4 * C + 4 * S)
    assert B.galore_step_bytes(M, N, R, param_bytes=4).floor == 12 * A + 32 * S + 8 * C
    assert B.adamw_bytes(M, N, param_bytes=4).floor == 28 * A
    # torch's AdamW on bf16 parameters keeps bf16 states
    assert B.adamw_bytes(M, N, param_bytes=2, state_bytes=2).floor == 14 * A


def test_right_side_swaps_lowrank_and_basis():
    # a right projection of the m x n matrix is the left projection of its transpose
    for fn in (B.project_bytes, B.adam_moments_bytes, B.backproject_update_bytes,
               B.galore_step_bytes):
        assert fn(N, M, R, side="right") == fn(M, N, R, side="left")
    assert B.sizes(M, N, R, side="right") == (A, M * R, R * N)
    # with a bf16 basis (faithful_dtypes) the basis and the fp32 R differ, so the side matters
    assert (B.project_bytes(M, N, R, state_bytes=2, side="right").floor
            - B.project_bytes(M, N, R, state_bytes=2).floor) == 2 * (M * R - R * N)
    with pytest.raises(ValueError):
        B.sizes(M, N, R, side="both")


def test_model_table_has_every_op():
    text = B.format_model_table([(M, N)], [R], param_bytes=(2,))
    row = "| 4096x11008 | 128 | bf16 | left | 437 / 93 | 97 / 32 | 1039 / 179 | 1574 / 305 |"
    assert row in text


# -------------------------------------------------------------------------------------------
# full-matrix ops: Adafactor (K6), AdaMeM's bias-corrected Adafactor, AdaPM, GHA

def test_adafactor_step_k6():
    stats = 8 * (M + N)
    # K6 (docs/bytes.md): 10A fused with bf16 G/W (GaLore's C4 script: no scale_parameter)
    b = B.adafactor_step_bytes(M, N, scale_parameter=False)
    assert b == B.Bytes(10 * A + stats, 106 * A + stats)
    assert mib(b.floor) == 430
    # kernel docstring: 12 with scale_parameter (an RMS(W) read), + 8 with momentum
    assert B.adafactor_step_bytes(M, N) == B.Bytes(12 * A + stats, 106 * A + stats)
    assert B.adafactor_step_bytes(M, N, momentum=True) == B.Bytes(20 * A + stats,
                                                                  126 * A + stats)
    assert B.adafactor_step_bytes(M, N, weight_decay=True).eager == 126 * A + stats
    # fp32 W and G: no eager casts (the reference updates an fp32 W in place)
    assert B.adafactor_step_bytes(M, N, param_bytes=4) == B.Bytes(24 * A + stats,
                                                                  88 * A + stats)
    # batched (B, m, n): A and the statistics scale with B
    assert B.adafactor_step_bytes(M, N, batch=3) == B.Bytes(36 * A + 3 * stats,
                                                            318 * A + 3 * stats)


def test_adafactor_step_unfactored():
    # kernel docstring: 20 bytes per element with bf16 (22 with scale_parameter), + 8 momentum
    kw = dict(factored=False)
    assert B.adafactor_step_bytes(M, N, scale_parameter=False, **kw) == B.Bytes(20 * A,
                                                                                122 * A)
    assert B.adafactor_step_bytes(M, N, **kw) == B.Bytes(22 * A, 122 * A)
    assert B.adafactor_step_bytes(M, N, momentum=True, **kw) == B.Bytes(30 * A, 142 * A)
    assert B.adafactor_step_bytes(M, N, param_bytes=4, **kw) == B.Bytes(32 * A, 104 * A)


def test_adafactor_bc_steps():
    small = 8 * (M + N)
    # factored: G read twice + W read and written = 8 per element (bf16)
    assert B.adafactor_bc_factored_step_bytes(M, N) == B.Bytes(8 * A + small, 122 * A + small)
    assert B.adafactor_bc_factored_step_bytes(M, N, pre_scale=False) == B.Bytes(
        8 * A + small, 114 * A + small)
    assert B.adafactor_bc_factored_step_bytes(M, N, param_bytes=4, post_decay=True) == B.Bytes(
        16 * A + small, 132 * A + small)
    # unfactored: 14 per element (bf16 G/W, fp32 V)
    assert B.adafactor_bc_unfactored_step_bytes(A) == B.Bytes(14 * A, 138 * A)
    assert B.adafactor_bc_unfactored_step_bytes(A, param_bytes=4, pre_scale=False) == B.Bytes(
        20 * A, 120 * A)


def test_adapm_update():
    small = 4 * C + 12 * S
    # kernel docstring table (bf16 G/W, fp32 V): 14, 20 (rms clip), 8 (mini), 10 (mini, rms)
    assert B.adapm_update_bytes(M, N, R) == B.Bytes(14 * A + small, 200 * A + small)
    assert B.adapm_update_bytes(M, N, R, clip_mode="rms") == B.Bytes(20 * A + small,
                                                                     216 * A + small)
    assert B.adapm_update_bytes(M, N, R, v_blocks=M) == B.Bytes(8 * A + small + 8 * M,
                                                                140 * A + small + 8 * M)
    assert B.adapm_update_bytes(M, N, R, v_blocks=32, clip_mode="rms") == B.Bytes(
        10 * A + small + 8 * 32, 156 * A + small + 8 * 32)
    assert B.adapm_update_bytes(M, N, R, clip_mode="none", pre_scale=False).eager == (
        184 * A + small)
    assert B.adapm_update_bytes(M, N, R, param_bytes=4) == B.Bytes(20 * A + small,
                                                                   184 * A + small)
    with pytest.raises(ValueError):
        B.adapm_update_bytes(M, N, R, clip_mode="norm")


def test_gha_update():
    # two reads of G ("the same as K7"): 4A with bf16 G; eager: cast + three fp32 GEMMs + g*g
    assert B.gha_update_bytes(M, N, R) == B.Bytes(4 * A + 8 * C, 34 * A + 8 * C)
    assert B.gha_update_bytes(M, N, R, g_bytes=4) == B.Bytes(8 * A + 8 * C, 28 * A + 8 * C)
    assert B.gha_update_bytes(N, M, R, side="right") == B.gha_update_bytes(M, N, R)


# The eager models' m x n coefficients against the references themselves: every aten call
# of one reference step, counting the bytes of its m x n operands (inputs read, outputs
# written; views free; a copy reads only its source, and a copy onto itself is free).

def _full_size_traffic(fn, numel):
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None and not r.alias_info.is_write
                   for r in func._schema.returns):
                return out   # a view
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            if func.overloadpacket.__name__ == "copy_":
                if args[0].data_ptr() == args[1].data_ptr():
                    return out
                ins = [args[1]]
            Count.total += sum(t.numel() * t.element_size() for t in ins + outs
                               if t.numel() == numel)
            return out

    with Count():
        fn()
    return Count.total


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_eager_models_count_the_references(dtype_name):
    import torch

    from lowrank_fused.dispatch import implementation

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    p = dt.itemsize
    m, n, r = 6, 10, 2
    a = m * n

    def par(*s):
        return torch.randn(s or (m, n)).to(dt)

    def pos(*s):
        return torch.rand(s) + 0.1

    def check(op, args, kw, model, small=0):
        """Inputs are built before counting; the step's own traffic only."""
        impl = implementation(op, "reference", "cpu")
        assert _full_size_traffic(lambda: impl(*args, **kw), a) == model.eager - small, (op, kw)

    adaf = dict(rho=1e-2, beta2t=0.8, eps1=1e-30, eps2=1e-3, clip_threshold=1.0)
    for mom in (False, True):
        for wd in (0.0, 0.1):
            kw = dict(adaf, scale_parameter=True, beta1=0.9 if mom else None, weight_decay=wd)
            flags = dict(param_bytes=p, momentum=mom, weight_decay=wd != 0)
            E = torch.randn(1, m, n) if mom else None
            check("adafactor_step", (par(1, m, n), par(1, m, n), pos(1, m), pos(1, n), None, E),
                  kw, B.adafactor_step_bytes(m, n, **flags), 8 * (m + n))
            E = torch.randn(a) if mom else None
            check("adafactor_step", (par(a), par(a), None, None, pos(a), E), kw,
                  B.adafactor_step_bytes(m, n, factored=False, **flags))
    bc = dict(lr=1e-3, beta2=0.95, eps1=1e-30, eps=1e-8, c2=0.4)
    for pre, post in ((1.0, 0.0), (0.99, 0.0), (1.0, 0.01)):
        kw = dict(bc, pre_scale=pre, post_decay=post)
        flags = dict(param_bytes=p, pre_scale=pre != 1.0, post_decay=post != 0.0)
        check("adafactor_bc_factored_step", (par(), par(), pos(m), pos(n)), kw,
              B.adafactor_bc_factored_step_bytes(m, n, **flags), 8 * (m + n))
        check("adafactor_bc_unfactored_step", (par(), par(), pos(m, n)), kw,
              B.adafactor_bc_unfactored_step_bytes(a, **flags))
    L = torch.linalg.qr(torch.randn(m, r))[0]
    apm = dict(beta1=0.9, s_coef=1.5, e_coef=10.0, v_keep=0.95, v_add=0.05, eps=1e-8, c2=0.4,
               lr=1e-3, clip_threshold=1.0)
    for nb in (None, m, 2):
        for clip in ("elementwise", "rms", "none"):
            for pre in (1.0, 0.99):
                G = par()
                V = pos(m, n) if nb is None else pos(nb)
                check("adapm_update", (par(), G, L, torch.randn(r, n), L.t() @ G.float(), V),
                      dict(apm, pre_scale=pre, clip_mode=clip),
                      B.adapm_update_bytes(m, n, r, param_bytes=p, v_blocks=nb, clip_mode=clip,
                                           pre_scale=pre != 1.0),
                      4 * m * r + 12 * r * n + (8 * nb if nb else 0))
    check("gha_update", (par(), L), dict(eta=0.5), B.gha_update_bytes(m, n, r, g_bytes=p),
          8 * m * r)


def test_moment_transport_k8():
    # K8 (docs/bytes.md): 16S + 8C fused with fp32 states and bases (26 MiB in the example)
    b = B.moment_transport_bytes(M, N, R)
    assert b.floor == 16 * S + 8 * C and mib(b.floor) == 26
    assert b.eager == 8 * C + 16 * S + 24 * R * R
    assert B.moment_transport_bytes(M, N, R, form="linear").eager == 8 * C + 16 * S + 12 * R * R
    assert B.moment_transport_bytes(M, N, R, form="ldadam") == B.Bytes(16 * S + 8 * C,
                                                                       8 * C + 120 * S
                                                                       + 24 * R * R)
    # bf16 moments (faithful_dtypes): half the floor's S bytes; eager casts both ways
    assert B.moment_transport_bytes(M, N, R, state_bytes=2) == B.Bytes(
        8 * S + 8 * C, 8 * C + 40 * S + 24 * R * R)
    assert B.moment_transport_bytes(N, M, R, side="right") == B.moment_transport_bytes(M, N, R)
    with pytest.raises(ValueError):
        B.moment_transport_bytes(M, N, R, form="cubic")


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
@pytest.mark.parametrize("form", ["squared", "linear", "ldadam"])
def test_moment_transport_eager_model_counts_the_reference(form, dtype_name):
    """Every aten call of one reference transport, counting its basis (m x r), moment (r x n)
    and r x r operands: m, n, r = 7, 10, 3 keep the three sizes apart."""
    import torch

    from lowrank_fused.dispatch import implementation

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    m, n, r = 7, 10, 3
    op = {"squared": "moment_transport", "linear": "moment_transport_linear",
          "ldadam": "ldadam_moment_transport"}[form]
    impl = implementation(op, "reference", "cpu")
    P_new, P_old = (torch.linalg.qr(torch.randn(m, r))[0] for _ in range(2))
    M, V = torch.randn(r, n).to(dt), torch.rand(r, n).to(dt)
    if form == "ldadam":
        M_tr = torch.empty_like(M)
        fn = lambda: impl(P_new, P_old, M, V, M_tr, bc1=0.5, bc2=0.1)   # noqa: E731
    else:
        fn = lambda: impl(P_new, P_old, M, V)   # noqa: E731
    counted = sum(_full_size_traffic(fn, k) for k in (m * r, r * n, r * r))
    assert counted == B.moment_transport_bytes(m, n, r, state_bytes=dt.itemsize,
                                               form=form).eager


def test_adamem_moments_k2():
    # two passes over r x n (N needs the whole matrix's statistics): 20S fused at fp32, the
    # reference's 15 kernels 128S; the r- and n-vectors read and written once in both
    small = 8 * (R + N)
    assert B.adamem_moments_bytes(M, N, R) == B.Bytes(20 * S + small, 128 * S + small)
    assert mib(B.adamem_moments_bytes(M, N, R).floor) == 27
    # bf16 states (faithful_dtypes): 12S fused; eager casts M twice (6 B each)
    assert B.adamem_moments_bytes(M, N, R, state_bytes=2) == B.Bytes(
        12 * S + 4 * (R + N), 136 * S + 4 * (R + N))
    assert B.adamem_moments_bytes(N, M, R, side="right") == B.adamem_moments_bytes(M, N, R)


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
@pytest.mark.parametrize("stats_from_momentum", [True, False])
def test_adamem_moments_eager_model_counts_the_reference(stats_from_momentum, dtype_name):
    """Every aten call of one reference step, counting its r x n operands (r, n = 3, 10)."""
    import torch

    from lowrank_fused.dispatch import implementation

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    r, n = 3, 10
    impl = implementation("adamem_moments", "reference", "cpu")
    R_, M_ = torch.randn(r, n), torch.randn(r, n).to(dt)
    row, col = (torch.rand(r) + 0.1).to(dt), (torch.rand(n) + 0.1).to(dt)
    N_ = torch.empty_like(M_)
    kw = dict(beta1=0.9, beta2=0.95, eps=1e-8, eps1=1e-30, c1=0.5, c2=0.3,
              stats_from_momentum=stats_from_momentum)
    counted = _full_size_traffic(lambda: impl(R_, M_, row, col, N_, **kw), r * n)
    model = B.adamem_moments_bytes(r, n, r, state_bytes=dt.itemsize)
    assert counted == model.eager - 2 * dt.itemsize * (r + n)


# -------------------------------------------------------------------------------------------
# AdaMeM's residual column statistics, IASS rank selection

def test_residual_col_stats_bytes():
    small = M * N // min(M, N)   # the n-vectors of the canonical left form (long dimension)
    S_ = R * max(M, N)
    assert B.residual_col_stats_bytes(M, N, R) == B.Bytes(4 * S_ + 16 * small,
                                                          16 * S_ + 124 * small)
    assert B.residual_col_stats_bytes(M, N, R, form="explicit") == B.Bytes(
        2 * A + 4 * C + 4 * S + 12 * N, 6 * A + 32 * A + 4 * C + 4 * S + 104 * N)
    assert B.residual_col_stats_bytes(N, M, R, side="right") == B.residual_col_stats_bytes(M, N, R)
    with pytest.raises(ValueError):
        B.residual_col_stats_bytes(M, N, R, form="both")


@pytest.mark.parametrize("form", ["identity", "explicit"])
@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_residual_col_stats_eager_model_counts_the_reference(form, dtype_name):
    """Every aten call of the reference, counting its m x n, r x n and n-sized operands
    (m, n, r = 7, 10, 3: all sizes distinct)."""
    import torch

    from lowrank_fused.dispatch import implementation

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    m, n, r = 7, 10, 3
    impl = implementation("residual_col_stats", "reference", "cpu")
    G = torch.randn(m, n).to(dt)
    P = torch.linalg.qr(torch.randn(m, r))[0]
    R_ = P.t() @ G.float()
    gcs = G.float().square().sum(dim=0)
    c_os, scale = torch.rand(n) + 0.1, torch.empty(n)
    kw = dict(beta2=0.95, eps1=1e-30, eps=1e-8, c2=0.3, explicit=form == "explicit",
              g_col_sumsq=gcs if form == "identity" else None)
    counted = sum(_full_size_traffic(lambda: impl(G, P, R_, c_os, scale, **kw), k)
                  for k in (m * n, r * n, m * r, n))
    model = B.residual_col_stats_bytes(m, n, r, g_bytes=dt.itemsize, form=form)
    assert counted == model.eager


@pytest.mark.parametrize("dtype_name", ["bf16", "fp32"])
def test_iass_select_eager_model_counts_the_reference(dtype_name):
    import torch

    from lowrank_fused.dispatch import implementation

    dt = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    m, n, k = 7, 10, 3
    impl = implementation("iass_select", "reference", "cpu")
    G = torch.randn(m, n).to(dt)
    Qb = torch.linalg.qr(torch.randn(m, k))[0]
    Bm = Qb.t() @ G.float()
    counted = sum(_full_size_traffic(lambda: impl(G, Qb, Bm, eta_th=0.5, r_max=k), s)
                  for s in (m * n, k * n))
    assert counted == B.iass_select_bytes(m, n, k, g_bytes=dt.itemsize).eager
    assert B.iass_select_bytes(M, N, R) == B.Bytes(2 * A + 4 * S, 6 * A + 12 * A + 12 * S)


@pytest.mark.parametrize("method,full_passes", [
    ("galore", 6), ("adaptive_adamw", 6), ("rsadamw", 6), ("adarankgrad", 6), ("gha", 10),
    ("galore_kfac", 6), ("ldadam", 18), ("adamem", 8), ("adapm", 16), ("adapm_mini", 10)])
def test_method_step_floor_counts_the_full_size_passes(method, full_passes):
    """docs/bytes.md at bf16 parameters: each method's step floor is its full-size passes
    (GaLore 6A, AdaMeM 8A, AdaPM 16A; LDAdam 18A = the ideal 14A plus forming A = E + G;
    AdaPM-mini 10A with its kernel's extra read of G for the block means) plus low-rank terms
    (about 32 bytes per r x n element: one to two A at rank 128 on 4096 x 11008)."""
    A = M * N
    b = B.method_step_bytes(method, M, N, R, param_bytes=2)
    assert 0 < b.floor - full_passes * A < 2 * A, (method, b.floor / A)
    # fp32 parameters double the parameter passes, never the state ones
    assert B.method_step_bytes(method, M, N, R, param_bytes=4).floor > b.floor
    if b.eager is not None:
        assert b.eager > 4 * b.floor


def test_method_step_bytes_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="method must be one of"):
        B.method_step_bytes("sgd", M, N, R)


# -------------------------------------------------------------------------------------------
# FLOP model and roofline

def test_flops_hand_derived_small_shape():
    m, n, r = 6, 10, 2          # A = 60, left: S = 20, C = 12; right: S = 12, C = 20
    assert B.project_flops(m, n, r) == B.Flops(2 * 60 * 2)
    assert B.adam_moments_flops(m, n, r) == B.Flops(0, 0, 10 * 20)
    assert B.adam_moments_flops(m, n, r, side="right") == B.Flops(0, 0, 10 * 12)
    assert B.backproject_update_flops(m, n, r) == B.Flops(240, 0, 3 * 60)
    assert B.galore_step_flops(m, n, r) == B.Flops(480, 0, 180 + 200)
    assert B.adamw_flops(m, n) == B.Flops(0, 0, 14 * 60)
    # K8: P_new^T P_old is r x r over m (2*r*r*m), then two r x r by r x n products
    assert B.moment_transport_flops(m, n, r) == B.Flops(2 * 2 * 2 * 6 + 2 * 2 * 2 * 2 * 10)
    assert B.moment_transport_flops(m, n, r, form="ldadam").elementwise == 8 * 20
    # GHA: two IEEE m x n x r products and the r x r / m x r tail
    assert B.gha_update_flops(m, n, r) == B.Flops(0, 4 * 60 * 2 + 2 * 2 * (20 + 12), 2 * 60)
    # in the optimizer's step its two K1 run at the step's precision, and the tail has the
    # QR (CholeskyQR2: two Grams and two products over the m x r basis, 2*r*C each)
    assert B.gha_update_flops(m, n, r, k1_at_precision=True) == B.Flops(
        4 * 60 * 2, 2 * 2 * (20 + 12) + 8 * 2 * 12, 2 * 60)
    assert B.method_step_flops("gha", m, n, r) == (B.galore_step_flops(m, n, r)
                                                   + B.Flops(480, 2 * 2 * 32 + 8 * 2 * 12, 120)
                                                   + B.moment_transport_flops(m, n, r))
    f = B.method_step_flops("ldadam", m, n, r)
    assert f.gemm == 12 * 60 * 2 + 2 * 2 * 20 + 2 * 2 * 12 + (2 * 2 * 12 + 4 * 2 * 20)
    assert B.method_step_flops("adamem", m, n, r).gemm == 6 * 60 * 2
    assert B.method_step_flops("adapm", m, n, r).gemm == 6 * 60 * 2
    assert B.method_step_flops("galore_kfac", m, n, r) == B.Flops(480, 4 * 2 * 20,
                                                                  180 + 3 * 20)
    assert f.total == f.gemm + f.ieee_gemm + f.elementwise
    with pytest.raises(ValueError, match="method"):
        B.method_step_flops("sgd", m, n, r)


def test_flops_right_side_is_the_transpose():
    for method in B.METHOD_STEPS:
        if method.startswith("adapm"):   # AdaPM is left-form only
            continue
        assert (B.method_step_flops(method, N, M, R, side="right")
                == B.method_step_flops(method, M, N, R, side="left")), method


@pytest.mark.parametrize("method", B.METHOD_STEPS)
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_method_gemm_flops_match_the_reference_step(method, shape):
    """The model's GEMM FLOPs are what torch's FLOP counter sees in one steady step of the
    eager reference."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bench import bench_method_step as MS

    m, n, r = *shape, 4
    if method.startswith("adapm") and m > n:
        pytest.skip("AdaPM is left-form (m <= n) in the benchmark")
    W = torch.nn.Parameter(torch.randn(m, n))
    W.grad = torch.randn(m, n)
    opt = MS._optimizer(dict(method=method, r=r, precision="ieee"), W, "reference")
    opt.step()
    with FlopCounterMode(display=False) as counter:
        opt.step()
    side = "right" if m >= n else "left"
    f = B.method_step_flops(method, m, n, r, side=side)
    # GHA's model counts the Triton path's CholeskyQR2; the reference's Householder QR is
    # not a product torch's counter sees
    qr = B.cholqr2_flops(m, n, r, side=side) if method == "gha" else 0
    assert counter.get_total_flops() == f.gemm + f.ieee_gemm - qr


def test_op_flops_dispatch():
    assert B.op_flops("project", M, N, R, side="left") == B.project_flops(M, N, R)
    assert B.op_flops("method_step:ldadam", M, N, R) == B.method_step_flops("ldadam", M, N, R)
    assert B.op_flops("adamw", M, N) == B.adamw_flops(M, N)
    assert B.op_flops("adapm_update:mini", M, N, R).elementwise == 10 * A
    assert B.op_flops("grouped_project", M, N, R) is None


def test_device_peaks_and_precisions():
    h100 = B.device_peaks("NVIDIA H100 80GB HBM3")
    assert h100.name == "H100 SXM" and h100.hbm_gbps == 3000.0
    assert B.device_peaks("NVIDIA H200").hbm_gbps == 4800.0
    assert B.device_peaks("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert B.device_peaks("cpu (x86_64, 2 cores)") is None
    assert h100.tflops("ieee") == h100.tflops(None) == 67.0
    assert h100.tflops("tf32") == 495.0 and h100.tflops("tf32x3") == pytest.approx(165.0)
    assert h100.tflops("bf16") == 990.0
    with pytest.raises(ValueError, match="precision"):
        h100.tflops("fp8")


def test_roofline_takes_the_larger_term():
    pk = B.DevicePeaks("test", 1000.0, "test", fp32_tflops=10.0, tf32_tflops=100.0,
                       bf16_tflops=200.0)
    # bytes-bound: 1e9 B at 1000 GB/s = 1 ms; 1e9 GEMM FLOPs at 200 TFLOP/s = 5 us
    rl = B.roofline(10 ** 9, B.Flops(10 ** 9), "bf16", bandwidth_gbps=1000.0, peaks=pk)
    assert rl.seconds == pytest.approx(1e-3) and rl.bound == "bytes"
    # flops-bound: tf32x3 is a third of tf32, and the fp32 part runs at the fp32 rate
    rl = B.roofline(10 ** 6, B.Flops(3 * 10 ** 11, 0, 10 ** 10), "tf32x3",
                    bandwidth_gbps=1000.0, peaks=pk)
    assert rl.flops_seconds == pytest.approx(3e11 / (100e12 / 3) + 1e10 / 10e12)
    assert rl.seconds == rl.flops_seconds and rl.bound == "flops"
    with pytest.raises(ValueError, match="bandwidth_gbps"):
        B.roofline(1, B.Flops(1), "ieee", bandwidth_gbps=0, peaks=pk)


def test_headline_steps_are_compute_bound_in_ieee():
    """At 4096x11008 on an H100 the ieee GEMMs (4Ar at 67 TFLOP/s) outweigh the bytes of a
    GaLore step; bf16 GEMMs leave it bytes-bound."""
    h100 = B.DEVICE_PEAKS["h100"]
    b = B.method_step_bytes("galore", M, N, R).floor
    f = B.method_step_flops("galore", M, N, R)
    assert B.roofline(b, f, "ieee", bandwidth_gbps=3000.0, peaks=h100).bound == "flops"
    assert B.roofline(b, f, "bf16", bandwidth_gbps=3000.0, peaks=h100).bound == "bytes"
