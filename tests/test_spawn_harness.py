"""The multi-process test launcher (``lowrank_fused.testing.distributed.spawn_with_deadline``):
a rank's exception reaches the caller with its message, a rank that never returns is killed
at the deadline instead of stalling the suite, and ranks that return are joined cleanly."""
import os
import time

import pytest
import torch.multiprocessing as mp

from lowrank_fused.testing.distributed import spawn_with_deadline


def _rank_1_raises(rank):
    if rank == 1:
        raise ValueError("rank 1 failed on purpose")


def _rank_1_hangs(rank):
    if rank == 1:
        time.sleep(60)


def _writes(rank, out_dir):
    with open(os.path.join(out_dir, f"done-{rank}"), "w") as f:
        f.write(str(rank))


def test_a_rank_exception_reaches_the_caller():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        spawn_with_deadline(_rank_1_raises, (), 2)


def test_a_hung_rank_is_killed_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="_rank_1_hangs: 2 processes still running"):
        spawn_with_deadline(_rank_1_hangs, (), 2, deadline_s=5.0)
    assert time.monotonic() - start < 45


def test_ranks_that_return_are_joined(tmp_path):
    spawn_with_deadline(_writes, (str(tmp_path),), 3)
    assert sorted(os.listdir(tmp_path)) == ["done-0", "done-1", "done-2"]
