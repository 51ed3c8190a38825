"""Suite ``traffic`` of ``bench.run`` (opt-in: ``--suite traffic``): the bytes the Triton
kernels request in one steady step of every method, H100 tile configs, counted under the
interpreter. The measurement is ``bench.bench_traffic`` (also runnable alone)."""
from bench.bench_traffic import run

__all__ = ["run"]
