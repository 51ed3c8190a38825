"""Per-tensor non-finite flags (``ops_multi.BoundNonfiniteFlags`` / ``nonfinite_flags``): the
compiled pass (CPU twin here, the CUDA kernel on a GPU) against the torch reference, on fresh
random tensors of every supported dtype with NaN/Inf planted at random places (chunk
boundaries included), empty and non-contiguous tensors, a poisoned output buffer."""
import math

import pytest
import torch

from lowrank_fused import _ext, ops_multi

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CHUNK = 1 << 14     # the compiled pass's elements per work item


def _tensors(seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 7, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5, 0, 33]
    out = []
    for i, n in enumerate(sizes):
        dtype = DTYPES[int(torch.randint(len(DTYPES), (1,), generator=gen))]
        out.append((torch.randn(n, generator=gen) * 10).to(dtype).to(device))
    return out


def _plant(tensors, seed):
    """NaN, +Inf or -Inf at a random element of a random half of the non-empty tensors; the
    expected flags."""
    gen = torch.Generator().manual_seed(seed + 100)
    expected = []
    for t in tensors:
        hit = t.numel() > 0 and bool(torch.rand(1, generator=gen) < 0.5)
        if hit:
            i = int(torch.randint(t.numel(), (1,), generator=gen))
            if t.numel() > CHUNK and bool(torch.rand(1, generator=gen) < 0.5):
                i = CHUNK * int(torch.randint(t.numel() // CHUNK, (1,), generator=gen))
            t.view(-1)[i] = (math.nan, math.inf, -math.inf)[i % 3]
        expected.append(hit)
    return expected + [any(expected)]


def _poison(bound):
    bound.flags.copy_(torch.rand(bound.flags.shape) < 0.5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_flags_match_planted(seed, backend):
    tensors = _tensors(seed)
    expected = _plant(tensors, seed)
    bound = ops_multi.BoundNonfiniteFlags(tensors, backend=backend)
    if backend == "auto" and _ext.why_no_cpu() is None:
        assert bound.where == "cpu"
    _poison(bound)
    address = bound.flags.data_ptr()
    anyflag = bound(tensors)
    assert bound.flags.tolist() == expected
    assert anyflag.dim() == 0 and anyflag.dtype == torch.bool and bool(anyflag) == expected[-1]
    assert anyflag.data_ptr() == address + len(tensors)      # a view of the same buffer
    # a second call on finite tensors clears every flag in place
    clean = [torch.nan_to_num(t, nan=0.0, posinf=1.0, neginf=-1.0) for t in tensors]
    bound(clean)
    assert bound.flags.data_ptr() == address
    assert not bound.flags.any()


def test_compiled_equals_reference_and_noncontiguous_falls_back():
    tensors = _tensors(11)
    expected = _plant(tensors, 11)
    a = ops_multi.nonfinite_flags(tensors)
    b = ops_multi.nonfinite_flags(tensors, backend="reference")
    assert a.tolist() == b.tolist() == expected
    # transposed 2-D views: not contiguous, so the call takes the torch path
    mats = [torch.randn(5, 9).t(), torch.randn(4, 3).t().bfloat16()]
    mats[1][2, 1] = math.inf
    assert ops_multi.nonfinite_flags(mats).tolist() == [False, True, True]


def test_bound_call_checks_its_tensors():
    tensors = [torch.randn(4), torch.randn(6)]
    bound = ops_multi.BoundNonfiniteFlags(tensors)
    with pytest.raises(ValueError, match="tensors must hold 2"):
        bound(tensors[:1])
    with pytest.raises(ValueError, match=r"tensors\[1\] \(5 elements"):
        bound([tensors[0], torch.randn(5)])
    with pytest.raises(ValueError, match=r"tensors\[0\].*torch.bfloat16"):
        bound([tensors[0].bfloat16(), tensors[1]])
    with pytest.raises(TypeError, match=r"like\[0\] has dtype torch.int32"):
        ops_multi.BoundNonfiniteFlags([torch.zeros(3, dtype=torch.int32)])
    with pytest.raises(ValueError, match="backend must be"):
        ops_multi.BoundNonfiniteFlags(tensors, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_reference():
    tensors = _tensors(5, "cuda")
    expected = _plant(tensors, 5)
    bound = ops_multi.BoundNonfiniteFlags(tensors)
    assert bound.where == "cuda"
    _poison(bound)
    bound(tensors)
    assert bound.flags.cpu().tolist() == expected
    ref = ops_multi.nonfinite_flags(tensors, backend="reference")
    assert ref.cpu().tolist() == expected


def test_bound_call_checks_once_per_layout_token():
    """With a layout token the counts, dtypes and contiguity are checked at its first call
    and again at every new token; the flags are computed at every call."""
    tensors = [torch.randn(4), torch.randn(2, 3)]
    bound = ops_multi.BoundNonfiniteFlags(tensors)
    assert not bool(bound(tensors, layout_token=1))
    tensors[1][1, 2] = math.nan
    assert bound(tensors, layout_token=1).item() and bound.flags.tolist() == [False, True, True]
    with pytest.raises(ValueError, match=r"tensors\[1\] \(5 elements"):
        bound([tensors[0], torch.randn(5)], layout_token=2)
    # a non-contiguous tensor under a new token takes the reference path: still right
    t = torch.randn(3, 2).t()
    t[0, 1] = math.inf
    assert bound([torch.randn(4), t], layout_token=3).item()
    assert bound.flags.tolist() == [False, True, True]
    assert not bound([torch.randn(4), torch.randn(3, 2).t()], layout_token=3).item()
