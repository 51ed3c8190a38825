"""Train a tiny LLaMA-style model with GaLore-AdamW (``make train``).

    python -m lowrank_fused.train [--steps 300] [--optimizer galore|adamw] [--backend auto] ...

Default data: byte-level text from the running interpreter's standard-library ``.py`` files
(see ``lowrank_fused.data``); ``--data PATH.bin`` trains on a nanoGPT-style uint16 token file.
Prints a header (model size, device, resolved backend), one line per ``--log-every`` steps
(step, mean loss over the window, lr, tokens/s), periodic validation loss, and at the end the
final train/val loss, overall tokens/s, and the optimizer's state bytes against what AdamW
would hold (two fp32 moments per parameter). ``--json PATH`` writes the same metrics.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Iterable, List, Optional

import torch

from lowrank_fused.data import BatchSampler, Corpus, DEFAULT_MAX_BYTES, load_bin, load_stdlib_corpus
from lowrank_fused.models import LlamaConfig, LlamaForCausalLM
from lowrank_fused.routing import galore_param_groups

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EVAL_SEED = 1234  # fixed: every evaluation sees the same batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lowrank_fused.train",
        description="Train a tiny LLaMA-style model with GaLore-AdamW on byte-level text.")
    a = p.add_argument
    a("--steps", type=int, default=300, help="optimizer steps (default 300)")
    a("--batch-size", type=int, default=16)
    a("--seq-len", type=int, default=128)
    a("--lr", type=float, default=0.01, help="peak learning rate (default 0.01, as GaLore's README)")
    a("--weight-decay", type=float, default=0.0)
    a("--warmup", type=int, default=None,
      help="linear warmup steps before the cosine decay (default: 10%% of --steps)")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this (default 0.1)")
    a("--grad-clip", type=float, default=1.0, help="max grad norm, 0 disables (default 1.0)")
    a("--optimizer", choices=("galore", "adamw"), default="galore")
    a("--rank", type=int, default=32, help="GaLore rank (default 32)")
    a("--update-proj-gap", type=int, default=50, help="steps between SVD refreshes (default 50)")
    a("--scale", type=float, default=0.25, help="GaLore scale alpha (default 0.25)")
    a("--proj-type", default="std", choices=("std", "reverse_std", "left", "right"))
    a("--target-modules", default="attn,mlp",
      help="comma-separated name substrings, 'all-linear', or 're:<regex>' (default attn,mlp)")
    a("--backend", default="auto", help="GaLoreAdamW backend: auto|reference|triton|cuda|cpu")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--dtype", choices=tuple(DTYPES), default="fp32", help="parameter dtype")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0,
      help="torch CPU threads (default 0: torch's default; 1 helps on a busy machine)")
    a("--log-every", type=int, default=25)
    a("--eval-every", type=int, default=100, help="validation every N steps, 0: only at the end")
    a("--eval-batches", type=int, default=8)
    a("--data", default=None, help="nanoGPT-style uint16 token file (.bin); default: stdlib text")
    a("--vocab-size", type=int, default=None, help="vocab for --data (default: max id + 1)")
    a("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="stdlib corpus byte cap (4 MiB)")
    a("--dim", type=int, default=128)
    a("--n-layers", type=int, default=2)
    a("--n-heads", type=int, default=4)
    a("--mlp-dim", type=int, default=344)
    a("--json", default=None, metavar="PATH", help="write the final metrics as JSON")
    return p


def lr_lambda(steps: int, warmup: int, min_ratio: float):
    """Multiplier of each group's initial lr at scheduler step ``s`` (0-based): linear warmup
    to 1 over ``warmup`` steps, then cosine to ``min_ratio`` at ``steps``."""
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def parse_targets(spec: str):
    if spec == "all-linear":
        return spec
    if spec.startswith("re:"):
        return spec[3:]
    return tuple(s.strip() for s in spec.split(",") if s.strip())


def adamw_state_estimate(params: Iterable[torch.Tensor]) -> int:
    """Bytes AdamW's moments would take: two fp32 tensors (exp_avg, exp_avg_sq) per parameter."""
    return sum(2 * p.numel() * 4 for p in params)


def state_tensor_bytes(optimizer: torch.optim.Optimizer, params=None) -> int:
    """Bytes of the tensors in ``optimizer.state`` (of ``params`` only, if given)."""
    keys = optimizer.state.keys() if params is None else [p for p in params if p in optimizer.state]
    total = 0
    for k in keys:
        for v in optimizer.state[k].values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total


def optimizer_state_bytes(optimizer) -> int:
    fn = getattr(optimizer, "state_bytes", None)
    return int(fn()) if callable(fn) else state_tensor_bytes(optimizer)


def resolved_backend_of(optimizer, requested: str, device: torch.device) -> str:
    rb = getattr(optimizer, "resolved_backend", None)
    if callable(rb):
        return str(rb(device))
    if isinstance(rb, str):
        return rb
    from lowrank_fused.dispatch import resolve_backend
    return resolve_backend(requested, device)


@torch.no_grad()
def evaluate(model, tokens, batches: int, batch_size: int, seq_len: int, device) -> float:
    was_training = model.training
    model.eval()
    sampler = BatchSampler(tokens, batch_size, seq_len, seed=EVAL_SEED, device=device)
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = sampler.next_batch()
        total += model(x, y)[1].detach()
    model.train(was_training)
    return float(total) / batches


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def load_corpus(args) -> Corpus:
    if args.data:
        return load_bin(args.data, vocab_size=args.vocab_size)
    if args.vocab_size not in (None, 256):
        raise SystemExit("--vocab-size only applies with --data (the stdlib corpus is bytes: 256)")
    return load_stdlib_corpus(max_bytes=args.max_bytes, seed=args.seed)


def main(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    if warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available")
    dtype = DTYPES[args.dtype]
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    try:
        corpus = load_corpus(args)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"lowrank_fused.train: {e}") from e
    config = LlamaConfig(vocab_size=corpus.vocab_size, hidden_size=args.dim,
                         intermediate_size=args.mlp_dim, num_hidden_layers=args.n_layers,
                         num_attention_heads=args.n_heads, max_position_embeddings=args.seq_len)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]

    if args.optimizer == "galore":
        from lowrank_fused import GaLoreAdamW
        from lowrank_fused.dispatch import BackendUnavailable
        try:
            groups = galore_param_groups(
                model, target_modules=parse_targets(args.target_modules), rank=args.rank,
                update_proj_gap=args.update_proj_gap, scale=args.scale, proj_type=args.proj_type)
            optimizer = GaLoreAdamW(groups, lr=args.lr, weight_decay=args.weight_decay,
                                    backend=args.backend)
            backend = resolved_backend_of(optimizer, args.backend, device)
        except (BackendUnavailable, ImportError, ValueError) as e:
            raise SystemExit(f"lowrank_fused.train: {e}") from e
        projected = groups[0]["params"] if "rank" in groups[0] else []
        opt_desc = (f"GaLoreAdamW rank={args.rank} gap={args.update_proj_gap} scale={args.scale} "
                    f"proj={args.proj_type}; {len(projected)} projected matrices "
                    f"({sum(p.numel() for p in projected):,} params)")
    else:
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, eps=1e-6)
        backend = "torch.optim.AdamW"
        projected = []
        opt_desc = "torch.optim.AdamW"
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.steps, warmup, args.min_lr_ratio))

    tokens_per_step = args.batch_size * args.seq_len
    print(f"lowrank_fused.train: {model.num_parameters():,} params "
          f"(dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads, mlp {args.mlp_dim}, "
          f"vocab {corpus.vocab_size}), {args.dtype}")
    print(f"  data: {corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} val tokens"
          + (f", {corpus.num_files} files" if corpus.num_files else "") + ")")
    print(f"  device: {device}, backend: {backend}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"  optimizer: {opt_desc}")
    print(f"  {args.steps} steps x {args.batch_size} x {args.seq_len} = {tokens_per_step:,} tokens/step, "
          f"lr {args.lr} (warmup {warmup}, cosine to {args.min_lr_ratio}x), grad clip {args.grad_clip}")
    sys.stdout.flush()

    sampler = BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed, device=device)
    history, evals = [], []
    window_loss = torch.zeros((), device=device)
    window_steps, window_t = 0, 0.0
    train_time = first_step_time = 0.0
    first_loss = None
    model.train()
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        x, y = sampler.next_batch()
        _, loss = model(x, y)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        lr_now = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_loss += loss.detach().float()
        window_steps += 1
        last = step == args.steps
        if step == 1 or step % args.log_every == 0 or last:
            _sync(device)
        dt = time.perf_counter() - t0
        window_t += dt
        train_time += dt
        if step == 1:
            first_step_time = dt
        if step == 1 or step % args.log_every == 0 or last:
            mean_loss = float(window_loss) / window_steps
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"loss is {mean_loss} at step {step}")
            if first_loss is None:
                first_loss = mean_loss
            tps = window_steps * tokens_per_step / max(window_t, 1e-9)
            history.append({"step": step, "loss": mean_loss, "lr": lr_now, "tokens_per_s": tps})
            print(f"step {step:5d}  loss {mean_loss:.4f}  lr {lr_now:.2e}  {tps:,.0f} tok/s", flush=True)
            window_loss.zero_()
            window_steps, window_t = 0, 0.0
        if args.eval_every and step % args.eval_every == 0 and not last:
            vl = evaluate(model, corpus.val, args.eval_batches, args.batch_size, args.seq_len, device)
            evals.append({"step": step, "val_loss": vl})
            print(f"step {step:5d}  val_loss {vl:.4f}", flush=True)

    train_loss = evaluate(model, corpus.train, args.eval_batches, args.batch_size, args.seq_len, device)
    val_loss = evaluate(model, corpus.val, args.eval_batches, args.batch_size, args.seq_len, device)
    evals.append({"step": args.steps, "val_loss": val_loss})
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        raise FloatingPointError(f"final loss is not finite: train {train_loss}, val {val_loss}")

    state_bytes = optimizer_state_bytes(optimizer)
    adamw_bytes = adamw_state_estimate(params)
    # overall throughput without step 1 (allocations, first SVDs, kernel compilation)
    if args.steps > 1:
        tokens_per_s = (args.steps - 1) * tokens_per_step / max(train_time - first_step_time, 1e-9)
    else:
        tokens_per_s = tokens_per_step / max(train_time, 1e-9)
    print(f"final: train loss {train_loss:.4f}, val loss {val_loss:.4f} "
          f"(first logged loss {first_loss:.4f}); {tokens_per_s:,.0f} tokens/s "
          f"(steps 2-{args.steps}); {train_time:.1f} s of training, step 1 took {first_step_time:.2f} s")
    name = "GaLore-AdamW" if args.optimizer == "galore" else "AdamW"
    print(f"optimizer state: {name} {state_bytes:,} B ({_fmt_bytes(state_bytes)}) vs AdamW "
          f"{adamw_bytes:,} B ({_fmt_bytes(adamw_bytes)}, 2 fp32 moments/param): "
          f"{state_bytes / adamw_bytes:.3f}x")
    if projected:
        proj_state = state_tensor_bytes(optimizer, projected)
        if proj_state:
            proj_adamw = adamw_state_estimate(projected)
            print(f"  projected matrices only: {proj_state:,} B vs AdamW {proj_adamw:,} B "
                  f"({proj_state / proj_adamw:.3f}x)")

    metrics = {
        "optimizer": args.optimizer, "backend": backend, "device": str(device), "dtype": args.dtype,
        "model_params": model.num_parameters(), "config": config.to_dict(),
        "steps": args.steps, "tokens_per_step": tokens_per_step,
        "first_loss": first_loss, "final_train_loss": train_loss, "final_val_loss": val_loss,
        "tokens_per_s": tokens_per_s, "train_time_s": train_time, "first_step_s": first_step_time,
        "optimizer_state_bytes": state_bytes, "adamw_state_bytes": adamw_bytes,
        "state_ratio": state_bytes / adamw_bytes,
        "history": history, "evals": evals, "args": vars(args),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
        print(f"metrics written to {args.json}")
    return metrics


if __name__ == "__main__":
    main()
