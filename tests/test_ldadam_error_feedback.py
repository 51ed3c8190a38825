"""LDAdam error feedback (K4): the fused Triton op vs the eager reference
(lowrank_fused/reference/ldadam_error_feedback.py), both forms, both E dtypes."""
import pytest
import torch

from lowrank_fused.dispatch import lookup
from lowrank_fused.testing import assert_parity, poison, tolerance
from _cases import orthonormal

SHAPES = [(97, 203), (64, 64), (130, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("rank", [1, 7])
@pytest.mark.parametrize("explicit", [False, True], ids=["fused-form", "explicit-form"])
@pytest.mark.parametrize("e_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("alias", [False, True], ids=["E-separate", "E-is-A"])
def test_error_feedback_matches_reference(shape, rank, explicit, e_dtype, alias, device):
    m, n = shape
    A0 = torch.randn(m, n, device=device).to(e_dtype)
    Pn, Po = orthonormal(m, rank, device), orthonormal(m, rank, device)
    Rg = Pn.t() @ A0.float()
    M = torch.randn(rank, n, device=device)
    M_tr = (Pn.t() @ Po) @ M
    c = 0.908 / (1 - 0.908)
    out = {}
    for backend in ("reference", "triton"):
        A = A0.clone()
        E = A if alias else poison(torch.empty(m, n, device=device, dtype=e_dtype))
        lookup("ldadam_error_feedback", backend)(A, Pn, Po, Rg, M, M_tr, E, c=c,
                                                 explicit=explicit)
        out[backend] = E
    assert_parity(out["triton"], out["reference"], rtol=tolerance(e_dtype), name="E")
    # E is not trivially A: the momentum terms moved it
    assert (out["reference"].float() - A0.float()).abs().max() > 1e-2
