"""Shared test setup: CPU devices, the path to ../shared, tiny models."""

import os
from pathlib import Path

import pytest

# Tests run on the CPU, with 8 host devices so that sharding code paths are exercised.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("VTL_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_SHARED = Path(__file__).resolve().parents[2] / "shared"


def pytest_addoption(parser):
    parser.addoption(
        "--shared",
        default=os.environ.get("VTL_SHARED", str(DEFAULT_SHARED)),
        help="folder with data/ and weights/ (default: $VTL_SHARED or ../shared)",
    )


@pytest.fixture(scope="session")
def shared(request) -> Path:
    """The shared folder; tests that need it are skipped when it is absent."""
    path = Path(request.config.getoption("--shared"))
    if not path.is_dir():
        pytest.skip(f"shared folder {path} is absent (set VTL_SHARED or --shared)")
    return path


@pytest.fixture(scope="session")
def vgg16_notop(shared) -> Path:
    path = shared / "weights" / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def vehicles(shared) -> Path:
    path = shared / "data" / "vehicles4"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path
