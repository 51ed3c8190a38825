"""Ahead-of-time compilation of Triton kernels for a GPU target, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole compiler
(TTIR -> TTGIR -> LLIR -> PTX -> cubin) on a machine with no GPU, so it catches what the CPU
interpreter lets through (``tl.dot`` dimensions below 16, layout errors, API drift between
Triton versions). The ``ptxas -v`` log of Triton's own cubin step (its bundled ptxas, its
flags) reports registers and spills.

Two Triton versions are checked: the installed one and ``GPU_TRITON``, the version the GPU
machines and most users run (torch 2.11's CUDA wheels pin it). Register allocation differs
between them (each bundles its own ptxas and emits different PTX), so a tile that fits under
one can spill under the other. ``GPU_TRITON`` is installed from the package index by name,
once, into a cache folder (``triton_dir``), never into the environment, and the compile
processes run with it first on ``PYTHONPATH``. Each version compiles into its own Triton cache
directory, so a rerun is warm.

    python -m lowrank_fused.testing.aot --record bench/results/aot-sm90.json

compiles everything under both versions and writes each variant's registers and spill bytes.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TARGET_ARCH = 90
GPU_TRITON = "3.6.0"


@dataclass
class Variant:
    """One compilation the launcher can ask for: runtime-arg types, constexprs, launch opts."""
    kernel: object                      # the @triton.jit function
    types: dict                         # runtime argument name -> Triton type ("*fp32", "i32", "fp32")
    constexprs: dict                    # constexpr argument name -> value
    num_warps: int = 4
    num_stages: int = 3

    @property
    def name(self):
        cs = ",".join(f"{k}={getattr(v, 'name', v)}" for k, v in self.constexprs.items())
        ts = ",".join(t for t in self.types.values() if t.startswith("*"))
        return f"{self.kernel.__name__}[{ts}|{cs}|w{self.num_warps}s{self.num_stages}]"


def compile_variant(v: Variant):
    """``(compiled kernel, stdout of the compile)``: with ``TRITON_DUMP_PTXAS_LOG=1`` the
    stdout holds the ``ptxas -v`` log of Triton's own cubin step (only when it compiled, not
    when the kernel came from Triton's cache)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for arg in v.kernel.arg_names:
        if arg in v.constexprs:
            signature[arg] = "constexpr"
        elif arg in v.types:
            signature[arg] = v.types[arg]
        else:
            raise KeyError(f"{v.kernel.__name__}: no type given for argument {arg!r}")
    src = ASTSource(fn=v.kernel, signature=signature, constexprs=dict(v.constexprs))
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                                  options={"num_warps": v.num_warps,
                                           "num_stages": v.num_stages})
    return compiled, log.getvalue()


def find_ptxas():
    """The ptxas Triton itself uses for sm_90 (PTX versions must match), else the toolkit's."""
    try:  # Triton 3.5+
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(TARGET_ARCH).path
    except Exception:
        pass
    try:  # older Triton
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("ptxas")[0]
    except Exception:
        pass
    for cand in (os.environ.get("TRITON_PTXAS_PATH"), shutil.which("ptxas"),
                 "/usr/local/cuda/bin/ptxas"):
        if cand and os.path.exists(cand):
            return cand
    return None


def parse_ptxas_log(text: str):
    """(registers, spill store bytes, spill load bytes) from a ``ptxas -v`` log, or None."""
    found = re.search(r"Used (\d+) registers", text)
    if not found:
        return None
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text))
    return int(found.group(1)), stores, loads


def triton_ptxas_flags():
    """The register-allocation flags of the installed Triton's cubin step (Triton 3.7+ adds
    ``--regAllocOptLevel=2``), for a ptxas run of our own that matches it."""
    import inspect

    try:
        from triton.backends.nvidia.compiler import CUDABackend

        src = inspect.getsource(CUDABackend.make_cubin)
    except Exception:
        return []
    return re.findall(r"--regAllocOptLevel=\d+", src)[:1]


def ptxas_usage(ptx: str, ptxas: str, arch: str = "sm_90a", flags=()):
    """(registers, spill store bytes, spill load bytes) reported by ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-lineinfo", "-v", *flags, f"--gpu-name={arch}", path,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{res.stderr}")
    return parse_ptxas_log(res.stdout + res.stderr)


def _usage_cache():
    """Where the ptxas usage of each compiled kernel is kept, next to Triton's cache of it
    (a warm compile does not run ptxas, so its log is not there to read)."""
    import triton

    try:
        base = triton.knobs.cache.dir
    except AttributeError:
        base = os.environ.get("TRITON_CACHE_DIR") or os.path.expanduser("~/.triton/cache")
    return os.path.join(base, "lowrank_fused-ptxas-usage")


def kernel_usage(compiled, log: str, ptxas):
    """(regs, spill stores, spill loads, where from) of a compiled kernel: Triton's own ptxas
    log when it just compiled it, else the value kept from then, else a ptxas run of our own
    with Triton's flags."""
    path = os.path.join(_usage_cache(), f"{compiled.hash}.json")
    usage = parse_ptxas_log(log)
    if usage is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(usage, f)
        os.replace(tmp, path)
        return (*usage, "triton")
    if os.path.exists(path):
        with open(path) as f:
            return (*json.load(f), "cache")
    if ptxas is None:
        return None
    return (*ptxas_usage(compiled.asm["ptx"], ptxas, flags=triton_ptxas_flags()), "ptxas")


KERNEL_MODULES = ("project", "adam_moments", "backproject_update", "adamw_step",
                  "ldadam_error_feedback", "batched_matmul", "residual_backproject_update")
KERNEL_MODULES += ("adafactor_step", "adafactor_bc_step", "gha_update")
KERNEL_MODULES += ("adapm_update", "adapm_dense_update")
KERNEL_MODULES += ("range_finder", "ldadam_power_iteration")
KERNEL_MODULES += ("moment_transport",)
KERNEL_MODULES += ("adamem_moments", "norm_growth_limit")
KERNEL_MODULES += ("grouped_project", "grouped_backproject_update",
                   "grouped_residual_backproject_update")
KERNEL_MODULES += ("iass_select", "residual_col_stats")
KERNEL_MODULES += ("adapm_refit", "subspace_drift", "kfac_precondition", "kfac_transport")
KERNEL_MODULES += ("grouped_adamem_middle",)
KERNEL_MODULES += ("ldadam_error_accumulate", "grouped_adamem_vector_step",
                   "adamem_factored_step")
KERNEL_MODULES += ("grouped_adapm_update",)
KERNEL_MODULES += ("ldadam_scaled_moments",)
KERNEL_MODULES += ("gha_batch", "small_cholesky_inverse")


def all_variants():
    """Every kernel module's variants, each compilation once (two dtype combinations of a
    launcher can name the same compilation, e.g. a dense kernel whose state is fp32 either
    way)."""
    import importlib

    seen = set()
    for mod in KERNEL_MODULES:
        for v in importlib.import_module(f"lowrank_fused.kernels.{mod}").aot_variants():
            if v.name not in seen:
                seen.add(v.name)
                yield v


def compile_all(shard: int = 0, shards: int = 1, match: str = None):
    """Compile every variant; a dict name -> {"ok", "error", "regs", "spill_stores", ...}.
    ``shard``/``shards``: only the variants whose index is ``shard`` modulo ``shards`` (the
    test runs one process per CPU core and merges the dicts). ``match``: only the variants
    whose name the regular expression matches (``re.search``).

    Must run in a process without ``TRITON_INTERPRET`` (there ``@triton.jit`` builds
    interpreter objects that cannot be compiled): tests call it through ``python -m``
    (``run_compile``).
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_all() needs TRITON_INTERPRET unset")
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, shards={shards}), got {shard}")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"   # read by Triton at each compile
    ptxas = find_ptxas()
    out = {}
    chosen = [v for v in all_variants() if match is None or re.search(match, v.name)]
    for i, v in enumerate(chosen):
        if i % shards != shard:
            continue
        rec = {"ok": False}
        try:
            compiled, log = compile_variant(v)
            ptx = compiled.asm["ptx"]
            rec["target_ok"] = f".target sm_{TARGET_ARCH}" in ptx
            rec["cubin"] = bool(compiled.asm.get("cubin"))
            usage = kernel_usage(compiled, log, ptxas)
            if usage is not None:
                rec["regs"], rec["spill_stores"], rec["spill_loads"], rec["usage_from"] = usage
            rec["ok"] = True
        except Exception as e:  # reported per variant by the test
            rec["error"] = f"{type(e).__name__}: {e}"[-2000:]
        out[v.name] = rec
    return out


def cache_root() -> str:
    """This project's cache folder: ``$LOWRANK_FUSED_CACHE``, else
    ``$XDG_CACHE_HOME/lowrank_fused`` (``~/.cache/lowrank_fused``)."""
    if os.environ.get("LOWRANK_FUSED_CACHE"):
        return os.environ["LOWRANK_FUSED_CACHE"]
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(xdg, "lowrank_fused")


def triton_dir(version: str) -> str:
    """The folder Triton ``version`` is installed into (``pip --target``): per Python
    version, as the wheel is."""
    return os.path.join(cache_root(), f"triton-{version}-cp{sys.version_info[0]}"
                                      f"{sys.version_info[1]}")


def ensure_triton(version: str, timeout: float = 900):
    """``(folder, None)`` with Triton ``version`` importable from ``folder``, installed there
    from the package index by name the first time (``pip install --no-deps --target``; the
    finished folder is renamed into place, so concurrent callers never see half of it), or
    ``(None, reason)`` when pip cannot get it (no network, no wheel for this Python)."""
    path = triton_dir(version)
    done = os.path.join(path, ".complete")
    if os.path.exists(done):
        return path, None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".partial-",
                           dir=os.path.dirname(path))
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "30",
           "--target", tmp, f"triton=={version}"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        reason = None if res.returncode == 0 else (
            f"`{' '.join(cmd[2:])}` failed (exit {res.returncode}): "
            f"{(res.stderr or res.stdout).strip()[-600:]}")
    except subprocess.TimeoutExpired:
        reason = f"`pip install triton=={version}` took over {timeout:.0f} s"
    if reason is None and not os.path.exists(os.path.join(tmp, "triton", "__init__.py")):
        reason = f"pip installed no triton package into {tmp}"
    if reason is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        return None, reason
    open(os.path.join(tmp, ".complete"), "w").close()
    try:
        os.rename(tmp, path)
    except OSError:   # another process finished first (or a stale, unfinished folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(done):
            return None, f"{path} exists but is not a finished install: remove it"
    return path, None


def compile_env(triton_path=None, version=None):
    """The environment of a compile process: no ``TRITON_INTERPRET``, a Triton cache directory
    of its own per Triton version, and with ``triton_path``, that Triton first on
    ``PYTHONPATH`` and its bundled ptxas (no ``TRITON_PTXAS_PATH`` override: PTX versions
    differ between Tritons)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if triton_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([triton_path] + [p for p in env.get(
            "PYTHONPATH", "").split(os.pathsep) if p])
        for k in ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH"):
            env.pop(k, None)
    if version is None:
        import triton

        version = triton.__version__
    env["TRITON_CACHE_DIR"] = os.path.join(cache_root(), "aot-cache", f"triton-{version}")
    return env


def run_compile(triton_path=None, version=None, shards=None, timeout=1800):
    """``compile_all`` in ``shards`` processes (default: one per CPU core, at most 4), with the
    installed Triton or the one in ``triton_path``. Returns the merged report:
    ``{"triton": version, "triton_file", "ptxas", "variants": {name: record}}``."""
    env = compile_env(triton_path, version)
    shards = shards or max(1, min(4, os.cpu_count() or 1))
    procs = [subprocess.Popen([sys.executable, "-m", "lowrank_fused.testing.aot", "--shard",
                               str(i), "--shards", str(shards)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(shards)]
    report = None
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"compile process failed (exit {proc.returncode}):\n"
                               f"{stderr[-4000:]}")
        part = json.loads(stdout)
        if report is None:
            report = part
        else:
            report["variants"].update(part["variants"])
    return report


def record(path: str, shards=None) -> dict:
    """Compile every variant under the installed Triton and under ``GPU_TRITON`` and write
    ``{"variants": {name: {triton version: {"regs", "spill_stores", "spill_loads"}}}, ...}``
    to ``path`` (JSON), with the Tritons and ptxas used and the variants at 240 registers or
    more per version (one more live value away from the 255 limit and a spill)."""
    import triton

    reports = [run_compile(shards=shards)]
    if triton.__version__ != GPU_TRITON:
        where, reason = ensure_triton(GPU_TRITON)
        if where is None:
            raise RuntimeError(f"Triton {GPU_TRITON} unavailable: {reason}")
        reports.append(run_compile(where, GPU_TRITON, shards=shards))
    variants = {}
    summary = {}
    for rep in reports:
        ver = rep["triton"]
        for name, rec in rep["variants"].items():
            entry = ({k: rec[k] for k in ("regs", "spill_stores", "spill_loads")}
                     if rec.get("ok") and "regs" in rec else {"error": rec.get("error", "")})
            variants.setdefault(name, {})[ver] = entry
        recs = [r for r in rep["variants"].values() if "regs" in r]
        summary[ver] = {
            "ptxas": rep["ptxas"], "ptxas_version": rep.get("ptxas_version"),
            "variants": len(rep["variants"]),
            "failed": sorted(n for n, r in rep["variants"].items() if not r.get("ok")),
            "spilling": sorted(n for n, r in rep["variants"].items()
                               if r.get("spill_stores") or r.get("spill_loads")),
            "max_regs": max((r["regs"] for r in recs), default=None),
            "at_240_regs_or_more": sorted(n for n, r in rep["variants"].items()
                                          if r.get("regs", 0) >= 240),
        }
    doc = {"target": f"sm_{TARGET_ARCH}a",
           "command": "python -m lowrank_fused.testing.aot --record " + path,
           "tritons": summary, "variants": dict(sorted(variants.items()))}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    head = json.dumps({k: v for k, v in doc.items() if k != "variants"}, indent=1)
    rows = ",\n".join(f" {json.dumps(n)}: {json.dumps(r, separators=(',', ':'))}"
                       for n, r in doc["variants"].items())
    with open(path, "w") as f:   # one line per variant
        f.write(head[:-2] + ',\n "variants": {\n' + rows + "\n }\n}\n")
    return doc


def _ptxas_version(ptxas):
    if not ptxas:
        return None
    try:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return None
    found = re.search(r"release (\S+), (V\S+)", out)
    return found.group(2) if found else out.strip().splitlines()[-1:]


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m lowrank_fused.testing.aot")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--match", metavar="REGEX", help="only the variants whose name matches")
    ap.add_argument("--record", metavar="JSON",
                    help=f"compile under the installed Triton and Triton {GPU_TRITON} and "
                         f"write registers and spills per variant to JSON")
    a = ap.parse_args()
    if a.record:
        doc = record(a.record, shards=None if a.shards == 1 else a.shards)
        for ver, summ in doc["tritons"].items():
            print(f"Triton {ver}: {summ['variants']} variants, {len(summ['failed'])} failed, "
                  f"{len(summ['spilling'])} spill, max {summ['max_regs']} registers, "
                  f"{len(summ['at_240_regs_or_more'])} at >= 240")
    else:
        import triton

        ptxas = find_ptxas()
        json.dump({"triton": triton.__version__, "triton_file": triton.__file__,
                   "ptxas": ptxas, "ptxas_version": _ptxas_version(ptxas),
                   "variants": compile_all(a.shard, a.shards, a.match)}, sys.stdout)
