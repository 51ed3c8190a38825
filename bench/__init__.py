"""Benchmarks of the lowrank_fused ops and optimizer step (see bench/README.md).

``bench.bytes`` is the byte model of docs/bytes.md, ``bench.harness`` the one timer
and result writer, ``bench.bench_<op>`` one setup factory per op, ``bench.suite_{step,e2e,
convergence}`` the optimizer-step, end-to-end and convergence suites, ``bench.report`` the
summary page and plots, ``bench.run`` the driver and ``bench.gpu_check`` the single GPU entry
point (tests on CUDA, then benchmarks).
"""
