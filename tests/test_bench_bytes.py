"""The benchmark byte model (bench/bytes.py) against ALGORITHMS.md section 10.1's table for
m, n, r = 4096, 11008, 128 (MiB as printed by shared/spec_checks/bytes2.py), and its
generalisation to other element sizes and the right-projected form."""
import pytest

from bench import bytes as B

M, N, R = 4096, 11008, 128
A, S, C = M * N, R * N, M * R


def mib(x):
    return round(x / 2 ** 20)


@pytest.mark.parametrize("fn, eager, floor", [
    (lambda: B.project_bytes(M, N, R), 437, 93),
    (lambda: B.adam_moments_bytes(M, N, R), 97, 32),
    (lambda: B.backproject_update_bytes(M, N, R), 1039, 179),
    (lambda: B.galore_step_bytes(M, N, R), 1574, 305),
])
def test_section_10_table_mib(fn, eager, floor):
    b = fn()
    assert (mib(b.eager), mib(b.floor)) == (eager, floor)


def test_section_10_formulas_exact():
    assert B.project_bytes(M, N, R) == B.Bytes(2 * A + 4 * C + 4 * S, 10 * A + 4 * C + 4 * S)
    assert B.adam_moments_bytes(M, N, R) == B.Bytes(24 * S, 72 * S)
    assert B.backproject_update_bytes(M, N, R) == B.Bytes(4 * A + 4 * C + 4 * S,
                                                          24 * A + 4 * C + 4 * S)
    assert B.galore_step_bytes(M, N, R) == B.Bytes(6 * A + 24 * S + 8 * C + 8 * S,
                                                   10 * A + 72 * S + 24 * A + 8 * C + 8 * S)


def test_dense_adamw_22A():
    b = B.adamw_bytes(M, N)
    assert b.floor == 22 * A
    assert mib(b.floor) == 946


def test_fp32_parameters():
    # fp32 G and W: no cast pass in eager K1, W is 4 B in K3, AdamW moves 28A
    assert B.project_bytes(M, N, R, g_bytes=4) == B.Bytes(4 * A + 4 * C + 4 * S,
                                                          4 * A + 4 * C + 4 * S)
    assert B.backproject_update_bytes(M, N, R, w_bytes=4) == B.Bytes(8 * A + 4 * C + 4 * S,
                                                                     32 * A + 4 * C + 4 * S)
    assert B.galore_step_bytes(M, N, R, param_bytes=4).floor == 12 * A + 32 * S + 8 * C
    assert B.adamw_bytes(M, N, param_bytes=4).floor == 28 * A
    # torch's AdamW on bf16 parameters keeps bf16 states
    assert B.adamw_bytes(M, N, param_bytes=2, state_bytes=2).floor == 14 * A


def test_right_side_swaps_lowrank_and_basis():
    # a right projection of the m x n matrix is the left projection of its transpose
    for fn in (B.project_bytes, B.adam_moments_bytes, B.backproject_update_bytes,
               B.galore_step_bytes):
        assert fn(N, M, R, side="right") == fn(M, N, R, side="left")
    assert B.sizes(M, N, R, side="right") == (A, M * R, R * N)
    # with a bf16 basis (faithful_dtypes) the basis and the fp32 R differ, so the side matters
    assert (B.project_bytes(M, N, R, state_bytes=2, side="right").floor
            - B.project_bytes(M, N, R, state_bytes=2).floor) == 2 * (M * R - R * N)
    with pytest.raises(ValueError):
        B.sizes(M, N, R, side="both")


def test_model_table_has_every_op():
    text = B.format_model_table([(M, N)], [R], param_bytes=(2,))
    row = "| 4096x11008 | 128 | bf16 | left | 437 / 93 | 97 / 32 | 1039 / 179 | 1574 / 305 |"
    assert row in text
