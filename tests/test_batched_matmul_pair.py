"""The two forms of the batched GEMM for GHA's moment transport (``kernels/batched_matmul.py``):
``BoundBatchedMatmul(..., square_out=C2)`` (``C`` and ``C * C`` from one launch) and
``BoundBatchedMatmulPair`` (``C M`` and ``C2 V`` in one launch): bit for bit the
``batched_matmul`` calls and the torch square they replace, close to torch's fp32 products,
on strided operands of odd shapes, in every stored dtype and both precisions the transport
runs in, outputs poisoned first; bad buffers rejected by name."""
import pytest
import torch

from lowrank_fused.dispatch import available

pytestmark = pytest.mark.skipif(not available("triton", "cpu") and not torch.cuda.is_available(),
                                reason="triton unavailable here")

PRECISIONS = ["ieee", "tf32x3"]
SHAPES = [(1, 5, 3, 2), (3, 37, 9, 9), (2, 130, 70, 33)]


def _dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _nan(*shape):
    return torch.full(shape, float("nan"), device=_dev())


def _operands(nb, m, k, n, dtype, seed):
    """A and A2 as transposed views of (nb, k, m) blocks (the moments' stored layout, read as
    M^T), A2 a slice of a wider block (strides of its own); B and B2 transposed views of
    (nb, n, k) blocks (C^T), one layout."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(nb, k, m, generator=g).to(dtype).to(_dev()).transpose(1, 2)
    A2 = torch.rand(nb, k, m + 3, generator=g).to(dtype).to(_dev())[:, :, 1:m + 1]
    A2 = A2.transpose(1, 2)
    B = torch.randn(nb, n, k, generator=g).to(_dev()).transpose(1, 2)
    B2 = torch.rand(nb, n, k, generator=g).to(_dev()).transpose(1, 2)
    return A, A2, B, B2


def _close(got, A, B):
    tol = 1e-5 * A.shape[-1]          # fp32 summation over k of exact fp32 operands
    torch.testing.assert_close(got.double(), A.double() @ B.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_pair_equals_two_products(shape, dtype, precision):
    from lowrank_fused.kernels.batched_matmul import BoundBatchedMatmulPair, batched_matmul

    nb, m, k, n = shape
    A, A2, B, B2 = _operands(nb, m, k, n, dtype, seed=sum(shape))
    C, C2 = _nan(nb, m, n), _nan(nb, m, n)
    BoundBatchedMatmulPair(A, B, C, A2, B2, C2, precision=precision)()
    want, want2 = _nan(nb, m, n), _nan(nb, m, n)
    batched_matmul(A, B, want, precision=precision)
    batched_matmul(A2, B2, want2, precision=precision)
    assert torch.equal(C, want)
    assert torch.equal(C2, want2)
    _close(C, A, B)
    _close(C2, A2, B2)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("shape", SHAPES)
def test_square_out_equals_the_product_and_torch_square(shape, precision):
    from lowrank_fused.kernels.batched_matmul import BoundBatchedMatmul, batched_matmul

    nb, m, k, n = shape
    A, _, B, _ = _operands(nb, m, k, n, torch.float32, seed=7 + sum(shape))
    C = _nan(nb, n, m).transpose(1, 2)            # strided outputs, one layout
    C2 = _nan(nb, n, m).transpose(1, 2)
    BoundBatchedMatmul(A, B, C, precision=precision, square_out=C2)()
    want = _nan(nb, m, n)
    batched_matmul(A, B, want, precision=precision)
    assert torch.equal(C, want)
    assert torch.equal(C2, want * want)
    _close(C, A, B)


def test_an_empty_inner_dimension_writes_zeros():
    from lowrank_fused.kernels.batched_matmul import BoundBatchedMatmul, BoundBatchedMatmulPair

    A = torch.empty(2, 4, 0, device=_dev())
    B = torch.empty(2, 0, 3, device=_dev())
    outs = [_nan(2, 4, 3) for _ in range(4)]
    BoundBatchedMatmulPair(A, B, outs[0], A.clone(), B.clone(), outs[1])()
    BoundBatchedMatmul(A, B, outs[2], square_out=outs[3])()
    assert not any(o.any() for o in outs)


def test_bad_buffers_are_rejected_by_name():
    from lowrank_fused.kernels.batched_matmul import BoundBatchedMatmul
    from lowrank_fused.kernels.batched_matmul import BoundBatchedMatmulPair as Pair

    A, A2, B, B2 = _operands(2, 6, 4, 3, torch.float32, 0)
    C, C2 = torch.empty(2, 6, 3, device=_dev()), torch.empty(2, 6, 3, device=_dev())
    Pair(A, B, C, A2, B2, C2)
    with pytest.raises(ValueError, match="A2 must be like A"):
        Pair(A, B, C, A2.to(torch.bfloat16), B2, C2)
    with pytest.raises(ValueError, match="A2 must be like A"):
        Pair(A, B, C, A2[:, :5], B2, C2)
    with pytest.raises(ValueError, match="B must have shape"):
        Pair(A, B[:1], C, A2, B2, C2)
    with pytest.raises(TypeError, match="float32"):
        Pair(A, B.double(), C, A2, B2, C2)
    with pytest.raises(ValueError, match="B2 must have B's layout"):
        Pair(A, B, C, A2, B2.contiguous(), C2)
    with pytest.raises(ValueError, match="C2 must be float32 of shape"):
        Pair(A, B, C, A2, B2, C2[:, :5])
    with pytest.raises(ValueError, match="C2 must have C's layout"):
        Pair(A, B, C, A2, B2, C2.transpose(1, 2).contiguous().transpose(1, 2))
    with pytest.raises(ValueError, match="3-D"):
        Pair(A[0], B, C, A2, B2, C2)
    with pytest.raises(ValueError, match="square_out must be float32"):
        BoundBatchedMatmul(A, B, C, square_out=C2.double())
    with pytest.raises(ValueError, match="square_out must have C's layout"):
        BoundBatchedMatmul(A, B, C, square_out=C2.transpose(1, 2).contiguous().transpose(1, 2))
