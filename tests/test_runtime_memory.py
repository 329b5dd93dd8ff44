"""The server's memory estimate: it matches what the CPU path holds, and serving refuses
over the limit with one line before anything loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from mlx.utils import tree_flatten

from optiq.core.errors import ConfigError, MemoryBudgetError
from optiq.core.model_io import bundled_quant_path, has_bundled_quant, load_model, validate_model_dir
from optiq.runtime.config import ServeConfig
from optiq.runtime.footprint import estimate

MODELS = ["bundled"] + (["bundled-quant"] if has_bundled_quant() else [])


@pytest.mark.parametrize("name", MODELS)
def test_weights_estimate_is_what_the_cpu_path_holds(name):
    """Estimated from the safetensors headers before loading: fp32 floats (scales, biases,
    norms, an unquantized model's weights) and packed quantized weights, to the byte."""
    path, config = validate_model_dir(name)
    fp = estimate(path, config, ServeConfig(model=name), cpu=True)
    held = sum(p.nbytes for _, p in tree_flatten(load_model(path).model.parameters()))
    assert fp.parts["weights"] == held
    assert fp.fp32 and fp.peak > held


@pytest.mark.skipif(not has_bundled_quant(), reason="bundled quant not built")
def test_largest_dequantized_layer_reads_per_layer_bits():
    """The bundled quant's 8-bit embedding (2048 x 128) is its largest layer in fp32."""
    path, config = validate_model_dir(bundled_quant_path())
    fp = estimate(path, config, ServeConfig(model=str(path)), cpu=True)
    assert fp.parts["largest dequantized layer"] == 2 * 2048 * 128 * 4  # dequantize peaks at 2x


def test_cache_part_follows_max_context():
    path, config = validate_model_dir("bundled")
    small = estimate(path, config, ServeConfig(max_context=256), cpu=True)
    big = estimate(path, config, ServeConfig(max_context=4096), cpu=True)
    (k_small,) = [k for k in small.parts if k.startswith("cache per request")]
    (k_big,) = [k for k in big.parts if k.startswith("cache per request")]
    assert "256 tokens" in k_small and "4096 tokens" in k_big
    assert big.parts[k_big] > small.parts[k_small]


def test_max_memory_sets_prompt_cache_share():
    assert ServeConfig(max_memory_gb=8).prompt_cache_budget() == 1 << 30
    assert ServeConfig(max_memory_gb=8, prompt_cache_bytes=5).prompt_cache_budget() == 5
    assert ServeConfig().prompt_cache_budget() is None
    with pytest.raises(ConfigError, match="--max-memory"):
        ServeConfig(max_memory_gb=0).check()


def test_server_refuses_over_max_memory_before_loading():
    from optiq.runtime.server import GenerationServer

    def never(): raise AssertionError("the model must not load")

    with pytest.raises(MemoryBudgetError, match=r"will not fit in memory to serve: .*limit 0\.05 GB --max-memory: .*raise --max-memory"):
        GenerationServer(ServeConfig(model="bundled", port=0, max_memory_gb=0.05), loader=never)


def test_cli_serve_refusal_is_one_line():
    r = subprocess.run([sys.executable, "-m", "optiq.cli.main", "serve", "--port", "0", "--max-memory", "0.05"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the model will not fit in memory to serve: weights"), r.stderr
    assert "weights" in lines[0] and "in the CPU's fp32 compute path" in lines[0]
