"""Transport of GaLoreKFACAdamW's momentum and Kronecker factor across a subspace refresh
(docs/methods/adaptive_adamw.md: A4 applied to GaLoreKFACAdamW), left (canonical) form:

    C = P_new^T @ P_old          (r_new x r_old: the K1 projection kernel, an m-long reduction)
    M_new = C @ M                (r_new x n)      } one launch of the K8 transport kernel
    CF    = C @ F                (r_new x r_old)  } (``moment_transport.py``, linear form)
    F_new = CF @ C^T             (r_new x r_new, torch: r^3 work)

Not a kernel of its own: the two launches of ``moment_transport_linear`` with F as the second
"moment", CF kept in fp32 (a factor in bf16 is rounded once, at the end, as in the reference).
Registered as the ``triton`` implementation of ``kfac_transport``.
"""
import torch

from .moment_transport import (_TORCH_PRECISION, V_LINEAR, _check_args, _gram, _launch,
                               configs_for)


def kfac_transport(P_new: torch.Tensor, P_old: torch.Tensor, M: torch.Tensor,
                   F: torch.Tensor):
    """Same contract as ``lowrank_fused.reference.kfac_transport.kfac_transport_ref``: new
    tensors ``(C @ M, C @ F @ C^T)`` in the dtypes of M and F."""
    m, r_new, r_old = _check_args(P_new, P_old, M, F)
    if tuple(F.shape) != (r_old, r_old):
        raise ValueError(f"F must be r_old x r_old = {(r_old, r_old)}, got {tuple(F.shape)}")
    if m == 0 or r_new == 0 or r_old == 0 or M.shape[1] == 0:
        from lowrank_fused.reference.kfac_transport import kfac_transport_ref

        return kfac_transport_ref(P_new, P_old, M, F)
    # no precision argument (the reference's signature): torch's fp32 matmul setting decides
    precision = _TORCH_PRECISION.get(torch.get_float32_matmul_precision(), "ieee")
    C = _gram(P_new, P_old, precision)
    M_out = torch.empty((r_new, M.shape[1]), dtype=M.dtype, device=M.device)
    CF = torch.empty((r_new, r_old), dtype=torch.float32, device=M.device)
    _launch(C, M, F, M_out, CF, v_form=V_LINEAR, precision=precision)
    return M_out, (CF @ C.t()).to(F.dtype)


def aot_variants():
    """The transport kernel with an fp32 second output (CF) next to narrow states; the
    same-dtype variants are ``moment_transport.py``'s, C's GEMM is ``project.py``'s."""
    from lowrank_fused.testing.aot import Variant

    from .moment_transport import _moment_transport_kernel

    ints = {a: "i32" for a in ("R_NEW", "R_OLD", "N_M", "N_V", "stride_cr", "stride_ck",
                               "stride_mk", "stride_mn", "stride_vk", "stride_vn",
                               "stride_mor", "stride_mon", "stride_vor", "stride_von")}
    floats = {"bc1_sq": "fp32", "bc2": "fp32"}
    for s_t in ("bf16", "fp16"):
        for mode in (0, 1, 2, 4):   # ieee, tf32, bf16, tf32x3
            for cfg in configs_for(mode):
                yield Variant(_moment_transport_kernel,
                              {"c_ptr": "*fp32", "m_ptr": "*" + s_t, "v_ptr": "*" + s_t,
                               "mo_ptr": "*" + s_t, "vo_ptr": "*fp32", **ints, **floats},
                              dict(BLOCK_R=cfg.BLOCK_R, BLOCK_N=cfg.BLOCK_N,
                                   BLOCK_K=cfg.BLOCK_K, DOT_MODE=mode, V_FORM=V_LINEAR,
                                   INTERPRET=False),
                              cfg.num_warps, cfg.num_stages)
