"""The planned launch (``kernels/_launch.py``): after its first launch through
``JITFunction.run``, a bound call's kernel is launched through the compiled kernel's launcher
directly, with the same arguments, as long as they provably specialise the same way.

Without a GPU the direct path is checked with the stand-in driver
(``lowrank_fused.testing.standin_driver``: kernels compiled for sm_90, the CUDA launch call a
recorder) in a subprocess without the interpreter, under the installed Triton and under the
GPU machines' (``aot.GPU_TRITON``, installed side by side for the AOT test; skipped where it is
not available): the planned K1 and K3 hand the launcher the grid and arguments of their first
launch on later calls, without ``JITFunction.run``, also for a gradient passed as another
tensor object at the planned address, and a gradient at another address goes through
``JITFunction.run`` again. Under the interpreter every call is an ordinary launch."""
import json
import subprocess
import sys

import pytest
import torch

from lowrank_fused.kernels._common import interpreting
from lowrank_fused.testing.aot import GPU_TRITON, ensure_triton, find_ptxas
from lowrank_fused.testing.standin_driver import process_env


def _check(triton_path=None, version=None):
    env = process_env(triton_path, version)
    proc = subprocess.run([sys.executable, "-m", "lowrank_fused.testing.standin_driver",
                           "--check"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the real launcher")
@pytest.mark.parametrize("which", ["installed", "gpu_triton"])
def test_direct_launches_hand_the_launcher_the_same_arguments(which):
    if find_ptxas() is None:
        pytest.skip("ptxas not found: the kernels cannot compile for sm_90 here")
    if which == "installed":
        report = _check()
    else:
        import triton
        if triton.__version__ == GPU_TRITON:
            pytest.skip(f"the installed Triton is {GPU_TRITON}")
        where, reason = ensure_triton(GPU_TRITON)
        if where is None:
            pytest.skip(f"Triton {GPU_TRITON} not available: {reason}")
        report = _check(where, GPU_TRITON)
        assert report["triton"] == GPU_TRITON
    for name, c in report["checks"].items():
        assert c["same_arguments"], (name, c)
        assert c["run_calls_first"] == c["launches"] and c["run_calls_later"] == 0, (name, c)
    assert report["checks"]["K1"]["run_calls_moved"] == 1
    assert report["ok"], report


@pytest.mark.skipif(not interpreting(), reason="the interpreter's path")
def test_under_the_interpreter_every_call_is_an_ordinary_launch():
    from lowrank_fused import ops
    from lowrank_fused.kernels.grouped_project import plan_grouped_project
    from lowrank_fused.testing import assert_parity, poison, tolerance

    Gs = [torch.randn(40, 30) for _ in range(2)]
    Ps = [torch.linalg.qr(torch.randn(40, 5))[0] for _ in range(2)]
    Rs = [torch.empty(5, 30) for _ in range(2)]
    launch = plan_grouped_project(Gs, Ps, Rs)
    for _ in range(2):
        for R in Rs:
            poison(R)
        launch(Gs[0])
        for G, P, R in zip(Gs, Ps, Rs):
            assert_parity(R, ops.project(G, P, backend="reference"),
                          rtol=tolerance(torch.float32))
    k1 = launch.__closure__ and [c.cell_contents for c in launch.__closure__
                                 if type(c.cell_contents).__name__ == "PlannedLaunch"]
    assert k1 and all(k._fast is None for k in k1)


@pytest.mark.skipif(not interpreting(), reason="records interpreted launches")
def test_bench_triton_launch_records_and_replays(tmp_path):
    """``bench/bench_triton_launch.py`` end to end for one method under the installed Triton:
    its launches recorded (all of GaLore's planned), replayed both ways, the planned replay
    cheaper than the plain one."""
    if find_ptxas() is None:
        pytest.skip("ptxas not found: the kernels cannot compile for sm_90 here")
    import pickle

    from bench import bench_triton_launch as BTL

    tapes = BTL.record(["galore"], warm=1, stub_warm=1, log=lambda *a: None)
    assert tapes["galore"] and all(entry[-1] for entry in tapes["galore"])
    path = tmp_path / "tapes.pkl"
    path.write_bytes(pickle.dumps(tapes))
    result = BTL._run_replay(str(path), 5)
    row = result["methods"]["galore"]
    assert row["plain"]["launches"] == row["planned"]["planned"] == len(tapes["galore"])
    assert row["planned"]["us_per_step"] < row["plain"]["us_per_step"]


class _FakeJIT:
    """A kernel object with JITFunction's shape: ``kernel[grid](*args, **meta)`` records the
    launch and returns a 'compiled kernel'."""

    device_caches = {}

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.launches.append((grid, args, meta))
            return "compiled"
        return run


def test_a_failing_direct_launch_falls_back_once_and_warns(monkeypatch):
    """A direct launch that raises (a launcher the planned path does not know) is made through
    ``JITFunction.run`` instead, that launch and every later one, with one warning."""
    from lowrank_fused.kernels import _launch

    class Failing:
        values = [1, 2]

        def rebind(self, args):
            return list(args)

        def launch(self, values):
            raise TypeError("bad launcher arguments")

    monkeypatch.setattr(_launch, "_ENABLED", True)
    monkeypatch.setattr(_launch, "_WARNED", [])
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    monkeypatch.setattr(_launch._Direct, "make", classmethod(lambda cls, *a: Failing()))
    kernel = _FakeJIT()
    launch = _launch.PlannedLaunch(kernel, (2, 1), dict(BLOCK=4))
    launch(1, 2)                                # ordinary, then prepared at the next call
    with pytest.warns(RuntimeWarning, match="direct path .*TypeError: bad launcher"):
        launch(1, 2)
    launch(1, 2)
    assert kernel.launches == [((2, 1), (1, 2), {"BLOCK": 4})] * 3


def test_direct_launches_can_be_switched_off(monkeypatch):
    from lowrank_fused.kernels import _launch

    monkeypatch.setattr(_launch, "_ENABLED", False)
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    kernel = _FakeJIT()
    launch = _launch.PlannedLaunch(kernel, (1,), {})
    for _ in range(3):
        launch(5)
    assert len(kernel.launches) == 3 and launch._fast is None and launch._compiled is None
