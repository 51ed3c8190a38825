"""Test support shared by tests/ and bench/: the tolerance table and the parity assertion."""
from lowrank_fused.testing.parity import assert_parity, poison, tolerance

__all__ = ["assert_parity", "poison", "tolerance"]
