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
# methods with ``grouped_gemms`` (K1/K3 of each matrix class as one launch): a "fused-grouped" row
GROUPED = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad", "ldadam",
           "adamem")
# the whole-model comparison of issue 4 on CUDA (not --quick): LLaMA-1B, GaLore's rank for it
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


def time_steps(opt, device, n: int, warm: int = 2):
    for _ in range(warm):
        opt.step()
    _sync(device)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        opt.step()
        _sync(device)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts), statistics.fmean(ts)


def _set_grads(model, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype)


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
                        ("fused-grouped", "triton", {"grouped_gemms": True})]
    snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    rows, errors = [], []

    def fresh():
        model.load_state_dict(snapshot)
        _set_grads(model)

    for method in methods:
        for variant, backend, extra in backends:
            if extra and method not in GROUPED:
                continue
            label = f"{method} {variant}/{backend}"
            try:
                fresh()
                opt = make_optimizer(model, method, **_kwargs(method, rank, FAR, backend, extra))
                p50, mean = time_steps(opt, device, n)
                state = int(opt.state_bytes())
                row = {"method": method, "variant": variant, "backend": backend,
                       "steady_p50_ms": p50, "steady_mean_ms": mean, "state_bytes": state,
                       "refresh_p50_ms": None, "refresh_interval": None, "amortised_ms": p50}
                del opt
                if method in REFRESH:
                    fresh()
                    opt = make_optimizer(model, method,
                                         **_kwargs(method, rank, 1, backend, extra))
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


def whole_model(device, log, errors, methods=None, spec=WHOLE_MODEL, steps: int = 20) -> dict:
    """Issue 4's whole-model comparison: the steady step (between refreshes) of GaLore and
    AdaptiveAdamW, fused per matrix and grouped, on every parameter of a LLaMA-1B-sized model
    (fp32), against ``torch.optim.AdamW(fused=True)`` on the same parameters, side by side in
    one process. The first step (a randomized refresh, to keep the run short) is a warm step."""
    from lowrank_fused.models import LlamaForCausalLM, llama_config
    name, rank, which = spec
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(name)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    _set_grads(model)
    rows = []
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    p50, mean = time_steps(opt, device, steps, warm=min(2, steps))
    del opt
    rows.append({"method": "torch.optim.AdamW", "variant": "torch-fused", "steady_p50_ms": p50,
                 "steady_mean_ms": mean, "state_bytes": 8 * n_params})
    log(f"  whole-model {name} torch.optim.AdamW(fused=True): {p50:8.3f} ms")
    for method in which:
        if methods is not None and method not in methods:
            continue
        for variant, extra in (("fused", {}), ("fused-grouped", {"grouped_gemms": True})):
            try:
                opt = make_optimizer(model, method, **_kwargs(
                    method, rank, FAR, "triton", {"projector": "randomized", **extra}))
                p50, mean = time_steps(opt, device, steps, warm=min(2, steps))
                state = int(opt.state_bytes())
                del opt
            except Exception as exc:
                errors.append({"case": f"whole-model {method} {variant}",
                               "error": f"{type(exc).__name__}: {exc}"})
                log(f"ERROR whole-model {method} {variant}: {exc}")
                continue
            rows.append({"method": method, "variant": variant, "steady_p50_ms": p50,
                         "steady_mean_ms": mean, "state_bytes": state})
            log(f"  whole-model {name} {method} {variant}: {p50:8.3f} ms")
    base = rows[0]["steady_p50_ms"]
    for r in rows:
        r["vs_torch_adamw"] = r["steady_p50_ms"] / base
    return {"model": name, "model_params": n_params, "rank": rank, "timed_steps": steps,
            "rows": rows}
