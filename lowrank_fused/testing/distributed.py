"""Multi-process test drivers (importable by spawned workers): every method under
``DistributedDataParallel`` with the gloo backend on CPU."""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist


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

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
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
    finally:
        dist.destroy_process_group()


def mlp_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.Tanh(), torch.nn.Linear(40, 24),
                               torch.nn.Tanh(), torch.nn.Linear(24, 8))


def mlp_batch(t, world, per_rank=4):
    g = torch.Generator().manual_seed(900 + t)
    x = torch.randn(world * per_rank, 16, generator=g)
    return x, torch.sin(x[:, :8])


def mlp_single(opt_factory, steps, world, per_rank=4, poison_step=None):
    model = mlp_model()
    opt = opt_factory(model)
    for t in range(steps):
        x, y = mlp_batch(t, world, per_rank)
        ((model(x) - y) ** 2).mean().backward()
        if t == poison_step:
            next(model.parameters()).grad.view(-1)[0] = float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def galore_groups(model, rank=4):
    """GaLore groups of the MLP: the Linear weights projected on the right, biases dense."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    return [{"params": weights, "rank": rank, "update_proj_gap": 2, "proj_type": "right"},
            {"params": biases}]


def ldadam_groups(model, rank=4):
    """LDAdam groups of the MLP: the Linear weights low-rank on the right, biases dense."""
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    return [{"params": weights, "rank": rank, "enable_lowrank": True, "proj_type": "right"},
            {"params": biases, "enable_lowrank": False}]


def fsdp2_worker(rank, world, port, steps, out_dir, per_rank=4):
    """FSDP2 (``fully_shard``, parameters sharded on dim 0): AdamW, HFAdamW and GaLoreAdamW
    runs, one with a NaN injected into one rank's shard at step 1 (``nonfinite="skip"``: every
    rank must skip), and the refusal of a method that needs whole matrices. Saves full weights
    and messages per rank."""
    import lowrank_fused as lf
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = {}
        for name, factory, poison in (
                ("adamw", lambda m: lf.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1), None),
                ("hf_adamw", lambda m: lf.HFAdamW(m.parameters(), lr=1e-2), None),
                ("adamw_skip", lambda m: lf.AdamW(m.parameters(), lr=1e-2,
                                                  nonfinite="skip"), 1),
                ("galore", lambda m: lf.GaLoreAdamW(galore_groups(m), lr=1e-2), None),
                ("ldadam", lambda m: lf.LDAdamW(ldadam_groups(m), lr=1e-3), None)):
            model = mlp_model()
            for layer in model:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer)
            fully_shard(model)
            opt = factory(model)
            for t in range(steps):
                x, y = mlp_batch(t, world, per_rank)
                x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
                ((model(x) - y) ** 2).mean().backward()
                if t == poison and rank == 1:
                    g = next(model.parameters()).grad
                    g.to_local().view(-1)[0] = float("nan")
                opt.step()
                opt.zero_grad(set_to_none=True)
            out[name] = {k: v.full_tensor().detach().clone() for k, v in model.state_dict().items()}
            out[name + ":skipped"] = opt.skipped_steps
        model = mlp_model()
        fully_shard(model)
        try:
            lf.make_optimizer(model, "adaptive_adamw", rank=2, target_modules=r"^[024]$")
            out["refusal"] = None
        except ValueError as e:
            out["refusal"] = str(e)
        torch.save(out, os.path.join(out_dir, f"fsdp-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def per_layer_refusal_worker(rank, world, port, out_dir):
    """PerLayerStep inside a 2-process group must refuse (gradients not yet all-reduced)."""
    import lowrank_fused as lf
    from lowrank_fused.per_layer import PerLayerStep

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        try:
            PerLayerStep(lf.AdamW(mlp_model().parameters()))
            msg = None
        except ValueError as e:
            msg = str(e)
        torch.save(msg, os.path.join(out_dir, f"pl-{rank}.pt"))
    finally:
        dist.destroy_process_group()
