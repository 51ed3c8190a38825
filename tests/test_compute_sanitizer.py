"""compute-sanitizer memcheck over the CUDA kernels of csrc/, where the device and
the toolkit allow it: a child process runs every CUDA op of the extension (dense AdamW step,
the multi-tensor moments and AdamW steps over many odd-sized tensors, the batched small
Cholesky inverse) under ``compute-sanitizer --tool memcheck``; any out-of-bounds or misaligned
access, or a leaked/failed launch, fails the test with the sanitizer's report."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lowrank_fused import _ext

pytestmark = pytest.mark.gpu

SCRIPT = textwrap.dedent("""
    import torch
    from lowrank_fused import ops, ops_multi
    from lowrank_fused.subspace import small_cholesky_inverse
    torch.manual_seed(0)
    dev = "cuda"
    sizes = [1, 7, 33, 1000, 4097, 65537]
    for wdt in (torch.float32, torch.bfloat16):
        for n in sizes:
            W = torch.randn(n, device=dev).to(wdt)
            G = torch.randn(n, device=dev).to(wdt)
            M, V = torch.zeros(n, device=dev), torch.zeros(n, device=dev)
            ops.adamw_step(W, G, M, V, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                           weight_decay=0.01, backend="cuda")
        Ws = [torch.randn(n, device=dev).to(wdt) for n in sizes]
        Gs = [torch.randn_like(w) for w in Ws]
        Ms = [torch.zeros(n, device=dev) for n in sizes]
        Vs = [torch.zeros(n, device=dev) for n in sizes]
        flag = torch.zeros(1, dtype=torch.int32, device=dev)
        ops_multi.adamw_step_multi(Ws, Gs, Ms, Vs, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                                   step=1, nonfinite=flag, backend="cuda")
        Rs = [torch.randn(5, n, device=dev) for n in sizes]
        Ms = [torch.zeros_like(r).to(wdt) for r in Rs]
        Vs = [torch.zeros_like(r).to(wdt) for r in Rs]
        Ns = [torch.empty_like(r).to(wdt) for r in Rs]
        norms = torch.zeros(len(Rs), device=dev)
        ops_multi.adam_moments_multi(Rs, Ms, Vs, Ns, beta1=0.9, beta2=0.999, eps=1e-8, step=1,
                                     norms=norms, nonfinite=flag, backend="cuda")
    for k in (1, 5, 40, 129):
        Y = torch.randn(3, 4 * k, k, device=dev)
        small_cholesky_inverse(Y.transpose(1, 2) @ Y, backend="cuda")
    torch.cuda.synchronize()
    print("SANITIZED-OK")
""")


def _sanitizer():
    for cand in (shutil.which("compute-sanitizer"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                              "compute-sanitizer")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels_pass_memcheck(tmp_path):
    if _ext.why_no_cuda() is not None:
        pytest.skip(f"CUDA extension unavailable: {_ext.why_no_cuda()}")
    tool = _sanitizer()
    if tool is None:
        pytest.skip("compute-sanitizer is not installed")
    script = tmp_path / "run_cuda_ops.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "99",
                           "--leak-check", "no", sys.executable, str(script)],
                          capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 and "SANITIZED-OK" not in out and (
            "not supported" in out or "Device not supported" in out
            or "permission" in out.lower()):
        pytest.skip("compute-sanitizer cannot attach on this device: " + out[-300:])
    assert proc.returncode == 0 and "SANITIZED-OK" in out, out[-4000:]
    assert "ERROR SUMMARY: 0 errors" in out, out[-4000:]
