"""Shared test setup: hypothesis profiles and the backend fixture every spec runs under."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import minilora as ml
from minilora import backend as bk

# `make test` runs with --hypothesis-profile=ci: a fixed example count, no deadline (shared CI machines).
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev", max_examples=10, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough", max_examples=300, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

os.environ.setdefault("MPLBACKEND", "Agg")

# benchmarks/ (the harness and the PyTorch twin the oracle tests compare with) is imported from the repository root
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _backend_params():
    # "strict": NumPy with CuPy's rules, so every spec also proves it would run on a GPU (no GPU needed)
    params = [pytest.param("numpy", id="numpy"), pytest.param("strict", id="strict")]
    if bk.cupy_available():
        params.append(pytest.param("cupy", id="cupy"))
    else:
        params.append(pytest.param("cupy", id="cupy", marks=pytest.mark.skip(reason="CuPy backend: no CuPy or no GPU here")))
    return params


@pytest.fixture(params=_backend_params())
def backend(request):
    """Run the test under numpy, strict and cupy (CuPy skipped with a reason when absent)."""
    with bk.use(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    ml.manual_seed(0)
    previous = bk.get_backend()
    yield
    bk.set_backend(previous)


def to_np(x):
    return bk.to_numpy(x)


def assert_close(actual, expected, rtol=1e-7, atol=1e-9, what=""):
    np.testing.assert_allclose(to_np(actual), to_np(expected), rtol=rtol, atol=atol, err_msg=what)
