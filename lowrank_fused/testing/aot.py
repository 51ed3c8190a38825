"""Ahead-of-time compilation of Triton kernels for a GPU target, without a GPU.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` runs the whole compiler
(TTIR -> TTGIR -> LLIR -> PTX -> cubin) on a machine with no GPU, so it catches what the CPU
interpreter lets through (``tl.dot`` dimensions below 16, layout errors, API drift between
Triton versions). ``ptxas -v`` on the PTX reports registers and spills.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

TARGET_ARCH = 90


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
    return triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32),
                          options={"num_warps": v.num_warps, "num_stages": v.num_stages})


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


def ptxas_usage(ptx: str, ptxas: str, arch: str = "sm_90a"):
    """(registers, spill store bytes, spill load bytes) reported by ``ptxas -v``."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"-arch={arch}", path, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{res.stderr}")
    text = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    stores = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))
    loads = sum(int(x) for x in re.findall(r"(\d+) bytes spill loads", text))
    return regs, stores, loads


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


def all_variants():
    import importlib

    for mod in KERNEL_MODULES:
        yield from importlib.import_module(f"lowrank_fused.kernels.{mod}").aot_variants()


def compile_all(shard: int = 0, shards: int = 1):
    """Compile every variant; a dict name -> {"ok", "error", "regs", "spill_stores", ...}.
    ``shard``/``shards``: only the variants whose index is ``shard`` modulo ``shards`` (the
    test runs one process per CPU core and merges the dicts).

    Must run in a process without ``TRITON_INTERPRET`` (there ``@triton.jit`` builds
    interpreter objects that cannot be compiled): tests call it through ``python -m``.
    """
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_all() needs TRITON_INTERPRET unset")
    if not 0 <= shard < shards:
        raise ValueError(f"shard must be in [0, shards={shards}), got {shard}")
    ptxas = find_ptxas()
    out = {}
    for i, v in enumerate(all_variants()):
        if i % shards != shard:
            continue
        rec = {"ok": False}
        try:
            compiled = compile_variant(v)
            ptx = compiled.asm["ptx"]
            rec["target_ok"] = f".target sm_{TARGET_ARCH}" in ptx
            rec["cubin"] = bool(compiled.asm.get("cubin"))
            if ptxas:
                rec["regs"], rec["spill_stores"], rec["spill_loads"] = ptxas_usage(ptx, ptxas)
            rec["ok"] = True
        except Exception as e:  # reported per variant by the test
            rec["error"] = f"{type(e).__name__}: {e}"[-2000:]
        out[v.name] = rec
    return out


if __name__ == "__main__":
    import argparse
    import json
    import sys

    ap = argparse.ArgumentParser(prog="python -m lowrank_fused.testing.aot")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--shards", type=int, default=1)
    a = ap.parse_args()
    json.dump(compile_all(a.shard, a.shards), sys.stdout)
