"""Shared fixtures. Importing optiq.core first preloads OpenBLAS before MLX loads."""

from __future__ import annotations

from pathlib import Path

import optiq.core  # noqa: F401  (OpenBLAS preload must precede any mlx import)
import pytest

from optiq.core.model_io import bundled_model_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The trained tiny Qwen3.5-style model shipped in optiq-core."""
    return bundled_model_path()


@pytest.fixture(scope="session")
def tiny_moe_dir(tmp_path_factory) -> Path:
    """A tiny qwen3_5_moe model with random weights, built once per test session."""
    from optiq.core.tiny_models import make_tiny_moe

    return make_tiny_moe(tmp_path_factory.mktemp("moe") / "optiq-tiny-moe", seed=0)


@pytest.fixture(scope="session")
def http_server(bundled_model_dir):
    """One `optiq serve --http-port 0` on the bundled model for the HTTP tests (greedy,
    2 slots + 2 queue places so limits are cheap to reach, a 256-token context)."""
    from serving import ServerProcess

    with ServerProcess(
        "--http-port", "0", "--max-concurrency", "2", "--max-queue", "2", "--temp", "0",
        "--max-context", "256", model=str(bundled_model_dir),
    ) as srv:
        yield srv
