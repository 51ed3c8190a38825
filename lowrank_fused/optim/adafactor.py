"""Adafactor, the HF ``transformers`` version vendored in GaLore (docs/methods/adafactor.md).

Parameters with ndim >= 2 keep factored second-moment statistics: ``exp_avg_sq_row`` of shape
``shape[:-1]`` and ``exp_avg_sq_col`` of shape ``shape[:-2] + shape[-1:]`` (a tensor with more
than two dimensions is a batch of ``shape[-2] x shape[-1]`` matrices, as in the HF code);
other parameters keep a full ``exp_avg_sq``. ``beta1`` adds ``exp_avg``, an EMA of the
already clipped and scaled update. There is no bias correction: the ``1 - t^decay_rate``
schedule makes step 1 exact. All states are fp32 (the HF code casts the gradient to fp32).

The step math is the ``adafactor_step`` op (``lowrank_fused/reference/adafactor_step.py``),
looked up in the dispatch table for the optimizer's backend; the scalars that depend only on
the step counter (relative step size, ``beta2t``) are computed here.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from lowrank_fused.dispatch import implementation
from lowrank_fused.optim._base import LowRankOptimizer, check_number, is_sharded, local


@dataclass(frozen=True)
class AdafactorRoute:
    """The step engine's route of an Adafactor parameter: its canonical shape ((B, m, n) for
    ndim >= 2, flat otherwise) and whether its second moment is factored. Parameters of one
    route (and dtype, strides, momentum, ``scale_parameter``, backend) form a class that runs
    in one set of launches."""
    shape: tuple
    factored: bool


def relative_step_size(step: int, lr, relative_step: bool, warmup_init: bool) -> float:
    """rho_t (docs/methods/adafactor.md, ``adafactor.py#L133-L137``):
    ``min(1e-6*t if warmup_init else 1e-2, 1/sqrt(t))`` with ``relative_step``, else ``lr``."""
    if relative_step:
        min_step = 1e-6 * step if warmup_init else 1e-2
        return min(min_step, 1.0 / math.sqrt(step))
    return float(lr)


def beta2_at(step: int, decay_rate: float) -> float:
    """``1 - t^decay_rate`` (``b2t`` in docs/methods/adafactor.md): 0 at t = 1."""
    return 1.0 - math.pow(step, decay_rate)


class Adafactor(LowRankOptimizer):
    """Adafactor (Shazeer & Stern 2018) as HF transformers / galore_torch implement it.

    Args (all may be overridden per param group; defaults are the HF class defaults):
        lr: external learning rate; must be None when ``relative_step`` (the step size is then
            ``min(1e-2, 1/sqrt(t))``, or ``min(1e-6*t, 1/sqrt(t))`` with ``warmup_init``), and
            a number >= 0 otherwise.
        eps: (eps1, eps2): eps1 (1e-30) is added to squared gradients, eps2 (1e-3) floors the
            parameter RMS in ``scale_parameter``.
        clip_threshold: d > 0 (1.0): the update is divided by ``max(1, RMS(U)/d)``.
        decay_rate: tau <= 0 (-0.8): second-moment decay ``beta2_t = 1 - t^tau``.
        beta1: None (no momentum, default) or a momentum coefficient in [0, 1).
        weight_decay: lam >= 0 (0.0), applied as ``W <- W - lam*a_t*W`` before the update.
        scale_parameter: multiply the step size by ``max(eps2, RMS(W))`` (True).
        relative_step: time-dependent step size instead of ``lr`` (True).
        warmup_init: linear warm-up of the relative step size (False; needs relative_step).
        backend, nonfinite: the options every method shares (``LowRankOptimizer``,
            docs/conventions.md). The backend is that of the ``adafactor_step`` op (``triton``: ``kernels/adafactor_step.py``, three passes over G with the row and
            column statistics, the update RMS and RMS(W) reduced on the device, no m x n
            temporary and no host read, a whole class of same-shape parameters per set of
            launches on the step engine; ``auto`` picks it on CUDA).

    State per parameter: ``step`` (int); ``exp_avg_sq_row`` and ``exp_avg_sq_col`` (ndim >= 2)
    or ``exp_avg_sq`` (ndim < 2); ``exp_avg`` when beta1 is not None. The HF code also keeps
    ``RMS``, the parameter RMS recomputed at every step; it is not state and is not stored.
    """

    PARAM_DTYPES = LowRankOptimizer.PARAM_DTYPES + (torch.float64,)   # HF Adafactor runs fp64
    # no basis, no GEMM, and its state is in the parameter dtype by definition
    OPTIONS = frozenset({"backend", "nonfinite"})
    # FSDP2 (dim-0 shards): the statistics over the split rows and the two RMS are all-reduced
    # (``_sharded_step``; docs/methods/adafactor.md, "Under FSDP2")
    SUPPORTS_SHARDED = True

    def __init__(self, params, lr=None, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                 beta1=None, weight_decay=0.0, scale_parameter=True, relative_step=True,
                 warmup_init=False, **options):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        beta1=beta1, weight_decay=weight_decay, scale_parameter=scale_parameter,
                        relative_step=relative_step, warmup_init=warmup_init)
        self._check_group(defaults)
        super().__init__(params, defaults, **options)

    # -- validation -----------------------------------------------------------------------
    def _check_group(self, group):
        for flag in ("scale_parameter", "relative_step", "warmup_init"):
            if not isinstance(group[flag], bool):
                raise ValueError(f"{flag} must be a bool, got {group[flag]!r}")
        if group["relative_step"]:
            if group["lr"] is not None:
                raise ValueError("lr must be None when relative_step=True (the step size is "
                                 f"relative); got lr={group['lr']!r}. Pass relative_step=False "
                                 "to use an external learning rate")
        else:
            if group["lr"] is None:
                raise ValueError("lr must be given when relative_step=False")
            check_number("lr", group["lr"], low=0.0)
            if group["warmup_init"]:
                raise ValueError("warmup_init=True requires relative_step=True")
        eps = group["eps"]
        if not (isinstance(eps, (tuple, list)) and len(eps) == 2):
            raise ValueError(f"eps must be a pair (eps1, eps2), got {eps!r}")
        check_number("eps[0]", eps[0], low=0.0)
        check_number("eps[1]", eps[1], low=0.0)
        d = check_number("clip_threshold", group["clip_threshold"], low=0.0)
        if d == 0.0:
            raise ValueError("clip_threshold must be > 0, got 0")
        check_number("decay_rate", group["decay_rate"], high=0.0)
        if group["beta1"] is not None:
            check_number("beta1", group["beta1"], low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _ops_needed(self, group, p):
        return ("adafactor_step",)

    # -- the step -------------------------------------------------------------------------
    @staticmethod
    def _canonical(p):
        """The op's canonical shape: (B, m, n) for ndim >= 2, flat for ndim < 2."""
        shape = p.shape
        if p.dim() >= 2:
            return (math.prod(shape[:-2]), shape[-2], shape[-1])
        return (p.numel(),)

    @classmethod
    def _views(cls, p):
        """(W, G, write_back) in the op's canonical shape (of this rank's shard for an FSDP2
        parameter). ``write_back`` copies W into p when p could not be viewed."""
        P = local(p)
        canon = cls._canonical(P)
        G = local(p.grad).reshape(canon)
        try:
            return P.view(canon), G, lambda W: None
        except RuntimeError:
            W = P.reshape(canon).clone()
            return W, G, lambda W: P.copy_(W.view(P.shape))

    def _init_state(self, p, group):
        state = self.state[p]
        shape = local(p).shape          # an FSDP2 shard's state covers its own rows
        if "step" not in state:
            state["step"] = 0
            f32 = dict(dtype=torch.float32, device=p.device)
            if p.dim() >= 2:
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1], **f32)
                state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], **f32)
            else:
                state["exp_avg_sq"] = torch.zeros(shape, **f32)
        if group["beta1"] is not None and "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        return state

    @staticmethod
    def _step_scalars(group, t):
        """``(rho, beta2t, eps1, eps2, clip_threshold, beta1, weight_decay)`` of step ``t``
        (the ``adafactor_step`` keywords, in the order the grouped launcher takes them)."""
        eps1, eps2 = group["eps"]
        beta1 = group["beta1"]
        return (relative_step_size(t, group["lr"], group["relative_step"], group["warmup_init"]),
                beta2_at(t, float(group["decay_rate"])), float(eps1), float(eps2),
                float(group["clip_threshold"]), None if beta1 is None else float(beta1),
                float(group["weight_decay"]))

    @staticmethod
    def _call(impl, W, G, row, col, V, exp_avg, scalars, scale_parameter, skip):
        rho, beta2t, eps1, eps2, d, beta1, wd = scalars
        impl(W, G, row, col, V, exp_avg, rho=rho, beta2t=beta2t, eps1=eps1, eps2=eps2,
             clip_threshold=d, scale_parameter=scale_parameter, beta1=beta1, weight_decay=wd,
             skip=skip)

    def _step_param(self, p, group, backend, precision):
        if is_sharded(p):
            self._sharded_step(p, group)
            return
        state = self._init_state(p, group)
        factored = p.dim() >= 2
        use_momentum = group["beta1"] is not None
        t = state["step"] + 1
        W, G, write_back = self._views(p)
        if factored:
            B, m, n = W.shape
            row = state["exp_avg_sq_row"].view(B, m)
            col = state["exp_avg_sq_col"].view(B, n)
            V = None
        else:
            row = col = None
            V = state["exp_avg_sq"].view(W.shape)
        exp_avg = state["exp_avg"].view(W.shape) if use_momentum else None
        impl = implementation("adafactor_step", backend, p.device)
        # no skip flag: a step with per-parameter work reads the flag at once (docs/engine.md),
        # and per-layer mode checks each gradient itself
        self._call(impl, W, G, row, col, V, exp_avg, self._step_scalars(group, t),
                   group["scale_parameter"], None)
        write_back(W)
        state["step"] = t

    def _sharded_step(self, p, group):
        """The step of an FSDP2 parameter (rows split over the ranks; docs/methods/adafactor.md,
        "Under FSDP2"): the reference op's math on this rank's shard, with what spans the whole
        tensor summed over the ranks. A matrix's column means and the mean of its row
        statistics are all-reduced (an n-vector and a scalar, with sum(W^2) riding along), then
        sum(U^2) (one scalar); a vector or a batch of matrices (ndim > 2, split along the
        batch) keeps all its statistics local and all-reduces only sum(U^2) and sum(W^2). So
        every rank takes the same clipping and step size, and the run equals the one-process
        one up to the rounding of the sums."""
        from lowrank_fused import sharded

        rows = sharded.rows_of(p)
        state = self._init_state(p, group)
        t = state["step"] + 1
        rho, beta2t, eps1, eps2, d, beta1, wd = self._step_scalars(group, t)
        scaled = bool(group["scale_parameter"])
        numel = p.numel()                      # the whole tensor's (a DTensor's shape is global)
        W, G, write_back = self._views(p)      # this rank's shard
        g = G.float()
        w = W.float()
        q = g * g + eps1
        w_sq = None
        if p.dim() >= 2:
            B, m, n = W.shape
            row = state["exp_avg_sq_row"].view(B, m)
            col = state["exp_avg_sq_col"].view(B, n)
            row.mul_(beta2t).add_(q.mean(dim=-1), alpha=1.0 - beta2t)
            if p.dim() == 2:
                # the rows are split: column means and the row statistics' mean over ranks
                parts = [q.sum(dim=-2).reshape(-1), row.sum().reshape(1)]
                if scaled:
                    parts.append(w.square().sum().reshape(1))
                buf = rows.sum_(torch.cat(parts))
                col.mul_(beta2t).add_(buf[:n].view(1, n) / rows.m, alpha=1.0 - beta2t)
                row_mean = (buf[n] / rows.m).reshape(1, 1)
                w_sq = buf[n + 1] if scaled else None
            else:                              # split along the batch: every matrix is whole
                col.mul_(beta2t).add_(q.mean(dim=-2), alpha=1.0 - beta2t)
                row_mean = row.mean(dim=-1, keepdim=True)
            r_factor = (row / row_mean).rsqrt_().unsqueeze(-1)
            c_factor = col.unsqueeze(-2).rsqrt()
            u = torch.mul(r_factor, c_factor).mul_(g)
        else:
            V = state["exp_avg_sq"].view(W.shape)
            V.mul_(beta2t).add_(q, alpha=1.0 - beta2t)
            u = V.rsqrt().mul_(g)
        if w_sq is None:
            sums = [u.square().sum().reshape(1)]
            if scaled:
                sums.append(w.square().sum().reshape(1))
            sums = rows.sum_(torch.cat(sums))
            u_sq = sums[0]
            if scaled:
                w_sq = sums[1]
        else:
            u_sq = rows.sum_(u.square().sum().reshape(1))[0]
        a = (w_sq.sqrt() / math.sqrt(numel)).clamp(min=eps2) * rho if scaled else rho
        u.div_((u_sq.sqrt() / math.sqrt(numel) / d).clamp_(min=1.0))
        u.mul_(a)
        if beta1 is not None:
            exp_avg = state["exp_avg"].view(W.shape)
            exp_avg.mul_(beta1).add_(u, alpha=1.0 - beta1)
            u = exp_avg
        if wd != 0:
            w.add_(w * (-wd * a))
        w.add_(-u)
        W.copy_(w)
        write_back(W)
        state["step"] = t

    # -- the step engine (docs/engine.md; this method's classes: docs/methods/adafactor.md) --
    # Every state write of a steady step (the statistics, exp_avg, W) takes the on-device skip
    # flag, so with the lagged flag a steady step reads nothing on the host.
    DEVICE_SKIP = True
    # a steady step is one grouped call per class (GroupedAdafactorStep: its scalars in a
    # table, its launches skipped on a replay) where every class took it on the last step
    CAPTURABLE = True

    def _class_capturable(self, cls) -> bool:
        """The class ran its grouped call on the last step (not the op per member)."""
        return cls.extra.get("grouped_used", False)

    def _route(self, p, group):
        """Every parameter runs on a class of its canonical shape; a strided vector (the
        unfactored kernels take contiguous ones) keeps its own per-parameter step."""
        if p.dim() < 2 and not p.is_contiguous():
            return None
        return AdafactorRoute(shape=self._canonical(p), factored=p.dim() >= 2)

    def _refresh_classes(self, routed) -> bool:
        """No refresh; True (rebuild the classes) when a group's momentum or
        ``scale_parameter`` changed since they were built (they fix a class's kernels)."""
        flags = tuple((g["beta1"] is None, bool(g["scale_parameter"]))
                      for g in self.param_groups)
        return flags != self.__dict__.get("_class_flags")

    def _build_classes(self, plan):
        """The classes of the routed parameters: the members sharing canonical shape, weight
        dtype and strides, momentum, ``scale_parameter`` and backend, with their state lists.
        (Adafactor has no basis and no projection, so the base's classes, built around those,
        are replaced here; the base's ``_engine_step`` runs them through ``_class_step``.)"""
        from lowrank_fused.dispatch import resolve_call
        from lowrank_fused.optim import _engine

        classes = {}
        for p, group, route, state in plan.routed:
            state = self._init_state(p, group)
            backend = self._backend_for(group, p)
            W = p.view(route.shape)
            key = (route, W.dtype, W.stride(), group["beta1"] is not None,
                   bool(group["scale_parameter"]), str(backend), id(backend))
            cls = classes.get(key)
            if cls is None:
                cls = classes[key] = _engine.MatrixClass(key=key, route=route, backend=backend)
            cls.members.append(_engine.Member(p=p, group=group, state=state, W=W))
            cls.Ws.append(W)
        for cls in classes.values():
            route, sts = cls.route, [m.state for m in cls.members]
            momentum, scaled = cls.key[3], cls.key[4]
            if route.factored:
                B, m, n = route.shape
                rows = [st["exp_avg_sq_row"].view(B, m) for st in sts]
                cols = [st["exp_avg_sq_col"].view(B, n) for st in sts]
                Vs = None
            else:
                rows = cols = None
                Vs = [st["exp_avg_sq"].view(route.shape) for st in sts]
            Es = [st["exp_avg"].view(route.shape) for st in sts] if momentum else None
            cls.extra.update(rows=rows, cols=cols, Vs=Vs, Es=Es, scaled=scaled, grouped=None,
                             impl=implementation("adafactor_step", cls.backend,
                                                 cls.Ws[0].device))
            if resolve_call("adafactor_step", cls.backend, cls.Ws[0].device)[0] == "triton":
                from lowrank_fused.kernels.adafactor_step import GroupedAdafactorStep

                try:     # the whole class in one set of launches, each member's bits as alone
                    cls.extra["grouped"] = GroupedAdafactorStep(
                        cls.Ws, rows, cols, Vs, Es, shape=route.shape, scale_parameter=scaled)
                except ValueError:   # state of another layout (e.g. loaded strided): per member
                    pass
        plan.classes = classes
        self._class_flags = tuple((g["beta1"] is None, bool(g["scale_parameter"]))
                                  for g in self.param_groups)
        self._classes_stale = False

    def _class_step(self, cls, precision):
        """One class: the grouped step (five launches factored, three unfactored) with one
        scalar set per distinct (group, step counter), or the op per member elsewhere."""
        memo, sets, sel = {}, [], []
        for m in cls.members:
            st = m.state
            t = st["step"] + 1
            st["step"] = t
            k = (id(m.group), t)
            i = memo.get(k)
            if i is None:
                i = memo[k] = len(sets)
                sets.append(self._step_scalars(m.group, t))
            sel.append(i)
        grouped = cls.extra["grouped"]
        params = cls.extra.get("_member_params")
        if params is None:
            params = cls.extra["_member_params"] = [m.p for m in cls.members]
        Gs = self._step_grads(params, cls.extra)
        if grouped is not None and grouped.takes(Gs):
            grouped(Gs, sets, None if len(sets) == 1 else sel, skip=self._skip_flag)
            cls.extra["grouped_used"] = True
            return
        cls.extra["grouped_used"] = False
        # the reference, or gradients of different layouts on this step: the op per member
        x = cls.extra
        impl, shape, scaled = x["impl"], cls.route.shape, x["scaled"]
        for i, (m, W) in enumerate(zip(cls.members, cls.Ws)):
            self._call(impl, W, Gs[i].reshape(shape),
                       None if x["rows"] is None else x["rows"][i],
                       None if x["cols"] is None else x["cols"][i],
                       None if x["Vs"] is None else x["Vs"][i],
                       None if x["Es"] is None else x["Es"][i],
                       sets[sel[i]], scaled, self._skip_flag)
