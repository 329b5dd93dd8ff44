"""Benchmark scripts fail loudly when their setup fails (never measure a stand-in model)."""

from __future__ import annotations

import importlib.util

import pytest


def _load(repo_root, name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", repo_root / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lora_benchmark_stops_when_convert_fails(repo_root, tmp_path):
    bench = _load(repo_root, "lora_train")
    missing = tmp_path / "no-such-model"
    with pytest.raises(bench.ConvertFailed, match=r"failed \(exit 1\): error: model directory .*no-such-model"):
        bench.quantized_model(missing, tmp_path / "out", [])
    assert not list((tmp_path / "out").iterdir())  # no hand-made model in its place
