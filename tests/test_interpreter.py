"""The interpreter shortcut (``kernels/_interpreter.py``): under ``TRITON_INTERPRET=1`` a launch
patches the language once (both ``triton.language`` and ``triton.language.core``) and the
``@triton.jit`` helpers it calls run without patching it again; results unchanged, and the
language is restored when the launch ends."""
import pytest
import torch
import triton
import triton.language as tl

from lowrank_fused.dispatch import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="interpreter only")


@triton.jit
def _scaled_square(x, s):
    return x * x * s


@triton.jit
def _helper_loop_kernel(x_ptr, out_ptr, n, STEPS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(STEPS):
        acc += _scaled_square(x, i + 1.0)          # a helper call per iteration
    tl.store(out_ptr + offs, acc, mask=mask)
    tl.store(out_ptr + BLOCK + tl.program_id(0), tl.sum(acc, axis=0))   # tl.sum: a jit helper


def _launch(x, steps=5):
    block = triton.next_power_of_2(x.numel())
    out = torch.full((block + 1,), float("nan"))
    _helper_loop_kernel[(1,)](x, out, x.numel(), STEPS=steps, BLOCK=block)
    return out[:x.numel()], out[block]


def test_installed():
    import triton.runtime.interpreter as interp

    import lowrank_fused.kernels  # noqa: F401  (installs it)
    from lowrank_fused.kernels import _interpreter

    assert _interpreter._installed
    assert interp._patch_lang.__module__ == _interpreter.__name__
    assert interp._patch_builtin.__module__ == _interpreter.__name__
    assert interp._get_np_dtype.__module__ == _interpreter.__name__
    assert tl.core.block_type.__init__.__module__ == _interpreter.__name__
    assert tl.core.tensor.__init__.__module__ == _interpreter.__name__
    assert "broadcast_impl_value" in vars(interp.interpreter_semantic)


def _type_attrs(obj):
    """An object's attributes with Triton's tuples and constexprs as plain values."""
    def plain(v):
        if isinstance(v, tl.core.tuple):
            return ("tuple", [plain(x) for x in v.values])
        if isinstance(v, tl.constexpr):
            return ("constexpr", v.value)
        return v
    return {k: plain(v) for k, v in vars(obj).items()}


def test_memoized_types_equal_the_languages_own():
    """``block_type`` and ``tensor`` built through the memoized constructors (each asked twice:
    from the cache the second time) have the attributes the language's own constructors give,
    for scalar and pointer element types and shapes given as ints, constexprs, tuples and
    ``tl.tuple``; a shape the language refuses is still refused."""
    import lowrank_fused.kernels  # noqa: F401
    from lowrank_fused.kernels import _interpreter

    own_bt = _interpreter._TYPE_ORIGINALS["block_type"]
    own_t = _interpreter._TYPE_ORIGINALS["tensor"]
    bt, tensor = tl.core.block_type, tl.core.tensor
    elements = [tl.float32, tl.bfloat16, tl.int32, tl.int1, tl.pointer_type(tl.float32),
                tl.pointer_type(tl.float16, const=True)]
    shapes = [[4], [2, 8], [16, 1], [tl.constexpr(4), 2], tl.core.tuple([8, 8]),
              [1, 2, 4]]
    for _ in range(2):
        for e in elements:
            for shape in shapes:
                mine = bt(e, shape)
                theirs = bt.__new__(bt)
                own_bt(theirs, e, shape)
                assert _type_attrs(mine) == _type_attrs(theirs), (e, shape)
                assert mine == theirs and str(mine) == str(theirs)
                assert mine.element_ty is e
                for ty in (mine, e):
                    t = tensor("handle", ty)
                    u = tensor.__new__(tensor)
                    own_t(u, "handle", ty)
                    assert _type_attrs(t) == _type_attrs(u), (ty,)
                    assert t.type is ty and t.dtype is ty.scalar
    for refused in ([3], (2, 8)):           # not a power of two; a Python tuple
        with pytest.raises(Exception):
            own_bt(bt.__new__(bt), tl.float32, refused)
        with pytest.raises(Exception):
            bt(tl.float32, refused)
    with pytest.raises(Exception):
        bt(tl.float32, [])                  # 0-d


def test_broadcast_of_blocks_of_one_shape_returns_them():
    """The broadcast shortcut: two blocks of one shape come back as they are (the general
    path's answer); a block and a scalar, or blocks of other shapes, broadcast as before."""
    import numpy as np

    import triton.runtime.interpreter as interp

    import lowrank_fused.kernels  # noqa: F401

    sem = interp.interpreter_semantic
    general = type(sem).broadcast_impl_value

    def block(shape, value=1.0):
        data = np.full(shape, value, dtype=np.float32)
        return tl.core.tensor(interp.TensorHandle(data, tl.float32), tl.block_type(tl.float32, list(shape)))

    a, b = block((4, 8)), block((4, 8), 2.0)
    assert sem.broadcast_impl_value(a, b) == (a, b)
    assert general(sem, a, b)[0].shape == a.shape
    for x, y in [(block((4, 1)), block((1, 8))), (block((4, 8)), block((8,)))]:
        mine = sem.broadcast_impl_value(x, y)
        theirs = general(sem, x, y)
        for m, t in zip(mine, theirs):
            assert m.type == t.type and m.shape == t.shape
            np.testing.assert_array_equal(m.handle.data, t.handle.data)


def test_memoized_np_dtypes_answer_as_the_interpreter():
    """The memoized ``_get_np_dtype`` gives the interpreter's own answer for every scalar,
    block and pointer type (asked twice: from the cache the second time)."""
    import importlib

    import triton.runtime.interpreter as interp

    import lowrank_fused.kernels  # noqa: F401

    fresh = importlib.util.module_from_spec(importlib.util.find_spec(interp.__name__))
    fresh.__spec__.loader.exec_module(fresh)          # the interpreter's own, unpatched
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.uint16, tl.int32, tl.uint32, tl.int64,
               tl.uint64, tl.float16, tl.bfloat16, tl.float32, tl.float64]
    kinds = scalars + [tl.block_type(t, [4, 8]) for t in scalars] + \
        [tl.pointer_type(t) for t in scalars] + [tl.block_type(tl.pointer_type(tl.float32), [4])]
    for _ in range(2):
        for t in kinds:
            assert interp._get_np_dtype(t) == fresh._get_np_dtype(t), t


def test_helpers_run_without_patching_again_and_results_hold(monkeypatch):
    import lowrank_fused.kernels  # noqa: F401
    from lowrank_fused.kernels import _interpreter

    calls = []
    original = _interpreter._original_patch

    def counting(fn):
        calls.append(fn)
        return original(fn)

    monkeypatch.setattr(_interpreter, "_original_patch", counting)
    x = torch.randn(37, generator=torch.Generator().manual_seed(0))
    got, total = _launch(x, steps=5)
    want = sum(x * x * (i + 1.0) for i in range(5))
    assert torch.equal(got, want)          # the same fp32 operations in the same order
    assert torch.allclose(total, want.sum(), rtol=1e-5)
    # one patch for the launch; the five helper calls and tl.sum's combine function skip it
    assert len(calls) == 1, len(calls)


def test_language_restored_after_a_launch():
    import lowrank_fused.kernels  # noqa: F401

    _launch(torch.randn(8))
    for mod in (tl, tl.core):
        for name in ("load", "store", "where", "arange"):
            assert tl.core.is_builtin(getattr(mod, name)), f"{mod.__name__}.{name} left patched"


@triton.jit
def _int32_offsets_kernel(x_ptr, out_ptr, scale, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    tl.store(out_ptr + offs, x * scale + 7)        # int32 arithmetic, as offsets are


def _wrap32(v):
    return (v + 2**31) % 2**32 - 2**31


def test_integer_overflow_wraps_as_on_the_gpu_and_is_checked_in_debug():
    """The shortcut turns the interpreter's integer-overflow sanitizer off while its asserts
    are off (the check was built and dropped: a compiled kernel has it only with
    ``debug=True``): int32 wraps as on the GPU. With ``debug`` on, the sanitizer is on and the
    same launch asserts."""
    import dataclasses

    import triton.runtime.interpreter as interp

    import lowrank_fused.kernels  # noqa: F401
    from lowrank_fused.kernels import _interpreter

    options = interp.interpreter_builder.options
    assert options.sanitize_overflow is False and options.debug is False
    x = torch.tensor([1, 2, 3, -5, 2**20, 2**30 - 1, 7, 0], dtype=torch.int32)
    scale = 3000
    out = torch.full_like(x, -1)
    _int32_offsets_kernel[(1,)](x, out, scale, BLOCK=8)
    assert out.tolist() == [_wrap32(v * scale + 7) for v in x.tolist()]
    assert out.tolist() != [v * scale + 7 for v in x.tolist()]      # it did overflow
    try:
        interp.interpreter_builder.options = dataclasses.replace(options, debug=True)
        assert _interpreter._overflow_check(interp)
        assert interp.interpreter_builder.options.sanitize_overflow is True
        with pytest.raises(Exception, match="overflow"):
            _int32_offsets_kernel[(1,)](x, torch.full_like(x, -1), scale, BLOCK=8)
        small = torch.arange(8, dtype=torch.int32)
        out = torch.full_like(small, -1)
        _int32_offsets_kernel[(1,)](small, out, scale, BLOCK=8)
        assert out.tolist() == [v * scale + 7 for v in range(8)]
    finally:
        interp.interpreter_builder.options = options
