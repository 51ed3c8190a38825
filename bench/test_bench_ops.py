"""pytest-benchmark entry over the same factories as ``bench.run``.

    python -m pytest bench/ --benchmark-only

Not part of ``make test`` (which runs ``tests/``). On CUDA: the quick grid, fused and eager; on
CPU: the small eager cases (the Triton interpreter is not a speed measurement).
"""
import importlib

import pytest
import torch

from bench.run import MODULES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params():
    out = []
    for name in MODULES:
        mod = importlib.import_module(f"bench.bench_{name}")
        for case_name, params in mod.cases(DEVICE, quick=True):
            for variant, backend in mod.variants(params, DEVICE):
                out.append(pytest.param(mod, params, backend,
                                        id=f"{name}-{case_name}-{variant}-{backend}"))
    return out


@pytest.mark.parametrize("mod, params, backend", _params())
def test_bench(benchmark, mod, params, backend):
    from bench.harness import matmul_precision

    d = mod.describe(params, backend)
    benchmark.group = f"{d['op']} {params['m']}x{params['n']} r={d['r']}"
    benchmark.extra_info.update(op=d["op"], m=params["m"], n=params["n"], r=d["r"],
                                dtype=str(params["dtype"]), precision=d["precision"],
                                bytes_floor=d["bytes"].floor, bytes_eager_model=d["bytes"].eager)
    with matmul_precision(params.get("precision") or "ieee"):
        fn = mod.make(params, backend, DEVICE)
        if DEVICE.type == "cuda":
            def run():
                fn()
                torch.cuda.synchronize()
        else:
            run = fn
        benchmark(run)
