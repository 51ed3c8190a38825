"""Multi-process test drivers (importable by spawned workers): every method under
``DistributedDataParallel`` with the gloo backend on CPU."""
from __future__ import annotations

import contextlib
import os
import socket
import warnings

import torch
import torch.distributed as dist


@contextlib.contextmanager
def gloo_group(rank, world, port):
    """This spawned process's part of a ``world``-process gloo group on localhost (one torch
    thread), destroyed on the way out."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
        # no rank tears its side down while a peer may still have work in flight with it
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A free TCP port on localhost for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(seed=0):
    from lowrank_fused.models import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, intermediate_size=48,
                                        vocab_size=64, max_position_embeddings=16))


def global_batch(t, world, per_rank=2):
    """The step-t batch of the whole job; rank r trains on rows [r*per_rank, (r+1)*per_rank)."""
    g = torch.Generator().manual_seed(500 + t)
    return torch.randint(0, 64, (world * per_rank, 9), generator=g)


def run_single(method, kwargs, steps, world, per_rank=2):
    """The single-process run DDP must equal: the same global batches, mean loss."""
    import lowrank_fused as lf

    model = tiny_model()
    opt = lf.make_optimizer(model, method, **kwargs)
    for t in range(steps):
        ids = global_batch(t, world, per_rank)
        _, loss = model(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _ddp_steps(model, ddp, opt, start, stop, rank, world, per_rank):
    for t in range(start, stop):
        ids = global_batch(t, world, per_rank)[rank * per_rank:(rank + 1) * per_rank]
        _, loss = ddp(ids[:, :-1], labels=ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def ddp_worker(rank, world, port, cases, steps, out_dir, per_rank=2):
    """For each (method, kwargs): a DDP run of ``steps`` steps, and the same run interrupted
    after ``steps // 2`` steps (model + optimizer checkpoint through ``torch.save`` /
    ``torch.load(weights_only=True)``, a fresh model, DDP wrapper and optimizer) and resumed.
    Saves both runs' weights per rank."""
    import lowrank_fused as lf
    from torch.nn.parallel import DistributedDataParallel as DDP

    with gloo_group(rank, world, port):
        results, resumed = {}, {}
        half = steps // 2
        for method, kwargs in cases:
            model = tiny_model()
            opt = lf.make_optimizer(model, method, **kwargs)
            _ddp_steps(model, DDP(model), opt, 0, steps, rank, world, per_rank)
            results[method] = {k: v.detach().clone() for k, v in model.state_dict().items()}

            model = tiny_model()
            opt = lf.make_optimizer(model, method, **kwargs)
            _ddp_steps(model, DDP(model), opt, 0, half, rank, world, per_rank)
            path = os.path.join(out_dir, f"ckpt-{method}-{rank}.pt")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
            ckpt = torch.load(path, weights_only=True)
            model = tiny_model(seed=1)                 # another init: all comes from the file
            model.load_state_dict(ckpt["model"])
            opt = lf.make_optimizer(model, method, **kwargs)
            opt.load_state_dict(ckpt["opt"])
            _ddp_steps(model, DDP(model), opt, half, steps, rank, world, per_rank)
            resumed[method] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        torch.save({"run": results, "resumed": resumed}, os.path.join(out_dir, f"rank{rank}.pt"))


def _WholeMatricesOnly(params):
    """A method without a sharded path (``SUPPORTS_SHARDED = False``, the base's default)."""
    import lowrank_fused as lf

    cls = type("WholeMatricesOnly", (lf.GaLoreAdamW,), {"SUPPORTS_SHARDED": False})
    return cls(params)


def fsdp2_worker(rank, world, port, steps, out_dir, per_rank=4):
    """FSDP2 (``fully_shard``, parameters sharded on dim 0): AdamW and HFAdamW runs, one with
    a NaN injected into one rank's shard at step 1 (``nonfinite="skip"``: every
    rank must skip), the refusal of a method without a sharded path and that of per-layer
    mode inside a process group. Saves full weights and messages per rank."""
    import lowrank_fused as lf
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, world, port):
        out = {}
        for name, factory, poison in (
                ("adamw", lambda m: lf.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), None),
                ("hf_adamw", lambda m: lf.HFAdamW(m.parameters(), lr=1e-2), None),
                ("adamw_skip", lambda m: lf.AdamW(m.parameters(), lr=1e-2,
                                                  nonfinite="skip"), 1)):
            model = _sharded_model(fully_shard)
            opt = factory(model)
            for t in range(steps):
                x, y = odd_batch(t, world, per_rank)
                rows = slice(rank * per_rank, (rank + 1) * per_rank)
                _odd_loss(model, x[rows], y[rows]).backward()
                if t == poison and rank == 1:
                    g = next(model.parameters()).grad
                    g.to_local().view(-1)[0] = float("nan")
                opt.step()
                opt.zero_grad(set_to_none=True)
            out[name] = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
            out[name + ":skipped"] = opt.skipped_steps
        model = _sharded_model(fully_shard)
        try:
            _WholeMatricesOnly(model.parameters())
            out["refusal"] = None
        except ValueError as e:
            out["refusal"] = str(e)
        try:                         # per-layer mode inside a process group of 2 ranks
            from lowrank_fused.per_layer import PerLayerStep

            PerLayerStep(lf.AdamW(odd_mlp().parameters()))
            out["per_layer_refusal"] = None
        except ValueError as e:
            out["per_layer_refusal"] = str(e)
        torch.save(out, os.path.join(out_dir, f"fsdp-rank{rank}.pt"))


# -- every method under FSDP2: one spawn per test file, compared with the one-process run -----
FSDP2_STEPS = 6
FSDP2_TARGETS = r"^[024]$"


def odd_mlp(seed=0, dtype=None):
    """The FSDP2 test model: weights 41x17 (right-projected under "std"), 23x41 and 9x23
    (left); over 2 ranks their rows split 21/20, 12/11 and 5/4. fp32, or ``dtype``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(17, 41), torch.nn.Tanh(),
                                torch.nn.Linear(41, 23), torch.nn.Tanh(), torch.nn.Linear(23, 9))
    return model if dtype is None else model.to(dtype)


def odd_batch(t, world, per_rank=4):
    g = torch.Generator().manual_seed(700 + t)
    x = torch.randn(world * per_rank, 17, generator=g)
    return x, torch.sin(x[:, :9]) + 0.1 * x[:, 8:]


def _odd_loss(model, x, y):
    dtype = next(model.parameters()).dtype
    return ((model(x.to(dtype)) - y.to(dtype)) ** 2).float().mean()


def fixed_grad(t, i, shape, dtype):
    """The step-t gradient of parameter i in a fixed-gradient case: the same numbers in the
    one-process and the sharded run (which takes its rows), so only the optimizer's own sums
    over the ranks differ; what a bf16 case needs, where the backward passes' own rounding
    would otherwise dominate."""
    g = torch.Generator().manual_seed(1000 * t + i)
    return (0.1 * torch.randn(shape, generator=g)).to(dtype)


_SETTINGS = {"exact_gram_ratio": 1.0, "dtype": None, "fixed_grads": False, "poison_step": None}


def _case_settings(kwargs):
    """A case's optimizer keywords and its run settings: ``exact_gram_ratio``
    (``sharded.EXACT_GRAM_RATIO`` for the case), ``dtype`` (of the model: "bfloat16") and
    ``fixed_grads`` (``fixed_grad`` replaces each backward's gradients), ``poison_step`` (a
    NaN in the first parameter's gradient at that step: on the last rank's shard only in the
    sharded run). The backend is the
    reference one unless the case names another (what is tested is the sharding, not the
    kernels, which the interpreter runs slowly)."""
    kwargs = {"backend": "reference", **kwargs}
    settings = {k: kwargs.pop(k, v) for k, v in _SETTINGS.items()}
    if settings["dtype"] is not None:
        settings["dtype"] = getattr(torch, settings["dtype"])
    return kwargs, settings


def odd_single(opt_factory, steps=FSDP2_STEPS, world=2, per_rank=4, poison_step=None,
               dtype=None, fixed_grads=False):
    """The one-process run of ``opt_factory(odd_mlp(dtype=dtype))`` on the global batches of
    ``world`` ranks (a NaN in the first gradient at ``poison_step``; ``fixed_grads``: the
    gradients of ``fixed_grad``). Returns the weights."""
    model = odd_mlp(dtype=dtype)
    opt = opt_factory(model)
    for t in range(steps):
        x, y = odd_batch(t, world, per_rank)
        _odd_loss(model, x, y).backward()
        if fixed_grads:
            for i, p in enumerate(model.parameters()):
                p.grad.copy_(fixed_grad(t, i, p.shape, p.dtype))
        if t == poison_step:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fsdp2_single(method, kwargs, steps=FSDP2_STEPS, world=2, per_rank=4):
    """The one-process run an FSDP2 run must equal: ``make_optimizer(odd_mlp(), method,
    **kwargs)`` on the same global batches. Returns the weights."""
    import lowrank_fused as lf

    kwargs, settings = _case_settings(kwargs)
    return odd_single(lambda m: lf.make_optimizer(m, method, **kwargs), steps, world, per_rank,
                      dtype=settings["dtype"], fixed_grads=settings["fixed_grads"],
                      poison_step=settings["poison_step"])


def _sharded_model(fully_shard, dtype=None):
    model = odd_mlp(dtype=dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _fsdp2_steps(model, opt, start, stop, rank, world, per_rank, traffic=None,
                 fixed_grads=False, poison_step=None):
    from lowrank_fused import sharded

    for t in range(start, stop):
        x, y = odd_batch(t, world, per_rank)
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        _odd_loss(model, x[rows], y[rows]).backward()
        if fixed_grads:                 # this rank's rows of the one-process gradient
            for i, p in enumerate(model.parameters()):
                counts = sharded._chunk_counts(p.shape[0], world)
                start_row = sum(counts[:rank])
                full = fixed_grad(t, i, p.shape, p.dtype)
                p.grad.to_local().copy_(full[start_row:start_row + counts[rank]])
        if t == poison_step and rank == world - 1:
            next(model.parameters()).grad.to_local().view(-1)[0] = float("nan")
        before = sharded.traffic()["bytes"]
        opt.step()
        if traffic is not None:
            traffic.append(sharded.traffic()["bytes"] - before)
        opt.zero_grad(set_to_none=True)


def fsdp2_cases_worker(rank, world, port, cases, steps, out_dir, per_rank=4):
    """For each ``(name, method, kwargs)``: an FSDP2 run of ``steps`` steps on ``odd_mlp``
    (its full weights, the bytes the optimizer all-reduced or gathered per step), and the same
    run checkpointed after ``steps // 2`` steps (each rank's ``opt.state_dict()`` and local
    weight shards through ``torch.save`` / ``torch.load(weights_only=True)``; a fresh model and
    optimizer) and resumed. A case whose optimizer raises records the message instead."""
    import lowrank_fused as lf
    from lowrank_fused import sharded
    from torch.distributed.fsdp import fully_shard

    with gloo_group(rank, world, port):
        out = {}
        for name, method, kwargs in cases:
            kwargs, settings = _case_settings(kwargs)
            sharded.EXACT_GRAM_RATIO = settings["exact_gram_ratio"]
            dtype, fixed = settings["dtype"], settings["fixed_grads"]
            run = dict(fixed_grads=fixed, poison_step=settings["poison_step"])
            try:
                model = _sharded_model(fully_shard, dtype)
                opt = lf.make_optimizer(model, method, **kwargs)
                traffic = []
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", sharded.ShardedRefreshWarning)
                    _fsdp2_steps(model, opt, 0, steps, rank, world, per_rank, traffic, **run)
                out[name + ":warnings"] = [str(w.message) for w in caught
                                           if issubclass(w.category,
                                                         sharded.ShardedRefreshWarning)]
                out[name] = {k: v.full_tensor().detach().clone()
                             for k, v in model.state_dict().items()}
                out[name + ":traffic"] = traffic
                out[name + ":skipped"] = opt.skipped_steps

                half = steps // 2
                model = _sharded_model(fully_shard, dtype)
                opt = lf.make_optimizer(model, method, **kwargs)
                _fsdp2_steps(model, opt, 0, half, rank, world, per_rank, **run)
                path = os.path.join(out_dir, f"fsdp2-{name}-{rank}.pt")
                torch.save({"model": {k: v.to_local().detach().clone()
                                      for k, v in model.state_dict().items()},
                            "opt": opt.state_dict()}, path)
                ckpt = torch.load(path, weights_only=True)
                model = _sharded_model(fully_shard, dtype)
                with torch.no_grad():
                    for k, v in model.state_dict().items():
                        v.to_local().copy_(ckpt["model"][k])
                opt = lf.make_optimizer(model, method, **kwargs)
                opt.load_state_dict(ckpt["opt"])
                _fsdp2_steps(model, opt, half, steps, rank, world, per_rank, **run)
                out[name + ":resumed"] = {k: v.full_tensor().detach().clone()
                                          for k, v in model.state_dict().items()}
            except Exception as e:              # the test reports it (and may expect it)
                out[name + ":error"] = f"{type(e).__name__}: {e}"
        torch.save(out, os.path.join(out_dir, f"fsdp2-cases-{rank}.pt"))


def _rank_main(rank, fn, args):
    """One spawned rank: ``fn(rank, *args)`` with a Python traceback dumped on a fatal signal
    (a native abort otherwise reaches the test as a bare exit signal), then an immediate exit
    once ``fn`` has returned and its results are written: interpreter finalization with the
    communication library's threads still alive can abort a process that has finished its
    work."""
    import faulthandler
    import sys

    faulthandler.enable(all_threads=True)
    fn(rank, *args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn_with_deadline(fn, args, nprocs, deadline_s=180.0):
    """``torch.multiprocessing.spawn`` of ``fn(rank, *args)`` that gives up after
    ``deadline_s``: a rank left waiting in a collective for a peer that crashed or skipped it
    would otherwise hang the caller. The processes are killed and ``TimeoutError`` raised.
    Every multi-process test launches its ranks through this (see ``_rank_main``)."""
    import time

    import torch.multiprocessing as mp

    context = mp.spawn(_rank_main, args=(fn, tuple(args)), nprocs=nprocs, join=False)
    stop = time.monotonic() + deadline_s
    while not context.join(timeout=1.0):
        if time.monotonic() > stop:
            for proc in context.processes:
                if proc.is_alive():
                    proc.kill()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)}: {nprocs} processes still "
                               f"running after {deadline_s:.0f} s (a collective left waiting?)")


def fsdp2_run(cases, out_dir, steps=FSDP2_STEPS, world=2):
    """Run ``fsdp2_cases_worker`` in ``world`` gloo processes; returns each rank's results."""
    spawn_with_deadline(fsdp2_cases_worker,
                        (world, free_port(), list(cases), steps, str(out_dir)), world)
    return [torch.load(os.path.join(str(out_dir), f"fsdp2-cases-{r}.pt"), weights_only=True)
            for r in range(world)]


def check_fsdp2_case(results, name, single, rtol=1e-4, update_rtol=1e-3):
    """The FSDP2 run ``name`` equals the one-process weights ``single`` within ``rtol`` and
    so do the updates themselves (every weight moved; ``update_rtol`` relative to the update,
    not the weight; None: not compared, as for bf16 weights, whose updates are a few
    roundings), both ranks hold the same weights, and the resumed run ends where the
    uninterrupted one does."""
    from lowrank_fused.testing import assert_parity

    start = odd_mlp().state_dict()
    for r in results:
        if name + ":error" in r:
            raise AssertionError(f"FSDP2 case {name} failed: {r[name + ':error']}")
        for key, w in single.items():
            w0 = start[key].to(w.dtype)
            assert_parity(r[name][key], w, rtol=rtol, name=f"{name} {key}")
            assert not torch.equal(w, w0), f"{name}: {key} did not move"
            if update_rtol is not None:
                assert_parity(r[name][key].float() - w0.float(), w.float() - w0.float(),
                              rtol=update_rtol, name=f"{name} update of {key}")
            assert_parity(r[name + ":resumed"][key], r[name][key], rtol=1e-6,
                          name=f"{name} resumed {key}")
    for key in single:
        for r in results[1:]:
            assert torch.equal(results[0][name][key], r[name][key]), (name, key)


def sharded_ops_worker(rank, world, port, out_dir):
    """The core collectives of ``lowrank_fused.sharded`` on row shards of fixed random
    matrices (odd row counts: unequal shards): every rank saves its results for the test to
    compare with the one-process functions on the whole matrices."""
    from lowrank_fused import sharded

    with gloo_group(rank, world, port):
        out = {}
        for (m, n) in SHARDED_OPS_SHAPES:
            G = sharded_ops_matrix(m, n)
            counts = sharded._chunk_counts(m, world)
            rows = sharded.Rows(dist.group.WORLD, counts, rank)
            Gi = rows.local(G)
            for side in ("left", "right"):
                key = (m, n, side)
                for iters in (0, 2):
                    sharded.reset_traffic()
                    out[key + ("rsvd", iters)] = sharded.randomized_svd(
                        Gi, 3, side, rows, oversample=2, power_iters=iters, seed=5)
                    out[key + ("rsvd-bytes", iters)] = sharded.traffic()["bytes"]
                out[key + ("exact",)] = sharded.exact_svd(Gi, 3, side, rows)
                B = torch.randn(*((m, 3) if side == "left" else (3, n)),
                                generator=torch.Generator().manual_seed(3))
                Bi = rows.local(B) if side == "left" else B
                sharded.reset_traffic()
                out[key + ("project",)] = sharded.project(Gi, Bi, side, rows,
                                                          backend="reference")
                out[key + ("project-bytes",)] = sharded.traffic()["bytes"]
            out[(m, n, "sum_sq")] = rows.sum_sq(Gi)
            out[(m, n, "gather")] = rows.gather(Gi[:, :2].contiguous())
        torch.save(out, os.path.join(out_dir, f"sharded-{rank}.pt"))


SHARDED_OPS_SHAPES = ((13, 7), (9, 20), (3, 11))


def sharded_ops_matrix(m, n):
    """A fixed (m x n) test matrix with a decaying spectrum."""
    g = torch.Generator().manual_seed(100 * m + n)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))[0]
    s = 0.6 ** torch.arange(min(m, n), dtype=torch.float32)
    return (U * s) @ V.t()
