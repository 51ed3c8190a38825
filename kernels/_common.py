"""Pieces shared by the Triton kernels: dot precision modes, bf16 rounding, launch helpers.

Facts this encodes (measured; docs/backends.md explains them): under ``TRITON_INTERPRET=1`` a bf16
``tl.dot`` multiplies raw bits (garbage) and an fp32 -> bf16 store truncates instead of
rounding to nearest. So when interpreting, dot operands are always fp32 (bf16 operand rounding
is emulated by rounding to bf16 and back), and bf16 stores round to nearest-even explicitly.
On a GPU neither workaround is compiled in.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

# matmul precision modes, the names of torch.get_float32_matmul_precision() in brackets:
#   ieee  fp32 FMA, exact to fp32 rounding          ("highest")
#   tf32  TF32 tensor cores, fp32 accumulate          ("high")
#   bf16  operands rounded to bf16, fp32 accumulate   ("medium")
#   tf32x3  split precision: a = a_hi + a_lo (a_hi = tf32(a), a_lo = tf32(a - a_hi)), and
#         a @ b ~ a_lo @ b_hi + a_hi @ b_lo + a_hi @ b_hi on TF32 tensor cores, fp32
#         accumulate: about fp32 accuracy at a third of TF32's speed (docs/precision.md)
# The *_EMULATED modes are the interpreter's stand-ins (fp32 numpy dots on operands rounded
# to the mode's precision); they are never compiled.
DOT_IEEE, DOT_TF32, DOT_BF16, DOT_BF16_EMULATED = 0, 1, 2, 3
DOT_TF32X3, DOT_TF32_EMULATED, DOT_TF32X3_EMULATED = 4, 5, 6
_DOT_MODES = {"ieee": DOT_IEEE, "tf32": DOT_TF32, "bf16": DOT_BF16, "tf32x3": DOT_TF32X3}
_EMULATED = {DOT_BF16: DOT_BF16_EMULATED, DOT_TF32: DOT_TF32_EMULATED,
             DOT_TF32X3: DOT_TF32X3_EMULATED}
# the modes a GPU launch can ask for (the AOT variant lists compile each)
GPU_DOT_MODES = (DOT_IEEE, DOT_TF32, DOT_BF16, DOT_TF32X3)


def check_left_basis(G, P, name: str, cols: str):
    """A launcher's shape check of the left form: G 2-D (m x n) and the basis ``name`` with m
    rows (its columns called ``cols`` in the message). Returns ``(m, n, columns)``."""
    if G.dim() != 2:
        raise ValueError(f"G must be 2-D (m x n), got shape {tuple(G.shape)}")
    m, n = G.shape
    if P.dim() != 2 or P.shape[0] != m:
        raise ValueError(f"{name} must have shape ({m}, {cols}) for G of shape {(m, n)}, got "
                         f"{tuple(P.shape)}")
    return m, n, P.shape[1]


def check_buffer(name: str, t, shape, dtypes, device, *, contiguous: bool = True,
                 owner: str = "the call"):
    """A bound call's buffer: a tensor of ``shape``, one of ``dtypes``, on ``device`` (the one
    of ``owner``) and, where asked, contiguous; else an error naming it."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, {owner} on {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# GPU tile selection while interpreting: the SM count of the GPU whose launch choices (tile
# configs, split-K, split-row grids) the launchers make, or None for their own choice
_GPU_TILING = {"sm_count": None}
H100_SM_COUNT = 132


@contextlib.contextmanager
def gpu_tiling(sm_count: int = H100_SM_COUNT):
    """Inside, every launcher chooses its tile config, split-K and grid as it would on a CUDA
    device with ``sm_count`` SMs (default an H100 SXM's 132) and a tensor-core precision, even
    under the interpreter, instead of the interpreter-only tiles: for counting the memory
    traffic of the GPU configurations (``lowrank_fused.testing.traffic``). The kernels' own
    ``DOT_MODE`` stays the interpreter's (its bf16 dot is wrong), so results are unchanged."""
    if not isinstance(sm_count, int) or isinstance(sm_count, bool) or sm_count < 1:
        raise ValueError(f"sm_count must be a positive int, got {sm_count!r}")
    previous = _GPU_TILING["sm_count"]
    _GPU_TILING["sm_count"] = sm_count
    try:
        yield
    finally:
        _GPU_TILING["sm_count"] = previous


def interpreter_tiles() -> bool:
    """Whether launchers take their interpreter-only tiles (interpreting, outside
    ``gpu_tiling``)."""
    return interpreting() and _GPU_TILING["sm_count"] is None


def config_mode(precision: str, device: torch.device) -> int:
    """The DOT_MODE that selects a launcher's tile config: ``dot_mode``'s, or inside
    ``gpu_tiling`` the one a CUDA device would run ``precision`` in."""
    if _GPU_TILING["sm_count"] is not None:
        return _DOT_MODES[precision]
    return dot_mode(precision, device)


def grid_sm_count(device: torch.device):
    """The SM count that sizes split-K / split-row grids: the device's on CUDA, ``gpu_tiling``'s
    when forced, else None (one slice)."""
    if _GPU_TILING["sm_count"] is not None:
        return _GPU_TILING["sm_count"]
    return sm_count(device) if device.type == "cuda" else None


def dot_mode(precision: str, device: torch.device) -> int:
    """The DOT_MODE constexpr for ``precision`` on ``device``."""
    if precision not in _DOT_MODES:
        raise ValueError(f"precision must be one of {tuple(_DOT_MODES)}, got {precision!r}")
    mode = _DOT_MODES[precision]
    if device.type != "cuda":  # interpreter: fp32 numpy dots on operands rounded per mode
        return _EMULATED.get(mode, mode)
    return mode


@triton.jit
def round_bf16_rne(x):
    """fp32 -> fp32 holding the nearest-even bf16 value (for the interpreter, which truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_tf32_rne(x):
    """fp32 -> fp32 holding the nearest-even TF32 value (10-bit mantissa: the low 13 bits
    rounded off); NaN stays NaN, overflow past the largest TF32 value gives inf."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0xFFF + ((bits >> 13) & 1)) & 0xFFFFE000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def to_storage(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Cast fp32 ``x`` to the storage ``dtype`` with round-to-nearest-even everywhere."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            x = round_bf16_rne(x)
    return x.to(dtype)


@triton.jit
def adam_normalized_step(g, m_ptr, v_ptr, offs, mask, beta1, beta2, eps, c1, c2,
                         INTERPRET: tl.constexpr):
    """Update the Adam moments at ``offs`` in place from the fp32 gradient ``g`` and return
    ``(M/c1) / (sqrt(V/c2) + eps)`` computed from the *stored* moments (so a narrow state
    dtype rounds exactly as the reference does). IEEE-rounded division and sqrt."""
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * beta1 + (1.0 - beta1) * g
    v = v * beta2 + (1.0 - beta2) * (g * g)
    m_st = to_storage(m, m_ptr.dtype.element_ty, INTERPRET)
    v_st = to_storage(v, v_ptr.dtype.element_ty, INTERPRET)
    tl.store(m_ptr + offs, m_st, mask=mask)
    tl.store(v_ptr + offs, v_st, mask=mask)
    m = m_st.to(tl.float32)
    v = v_st.to(tl.float32)
    return tl.div_rn(tl.div_rn(m, c1), tl.sqrt_rn(tl.div_rn(v, c2)) + eps)


@triton.jit
def mma(a, b, acc, DOT_MODE: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation in the requested operand precision."""
    if DOT_MODE == 2:
        acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc, out_dtype=tl.float32)
    elif DOT_MODE == 4:   # the compiler splits the operands and issues three TF32 MMAs
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3",
                     out_dtype=tl.float32)
    elif DOT_MODE == 5:
        a = round_tf32_rne(a.to(tl.float32))
        b = round_tf32_rne(b.to(tl.float32))
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
    elif DOT_MODE == 6:   # the GPU's order: the two small products first, NaN -> 0 in them
        a = a.to(tl.float32)
        b = b.to(tl.float32)
        a_hi = round_tf32_rne(a)
        b_hi = round_tf32_rne(b)
        a_lo = round_tf32_rne(a - a_hi)
        b_lo = round_tf32_rne(b - b_hi)
        small = tl.dot(a_lo, b_hi, input_precision="ieee", out_dtype=tl.float32)
        small = tl.dot(a_hi, b_lo, small, input_precision="ieee", out_dtype=tl.float32)
        small = tl.where(small != small, 0.0, small)
        acc = tl.dot(a_hi, b_hi, acc + small, input_precision="ieee", out_dtype=tl.float32)
    elif DOT_MODE == 3:
        a = round_bf16_rne(a.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
        b = round_bf16_rne(b.to(tl.float32)).to(tl.bfloat16).to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)
    elif DOT_MODE == 1:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32",
                     out_dtype=tl.float32)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee",
                     out_dtype=tl.float32)
    return acc


_NO_SKIP = {}        # device -> a cached 0-dim False flag
_CAPTURED_NO_SKIP = []   # flags made during a CUDA graph capture, kept alive (see skip_flag)


def skip_flag(skip, device):
    """The ``skip_ptr`` a kernel that writes optimizer state or weights loads (and returns
    early when it holds True): ``skip`` (a 0-dim torch.bool tensor on ``device``, checked by
    ``lowrank_fused.ops``), or for None a 0-dim False tensor cached per device, so a call
    without a flag launches the same compiled kernel and allocates nothing. The flag is
    never read on the host. The first call per device allocates it; one made while a CUDA
    graph is being captured is filled inside the graph, so it is not cached (the next eager
    call makes the cached one) but kept alive for the graph's replays."""
    if skip is not None:
        return skip
    flag = _NO_SKIP.get(device)
    if flag is None:
        flag = torch.zeros((), dtype=torch.bool, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            _CAPTURED_NO_SKIP.append(flag)
        else:
            _NO_SKIP[device] = flag
    return flag


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# flat elementwise kernels: one block size for every problem
ELEMENTWISE_BLOCK = 1024
ELEMENTWISE_WARPS = 4


@triton.jit
def sum_fp32(ptr, count, BLOCK: tl.constexpr):
    """``sum(ptr[0:count])`` of fp32 values in a fixed order (deterministic, no atomics): a
    BLOCK-wide accumulator over the chunks, then one tree sum. For the second stage of a
    two-stage reduction (per-program partial sums written by the first kernel)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.load(ptr + offs, mask=offs < count, other=0.0)
    for start in range(BLOCK, count, BLOCK):
        acc += tl.load(ptr + start + offs, mask=start + offs < count, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_M x BLOCK_N) tile (pid_m, pid_n) of an M x N matrix: ``(offs_m, offs_n,
    mask_m, mask_n, mask)``, the 2-D mask the outer product of the two."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    return offs_m, offs_n, mask_m, mask_n, mask_m[:, None] & mask_n[None, :]


@triton.jit
def load_tile(ptr, offs_m, offs_n, stride_m, stride_n, mask):
    """The tile of a strided matrix at ``ptr`` in fp32 (masked elements 0)."""
    return tl.load(ptr + offs_m[:, None] * stride_m + offs_n[None, :] * stride_n, mask=mask,
                   other=0.0).to(tl.float32)


_SM_COUNT = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached): sizes split-K and split-row grids
    so that every SM gets programs."""
    if device.index not in _SM_COUNT:
        _SM_COUNT[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device.index]
