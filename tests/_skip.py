"""The check every op with an on-device ``skip`` flag gets (``lowrank_fused.ops``): with a
True flag every tensor it writes keeps its bits and the host reads nothing; with a False flag
the bits are those of a call without one (and differ from the prefill, so the op ran)."""
import pytest
import torch

from lowrank_fused import _ext
from lowrank_fused.dispatch import implementations, interpreting
from lowrank_fused.testing.trace import HostReads


def backends(op, fused=("triton", "compiled")):
    """The backends of ``op`` on the tests' device (``conftest.DEVICE``: CUDA when there is a
    GPU, else the CPU): the reference, Triton (on CUDA, or under the interpreter) and, with
    ``"compiled"``, the extension's kernel of ``op`` for that device (the CPU twin, or the CUDA
    kernel) where it has one, skipped when the extension is not built."""
    out = ["reference"]
    if "triton" in fused and (interpreting() or torch.cuda.is_available()):
        out.append("triton")
    name = "cuda" if torch.cuda.is_available() else "cpu"
    if "compiled" in fused and name in implementations(op):
        why = _ext.why_no_cuda() if name == "cuda" else _ext.why_no_cpu()
        out.append(pytest.param(name, marks=pytest.mark.skipif(
            why is not None, reason=f"no {name} kernel of {op}: {why}")))
    return out


def flags(device):
    """(False, True) as 0-dim bool tensors on ``device``."""
    return (torch.zeros((), dtype=torch.bool, device=device),
            torch.ones((), dtype=torch.bool, device=device))


def check_skip(make, run, device, also=()):
    """``make()`` gives the prefilled outputs (a list of tensors holding random values);
    ``run(outputs, skip)`` calls the op, writing them. Checks: with a True flag every output
    is bit-identical to its prefill and no value is read to the host; with a False flag every
    output equals (``torch.equal``) its value after a call without a flag, and some output
    changed (the op ran). ``also``: indices of outputs that a skipped call still writes (e.g.
    the multi ops' ``nonfinite``), excluded from the unchanged check."""
    no, yes = flags(device)
    base = make()
    out = [t.clone() for t in base]
    with HostReads() as reads:
        run(out, yes)
    assert sum(reads.count.values()) == 0, f"a skipped call read the host: {dict(reads.count)}"
    for i, (got, want) in enumerate(zip(out, base)):
        if i not in also:
            assert torch.equal(got, want), f"output {i} changed under skip=True"
    plain = [t.clone() for t in base]
    run(plain, None)
    flagged = [t.clone() for t in base]
    run(flagged, no)
    for i, (got, want) in enumerate(zip(flagged, plain)):
        assert torch.equal(got, want), f"output {i}: skip=False differs from skip=None"
    assert any(not torch.equal(p, b) for p, b in zip(plain, base)), "the op wrote nothing"
    return out


def bad_skips(device):
    """(skip, exception, words the message must hold) for a skip that is not a 0-dim bool
    tensor on ``device``."""
    other = "meta" if torch.device(device).type != "meta" else "cpu"
    return [
        (True, TypeError, "skip"),
        (torch.zeros((), dtype=torch.int32, device=device), TypeError, "torch.int32"),
        (torch.zeros(1, dtype=torch.bool, device=device), ValueError, "(1,)"),
        (torch.zeros((), dtype=torch.bool, device=other), ValueError, other),
    ]


def check_bad_skips(run, device):
    """``run(skip)`` calls the op with ``skip``; each bad flag raises, naming ``skip`` and
    what was given."""
    for skip, exc, words in bad_skips(device):
        with pytest.raises(exc) as info:
            run(skip)
        msg = str(info.value)
        assert "skip" in msg and words in msg, msg
