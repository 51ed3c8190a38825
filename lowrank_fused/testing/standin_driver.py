"""Triton's GPU launch path on a machine without a GPU: a stand-in driver and compiled kernels
whose CUDA launch call is a recorder.

``install()`` makes ``JITFunction.run`` behave as on an sm_90 device (device 0, stream 0,
target ``GPUTarget("cuda", 90, 32)``): kernels compile for sm_90 on first use (ptxas runs
here), and ``CompiledKernel`` skips loading the module into a CUDA context; its launcher
records each launch's arguments (``LAUNCHES``) and returns instead of calling
``cuLaunchKernelEx``. What runs is everything Triton does on the host before that call, which
is what ``bench/bench_triton_launch.py`` times and ``tests/test_planned_launch.py`` checks.

Must be used in a process without ``TRITON_INTERPRET`` (the kernels are then ``JITFunction``
objects), and only there: it replaces the active driver for the whole process.
"""
import os

LAUNCHES = []        # (kernel name, grid, args) per launch while recording
_STATE = {"record": False}


def recording(on: bool) -> None:
    """Record the launches' arguments from now on (or stop); recording costs host time."""
    _STATE["record"] = bool(on)


def install() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the stand-in driver needs TRITON_INTERPRET unset")
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import CompiledKernel
    from triton.runtime import driver

    class StandInDriver:
        """What ``JITFunction.run`` asks a driver on a GPU host: the device, its stream and the
        target; ``launcher_cls`` builds the recording launcher."""

        def __init__(self):
            self.launcher_cls = lambda src, metadata: _launcher(metadata.name)

        @staticmethod
        def get_current_device():
            return 0

        @staticmethod
        def get_current_stream(device):
            return 0

        @staticmethod
        def get_current_target():
            return GPUTarget("cuda", 90, 32)

        @staticmethod
        def get_active_torch_device():
            return torch.device("cpu")

        @staticmethod
        def map_python_to_cpp_type(ty):
            from triton.backends.nvidia.driver import ty_to_cpp
            return ty_to_cpp(ty)

        @staticmethod
        def is_active():
            return True

    def init_handles(self):
        if self.module is not None:
            return
        self.module, self.function, self._run = 1, 0, _launcher(self.name)
        self.n_regs = self.n_spills = 0
        self.n_max_threads = 1024

    CompiledKernel._init_handles = init_handles
    driver.set_active(StandInDriver())


def process_env(triton_path=None, version=None) -> dict:
    """The environment of a process that installs the stand-in driver: the compile
    processes' (``aot.compile_env``: no interpreter, the given Triton first, its own cache),
    with this repository importable (``bench``, ``lowrank_fused``) from any working folder."""
    from lowrank_fused.testing.aot import compile_env

    env = compile_env(triton_path, version)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(
        [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [root])
    return env


def _launcher(name):
    def run(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter, leave,
            *args):
        if _STATE["record"]:
            LAUNCHES.append((name, (gx, gy, gz), args))
    return run


def _same(a, b) -> bool:
    import torch
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.data_ptr() == b.data_ptr() and a.dtype == b.dtype)
    return type(a) is type(b) and a == b


def check_planned_launches() -> dict:
    """The step engine's planned K1 and K3 (``kernels/_launch.py: PlannedLaunch``) under this
    process's Triton, with the stand-in driver: their later calls hand the launcher the same
    grid and arguments as the first (``JITFunction.run``'s) and skip ``JITFunction.run``,
    also for the gradient passed as another tensor object at the planned address; a gradient
    at another address takes ``JITFunction.run`` again. Returns a report."""
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    from lowrank_fused.kernels.grouped_backproject_update import (
        plan_grouped_backproject_update)
    from lowrank_fused.kernels.grouped_project import plan_grouped_project

    install()
    runs = [0]
    real_run = JITFunction.run

    def counted(self, *args, **kwargs):
        runs[0] += 1
        return real_run(self, *args, **kwargs)
    JITFunction.run = counted
    torch.manual_seed(0)
    m, n, r, count = 96, 80, 8, 3
    G = torch.randn(count, m, n, dtype=torch.bfloat16)
    Gs = list(G.unbind(0))
    Ps = list(torch.randn(count, m, r).unbind(0))
    Rs = list(torch.empty(count, r, n).unbind(0))
    Ws = list(torch.randn(count, m, n).unbind(0))
    rsq = torch.empty(count)
    k1 = plan_grouped_project(Gs, Ps, Rs, precision="bf16", split_k=1, r_sumsq=rsq)
    k3 = plan_grouped_backproject_update(Ws, Ps, Rs, precision="bf16")
    skip = torch.zeros((), dtype=torch.bool)
    report = {"triton": triton.__version__, "checks": {}}
    for name, call, other in (
            ("K1", lambda g: k1(g), lambda: k1(torch.randn(count, m, n,
                                                           dtype=torch.bfloat16)[0])),
            ("K3", lambda g: k3(0.5, 1.0, 0.0, skip=skip), None)):
        LAUNCHES.clear()
        runs[0] = 0
        recording(True)
        call(Gs[0])                              # JITFunction.run, the direct path kept
        first = list(LAUNCHES)
        slow = runs[0]
        LAUNCHES.clear()
        call(Gs[0])                              # the same objects
        call(G[0])                               # the gradient as another tensor object
        fast = runs[0] - slow
        later = list(LAUNCHES)
        same = len(later) == 2 * len(first) and all(
            x[0] == y[0] and x[1] == y[1] and len(x[2]) == len(y[2])
            and all(_same(a, b) for a, b in zip(x[2], y[2]))
            for x, y in zip(later, first + first))
        moved = None
        if other is not None:                    # another address: JITFunction.run again
            before = runs[0]
            other()
            moved = runs[0] - before
        recording(False)
        report["checks"][name] = dict(launches=len(first), run_calls_first=slow,
                                      run_calls_later=fast, same_arguments=same,
                                      run_calls_moved=moved)
    JITFunction.run = real_run
    report["ok"] = all(c["same_arguments"] and c["run_calls_first"] == c["launches"]
                       and c["run_calls_later"] == 0 and c["run_calls_moved"] in (None, 1)
                       for c in report["checks"].values())
    return report


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] != ["--check"]:
        raise SystemExit("usage: python -m lowrank_fused.testing.standin_driver --check")
    print(json.dumps(check_planned_launches()))
