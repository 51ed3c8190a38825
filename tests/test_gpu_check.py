"""bench.gpu_check's arguments (the GPU entry point; its runs need CUDA): the benchmark suites
can be split over several device commands, and a wrong suite name is refused up front."""
import pytest

from bench import gpu_check


def test_suite_selection_splits_the_benchmarks():
    assert gpu_check.parse_args([]).suite is None
    args = gpu_check.parse_args(["--skip-tests", "--suite", "kernels, multi-tensor"])
    assert args.skip_tests and args.suite == ["kernels", "multi-tensor"]
    assert gpu_check.parse_args(["--suite", "step,e2e,convergence,refresh"]).suite == [
        "step", "e2e", "convergence", "refresh"]


@pytest.mark.parametrize("value", ["kernel", "", "step,bogus"])
def test_unknown_suite_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--suite", value])
    assert "--suite" in capsys.readouterr().err


def test_only_selects_kernel_modules():
    args = gpu_check.parse_args(["--skip-tests", "--suite", "kernels", "--only", "method_step"])
    assert args.only == "method_step"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "no_such_module"])
