"""Root conftest: test-wide environment and the `--benchmark` alias.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here,
before pytest imports any test module: on a CPU-only machine the Triton kernels then run in
Triton's interpreter on CPU tensors (docs/KERNELS.md, Testing under the interpreter).
"""

import os

import pytest

# Interpret Triton on CPU-only machines; on a GPU machine the kernels compile for the device
# (set TRITON_INTERPRET=1 yourself to force the interpreter there).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
# numpy's OpenBLAS threads spin-wait on a busy 2-core machine (40 ms instead of 0.3 ms for a
# small product): tests use one BLAS thread.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(os.path.dirname(__file__), ".numba_cache"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="alias for `--benchmark-only`: run only the benchmarks (pytest benchmarks/ --benchmark-only)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--benchmark", default=False):
        # Same run as `pytest benchmarks/ --benchmark-only`.
        config.option.benchmark_only = True
        # With no paths on the command line pytest collects `testpaths` (tests/ and benchmarks/):
        # narrow that to benchmarks/, so the alias collects exactly what the long form does.
        if config.args_source != pytest.Config.ArgsSource.ARGS:
            config.args = [str(config.rootpath / "benchmarks")]
