"""Pretrain a LLaMA-style model with any optimizer of the library (``make train``).

    python -m lowrank_fused.train [--model tiny|60m|130m|350m|1b] [--optimizer METHOD]
        [--rank R] [--update-proj-gap T] [--scale A] [--opt-arg KEY=VALUE ...] [--backend auto]
        [--data FILE|DIR|TRAIN.bin ...] [--steps N] [--batch-size B] [--grad-accum K]
        [--autocast] [--save CKPT] [--save-every N] [--resume CKPT] [--json LOG]

Default: the tiny model (dim 128, 2 layers) with GaLore-AdamW on byte-level text of the running
interpreter's standard-library ``.py`` files (``lowrank_fused.data``); a few minutes on 2 CPU
cores. ``--optimizer`` takes every method of ``lowrank_fused.routing.METHODS`` (plus
``torch_adamw``, ``torch.optim.AdamW`` as the dense baseline); the optimizer is built by
``make_optimizer``. ``--data`` takes text files or folders (bytes, vocab 256) or a nanoGPT-style
uint16 ``.bin`` file.

Output: a header, a progress line (updated in place on a terminal, one line per ``--log-every``
steps otherwise) with loss, lr, tokens/s and memory (peak CUDA memory on GPU, the process RSS on
CPU), validation loss and perplexity every ``--eval-every`` steps, and a final summary: val
perplexity, tokens/s, peak memory, the optimizer's state bytes against AdamW's (two fp32 moments
per parameter). ``--json PATH`` writes the same metrics. ``--save`` / ``--resume`` checkpoint the
model, optimizer, scheduler, data sampler, RNG and step; a resumed run continues bit-identically.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import sys
import time
from typing import Iterable, List, Optional

import torch

from lowrank_fused.data import (BatchSampler, Corpus, DEFAULT_MAX_BYTES, load_bin, load_stdlib_corpus,
                                load_text)
from lowrank_fused.models import LLAMA_CONFIGS, LlamaForCausalLM, llama_config
from lowrank_fused.routing import DENSE_METHODS, METHODS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EVAL_SEED = 1234  # fixed: every evaluation sees the same batches
OPTIMIZERS = METHODS + ("torch_adamw",)
CHECKPOINT_FORMAT = "lowrank_fused.train/1"

# which common flag reaches which method (a key the method's constructor or low-rank group
# takes); a flag left at None keeps the method's own default
GAP_KEYS = {m: "update_proj_gap" for m in
            ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adamem")}
GAP_KEYS.update({"adapm": "refit_T", "adapm_mini": "refit_T"})
SCALE_METHODS = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad")
# driver defaults beyond the classes' own: GaLore's README scale; Adafactor with an external
# lr (so the cosine schedule applies)
METHOD_DEFAULTS = {"galore": {"scale": 0.25}, "adafactor": {"relative_step": False}}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lowrank_fused.train",
        description="Pretrain a LLaMA-style model with any lowrank_fused optimizer.")
    a = p.add_argument
    a("--model", default="tiny", choices=tuple(LLAMA_CONFIGS),
      help="model size: tiny (CPU default) or the GaLore paper's 60m, 130m, 350m, 1b")
    a("--steps", type=int, default=300, help="optimizer steps (default 300)")
    a("--batch-size", type=int, default=16, help="sequences per micro-batch (default 16)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    a("--seq-len", type=int, default=None, help="default: 128 (tiny), 256 (paper sizes)")
    a("--lr", type=float, default=0.01, help="peak learning rate (default 0.01, as GaLore's README)")
    a("--weight-decay", type=float, default=None, help="default: the method's own")
    a("--warmup", type=int, default=None,
      help="linear warmup steps before the cosine decay (default: 10%% of --steps)")
    a("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this (default 0.1)")
    a("--grad-clip", type=float, default=1.0, help="max grad norm, 0 disables (default 1.0)")
    a("--optimizer", choices=OPTIMIZERS, default="galore", metavar="METHOD",
      help=f"one of {', '.join(OPTIMIZERS)} (default galore)")
    a("--rank", type=int, default=32, help="rank of the low-rank methods (default 32)")
    a("--update-proj-gap", type=int, default=50,
      help="steps between subspace refreshes: update_proj_gap (GaLore family, AdaMeM), "
           "refit_T (AdaPM) (default 50)")
    a("--scale", type=float, default=None,
      help="low-rank update scale alpha (GaLore family, AdaRankGrad; default: the method's, "
           "0.25 for galore)")
    a("--proj-type", default=None, choices=("std", "reverse_std", "left", "right"),
      help="projection side (galore, ldadam)")
    a("--target-modules", default=None,
      help="comma-separated name substrings, 'all-linear', or 're:<regex>' "
           "(default: the method's routing, attn,mlp for the GaLore family)")
    a("--opt-arg", action="append", default=[], metavar="KEY=VALUE",
      help="any other optimizer hyperparameter, repeatable (VALUE is a Python literal or a "
           "string), e.g. --opt-arg betas=(0.9,0.95) --opt-arg rank_metric=entropy")
    a("--backend", default="auto", help="optimizer backend: auto|reference|triton|cuda|cpu")
    a("--device", default=None, help="default: cuda if available, else cpu")
    a("--dtype", choices=tuple(DTYPES), default="fp32", help="parameter dtype")
    a("--autocast", action="store_true", help="bf16 autocast of forward and loss (for GPUs)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=0,
      help="torch CPU threads (default 0: torch's default; 1 helps on a busy machine)")
    a("--log-every", type=int, default=25)
    a("--eval-every", type=int, default=100, help="validation every N steps, 0: only at the end")
    a("--eval-batches", type=int, default=8)
    a("--data", nargs="+", default=None, metavar="PATH",
      help="text files or folders (byte-level) or one nanoGPT-style uint16 .bin file "
           "(default: the standard library's .py files)")
    a("--vocab-size", type=int, default=None,
      help="vocab for a .bin (default: the model's for paper sizes when the ids fit, else max id + 1)")
    a("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="text corpus byte cap (4 MiB)")
    a("--dim", type=int, default=None, help="override the model's hidden size")
    a("--n-layers", type=int, default=None)
    a("--n-heads", type=int, default=None)
    a("--mlp-dim", type=int, default=None)
    a("--save", default=None, metavar="PATH", help="checkpoint path, written at the end")
    a("--save-every", type=int, default=0, help="also checkpoint every N steps (needs --save)")
    a("--resume", default=None, metavar="PATH", help="continue from a checkpoint")
    a("--progress", choices=("auto", "tty", "lines", "none"), default="auto",
      help="progress display: auto (in place on a terminal), tty, lines, none")
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


def parse_opt_args(items: Iterable[str]) -> dict:
    """``["k=v", ...]`` -> ``{k: literal(v)}`` (a Python literal, else the string)."""
    out = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--opt-arg {item!r}: expected KEY=VALUE")
        try:
            out[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            out[key] = raw.strip()
    return out


def optimizer_kwargs(args, method: str) -> dict:
    """The keyword arguments ``make_optimizer(model, method, **kw)`` gets from the flags."""
    kw = dict(METHOD_DEFAULTS.get(method, {}))
    kw["lr"] = args.lr
    if args.weight_decay is not None:
        kw["weight_decay"] = args.weight_decay
    if method not in DENSE_METHODS:
        kw["rank"] = args.rank
        if args.target_modules and method not in ("adapm", "adapm_mini"):
            kw["target_modules"] = parse_targets(args.target_modules)
    if method in GAP_KEYS and args.update_proj_gap is not None:
        kw[GAP_KEYS[method]] = args.update_proj_gap
    if method in SCALE_METHODS and args.scale is not None:
        kw["scale"] = args.scale
    if args.proj_type and method in ("galore", "ldadam"):
        kw["proj_type"] = args.proj_type
    kw["backend"] = args.backend
    kw.update(parse_opt_args(args.opt_arg))
    if method == "adafactor" and kw.get("relative_step"):
        kw["lr"] = None          # Adafactor's relative step: no external lr, no schedule
    return kw


def build_optimizer(args, model, device):
    """(optimizer, backend description, one-line description)."""
    method = args.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "torch_adamw":
        wd = args.weight_decay if args.weight_decay is not None else 0.0
        fused = device.type in ("cuda", "cpu")
        try:
            opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=wd, eps=1e-6, fused=fused)
        except (RuntimeError, TypeError):
            opt, fused = torch.optim.AdamW(params, lr=args.lr, weight_decay=wd, eps=1e-6), False
        name = "torch.optim.AdamW" + ("(fused=True)" if fused else "")
        return opt, name, name
    from lowrank_fused.dispatch import BackendUnavailable
    from lowrank_fused.routing import make_optimizer
    kw = optimizer_kwargs(args, method)
    try:
        opt = make_optimizer(model, method, **dict(kw))
        backend = resolved_backend_of(opt, args.backend, device)
    except (BackendUnavailable, ImportError, NotImplementedError, ValueError, TypeError) as e:
        raise SystemExit(f"lowrank_fused.train: --optimizer {method}: {e}") from e
    low = [p for g in opt.param_groups if "rank" in g for p in g["params"]]
    shown = ", ".join(f"{k}={v}" for k, v in kw.items() if k not in ("backend", "target_modules"))
    desc = f"{type(opt).__name__} ({method}) {shown}"
    if low:
        desc += f"; {len(low)} low-rank matrices ({sum(p.numel() for p in low):,} params)"
    return opt, backend, desc


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


def _autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def evaluate(model, tokens, batches: int, batch_size: int, seq_len: int, device,
             autocast: bool = False) -> float:
    was_training = model.training
    model.eval()
    sampler = BatchSampler(tokens, batch_size, seq_len, seed=EVAL_SEED, device=device)
    total = torch.zeros((), device=device)
    for _ in range(batches):
        x, y = sampler.next_batch()
        with _autocast(device, autocast):
            total += model(x, y)[1].detach().float()
    model.train(was_training)
    return float(total) / batches


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def current_rss() -> int:
    """Resident set size of this process in bytes (0 where it cannot be read)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss``)."""
    try:
        import resource
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(r) if sys.platform == "darwin" else int(r) * 1024
    except (ImportError, OSError):
        return 0


def memory_now(device: torch.device) -> int:
    """The progress display's memory: peak CUDA memory allocated on GPU, the RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return current_rss()


class Progress:
    """One status line: rewritten in place (carriage return) on a terminal, printed as plain
    lines (every ``log_every`` steps) otherwise. ``note`` prints a permanent line."""

    def __init__(self, mode: str = "auto", stream=None):
        self.stream = stream if stream is not None else sys.stdout
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "tty" if callable(isatty) and isatty() else "lines"
        self.mode = mode
        self._width = 0
        self._last = 0.0

    @property
    def live(self) -> bool:
        return self.mode == "tty"

    def update(self, text: str, force: bool = False):
        """In-place update (TTY only, at most 10 per second unless ``force``)."""
        if self.mode != "tty":
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        pad = " " * max(0, self._width - len(text))
        self.stream.write("\r" + text + pad)
        self.stream.flush()
        self._width = len(text)

    def line(self, text: str):
        """A logged status line: a plain line, or the TTY's in-place line."""
        if self.mode == "lines":
            print(text, file=self.stream, flush=True)
        elif self.mode == "tty":
            self.update(text, force=True)

    def note(self, text: str):
        if self.mode == "none":
            return
        self.clear()
        print(text, file=self.stream, flush=True)

    def clear(self):
        if self.mode == "tty" and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def close(self):
        if self.mode == "tty" and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0


def load_corpus(args, vocab_hint: Optional[int] = None) -> Corpus:
    if args.data:
        bins = [d for d in args.data if str(d).endswith(".bin")]
        if bins:
            if len(args.data) != 1:
                raise SystemExit("--data: a .bin token file must be the only --data path")
            vocab = args.vocab_size
            if vocab is None and vocab_hint is not None:
                probe = load_bin(bins[0])
                vocab = vocab_hint if probe.vocab_size <= vocab_hint else None
            return load_bin(bins[0], vocab_size=vocab)
        if args.vocab_size not in (None, 256):
            raise SystemExit("--vocab-size only applies to a .bin file (text is bytes: 256)")
        return load_text(args.data, max_bytes=args.max_bytes)
    if args.vocab_size not in (None, 256):
        raise SystemExit("--vocab-size only applies with --data (the stdlib corpus is bytes: 256)")
    return load_stdlib_corpus(max_bytes=args.max_bytes, seed=args.seed)


# what a checkpoint must agree on with the resuming command
_RESUME_KEYS = ("model", "optimizer", "steps", "batch_size", "grad_accum", "seq_len", "seed",
                "dtype", "data", "max_bytes", "rank", "update_proj_gap", "scale", "opt_arg",
                "target_modules", "proj_type")


def save_checkpoint(path: str, payload: dict):
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    """The checkpoint, on the CPU (RNG states must stay there; ``load_state_dict`` moves the
    model and optimizer tensors to their parameters' device)."""
    if not os.path.isfile(path):
        raise SystemExit(f"--resume: no such checkpoint {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:   # an optimizer state holding a non-tensor object: the user's own file
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise SystemExit(f"--resume: {path} is not a lowrank_fused.train checkpoint")
    return ckpt


def main(argv: Optional[List[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_batches"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.save_every and not args.save:
        raise SystemExit("--save-every needs --save PATH")
    preset = LLAMA_CONFIGS[args.model]
    if args.seq_len is None:
        args.seq_len = 128 if args.model == "tiny" else 256
    if args.seq_len < 1:
        raise SystemExit("--seq-len must be >= 1")
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    if warmup < 0:
        raise SystemExit("--warmup must be >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: CUDA is not available")
    dtype = DTYPES[args.dtype]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    progress = Progress(args.progress)
    say = progress.note

    torch.manual_seed(args.seed)
    try:
        corpus = load_corpus(args, vocab_hint=preset["vocab_size"] if args.model != "tiny" else None)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"lowrank_fused.train: {e}") from e
    try:
        config = llama_config(args.model, vocab_size=corpus.vocab_size, hidden_size=args.dim,
                              intermediate_size=args.mlp_dim, num_hidden_layers=args.n_layers,
                              num_attention_heads=args.n_heads,
                              max_position_embeddings=args.seq_len)
    except ValueError as e:
        raise SystemExit(f"lowrank_fused.train: {e}") from e
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, backend, opt_desc = build_optimizer(args, model, device)
    has_lr = all(g.get("lr") is not None for g in optimizer.param_groups)
    scheduler = (torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.steps, warmup, args.min_lr_ratio)) if has_lr else None)
    sampler = BatchSampler(corpus.train, args.batch_size, args.seq_len, seed=args.seed,
                           device=device)

    start_step = 0
    history, evals = [], []
    train_time = first_step_time = 0.0
    timed_steps = 0
    first_loss = None
    window = {"loss": 0.0, "steps": 0}
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        run = ckpt["run"]
        if run["config"] != config.to_dict() or run["optimizer"] != args.optimizer:
            raise SystemExit(f"--resume {args.resume}: the checkpoint is for --optimizer "
                             f"{run['optimizer']} on {run['config']}, not this command's")
        diff = [k for k in _RESUME_KEYS if run["args"].get(k) != getattr(args, k)]
        if diff:
            raise SystemExit(f"--resume {args.resume}: flags differ from the checkpoint's run: "
                             + ", ".join(f"--{k.replace('_', '-')} {run['args'].get(k)!r} "
                                         f"(now {getattr(args, k)!r})" for k in diff))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        sampler.load_state_dict(ckpt["sampler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        start_step = int(ckpt["step"])
        history, evals = list(ckpt["history"]), list(ckpt["evals"])
        first_loss, window = ckpt["first_loss"], dict(ckpt["window"])
        train_time, first_step_time = ckpt["train_time"], ckpt["first_step_time"]
        timed_steps = int(ckpt.get("timed_steps", 0))
        if start_step > args.steps:
            raise SystemExit(f"--resume: the checkpoint is at step {start_step} > --steps {args.steps}")

    def checkpoint(step):
        save_checkpoint(args.save, {
            "format": CHECKPOINT_FORMAT, "step": step, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "sampler": sampler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
            "history": history, "evals": evals, "first_loss": first_loss, "window": window,
            "train_time": train_time, "first_step_time": first_step_time,
            "timed_steps": timed_steps,
            "run": {"config": config.to_dict(), "optimizer": args.optimizer,
                    "args": {k: getattr(args, k) for k in _RESUME_KEYS}},
        })

    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum
    say(f"lowrank_fused.train: {args.model} model, {model.num_parameters():,} params "
        f"(dim {config.hidden_size}, {config.num_hidden_layers} layers, "
        f"{config.num_attention_heads} heads, mlp {config.intermediate_size}, "
        f"vocab {corpus.vocab_size}), {args.dtype}" + (" + bf16 autocast" if args.autocast else ""))
    say(f"  data: {corpus.source} ({len(corpus.train):,} train / {len(corpus.val):,} val tokens"
        + (f", {corpus.num_files} files" if corpus.num_files else "") + ")")
    say(f"  device: {device}, backend: {backend}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}")
    say(f"  optimizer: {opt_desc}")
    say(f"  {args.steps} steps x {args.batch_size} x {args.seq_len}"
        + (f" x {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
        + f" = {tokens_per_step:,} tokens/step, lr {args.lr} (warmup {warmup}, cosine to "
        f"{args.min_lr_ratio}x), grad clip {args.grad_clip}"
        + (f"; resumed at step {start_step} from {args.resume}" if args.resume else ""))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    window_t = 0.0
    run_t0 = time.perf_counter()
    model.train()
    for step in range(start_step + 1, args.steps + 1):
        t0 = time.perf_counter()
        step_loss = torch.zeros((), device=device)
        for _ in range(args.grad_accum):
            x, y = sampler.next_batch()
            with _autocast(device, args.autocast):
                _, loss = model(x, y)
            (loss / args.grad_accum).backward()
            step_loss += loss.detach().float()
        step_loss /= args.grad_accum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        lr_now = optimizer.param_groups[0].get("lr")
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = step == args.steps
        logged = step == 1 or step % args.log_every == 0 or last
        loss_value = float(step_loss)            # syncs: the timing below covers the step
        dt = time.perf_counter() - t0
        if not math.isfinite(loss_value):
            progress.close()
            raise FloatingPointError(f"loss is {loss_value} at step {step}")
        window["loss"] += loss_value
        window["steps"] += 1
        window_t += dt
        train_time += dt
        if step == 1:
            first_step_time = dt
        else:
            timed_steps += 1
        mem = memory_now(device)
        mem_name = "peak" if device.type == "cuda" else "rss"
        tps_run = (timed_steps * tokens_per_step / max(train_time - first_step_time, 1e-9)
                   if timed_steps else tokens_per_step / max(dt, 1e-9))
        progress.update(f"step {step:5d}/{args.steps}  loss {loss_value:.4f}  "
                        f"{tps_run:,.0f} tok/s  {mem_name} {_fmt_bytes(mem)}")
        if logged:
            mean_loss = window["loss"] / window["steps"]
            if first_loss is None:
                first_loss = mean_loss
            tps = window["steps"] * tokens_per_step / max(window_t, 1e-9)
            history.append({"step": step, "loss": mean_loss, "lr": lr_now, "tokens_per_s": tps,
                            "memory_bytes": mem})
            lr_txt = f"{lr_now:.2e}" if lr_now is not None else "relative"
            text = (f"step {step:5d}/{args.steps}  loss {mean_loss:.4f}  lr {lr_txt}  "
                    f"{tps:,.0f} tok/s  {mem_name} {_fmt_bytes(mem)}")
            if progress.live:
                progress.note(text)
            else:
                progress.line(text)
            window = {"loss": 0.0, "steps": 0}
            window_t = 0.0
        if args.eval_every and step % args.eval_every == 0 and not last:
            vl = evaluate(model, corpus.val, args.eval_batches, args.batch_size, args.seq_len,
                          device, args.autocast)
            evals.append({"step": step, "val_loss": vl, "val_ppl": math.exp(min(vl, 50.0)),
                          "tokens": step * tokens_per_step})
            say(f"step {step:5d}  val_loss {vl:.4f}  val_ppl {math.exp(min(vl, 50.0)):.2f}")
        if args.save and (last or (args.save_every and step % args.save_every == 0)):
            checkpoint(step)
    progress.close()
    wall = time.perf_counter() - run_t0

    train_loss = evaluate(model, corpus.train, args.eval_batches, args.batch_size, args.seq_len,
                          device, args.autocast)
    val_loss = evaluate(model, corpus.val, args.eval_batches, args.batch_size, args.seq_len,
                        device, args.autocast)
    if not evals or evals[-1]["step"] != args.steps:
        evals.append({"step": args.steps, "val_loss": val_loss,
                      "val_ppl": math.exp(min(val_loss, 50.0)),
                      "tokens": args.steps * tokens_per_step})
    if not (math.isfinite(train_loss) and math.isfinite(val_loss)):
        raise FloatingPointError(f"final loss is not finite: train {train_loss}, val {val_loss}")

    state_bytes = optimizer_state_bytes(optimizer)
    adamw_bytes = adamw_state_estimate(params)
    # overall throughput without step 1 (allocations, first SVDs, kernel compilation)
    if timed_steps:
        tokens_per_s = timed_steps * tokens_per_step / max(train_time - first_step_time, 1e-9)
    else:
        tokens_per_s = tokens_per_step / max(train_time, 1e-9)
    if device.type == "cuda":
        peak_mem, peak_kind = torch.cuda.max_memory_allocated(device), "peak CUDA memory allocated"
    else:
        peak_mem, peak_kind = peak_rss(), "peak process RSS"
    val_ppl = math.exp(min(val_loss, 50.0))
    say(f"final: val loss {val_loss:.4f} (perplexity {val_ppl:.2f}), train loss {train_loss:.4f} "
        f"(first logged loss {first_loss:.4f})")
    say(f"  {tokens_per_s:,.0f} tokens/s (steps 2-{args.steps}); {train_time:.1f} s of training, "
        f"step 1 took {first_step_time:.2f} s; {peak_kind} {_fmt_bytes(peak_mem)}")
    say(f"optimizer state: {args.optimizer} {state_bytes:,} B ({_fmt_bytes(state_bytes)}) vs AdamW "
        f"{adamw_bytes:,} B ({_fmt_bytes(adamw_bytes)}, 2 fp32 moments/param): "
        f"{state_bytes / adamw_bytes:.3f}x")

    metrics = {
        "optimizer": args.optimizer, "backend": backend, "device": str(device), "dtype": args.dtype,
        "model": args.model, "model_params": model.num_parameters(), "config": config.to_dict(),
        "steps": args.steps, "tokens_per_step": tokens_per_step, "resumed_from": start_step,
        "first_loss": first_loss, "final_train_loss": train_loss, "final_val_loss": val_loss,
        "final_val_ppl": val_ppl, "tokens_per_s": tokens_per_s, "train_time_s": train_time,
        "wall_time_s": wall, "first_step_s": first_step_time,
        "peak_memory_bytes": peak_mem, "peak_memory_kind": peak_kind,
        "optimizer_state_bytes": state_bytes, "adamw_state_bytes": adamw_bytes,
        "state_ratio": state_bytes / adamw_bytes, "optimizer_desc": opt_desc,
        "history": history, "evals": evals, "args": vars(args),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(metrics, f, indent=2)
        say(f"metrics written to {args.json}")
    return metrics


if __name__ == "__main__":
    main()
