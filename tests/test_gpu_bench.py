"""benchmarks/gpu.py builds its grid and A/B settings from its arguments without training anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdshield.bench import QUICKSTART
from kdshield.errors import ConfigError
from tests.conftest import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    return load_benchmark(SCRIPT.stem)


def test_gpu_mode_is_the_quickstart_grid_with_gpu_batches(gpu_bench):
    a = gpu_bench.parse_args([])
    grid = gpu_bench.build_grid(a)
    for key in ("students", "datasets", "attacks", "methods", "seeds"):
        assert getattr(grid, key) == QUICKSTART[key], key
    assert (grid.n_proxy, grid.n_train, grid.n_dev, grid.n_test) == (2000, 2000, 300, 1000)
    assert grid.batch_size == 64 and grid.dtype == "auto" and grid.tag == "gpu"
    assert grid.work_dir == "runs/gpu" and grid.out == "runs/gpu/grid.jsonl"
    assert gpu_bench.out_path(a) == Path("benchmarks/results/gpu.jsonl")
    assert gpu_bench.COST_ORDER.count("lora") == gpu_bench.COST_ORDER.count("w2s") == 2


def test_cpu_smoke_shrinks_every_size_and_writes_beside_its_runs(gpu_bench):
    a = gpu_bench.parse_args(["--cpu-smoke", "--batch-size", "4", "--student", "some/model"])
    grid = gpu_bench.build_grid(a)
    assert grid.methods == QUICKSTART["methods"]  # the same cells, smaller
    assert (grid.n_train, grid.epochs, grid.poison_epochs, grid.max_length, grid.batch_size) == (64, 1, 1, 32, 4)
    assert grid.students == ["some/model"] and grid.tag == "gpu-smoke"
    assert gpu_bench.out_path(a) == Path("runs/gpu-smoke/gpu.jsonl")  # never the committed results file
    assert gpu_bench.sizes(a)["epochs"] == grid.epochs  # the A/B trains both methods for the grid's epochs


def test_bad_arguments_fail_before_any_work(gpu_bench):
    with pytest.raises(SystemExit):
        gpu_bench.parse_args(["--dtype", "fp64"])
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            gpu_bench.build_grid(gpu_bench.parse_args(["--cpu-smoke", "--dtype", "fp16"]))
