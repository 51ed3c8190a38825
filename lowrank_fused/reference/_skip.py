"""The reference's on-device ``skip`` (``lowrank_fused.ops``: a 0-dim torch.bool tensor that,
when True, leaves every tensor an op writes bit-identical), without reading the flag on the
host: snapshot the outputs, run the op, and put back ``torch.where(skip, before, after)``.
A call without a flag takes none of this (no snapshot, no select)."""
import torch


def run_unless(skip, outputs, op, *args, **kwargs):
    """``op(*args, **kwargs)`` (which writes ``outputs`` in place; None entries are ignored),
    then every output restored to its value before the call where ``skip`` holds True. The
    restore is a select, so the kept values are the old bits exactly (NaN payloads and signed
    zeros included)."""
    outputs = [t for t in outputs if t is not None]
    before = [t.clone() for t in outputs]
    op(*args, **kwargs)
    with torch.no_grad():
        for t, old in zip(outputs, before):
            t.copy_(torch.where(skip, old, t))
