"""Implementations backed by the compiled extension ``lowrank_fused._C``, registered in the
dispatch table for the backends "cpu" (the CPU twins, ``csrc/cpu``) and "cuda" (``csrc/cuda``).

Each function has its reference's canonical signature and works in place. The extension takes
raw pointers to contiguous buffers, so non-contiguous tensors are handled here: the kernel runs
on contiguous copies and the results are copied back. Importing this module does not load the
extension; the first call does (``lowrank_fused._ext``).

The ops that write optimizer state or weights take ``skip`` (None, or a 0-dim torch.bool
tensor on the tensors' device): its address goes to the kernel, which reads it itself (on the
device for CUDA; host memory for the CPU twins) and writes nothing when it holds True. None
passes a null pointer, the call of a build without the flag.
"""
from __future__ import annotations

import torch

from lowrank_fused import _capture, _ext
from lowrank_fused.dispatch import BackendUnavailable, register, register_auto_guard

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}  # = _C.DTYPE_FLOAT32, _C.DTYPE_BFLOAT16


def _module(backend: str):
    why = _ext.why_no_cpu() if backend == "cpu" else _ext.why_no_cuda()
    if why is not None:
        raise BackendUnavailable(f"backend={backend!r} is unavailable: {why}")
    return _ext.load()


def _check_tensors(op: str, backend: str, tensors: dict, like: str = "W") -> None:
    """Types, devices, dtypes and shapes, with errors that name the parameter."""
    where = f"{op} (backend {backend!r})"
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    ref = tensors[like]
    for name, t in tensors.items():
        if backend == "cpu" and t.device.type != "cpu":
            raise ValueError(f"{where}: {name} must be a CPU tensor, got device {t.device}")
        if backend == "cuda":
            if t.device.type != "cuda":
                raise ValueError(f"{where}: {name} must be a CUDA tensor, got device {t.device}")
            if t.device != ref.device:
                raise ValueError(f"{where}: {name} is on {t.device} but {like} is on "
                                 f"{ref.device}; all tensors must be on one device")
        if t.dtype not in _DTYPE_CODES:
            raise TypeError(f"{where}: {name} must be float32 or bfloat16, got {t.dtype}")
        if t.shape != ref.shape:
            raise ValueError(f"{where}: {name} must have the shape of {like} "
                             f"{tuple(ref.shape)}, got {tuple(t.shape)}")


def _check_distinct(op: str, backend: str, outputs: dict) -> None:
    seen = {}
    for name, t in outputs.items():
        if t.numel() == 0:
            continue
        ptr = t.data_ptr()
        if ptr in seen:
            raise ValueError(f"{op} (backend {backend!r}): {name} and {seen[ptr]} share memory; "
                             f"the in-place outputs must be distinct tensors")
        seen[ptr] = name


def _bump_version(t: torch.Tensor) -> None:
    """The kernel wrote through a raw pointer: tell autograd the tensor changed."""
    inc = getattr(torch.autograd.graph, "increment_version", None)
    if inc is not None and not t.is_inference():
        inc(t)


def _run_inplace(launch, inputs, outputs) -> None:
    """``launch(*contiguous inputs, *contiguous outputs)``, then write the outputs back."""
    ins = [t if t.is_contiguous() else t.contiguous() for t in inputs]
    outs = [t if t.is_contiguous() else t.contiguous() for t in outputs]
    launch(*ins, *outs)
    with torch.no_grad():
        for dst, src in zip(outputs, outs):
            if src is dst:
                _bump_version(dst)
            else:
                dst.copy_(src)


def _skip_ptr(op: str, backend: str, skip, device) -> int:
    """The address of ``skip`` (a 0-dim torch.bool tensor on ``device``) for the kernel, 0 for
    None. Never reads the flag."""
    if skip is None:
        return 0
    where = f"{op} (backend {backend!r})"
    if not isinstance(skip, torch.Tensor):
        raise TypeError(f"{where}: skip must be None or a 0-dim torch.bool tensor, got "
                        f"{type(skip).__name__}")
    if skip.dtype != torch.bool or skip.dim() != 0:
        raise TypeError(f"{where}: skip must be a 0-dim torch.bool tensor, got {skip.dtype} "
                        f"of shape {tuple(skip.shape)}")
    if skip.device != device:
        raise ValueError(f"{where}: skip is on {skip.device} but the tensors are on {device}")
    return skip.data_ptr()


def _adamw_checks(backend, W, G, M, V):
    _check_tensors("adamw_step", backend, {"W": W, "G": G, "M": M, "V": V})
    if M.dtype != V.dtype:
        raise TypeError(f"adamw_step (backend {backend!r}): M and V must have one dtype, "
                        f"got M {M.dtype} and V {V.dtype}")
    _check_distinct("adamw_step", backend, {"W": W, "M": M, "V": V})


def _adamw_scalars(lr, beta1, beta2, eps, c1, c2, pre_scale, post_decay):
    return dict(lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                c1=float(c1), c2=float(c2), pre_scale=float(pre_scale),
                post_decay=float(post_decay))


@register("adamw_step", "cpu")
def adamw_step_cpu(W, G, M, V, *, lr: float, beta1: float, beta2: float, eps: float,
                   c1: float, c2: float, pre_scale: float, post_decay: float,
                   skip=None) -> None:
    """The fused AdamW step of ``csrc/cpu`` (same math as the CUDA kernel), in place."""
    _adamw_checks("cpu", W, G, M, V)
    skip_ptr = _skip_ptr("adamw_step", "cpu", skip, W.device)
    if W.numel() == 0:
        return
    mod = _module("cpu")
    kw = _adamw_scalars(lr, beta1, beta2, eps, c1, c2, pre_scale, post_decay)

    def launch(g, w, m, v):
        mod.adamw_step_cpu(w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), w.numel(),
                           _DTYPE_CODES[w.dtype], _DTYPE_CODES[g.dtype], _DTYPE_CODES[m.dtype],
                           skip=skip_ptr, num_threads=torch.get_num_threads(), **kw)

    _run_inplace(launch, [G], [W, M, V])


def _takes(tensors, contiguous=False) -> bool:
    """Whether the CPU twins take these tensors (``auto`` runs the reference otherwise)."""
    for t in tensors:
        if (not isinstance(t, torch.Tensor) or t.dtype not in _DTYPE_CODES
                or t.device.type != "cpu" or (contiguous and not t.is_contiguous())):
            return False
    return True


@register_auto_guard("adamw_step", "cpu")
def _adamw_step_cpu_takes(W, G, M, V, **_):
    return _takes((W, G, M, V)) and M.dtype == V.dtype


@register("adamw_step", "cuda")
def adamw_step_cuda(W, G, M, V, *, lr: float, beta1: float, beta2: float, eps: float,
                    c1: float, c2: float, pre_scale: float, post_decay: float,
                    skip=None) -> None:
    """The fused AdamW step of ``csrc/cuda`` on W's device and current stream, in place."""
    _adamw_checks("cuda", W, G, M, V)
    skip_ptr = _skip_ptr("adamw_step", "cuda", skip, W.device)
    if W.numel() == 0:
        return
    mod = _module("cuda")
    kw = _adamw_scalars(lr, beta1, beta2, eps, c1, c2, pre_scale, post_decay)
    device = W.device

    def launch(g, w, m, v):
        mod.adamw_step_cuda(w.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), w.numel(),
                            _DTYPE_CODES[w.dtype], _DTYPE_CODES[g.dtype], _DTYPE_CODES[m.dtype],
                            skip=skip_ptr, device=device.index,
                            stream=torch.cuda.current_stream(device).cuda_stream, **kw)

    with torch.cuda.device(device):
        _run_inplace(launch, [G], [W, M, V])


# -- adam_moments (K2 of one matrix) on the CPU: the multi-tensor twin with one entry ---------

@register("adam_moments", "cpu")
def adam_moments_cpu(R, M, V, N, *, beta1: float, beta2: float, eps: float, c1: float,
                     c2: float, sumsq=None, skip=None) -> None:
    """K2 in place on M, V, writing N (and ``sum(N^2)`` into ``sumsq``): the vectorised pass
    of ``csrc/cpu/multi_tensor.cpp`` over one tensor. ``skip``: nothing is written when it
    holds True."""
    where = "adam_moments (backend 'cpu')"
    _check_tensors("adam_moments", "cpu", {"R": R, "M": M, "V": V, "N": N}, like="R")
    if R.dtype != torch.float32:
        raise TypeError(f"{where}: R must be float32, got {R.dtype}")
    if M.dtype != V.dtype:
        raise TypeError(f"{where}: M and V must have one dtype, got M {M.dtype} and V {V.dtype}")
    _check_distinct("adam_moments", "cpu", {"M": M, "V": V, "N": N})
    if sumsq is not None:
        _check_aux("adam_moments", "cpu", "sumsq", sumsq, torch.float32, 1, None)
    skip_ptr = _skip_ptr("adam_moments", "cpu", skip, R.device)
    if R.numel() == 0:
        if sumsq is not None:
            if skip is None:
                sumsq.zero_()
            else:
                sumsq.masked_fill_(~skip, 0.0)
        return
    mod = _module("cpu")

    def launch(r, m, v, n):
        mod.adam_moments_multi_cpu(
            [r.data_ptr(), m.data_ptr(), v.data_ptr(), n.data_ptr()], [r.numel()],
            [_DTYPE_CODES[t.dtype] for t in (r, m, v, n)], beta1=[float(beta1)],
            beta2=[float(beta2)], eps=[float(eps)], c1=[float(c1)], c2=[float(c2)],
            norms=sumsq.data_ptr() if sumsq is not None else 0, skip=skip_ptr,
            num_threads=torch.get_num_threads())

    _run_inplace(launch, [R], [M, V, N])
    if sumsq is not None:
        _bump_version(sumsq)


@register_auto_guard("adam_moments", "cpu")
def _adam_moments_cpu_takes(R, M, V, N, sumsq=None, **_):
    return (R.dtype == torch.float32 and _takes((R, M, V, N)) and M.dtype == V.dtype
            and (sumsq is None or (sumsq.is_contiguous() and sumsq.device.type == "cpu")))


# -- small_cholesky_inverse (CholeskyQR2's k x k part, lowrank_fused.subspace) ----------------

def _chol_checks(backend, Gram, Linv, ok):
    where = f"small_cholesky_inverse (backend {backend!r})"
    for name, t in (("Gram", Gram), ("Linv", Linv), ("ok", ok)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if backend == "cpu" and t.device.type != "cpu":
            raise ValueError(f"{where}: {name} must be a CPU tensor, got device {t.device}")
        if backend == "cuda" and (t.device.type != "cuda" or t.device != Gram.device):
            raise ValueError(f"{where}: {name} must be on Gram's CUDA device {Gram.device}, "
                             f"got {t.device}")
    if Gram.dtype != torch.float32 or Linv.dtype != torch.float32 or ok.dtype != torch.int32:
        raise TypeError(f"{where}: Gram and Linv must be float32 and ok int32, got "
                        f"{Gram.dtype}, {Linv.dtype}, {ok.dtype}")
    if Gram.dim() != 3 or Gram.shape[-1] != Gram.shape[-2] or Linv.shape != Gram.shape:
        raise ValueError(f"{where}: Gram and Linv must be (B, k, k), got {tuple(Gram.shape)} "
                         f"and {tuple(Linv.shape)}")
    if ok.shape != Gram.shape[:1]:
        raise ValueError(f"{where}: ok must be ({Gram.shape[0]},), got {tuple(ok.shape)}")
    _check_distinct("small_cholesky_inverse", backend, {"Gram": Gram, "Linv": Linv})


@register("small_cholesky_inverse", "cpu")
def small_cholesky_inverse_cpu(Gram, Linv, ok, *, pivot_ratio_tol: float) -> None:
    """Batched inverse Cholesky factor (``csrc/cpu/small_cholesky.cpp``), in place."""
    _chol_checks("cpu", Gram, Linv, ok)
    if Gram.numel() == 0:
        return
    mod = _module("cpu")
    B, k = Gram.shape[0], Gram.shape[-1]

    def launch(g, linv, o):
        mod.small_cholesky_inverse_cpu(g.data_ptr(), linv.data_ptr(), o.data_ptr(), B, k,
                                       pivot_ratio_tol=float(pivot_ratio_tol),
                                       num_threads=torch.get_num_threads())

    _run_inplace(launch, [Gram], [Linv, ok])


@register("small_cholesky_inverse", "cuda")
def small_cholesky_inverse_cuda(Gram, Linv, ok, *, pivot_ratio_tol: float) -> None:
    """Batched inverse Cholesky factor (``csrc/cuda/small_cholesky.cu``) on Gram's device and
    current stream, in place."""
    _chol_checks("cuda", Gram, Linv, ok)
    if Gram.numel() == 0:
        return
    mod = _module("cuda")
    B, k = Gram.shape[0], Gram.shape[-1]
    device = Gram.device

    def launch(g, linv, o):
        mod.small_cholesky_inverse_cuda(g.data_ptr(), linv.data_ptr(), o.data_ptr(), B, k,
                                        pivot_ratio_tol=float(pivot_ratio_tol),
                                        device=device.index,
                                        stream=torch.cuda.current_stream(device).cuda_stream)

    with torch.cuda.device(device):
        _run_inplace(launch, [Gram], [Linv, ok])


# -- multi-tensor ops (csrc/multi_tensor.h): one pass / one launch over many tensors ---------

def _check_multi(op: str, backend: str, lists: dict, *, fp32_only=(), same_dtype=(),
                 outputs=()) -> int:
    """Validates lists of tensors (the first list sets the shapes); errors name the argument and
    the tensor index. Returns the number of tensors."""
    where = f"{op} (backend {backend!r})"
    names = list(lists)
    for name, seq in lists.items():
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{where}: {name} must be a list or tuple of tensors, got "
                            f"{type(seq).__name__}")
    count = len(lists[names[0]])
    for name in names[1:]:
        if len(lists[name]) != count:
            raise ValueError(f"{where}: {name} has {len(lists[name])} tensors but {names[0]} "
                             f"has {count}")
    device = None
    for i in range(count):
        like = lists[names[0]][i]
        for name in names:
            t = lists[name][i]
            arg = f"{name}[{i}]"
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {arg} must be a torch.Tensor, got {type(t).__name__}")
            if backend == "cpu" and t.device.type != "cpu":
                raise ValueError(f"{where}: {arg} must be a CPU tensor, got device {t.device}")
            if backend == "cuda":
                if t.device.type != "cuda":
                    raise ValueError(f"{where}: {arg} must be a CUDA tensor, got device "
                                     f"{t.device}")
                if device is None:
                    device = t.device
                elif t.device != device:
                    raise ValueError(f"{where}: {arg} is on {t.device} but the first tensor is "
                                     f"on {device}; all tensors must be on one device")
            if name in fp32_only and t.dtype != torch.float32:
                raise TypeError(f"{where}: {arg} must be float32, got {t.dtype}")
            if t.dtype not in _DTYPE_CODES:
                raise TypeError(f"{where}: {arg} must be float32 or bfloat16, got {t.dtype}")
            if t.shape != like.shape:
                raise ValueError(f"{where}: {arg} must have the shape of {names[0]}[{i}] "
                                 f"{tuple(like.shape)}, got {tuple(t.shape)}")
            if not t.is_contiguous():
                raise ValueError(f"{where}: {arg} must be contiguous")
        for a, b in same_dtype:
            if lists[a][i].dtype != lists[b][i].dtype:
                raise TypeError(f"{where}: {a}[{i}] and {b}[{i}] must have one dtype, got "
                                f"{lists[a][i].dtype} and {lists[b][i].dtype}")
        seen = {}
        for name in outputs:
            t = lists[name][i]
            if t.numel() == 0:
                continue
            if t.data_ptr() in seen:
                raise ValueError(f"{where}: {name}[{i}] and {seen[t.data_ptr()]}[{i}] share "
                                 f"memory; the in-place outputs must be distinct tensors")
            seen[t.data_ptr()] = name
    return count


def _check_aux(op, backend, name, t, dtype, numel, device):
    """norms / nonfinite: None, or a contiguous tensor of `dtype` and `numel` elements."""
    if t is None:
        return
    where = f"{op} (backend {backend!r})"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor or None, got "
                        f"{type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{where}: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel or not t.is_contiguous():
        raise ValueError(f"{where}: {name} must be a contiguous tensor of {numel} element(s), "
                         f"got shape {tuple(t.shape)}")
    if backend == "cpu" and t.device.type != "cpu":
        raise ValueError(f"{where}: {name} must be a CPU tensor, got device {t.device}")
    if backend == "cuda" and device is not None and t.device != device:
        raise ValueError(f"{where}: {name} must be on {device}, got device {t.device}")


def _pack(lists):
    """Flat pointer and dtype-code lists (4 per tensor) and the sizes, for _C."""
    ptrs, codes, sizes = [], [], []
    for group in zip(*lists):
        for t in group:
            ptrs.append(t.data_ptr())
            codes.append(_DTYPE_CODES[t.dtype])
        sizes.append(group[0].numel())
    return ptrs, sizes, codes


def _per_tensor(op, name, values, count):
    vals = [float(x) for x in values]
    if len(vals) != count:
        raise ValueError(f"{op}: {name} must hold one value per tensor ({count}), got {len(vals)}")
    return vals


def _moments_multi(backend, Rs, Ms, Vs, Ns, beta1, beta2, eps, c1, c2, norms, nonfinite,
                   skip=None):
    op = "adam_moments_multi"
    count = _check_multi(op, backend, {"Rs": Rs, "Ms": Ms, "Vs": Vs, "Ns": Ns},
                         fp32_only=("Rs",), same_dtype=(("Ms", "Vs"),),
                         outputs=("Ms", "Vs", "Ns"))
    device = Rs[0].device if count else None
    _check_aux(op, backend, "norms", norms, torch.float32, count, device)
    _check_aux(op, backend, "nonfinite", nonfinite, torch.int32, 1, device)
    kw = {k: _per_tensor(op, k, v, count) for k, v in
          (("beta1", beta1), ("beta2", beta2), ("eps", eps), ("c1", c1), ("c2", c2))}
    if count == 0:
        return None
    skip_ptr = _skip_ptr(op, backend, skip, device)
    mod = _module(backend)
    ptrs, sizes, codes = _pack((Rs, Ms, Vs, Ns))
    kw.update(norms=norms.data_ptr() if norms is not None else 0,
              flag=nonfinite.data_ptr() if nonfinite is not None else 0, skip=skip_ptr)
    if backend == "cpu":
        mod.adam_moments_multi_cpu(ptrs, sizes, codes, num_threads=torch.get_num_threads(), **kw)
    else:
        with torch.cuda.device(device):
            mod.adam_moments_multi_cuda(ptrs, sizes, codes, device=device.index,
                                        stream=torch.cuda.current_stream(device).cuda_stream,
                                        **kw)
    for t in [*Ms, *Vs, *Ns] + [x for x in (norms, nonfinite) if x is not None]:
        _bump_version(t)
    return None


@register("adam_moments_multi", "cpu")
def adam_moments_multi_cpu(Rs, Ms, Vs, Ns, *, beta1, beta2, eps, c1, c2, norms=None,
                           nonfinite=None, skip=None) -> None:
    """K2 over every tensor of the lists in one OpenMP loop (``csrc/cpu/multi_tensor.cpp``)."""
    _moments_multi("cpu", Rs, Ms, Vs, Ns, beta1, beta2, eps, c1, c2, norms, nonfinite, skip)


@register_auto_guard("adam_moments_multi", "cpu")
def _adam_moments_multi_cpu_takes(Rs, Ms, Vs, Ns, **_):
    return (all(R.dtype == torch.float32 for R in Rs) and _takes(Rs, True)
            and _takes(Ms, True) and _takes(Vs, True) and _takes(Ns, True)
            and all(M.dtype == V.dtype for M, V in zip(Ms, Vs)))


@register("adam_moments_multi", "cuda")
def adam_moments_multi_cuda(Rs, Ms, Vs, Ns, *, beta1, beta2, eps, c1, c2, norms=None,
                            nonfinite=None, skip=None) -> None:
    """K2 over every tensor of the lists in ONE kernel launch (``csrc/cuda/multi_tensor.cu``)
    on the tensors' device and its current stream."""
    _moments_multi("cuda", Rs, Ms, Vs, Ns, beta1, beta2, eps, c1, c2, norms, nonfinite, skip)


def _adamw_multi(backend, Ws, Gs, Ms, Vs, scalars, nonfinite, skip=None):
    op = "adamw_step_multi"
    count = _check_multi(op, backend, {"Ws": Ws, "Gs": Gs, "Ms": Ms, "Vs": Vs},
                         same_dtype=(("Ms", "Vs"),), outputs=("Ws", "Ms", "Vs"))
    device = Ws[0].device if count else None
    _check_aux(op, backend, "nonfinite", nonfinite, torch.int32, 1, device)
    kw = {k: _per_tensor(op, k, v, count) for k, v in scalars.items()}
    if count == 0:
        return None
    skip_ptr = _skip_ptr(op, backend, skip, device)
    mod = _module(backend)
    ptrs, sizes, codes = _pack((Ws, Gs, Ms, Vs))
    kw["flag"] = nonfinite.data_ptr() if nonfinite is not None else 0
    kw["skip"] = skip_ptr
    if backend == "cpu":
        mod.adamw_step_multi_cpu(ptrs, sizes, codes, num_threads=torch.get_num_threads(), **kw)
    else:
        with torch.cuda.device(device):
            mod.adamw_step_multi_cuda(ptrs, sizes, codes, device=device.index,
                                      stream=torch.cuda.current_stream(device).cuda_stream, **kw)
    for t in [*Ws, *Ms, *Vs] + ([nonfinite] if nonfinite is not None else []):
        _bump_version(t)
    return None


@register("adamw_step_multi", "cpu")
def adamw_step_multi_cpu(Ws, Gs, Ms, Vs, *, lr, beta1, beta2, eps, c1, c2, pre_scale,
                         post_decay, nonfinite=None, skip=None) -> None:
    """The AdamW step of every tensor of the lists in one OpenMP loop (``csrc/cpu``)."""
    _adamw_multi("cpu", Ws, Gs, Ms, Vs, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, c1=c1,
                                             c2=c2, pre_scale=pre_scale,
                                             post_decay=post_decay), nonfinite, skip)


@register_auto_guard("adamw_step_multi", "cpu")
def _adamw_step_multi_cpu_takes(Ws, Gs, Ms, Vs, **_):
    return (_takes(Ws, True) and _takes(Gs, True) and _takes(Ms, True) and _takes(Vs, True)
            and all(M.dtype == V.dtype for M, V in zip(Ms, Vs)))


@register("adamw_step_multi", "cuda")
def adamw_step_multi_cuda(Ws, Gs, Ms, Vs, *, lr, beta1, beta2, eps, c1, c2, pre_scale,
                          post_decay, nonfinite=None, skip=None) -> None:
    """The AdamW step of every tensor of the lists in ONE kernel launch (``csrc/cuda``)."""
    _adamw_multi("cuda", Ws, Gs, Ms, Vs, dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, c1=c1,
                                              c2=c2, pre_scale=pre_scale,
                                              post_decay=post_decay), nonfinite, skip)


# -- the non-finite check of the optimizers' step (ops.nonfinite_flag) on the CPU -------------

_FLAG_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


def nonfinite_flag_cpu(tensors):
    """``ops.nonfinite_flag`` for CPU tensors through the compiled twin: one OpenMP pass over
    the exponent bits of every tensor (no reduction temporaries; torch's max-abs reduction is
    an order of magnitude slower on the CPU). None when the extension is not built or some
    tensor is not a contiguous CPU float32/bfloat16/float16/float64 tensor: the caller then
    takes the torch path."""
    if _ext.why_no_cpu() is not None:
        return None
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in _FLAG_CODES or not t.is_contiguous():
            return None
    bad = _ext.load().nonfinite_flag_cpu([t.data_ptr() for t in tensors],
                                         [t.numel() for t in tensors],
                                         [_FLAG_CODES[t.dtype] for t in tensors],
                                         num_threads=torch.get_num_threads())
    return torch.tensor(bool(bad))


def nonfinite_flags_multi(backend, ptrs, sizes, codes, flags):
    """Per-tensor non-finite flags through the extension (``ops_multi.BoundNonfiniteFlags``):
    ``flags`` (a contiguous torch.bool tensor of len(ptrs) + 1 on the buffers' device) gets one
    byte per buffer (pointers, element counts and ``_FLAG_CODES`` codes given) and then
    whether any is set; one OpenMP loop on the CPU, one launch on CUDA, nothing read back."""
    mod = _module(backend)
    if backend == "cpu":
        mod.nonfinite_flags_multi_cpu(ptrs, sizes, codes, flags=flags.data_ptr(),
                                      num_threads=torch.get_num_threads())
    else:
        device = flags.device
        with torch.cuda.device(device):
            mod.nonfinite_flags_multi_cuda(
                ptrs, sizes, codes, flags=flags.data_ptr(), device=device.index,
                stream=torch.cuda.current_stream(device).cuda_stream)


# -- bound multi-tensor calls: the lists checked and packed once ------------------------------

_MULTI_CHECKS = {
    "adam_moments_multi": dict(fp32_only=("Rs",), same_dtype=(("Ms", "Vs"),),
                               outputs=("Ms", "Vs", "Ns")),
    "adamw_step_multi": dict(same_dtype=(("Ms", "Vs"),), outputs=("Ws", "Ms", "Vs")),
}


_DTYPE = torch.Tensor.dtype.__get__

# the rows of a scalar table (csrc/multi_tensor.h kMomentsColumns / kAdamWColumns)
_TABLE_ROWS = {
    "adam_moments_multi": ("beta1", "1-beta1", "beta2", "1-beta2", "eps", "c1", "c2"),
    "adamw_step_multi": ("lr", "beta1", "1-beta1", "beta2", "1-beta2", "eps", "c1", "c2",
                         "pre_scale", "post_decay", "do_pre_scale", "do_post_decay"),
}
_SCALAR_NAMES = {"adam_moments_multi": ("beta1", "beta2", "eps", "c1", "c2"),
                 "adamw_step_multi": ("lr", "beta1", "beta2", "eps", "c1", "c2", "pre_scale",
                                      "post_decay")}


class PackedMulti:
    """A multi-tensor op of the extension bound to fixed lists: checked (``_check_multi``) and
    packed into the pointer lists of ``_C`` once. ``dynamic`` names the list that changes at
    every call (the gradients); a call patches its pointers after a cheap check (same dtype,
    shape and contiguity as the bound ones) instead of re-checking and re-packing everything.
    The scalars are the implementation's per-tensor lists (``c1``, ``c2``, ...)."""

    def __init__(self, op, backend, lists: dict, dynamic=None):
        check = _MULTI_CHECKS[op]
        self.count = _check_multi(op, backend, lists, **check)
        if self.count == 0:
            raise ValueError(f"{op}: a bound call needs at least one tensor")
        names = list(lists)
        self.op, self.backend, self.names = op, backend, names
        self.device = lists[names[0]][0].device
        self.ptrs, self.sizes, self.codes = _pack(tuple(lists.values()))
        self.stride = len(names)
        self.slot = names.index(dynamic) if dynamic is not None else None
        if dynamic is not None:          # the cheap check of a call's list (C loops)
            self._like_lists = ([t.shape for t in lists[dynamic]],
                                [t.dtype for t in lists[dynamic]])
        self.lists = lists
        # the written tensors autograd can have saved: the parameters (a graph built before
        # the step and run after it must see that they changed, as after torch's optimizers);
        # optimizer states and buffers are never in a graph, and bumping their versions too
        # was two thirds of the call's host time on a dense set
        self.written = [t for name in check["outputs"] for t in lists[name]
                        if t.requires_grad and not t.is_inference()]
        self.fn = getattr(_module(backend), f"{op}_{backend}")
        self._token = None                  # the layout_token of the last checked call
        self._checked = (None, None, None)  # the last call's checked skip, norms, table
        self._no_scalars = {name: [] for name in _SCALAR_NAMES[op]}

    def _check_dynamic(self, dynamic):
        shapes, dtypes = self._like_lists
        if len(dynamic) != self.count or not (
                all(map(torch.Tensor.is_contiguous, dynamic))
                and list(map(torch.Tensor.size, dynamic)) == shapes
                and list(map(_DTYPE, dynamic)) == dtypes):
            lists = dict(self.lists)
            lists[self.names[self.slot]] = list(dynamic)
            _check_multi(self.op, self.backend, lists, **_MULTI_CHECKS[self.op])
            raise ValueError(f"{self.op}: {self.names[self.slot]} must have the dtypes of "
                             f"the bound call's")

    def _check_aux_inputs(self, skip, norms, table):
        """The checks of ``skip``, ``norms`` and ``table`` (kept for the next call with the
        same three)."""
        self._checked = (None, None, None)
        _skip_ptr(self.op, self.backend, skip, self.device)
        if table is not None:
            rows = _TABLE_ROWS[self.op]
            if (table.dtype != torch.float32 or tuple(table.shape) != (len(rows), self.count)
                    or not table.is_contiguous() or table.device != self.device):
                raise ValueError(f"{self.op}: table must be a contiguous float32 "
                                 f"({len(rows)}, {self.count}) tensor on {self.device}, got "
                                 f"{table.dtype} {tuple(table.shape)} on {table.device}")
        if self.op == "adam_moments_multi":
            _check_aux(self.op, self.backend, "norms", norms, torch.float32, self.count,
                       self.device)
        self._checked = (skip, norms, table)

    def __call__(self, dynamic=None, *, skip=None, norms=None, table=None, layout_token=None,
                 **scalars):
        """``table`` (optional): the per-tensor scalars as a ``_tables.StagedTable``'s fp32
        table (``csrc/multi_tensor.h``: one row per field, one column per tensor) on the
        tensors' device, instead of the ``scalars`` lists: the call's arguments are then the
        same at every step. ``layout_token``: as ``ops_grouped.BoundGroupedProject``'s (the
        check of ``dynamic`` once per token). ``skip``, ``norms`` and ``table`` are checked
        when they are other tensors than the last call's (a step engine passes the same
        ones every step)."""
        if self.slot is not None:
            if layout_token is None or layout_token != self._token:
                self._check_dynamic(dynamic)
                self._token = layout_token
            elif len(dynamic) != self.count:
                self._check_dynamic(dynamic)
            self.ptrs[self.slot::self.stride] = list(map(torch.Tensor.data_ptr, dynamic))
        if skip is not self._checked[0] or norms is not self._checked[1] \
                or table is not self._checked[2]:
            self._check_aux_inputs(skip, norms, table)
        kw = dict(scalars, skip=0 if skip is None else skip.data_ptr(), flag=0)
        if table is not None:
            kw.update(self._no_scalars, table=table.data_ptr())
        if self.op == "adam_moments_multi":
            kw["norms"] = norms.data_ptr() if norms is not None else 0
        if _capture.replaying():
            pass                      # a replayed CUDA graph makes this launch
        elif self.backend == "cpu":
            self.fn(self.ptrs, self.sizes, self.codes, num_threads=torch.get_num_threads(), **kw)
        else:
            with torch.cuda.device(self.device):
                self.fn(self.ptrs, self.sizes, self.codes, device=self.device.index,
                        stream=torch.cuda.current_stream(self.device).cuda_stream, **kw)
        if self.written:
            torch.autograd.graph.increment_version(self.written)
