"""The step engine (lowrank_fused/optim/_engine.py, docs/engine.md).

For every method (``STEADY``):

* A steady step launches the same kernels on the same tensors every time: every Triton launch
  and every call into the compiled extension is recorded (the kernels run for real) and two
  steady steps (different step counts) give the same kernels with the same arguments: the
  same tensor addresses and scalars (the per-step ones in tables at fixed addresses), a few
  launches per matrix class.
* With the flag left on the device a steady step allocates nothing.

For GaLore and AdamW (the others' own engine tests check the same):

* With the flag read at once, a steady step allocates O(classes) small tensors, not
  O(parameters).
* With the flag left on the device (``lagged_nonfinite``, the default on CUDA), a step with a
  NaN/Inf gradient makes no host read, is skipped on the device, and the next ``step()`` (or
  ``nonfinite_check()``) rolls its counters back: weights and every state value bit-identical
  to before it; "raise" then names the parameter and the step.
* A refresh step reads the flag at once (its SVD needs a finite gradient).

For the capturable methods (GaLore, AdaptiveAdamW, RSAdamW, AdamW, Adafactor): a replayed step (the host
half with every launch suppressed, then an earlier step's launches) equals the eager run; on
CUDA, the captured run equals the eager one.
"""
import collections

import pytest
import torch

from lowrank_fused import _capture, _ext
from lowrank_fused.testing.trace import AllocationTrace, HostReads

from _methods import assert_same, backward, model, optimizer, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# every method, with its refreshes pushed past the steps the tests record
STEADY = {"galore": dict(update_proj_gap=50), "adaptive_adamw": dict(update_proj_gap=50),
          "rsadamw": dict(update_proj_gap=50), "gha": dict(update_proj_gap=50),
          "galore_kfac": dict(update_proj_gap=50, kfac_update_freq=50),
          "adarankgrad": dict(t_min=50), "ldadam": {}, "adamem": dict(update_proj_gap=50),
          "adapm": dict(refit_T=50), "adapm_mini": dict(refit_T=50), "adamw": {},
          "adafactor": {}}
ENGINE_METHODS = tuple(STEADY)
# launches per class or dense set in a steady step, at most (default 4)
PER_UNIT = {"adaptive_adamw": 5, "rsadamw": 5, "gha": 20, "galore_kfac": 7, "adamem": 6,
            "ldadam": 13, "adafactor": 5}
# the methods whose steady step is offered for CUDA-graph capture (CAPTURABLE)
CAPTURE_METHODS = ("galore", "adaptive_adamw", "rsadamw", "gha", "galore_kfac", "adarankgrad",
                   "ldadam", "adamem", "adapm", "adapm_mini", "adamw", "adafactor")
# the device-skip and per-class allocation tests run on these here; every other method has
# its own (test_optim_*_engine.py, test_optim_*_device_skip.py)
SKIP_METHODS = ("galore", "adamw")


def _arg(a):
    """A launch argument as recorded: a tensor by its address, a list elementwise, a
    scalar by value."""
    if torch.is_tensor(a):
        return ("tensor", a.data_ptr())
    if isinstance(a, (list, tuple)):
        return tuple(_arg(x) for x in a)
    return a


class LaunchRecorder:
    """Records every Triton launch and extension call: the kernel and every argument (tensors
    by address, scalars and the compiled meta-parameters by value)."""

    def __init__(self, monkeypatch, stub=False):
        import triton.runtime.interpreter as interp

        self.log = []
        real_run = interp.InterpretedFunction.run
        log = self.log

        def run(fn, *args, **kwargs):
            log.append(("triton:" + fn.fn.__name__, _arg(args),
                        tuple(sorted((k, _arg(v)) for k, v in kwargs.items()))))
            if not stub:        # stubbed: the interpreter's own copies are not counted
                return real_run(fn, *args, **kwargs)

        monkeypatch.setattr(interp.InterpretedFunction, "run", run)
        real = _ext.load()
        if real is None:
            return

        class Recorded:
            def __getattr__(self, name):
                attr = getattr(real, name)
                if not callable(attr) or name in ("build_info", "cpu_isa", "has_cuda"):
                    return attr

                def call(*args, **kwargs):
                    log.append(("ext:" + name, _arg(args), tuple(
                        sorted((k, _arg(v)) for k, v in kwargs.items()))))
                    return attr(*args, **kwargs)
                return call

        monkeypatch.setattr(_ext, "_module", Recorded())
        monkeypatch.setattr(_ext, "_tried", True)


def _steady(method, **kw):
    """A model whose gradients stay in the same tensors (zero_grad without set_to_none), the
    optimizer past its first refresh."""
    net = model()
    opt = optimizer(net, method, **{**STEADY[method], **kw})
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    return net, opt


@pytest.mark.parametrize("method", ENGINE_METHODS)
@pytest.mark.parametrize("lagged", [False, True], ids=["flag-read", "flag-lagged"])
def test_steady_steps_launch_the_same_kernels_on_the_same_tensors(method, lagged, monkeypatch):
    """Capture-ready: two steady steps (different step counts, so different bias
    corrections) make the same launches with the same arguments: the same tensors, and the
    per-step scalars in tables at fixed addresses, kept by their calls (between the two
    steps the kernels' shared table cache is filled past its size: a table taken from it
    could be evicted, and its memory freed under a captured graph)."""
    from lowrank_fused.kernels._grouped import _CACHE_SIZE, scalar_table

    # recording from the start: the multi-tensor calls bind the extension's functions once
    recorder = LaunchRecorder(monkeypatch)
    net, opt = _steady(method)         # auto: Triton GEMMs, the twin's multi-tensor ops
    opt.lagged_nonfinite = lagged
    steps = []
    for t in range(3, 5):
        if t == 4:
            for i in range(_CACHE_SIZE + 1):
                scalar_table([[float(i)]], "cpu", key=("another caller", i))
        backward(net, t)
        recorder.log.clear()
        opt.step()
        opt.zero_grad(set_to_none=False)
        steps.append(list(recorder.log))
    assert steps[0], "nothing was recorded"
    for a, b in zip(steps[0], steps[1]):
        assert a == b, f"a steady step changed a launch:\n{a}\n{b}"
    assert len(steps[0]) == len(steps[1])
    plan = opt._engine_plan
    # classes, dense sets, and AdaMeM's Adafactor matrices and vector sets
    units = len(plan.classes) + len(plan.dense) + len(getattr(plan, "factored", ())) \
        + len(getattr(plan, "vector_sets", ()))
    kernels = collections.Counter(entry[0] for entry in steps[0])
    assert any(name.startswith("ext:") for name in kernels), kernels   # the multi-tensor calls
    # a handful per class: K1, K2, K3 (+ a split-K reduction) and one dense call per set;
    # the AdaptiveAdamW family adds its limiter (one: its division is fused into K3), GHA two
    # projections and the fifteen
    # launches of its basis update (nine GEMMs, two factorizations, four elementwise), K-FAC the Grams and its whitening, AdaMeM its middle step's kernels; LDAdam's
    # class also projects its error buffer twice, back-projects it once and makes its five
    # small products (batched GEMMs: M V1, P_old (M V1), the transport's three); Adafactor's
    # factored class takes five (scalars, statistics, EMA, sums, apply)
    assert sum(kernels.values()) <= PER_UNIT.get(method, 4) * units + 2, kernels
    assert not plan.legacy


@pytest.mark.parametrize("method", SKIP_METHODS)
def test_steady_step_allocates_per_class_not_per_parameter(method, monkeypatch):
    net, opt = _steady(method)
    backward(net, 3)
    LaunchRecorder(monkeypatch, stub=True)
    trace = AllocationTrace()
    with trace:
        opt.step()
    plan = opt._engine_plan
    params = sum(len(g["params"]) for g in opt.param_groups)
    units = len(plan.classes) + len(plan.dense)
    assert params > 2 * units
    assert len(trace.sizes) <= 4 * units + 8, trace.sizes


@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_steady_step_with_the_flag_on_the_device_allocates_nothing(method, monkeypatch):
    """With the non-finite flag left on the device (the CUDA default), a steady step
    allocates no tensor at all: flags, workspaces and scalar tables are the plan's."""
    assert _steady_step_allocations(method, monkeypatch) == []


def _steady_step_allocations(method, monkeypatch):
    """The tensors one steady step allocates with the flag on the device (launches stubbed:
    the interpreter's own copies are not the step's)."""
    net, opt = _steady(method)
    opt.lagged_nonfinite = True
    backward(net, 3)
    opt.step()                      # the plan's flags buffer
    backward(net, 4)
    LaunchRecorder(monkeypatch, stub=True)
    trace = AllocationTrace()
    with trace:
        opt.step()
    return trace.sizes


@pytest.mark.parametrize("method", ENGINE_METHODS)
def test_steady_step_allocates_nothing_with_gpu_tiles_and_split_k(method, monkeypatch):
    """The same with the tiles a GPU launcher picks (``gpu_tiling``) and the grouped K1's
    reduction over m cut into two slices (what an H100 does for a class too small to fill
    it; the test model's classes are small, but their m is too short for the launcher to
    choose it): the split-K buffers and reductions are the plans' too."""
    import importlib

    from lowrank_fused.kernels._common import gpu_tiling

    gp = importlib.import_module("lowrank_fused.kernels.grouped_project")
    monkeypatch.setattr(gp, "choose_split_k", lambda *args: 2)
    with gpu_tiling():
        assert _steady_step_allocations(method, monkeypatch) == []


def _poison(net, name, value=float("nan")):
    p = dict(net.named_parameters())[name]
    p.grad.view(-1)[3] = value


NAMES = {"lowrank": "model.layers.0.mlp.down_proj.weight", "dense": "model.embed_tokens.weight"}


@pytest.mark.parametrize("method", SKIP_METHODS)
@pytest.mark.parametrize("which", ["lowrank", "dense"])
def test_device_skip_without_host_read_rolls_back(method, which):
    net, opt = _steady(method, nonfinite="skip")
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 3)
    _poison(net, NAMES[which])
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) == 0, dict(reads.count)
    opt.nonfinite_check()
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(net, opt), f"{method}: skipped on the device")
    # the run goes on as if that batch had never come
    opt.zero_grad(set_to_none=False)
    backward(net, 4)
    opt.step()
    ref_net, ref = _steady(method, nonfinite="skip")
    ref.zero_grad(set_to_none=False)
    backward(ref_net, 4)
    ref.step()
    opt.nonfinite_check()     # the lagged flag's decisions (AdaRankGrad's exit tests) settled
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), f"{method}: after the skip")


@pytest.mark.parametrize("method", SKIP_METHODS)
def test_device_skip_raise_names_parameter_and_step_at_the_next_step(method):
    net, opt = _steady(method)
    opt.lagged_nonfinite = True
    before = snapshot(net, opt)
    backward(net, 3)
    _poison(net, NAMES["lowrank"], float("inf"))
    opt.step()                                  # no read: the flag stays on the device
    opt.zero_grad(set_to_none=False)
    backward(net, 4)
    with pytest.raises(FloatingPointError, match=rf"'{NAMES['lowrank']}'.*at step 4"):
        opt.step()
    assert_same(before, snapshot(net, opt), f"{method}: raise")
    assert opt.step_calls == 3 and opt.skipped_steps == 0
    opt.step()                                  # the flag was consumed: the run goes on
    assert opt.step_calls == 4


def test_refresh_step_reads_the_flag_at_once():
    net, opt = _steady("galore", nonfinite="skip", update_proj_gap=4)   # refresh at counter 4
    opt.lagged_nonfinite = True
    backward(net, 3)
    opt.step()
    before = snapshot(net, opt)
    backward(net, 4)
    _poison(net, NAMES["lowrank"])
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) >= 1
    assert opt.skipped_steps == 1
    assert_same(before, snapshot(net, opt), "refresh step skipped at once")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_default_leaves_the_flag_on_the_device():
    """On CUDA the lagged mode is the default: a NaN step makes no host read, is skipped on
    the device, and the next step raises naming the parameter and the step."""
    from _methods import CFG

    def backward(net, t):                         # the batch of _methods.backward, on CUDA
        g = torch.Generator().manual_seed(1000 + t)
        ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g).cuda()
        net(ids[:, :-1], labels=ids[:, 1:])[1].backward()

    net = model().cuda()
    opt = optimizer(net, "galore", update_proj_gap=50)
    for t in range(3):
        backward(net, t)
        opt.step()
        opt.zero_grad(set_to_none=False)
    before = snapshot(net, opt)
    backward(net, 3)
    _poison(net, NAMES["dense"])
    reads = HostReads()
    with reads:
        opt.step()
    assert sum(reads.count.values()) == 0, dict(reads.count)
    backward(net, 4)
    with pytest.raises(FloatingPointError, match=rf"'{NAMES['dense']}'.*at step 4"):
        opt.step()
    assert_same(before, snapshot(net, opt), "cuda: raise")


class LaunchTape:
    """What a CUDA graph does with a step's launches, on the CPU: while ``recording`` every
    Triton launch and extension call is kept with its arguments; ``replay()`` makes them all
    again, in order, with the same arguments."""

    def __init__(self, monkeypatch):
        import triton.runtime.interpreter as interp

        self.tape, self.recording = [], False
        self.in_replay = 0                   # launches made while a replay's host half ran
        real_run = interp.InterpretedFunction.run
        tape = self

        def run(fn, *args, **kwargs):
            tape.in_replay += _capture.replaying()
            if tape.recording and not _capture.inside_unit():
                tape.tape.append((real_run, (fn,) + args, kwargs))
            return real_run(fn, *args, **kwargs)

        def unit(fn, args, kwargs):          # a capture unit: kept whole, its launches in it
            if tape.recording:
                tape.tape.append((fn, args, kwargs))

        monkeypatch.setattr(interp.InterpretedFunction, "run", run)
        monkeypatch.setattr(_capture, "_RECORDER", unit)
        real = _ext.load()

        class Taped:
            def __getattr__(self, name):
                attr = getattr(real, name)
                if not callable(attr) or name in ("build_info", "cpu_isa", "has_cuda"):
                    return attr

                def call(*args, **kwargs):
                    tape.in_replay += _capture.replaying()
                    if tape.recording and not _capture.inside_unit():
                        tape.tape.append((attr, args, kwargs))
                    return attr(*args, **kwargs)
                return call

        monkeypatch.setattr(_ext, "_module", Taped())
        monkeypatch.setattr(_ext, "_tried", True)

    def replay(self):
        for fn, args, kwargs in self.tape:
            fn(*args, **kwargs)

    def replayed_step(self, opt):
        """``opt.step()`` as it runs with a captured graph: its ``_device_step`` is the
        host half of ``_step_work`` with every launch suppressed, then the graph (this
        tape); what ``step()`` does before and after (the flag's check, ``_after_updates``)
        runs as ever, around it."""
        def device_step():
            with _capture.replay():
                opt._step_work()
            self.replay()

        opt._device_step = device_step
        try:
            opt.step()
        finally:
            del opt._device_step


def replay_run(tape, run, ref_run, ts, poison_at, change=None):
    """The capture tests' loop on the CPU. ``run`` and ``ref_run`` ((net, opt) pairs) step on
    the same gradients, the flag left on the device. ``run``'s first steady step is the
    "capture" (its launches and units recorded on ``tape``); each later one replays it
    (``tape.replayed_step``: the host half, no launch allowed, then the tape), unless a
    refresh, refit or recompute is pending (then it runs eagerly, as with ``capture`` on a
    GPU). ``ref`` runs eagerly. A NaN gradient at step ``poison_at``; ``change(opt, t)`` edits
    an optimizer's groups before step t. Every step's weights and state are compared bit for
    bit. Returns each step's mode ("capture", "replay", "eager")."""
    (net, opt), (ref_net, ref) = run, ref_run
    for o in (opt, ref):
        o.lagged_nonfinite = True
    modes = []
    for t in ts:
        for n, o in (run, ref_run):
            backward(n, t)
            if t == poison_at:
                _poison(n, NAMES["lowrank"])
            if change is not None:
                change(o, t)
        pending = opt._refresh_pending(opt._engine_plan)
        if pending or not tape.tape:
            tape.recording = not pending     # the "capture": one eager steady step
            opt.step()
            tape.recording = False
            modes.append("eager" if pending else "capture")
            assert pending or tape.tape
        else:
            launches = len(tape.tape)
            tape.replayed_step(opt)
            assert len(tape.tape) == launches and tape.in_replay == 0, tape.in_replay
            modes.append("replay")
        _step_eagerly_and_compare(run, ref_run, f"step {t}")
    assert opt.skipped_steps == ref.skipped_steps == 1
    return modes


def _step_eagerly_and_compare(run, ref_run, what):
    """The eager reference's step, both zeroed in place and their flags settled, then the
    two runs' weights and state compared bit for bit."""
    (net, opt), (ref_net, ref) = run, ref_run
    ref.step()
    for o in (opt, ref):
        o.zero_grad(set_to_none=False)
    opt.nonfinite_check()
    ref.nonfinite_check()
    assert_same(snapshot(ref_net, ref), snapshot(net, opt), what)


@pytest.mark.skipif(_ext.why_no_cpu() is not None, reason="needs the compiled CPU twin")
@pytest.mark.parametrize("method", CAPTURE_METHODS)
def test_replayed_launches_with_the_host_half_equal_eager_steps(method, monkeypatch):
    """A replayed step (``capture`` on CUDA) is the step's host half run with every launch
    suppressed (``lowrank_fused._capture.replay``: checks, counters, the scalar tables'
    contents) followed by the launches captured at an earlier steady step, unchanged, then
    what a step does after its launches (``_after_updates``). On the CPU the captured
    launches are a tape of one eager step; replaying it after the host half of each later
    step gives the eager run's weights and state bit for bit, a step with a NaN gradient
    included (skipped on the device, counted at the next step)."""
    tape = LaunchTape(monkeypatch)
    modes = replay_run(tape, _steady(method, nonfinite="skip"), _steady(method, nonfinite="skip"),
                       range(3, 9), poison_at=6)
    assert modes == ["capture"] + ["replay"] * 5, modes


@pytest.mark.skipif(_ext.why_no_cpu() is not None, reason="needs the compiled CPU twin")
def test_kfac_replays_between_the_eager_recomputes_of_its_roots(monkeypatch):
    """K-FAC's steps that recompute the roots (``eigh``, every ``kfac_update_freq`` steps)
    read the host and run eagerly; the steps between them replay the launches captured
    before a recompute (same tensors: the recompute writes the roots in place), equal to
    the eager run bit for bit."""
    tape = LaunchTape(monkeypatch)
    kw = dict(update_proj_gap=50, kfac_update_freq=3, nonfinite="skip")
    run, ref_run = _steady("galore_kfac", **kw), _steady("galore_kfac", **kw)
    opt = run[1]
    classes = list(opt._engine_plan.classes.values())
    assert classes and all(opt._class_capturable(c) for c in classes)
    modes = replay_run(tape, run, ref_run, range(3, 11), poison_at=8)
    assert modes.count("eager") >= 2 and modes.count("replay") >= 3, modes
    idx = modes.index("eager", modes.index("capture"))
    assert "replay" in modes[idx:], modes      # replays after a recompute


@pytest.mark.parametrize("method", ["galore", "gha", "galore_kfac", "ldadam", "adamem",
                                    "adapm", "adafactor"])
def test_a_failed_capture_runs_the_step_eagerly(method):
    """A capture that fails (an op in the step that cannot be captured on that machine)
    has run the step's host half but nothing on the device: the optimizer puts its host
    state back (step counters, flags), warns, switches capture off and runs the step
    eagerly, so the run equals one that never tried, bit for bit, a NaN step included."""
    import warnings

    from lowrank_fused.optim import CaptureFailedWarning

    net, opt = _steady(method, nonfinite="skip")
    ref_net, ref = _steady(method, nonfinite="skip")
    for o in (opt, ref):
        o.lagged_nonfinite = True
    opt.capture = True
    opt._graph_key = lambda: ("a steady step",)

    def failing_capture(key):
        with _capture.replay():              # a capture records the launches, runs none
            opt._step_work()
        raise RuntimeError("operation not permitted when stream is capturing")

    opt._capture_graph = failing_capture
    for t in range(3, 8):
        for n in (net, ref_net):
            backward(n, t)
            if t == 6:
                _poison(n, NAMES["lowrank"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step()
        failed = [w for w in caught if issubclass(w.category, CaptureFailedWarning)]
        assert len(failed) == (t == 4), (t, [str(w.message) for w in caught])
        _step_eagerly_and_compare((net, opt), (ref_net, ref), f"{method}: step {t}")
    assert opt.capture is False and opt.graphs_captured == 0
    assert opt.skipped_steps == ref.skipped_steps == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", CAPTURE_METHODS)
def test_cuda_graph_capture_equals_eager(method):
    """``opt.capture = True`` on CUDA: the second steady step of one structure is captured,
    the later ones replayed; weights and state equal the eager run's bit for bit, through a
    NaN step (skipped on the device, raised or counted at the next step) and a refresh."""
    from _methods import CFG

    def backward_cuda(net, t):
        g = torch.Generator().manual_seed(1000 + t)
        ids = torch.randint(0, CFG["vocab_size"], (2, 9), generator=g).cuda()
        net(ids[:, :-1], labels=ids[:, 1:])[1].backward()

    kw = dict(STEADY[method], nonfinite="skip")
    if method == "galore":
        kw["update_proj_gap"] = 6            # a refresh inside the run: re-captured after
    runs = []
    for capture in (False, True):
        net = model().cuda()
        opt = optimizer(net, method, **kw)
        opt.capture = capture
        for t in range(14):
            backward_cuda(net, t)
            if t == 9:
                _poison(net, NAMES["lowrank"])
            opt.step()
            opt.zero_grad(set_to_none=False)
        opt.nonfinite_check()
        torch.cuda.synchronize()
        runs.append((snapshot(net, opt), opt))
    (a, eager), (b, captured) = runs
    assert_same(a, b, f"{method}: captured vs eager")
    assert captured.graphs_captured >= 1 and eager.graphs_captured == 0
    assert captured.skipped_steps == eager.skipped_steps == 1


def test_only_methods_of_bound_calls_only_are_capturable():
    """A replay suppresses only the bound calls' launches: a method with any other device
    work in its steady step must never be captured (that work would run twice)."""
    import lowrank_fused as lf

    capturable = {name for name, cls in lf.optim.__dict__.items()
                  if isinstance(cls, type) and getattr(cls, "CAPTURABLE", False)}
    assert capturable == {"GaLoreAdamW", "AdaptiveAdamW", "RSAdamW", "GHAAdamW",
                          "GaLoreKFACAdamW", "AdaRankGrad", "LDAdamW", "AdaMeM", "AdaPM",
                          "AdaPMMini", "AdamW", "HFAdamW", "Adafactor"}, capturable


def _transposed_layout(t):
    """``t``'s values in a tensor of its shape whose 2-D strides are transposed (a gradient
    that arrived in another memory layout)."""
    if t.dim() != 2:
        return t.clone()
    out = torch.empty(t.shape[::-1], dtype=t.dtype).t()
    out.copy_(t)
    assert out.stride() != t.stride()
    return out


@pytest.mark.parametrize("method", ["galore", "adaptive_adamw", "adamem", "adapm", "adamw"])
def test_gradients_in_a_new_layout_mid_run_equal_the_per_parameter_step(method):
    """The bound calls check their gradients' layouts once per change the step's own check
    of every gradient sees (the layout token), not every step: gradients that arrive with
    other strides after steady steps (then the original layout again) must still be
    checked, re-planned and stepped exactly as the per-parameter step does."""
    runs = []
    for engine in (True, False):
        net = model()
        opt = optimizer(net, method, **STEADY[method])
        opt.engine = engine
        tokens = []
        for t in range(6):
            backward(net, t)
            if t == 3:                       # every 2-D gradient in the transposed layout
                for p in net.parameters():
                    p.grad = _transposed_layout(p.grad)
            opt.step()
            tokens.append(opt.__dict__.get("_layout_token"))
            opt.zero_grad(set_to_none=t in (3, 4))
        runs.append(snapshot(net, opt))
        if engine:
            # renewed on the first step, at the change and at the change back only
            assert tokens == [1, 1, 1, 2, 3, 3], tokens
    assert_same(runs[0], runs[1], f"{method}: engine vs per-parameter step")


@pytest.mark.parametrize("method", ["adaptive_adamw", "rsadamw"])
def test_capture_key_holds_the_values_launched_by_value(method):
    """The class limiter takes ``nl_gamma`` by value, so a captured graph holds it: the
    capture key carries it (a changed gamma makes the next step eager and re-captures)."""
    net, opt = _steady(method)
    before = opt._captured_values()
    opt.param_groups[-1]["nl_gamma"] = 1.5
    assert opt._captured_values() != before
    assert 1.5 in opt._captured_values()


def test_capture_key_holds_adamem_factored_values():
    """AdaMeM's factored Adafactor step (the embedding and head) takes beta2 and eps1 by
    value in its launches and products: both are in the capture key; its classes are
    capturable on the grouped middle and the planned combined update."""
    net, opt = _steady("adamem")
    before = opt._captured_values()
    opt.param_groups[-1]["eps1"] = 1e-20
    assert opt._captured_values() != before
    opt.param_groups[-1]["eps1"] = before[-1][1]
    opt.param_groups[-1]["betas"] = (0.9, 0.5)
    assert opt._captured_values() != before
    classes = list(opt._engine_plan.classes.values())
    assert classes and all(opt._class_capturable(c) for c in classes)
    classes[0].extra["middle"] = None         # the per-matrix middle: not capturable
    assert not opt._class_capturable(classes[0])


def test_capture_key_holds_gha_eta_and_sign_canon():
    """GHA's basis update (one capture unit per class) takes ``eta`` and ``sign_canon`` by
    value: both are in the capture key; a class whose members' etas differ runs the
    per-member update and is not capturable."""
    net, opt = _steady("gha")
    before = opt._captured_values()
    opt.param_groups[-1]["eta"] = 0.25
    assert opt._captured_values() != before and 0.25 in opt._captured_values()
    opt.param_groups[-1]["eta"] = before[-1]
    opt.sign_canon = not opt.sign_canon
    assert opt._captured_values() != before
    opt.sign_canon = not opt.sign_canon
    classes = list(opt._engine_plan.classes.values())
    assert classes and all(opt._class_capturable(c) for c in classes)
    classes[0].extra["eta"] = None          # mixed etas: the per-member path
    assert not opt._class_capturable(classes[0])


@pytest.mark.parametrize("method", ["galore", "ldadam", "adamem", "adafactor"])
def test_steps_where_some_parameters_have_no_gradient_equal_the_per_parameter_step(method):
    """The step reads every gradient once and the classes and dense sets take theirs by
    position: steps where projected and dense parameters in the middle of the list have no
    gradient (a new set of positions, then the full set again) must step exactly the
    parameters that have one, as the per-parameter step does."""
    runs = []
    for engine in (True, False):
        net = model()
        opt = optimizer(net, method, **STEADY[method])
        opt.engine = engine
        params = list(net.parameters())
        for t in range(5):
            backward(net, t)
            if t in (1, 2):                  # a projected matrix, a norm weight, another
                for i in (3, 4, len(params) // 2 + t):
                    params[i].grad = None
            opt.step()
            opt.zero_grad(set_to_none=False)
        runs.append(snapshot(net, opt))
    assert_same(runs[0], runs[1], f"{method}: engine vs per-parameter step")
