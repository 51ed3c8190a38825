"""Suite ``step``: one optimizer step of every method on a whole model's parameter set.

For each method of ``lowrank_fused.routing.METHODS`` (built with ``make_optimizer``) and each
backend (``eager`` = ``reference``; ``fused`` = ``triton`` where Triton runs: CUDA, or the CPU
interpreter with ``--interpret``), plus ``torch.optim.AdamW`` (``fused=True`` where torch has
it) as the dense baseline:

* ``steady``: the subspace refresh pushed out of reach (interval 10**9), two warm steps, then
  ``n`` timed steps (each synchronised): p50 and mean, ms;
* ``refresh``: the same with a refresh on every step (interval 1): one warm step, then the
  p50 of 3 timed steps, ms;
* ``amortised`` = steady p50 + (refresh p50 - steady p50) / T, with T the method's default
  interval (``REFRESH``). LDAdam's power iteration runs every step (its steady time includes
  it); AdamW and Adafactor have no refresh.

The gradients are fixed random tensors (std 1e-3), set once; timing does not include backward.
"""
from __future__ import annotations

import statistics
import time

import torch

from lowrank_fused.routing import METHODS, make_optimizer

# method -> (keyword(s) of the refresh interval, the method's default interval)
REFRESH = {
    "galore": (("update_proj_gap",), 200), "adaptive_adamw": (("update_proj_gap",), 200),
    "rsadamw": (("update_proj_gap",), 200), "gha": (("update_proj_gap",), 200),
    "galore_kfac": (("update_proj_gap",), 200), "adamem": (("update_proj_gap",), 200),
    "adarankgrad": (("t_min", "t_max"), 200), "adapm": (("refit_T",), 100),
    "adapm_mini": (("refit_T",), 100),
}
DENSE = ("adamw", "adafactor")
FAR = 10 ** 9
# the low-rank methods also get a "fused-per-matrix" row: the step engine off (``opt.engine =
# False``: each matrix's own K1/K2/K3, docs/engine.md) against the default (classes, grouped)
PER_MATRIX = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad",
              "ldadam", "adamem")
# the whole-model comparison on CUDA (not --quick): LLaMA-1B, GaLore's rank for it
WHOLE_MODEL = ("1b", 512, ("galore", "adaptive_adamw"))


def model_for(device, quick: bool):
    """(name, model): tiny on CPU, the GaLore paper's 130M on CUDA (60M with --quick)."""
    from lowrank_fused.models import LlamaForCausalLM, llama_config
    if device.type == "cuda":
        name = "60m" if quick else "130m"
        cfg = llama_config(name)
    else:
        name = "tiny"
        cfg = llama_config("tiny")
    torch.manual_seed(0)
    return name, LlamaForCausalLM(cfg).to(device)


def _kwargs(method, rank, interval, backend, extra=None):
    kw = {"lr": 1e-3, "backend": backend, **(extra or {})}
    if method == "adafactor":
        kw["relative_step"] = False
    if method not in DENSE:
        kw["rank"] = rank
    if method in REFRESH and interval is not None:
        for k in REFRESH[method][0]:
            kw[k] = interval
    return kw


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt, device, n: int, warm: int = 2, host: bool = False):
    """p50 and mean ms of ``n`` synchronised steps after ``warm`` ones; ``opt`` is an optimizer
    or a zero-argument step callable. ``host``: also the p50 of the host time, the wall time
    of the step call itself before synchronising (the CPU's issue work)."""
    step = opt.step if hasattr(opt, "step") else opt
    for _ in range(warm):
        step()
    _sync(device)
    ts, hs = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        hs.append((time.perf_counter() - t0) * 1e3)
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    out = (statistics.median(ts), statistics.fmean(ts))
    return out + (statistics.median(hs),) if host else out


def _set_grads(model, seed=0, on_device=False):
    """Fixed random gradients (std 1e-3); ``on_device``: drawn on the parameters' device (a
    1B model's gradients are not drawn on the host)."""
    dev = next(model.parameters()).device if on_device else torch.device("cpu")
    g = torch.Generator(device=dev).manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g, device=dev) * 1e-3).to(p.device, p.dtype)


def run(device, *, quick: bool, interpret: bool = False, methods=None, rank: int = None,
        log=print) -> dict:
    from bench import harness as H
    model_name, model = model_for(device, quick)
    if rank is None:
        rank = 8 if device.type != "cuda" else 128
    n = 5 if quick else (10 if device.type != "cuda" else 20)
    methods = [m for m in METHODS if methods is None or m in methods]
    backends = [("eager", "reference", None)]
    if H.triton_usable(device, interpret):
        backends[:0] = [("fused", "triton", None),
                        ("fused-per-matrix", "triton", {"engine": False})]
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    rows, errors = [], []

    def fresh():
        model.load_state_dict(snapshot)
        _set_grads(model)

    for method in methods:
        for variant, backend, extra in backends:
            if extra and method not in PER_MATRIX:
                continue
            label = f"{method} {variant}/{backend}"
            try:
                fresh()
                opt = _settings(make_optimizer(model, method,
                                               **_kwargs(method, rank, FAR, backend)), extra)
                p50, mean = time_steps(opt, device, n)
                state = int(opt.state_bytes())
                row = {"method": method, "variant": variant, "backend": backend,
                       "steady_p50_ms": p50, "steady_mean_ms": mean, "state_bytes": state,
                       "refresh_p50_ms": None, "refresh_interval": None, "amortised_ms": p50}
                del opt
                if method in REFRESH:
                    fresh()
                    opt = _settings(make_optimizer(model, method,
                                                   **_kwargs(method, rank, 1, backend)), extra)
                    r50, _ = time_steps(opt, device, 3, warm=1)   # each one an SVD-class refresh
                    T = REFRESH[method][1]
                    row.update(refresh_p50_ms=r50, refresh_interval=T,
                               amortised_ms=p50 + max(0.0, r50 - p50) / T)
                    del opt
            except Exception as exc:   # a backend a method lacks, or a failure: record, go on
                msg = f"{type(exc).__name__}: {exc}"
                if variant.startswith("fused"):
                    log(f"  {label}: skipped ({msg.splitlines()[0][:120]})")
                else:
                    errors.append({"case": f"step {label}", "error": msg})
                    log(f"ERROR step {label}: {msg}")
                continue
            rows.append(row)
            log(f"  step {label:34s} steady p50 {row['steady_p50_ms']:8.3f} ms"
                + (f"  refresh {row['refresh_p50_ms']:8.3f} ms  amortised "
                   f"{row['amortised_ms']:8.3f} ms" if row["refresh_p50_ms"] is not None else ""))
    # the dense baseline
    fresh()
    params = list(model.parameters())
    for fused in (True, False):
        try:
            opt = torch.optim.AdamW(params, lr=1e-3, fused=fused) if fused else \
                torch.optim.AdamW(params, lr=1e-3, foreach=True)
        except (RuntimeError, TypeError):
            continue
        try:
            p50, mean = time_steps(opt, device, n)
        except RuntimeError:
            continue
        name = "torch-fused" if fused else "torch-foreach"
        rows.append({"method": "torch.optim.AdamW", "variant": name, "backend": "torch",
                     "steady_p50_ms": p50, "steady_mean_ms": mean, "state_bytes": 8 * n_params,
                     "refresh_p50_ms": None, "refresh_interval": None, "amortised_ms": p50})
        log(f"  step torch.optim.AdamW {name:18s} steady p50 {p50:8.3f} ms")
        break
    base = next((r["amortised_ms"] for r in rows if r["method"] == "torch.optim.AdamW"), None)
    for r in rows:
        r["vs_torch_adamw"] = (r["amortised_ms"] / base) if base else None
        r["state_ratio"] = r["state_bytes"] / (8 * n_params)
    doc = {"suite": "step", "model": model_name, "model_params": n_params, "rank": rank,
           "timed_steps": n, "rows": rows, "errors": errors}
    if device.type == "cuda" and not quick and (methods is None or set(methods) & set(
            WHOLE_MODEL[2])):
        del model, snapshot
        torch.cuda.empty_cache()
        doc["whole_model"] = whole_model(device, log, errors, methods)
    return doc


def whole_model(device, log, errors, methods=None, spec=WHOLE_MODEL, steps: int = 20,
                warm: int = 2, precision=None, ceilings=None, graphs: bool = True,
                deadline=None) -> dict:
    """The whole-model comparison: the steady step (between refreshes) of GaLore and
    AdaptiveAdamW, fused on the step engine and per matrix, on every parameter of a LLaMA-1B-sized model
    (fp32), against ``torch.optim.AdamW(fused=True)`` on the same parameters, side by side in
    one process. The first step (a randomized refresh, to keep the run short) is a warm step.

    Every row has the synchronised step time (``steady_p50_ms``) and the host time
    (``host_p50_ms``: wall time of the ``opt.step()`` call itself, before synchronising: the
    CPU's launch work); the model-wide byte floor and FLOPs (``model_step_cost``) and, with
    ``ceilings`` (``harness.measure_ceilings``), the multiples of the byte floor and of the
    roofline at ``precision`` (the optimizers' ``matmul_precision``; None: torch's setting).
    CUDA graphs (``graphs``, CUDA only): a ``+graph`` row for torch's AdamW (``capturable=True``,
    captured with ``torch.cuda.graph``) and for every optimizer that offers a capture API
    (``graph_step``); the others get ``graph: "n/a"``. ``deadline`` (``time.monotonic()``):
    rows not started by then are listed under ``skipped`` instead of measured."""
    name, rank, which, model = _whole_model(device, spec)
    n_params = sum(p.numel() for p in model.parameters())
    rows = []
    params = list(model.parameters())
    graph_ok = graphs and device.type == "cuda"
    skipped = []

    def late(method, variant):
        if deadline is not None and time.monotonic() > deadline:
            skipped.append(f"{method} {variant}")
            log(f"  whole-model {method} {variant}: skipped (budget spent)")
            return True
        return False

    def add(method, variant, opt, step, cost, graph):
        p50, mean, host = time_steps(step, device, steps, warm=min(warm, steps), host=True)
        state = int(opt.state_bytes()) if hasattr(opt, "state_bytes") else 8 * n_params
        row = {"method": method, "variant": variant, "steady_p50_ms": p50,
               "steady_mean_ms": mean, "host_p50_ms": host, "state_bytes": state,
               "graph": graph, "precision": precision, "bytes_floor": cost[0],
               "flops": cost[1].total}
        row.update(_floor_multiples(p50, cost, precision, ceilings))
        rows.append(row)
        log(f"  whole-model {name} {method} {variant}: {p50:8.3f} ms (host {host:8.3f} ms)"
            + (f"  x{row['multiple_of_roofline']:.2f} roofline"
               if row.get("multiple_of_roofline") is not None else ""))

    torch_cost = model_step_cost(None, params)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    add("torch.optim.AdamW", "torch-fused", opt, opt.step, torch_cost,
        "captured separately" if graph_ok else "n/a")
    del opt
    if graph_ok and not late("torch.optim.AdamW", "torch-fused+graph"):
        try:
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
            add("torch.optim.AdamW", "torch-fused+graph", opt, _torch_graph(opt), torch_cost,
                "torch.cuda.graph")
            del opt
        except Exception as exc:
            errors.append({"case": "whole-model torch.optim.AdamW graph",
                           "error": f"{type(exc).__name__}: {exc}"})
            log(f"ERROR whole-model torch AdamW graph: {exc}")
    for method in which:
        if methods is not None and method not in methods:
            continue
        for variant, extra in WHOLE_MODEL_VARIANTS:
            if late(method, variant):
                continue
            try:
                opt = _whole_model_optimizer(model, method, rank, extra, precision)
                cost = model_step_cost(opt, params, method)
                capture = graph_step(opt)
                engine_capture = variant == "fused" and isinstance(
                    getattr(opt, "capture", None), bool)
                add(method, variant, opt, opt.step, cost,
                    "captured separately" if (capture or engine_capture) and graph_ok
                    else "n/a")
                if capture is not None and graph_ok:
                    add(method, variant + "+graph", opt, capture(), cost, "optimizer capture")
                if engine_capture and graph_ok and not late(method, variant + "+graph"):
                    opt.capture = True     # the engine's CUDA-graph capture (a setting)
                    add(method, variant + "+graph", opt, opt.step, cost, "opt.capture")
                    if not opt.graphs_captured:
                        rows[-1]["graph"] = "opt.capture (not capturable: ran eagerly)"
                    opt.capture = False
                del opt
            except Exception as exc:
                errors.append({"case": f"whole-model {method} {variant}",
                               "error": f"{type(exc).__name__}: {exc}"})
                log(f"ERROR whole-model {method} {variant}: {exc}")
                continue
    base = rows[0]["steady_p50_ms"]
    for r in rows:
        r["vs_torch_adamw"] = r["steady_p50_ms"] / base
    return {"model": name, "model_params": n_params, "rank": rank, "timed_steps": steps,
            "precision": precision, "rows": rows, "skipped": skipped}


WHOLE_MODEL_VARIANTS = (("fused", {}), ("fused-per-matrix", {"engine": False}))


def _whole_model(device, spec):
    """``(name, rank, methods, model)`` of a whole-model spec ``(name, rank, methods[, config
    overrides])``: the model built on the device, fixed random gradients drawn there."""
    from lowrank_fused.models import LlamaForCausalLM, llama_config
    name, rank, which = spec[:3]
    overrides = spec[3] if len(spec) > 3 else {}
    torch.manual_seed(0)
    with torch.device(device):      # built on the device: no host init of 1B parameters
        model = LlamaForCausalLM(llama_config(name, **overrides))
    _set_grads(model, on_device=True)
    return name, rank, which, model


def _whole_model_optimizer(model, method, rank, extra, precision):
    """A fused optimizer of the whole-model comparison: refresh out of reach after the first
    step, whose subspace comes from the randomized range finder (a short warm step)."""
    kw = {"projector": "randomized"}
    if precision is not None:
        kw["matmul_precision"] = precision
    return _settings(make_optimizer(model, method, **_kwargs(method, rank, FAR, "triton", kw)),
                     extra)


def _settings(opt, settings):
    """The optimizer with its settings (attributes, not constructor arguments: ``engine``)."""
    for key, value in (settings or {}).items():
        setattr(opt, key, value)
    return opt


def warm_whole_model(device, spec=WHOLE_MODEL, precision=None, log=print) -> int:
    """Two steps (the first refreshes) of every fused optimizer ``whole_model`` times, untimed:
    their Triton compiles for the model's shapes, done by a warm-up process
    (``bench.gpu_check``'s warm workers) so the timed run loads them from Triton's cache.
    Returns how many optimizers stepped."""
    name, rank, which, model = _whole_model(device, spec)
    done = 0
    for method in which:
        for variant, extra in WHOLE_MODEL_VARIANTS:
            t = time.perf_counter()
            opt = _whole_model_optimizer(model, method, rank, extra, precision)
            opt.step()
            opt.step()
            _sync(device)
            del opt
            done += 1
            log(f"warm whole-model {name} {method} {variant}: "
                f"{(time.perf_counter() - t) * 1e3:.0f} ms")
    return done


# the names under which an optimizer may offer CUDA-graph capture of its step: a method that
# returns a zero-argument callable replaying one step (capture happens inside the method)
CAPTURE_APIS = ("capture", "capture_step", "cuda_graph", "graphed_step")


def graph_step(opt):
    """The optimizer's capture method (a callable returning a replay callable), or None when it
    offers none. This library's optimizers offer capture as a setting instead
    (``opt.capture = True``: ``step()`` captures and replays by itself), which
    ``whole_model`` times as its own ``+graph`` rows."""
    for attr in CAPTURE_APIS:
        fn = getattr(opt, attr, None)
        if callable(fn):
            return fn
    return None


def _torch_graph(opt):
    """``opt.step`` of a ``capturable`` torch optimizer captured into a CUDA graph (warm-up on a
    side stream first, as torch's documentation does); returns the graph's ``replay``."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def model_step_cost(opt, params, method=None):
    """``(bytes_floor, Flops)`` of one steady step over ``params``: ``method``'s step model
    (``bench.bytes.method_step_bytes`` / ``method_step_flops``, fp32 states, side by
    galore_torch's "std" rule) for every matrix of ``opt``'s low-rank groups with a rank below
    its smaller dimension, dense AdamW (fp32 states) for the rest; ``opt=None``: torch's AdamW
    on everything (states in the parameter dtype)."""
    from bench import bytes as B
    from bench.harness import galore_side

    low = {}
    if opt is not None:
        for group in opt.param_groups:
            if group.get("rank"):
                for p in group["params"]:
                    if p.dim() == 2 and group["rank"] < min(p.shape):
                        low[id(p)] = group["rank"]
    nbytes, flops = 0, B.Flops(0)
    for p in params:
        size = p.element_size()
        if id(p) in low:
            m, n = p.shape
            side = galore_side(m, n)
            nbytes += B.method_step_bytes(method, m, n, low[id(p)], param_bytes=size,
                                          side=side).floor
            flops = flops + B.method_step_flops(method, m, n, low[id(p)], side=side)
        else:
            nbytes += B.adamw_bytes(p.numel(), 1, param_bytes=size,
                                    state_bytes=size if opt is None else 4).floor
            flops = flops + B.adamw_flops(p.numel(), 1)
    return nbytes, flops


def _floor_multiples(p50_ms, cost, precision, ceilings):
    """``multiple_of_floor`` / ``multiple_of_roofline`` / ``roofline_bound`` of a step of
    ``cost = (bytes, Flops)`` taking ``p50_ms``, against ``ceilings`` (empty without them)."""
    from bench import harness as H

    if not ceilings or not ceilings.get("copy_gbps") or p50_ms <= 0:
        return {}
    out = {"multiple_of_floor": p50_ms * 1e-3 / (cost[0] / (ceilings["copy_gbps"] * 1e9))}
    rl = H.roofline_of(cost[0], cost[1], precision, ceilings)
    if rl is not None:
        out.update(roofline_ms=rl.seconds * 1e3, multiple_of_roofline=p50_ms * 1e-3 / rl.seconds,
                   roofline_bound=rl.bound)
    return out
