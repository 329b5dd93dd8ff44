"""Every package builds as a wheel and installs alone in a fresh virtual environment."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

# package -> (import to try, modules that must NOT get installed with it)
PACKAGES = {
    "optiq_proto": ("import optiq.v1", ("mlx", "mlx_lm")),
    "optiq_core": (
        # the bundled model and its OptiQ quant ship inside the wheel; the quant loads
        # with stock mlx-lm and keeps its convert metadata (by_bits reads it)
        "import optiq.core, optiq.core.cpu; from optiq.core.model_io import validate_model_dir; "
        "validate_model_dir(None); q, _ = validate_model_dir('bundled-quant'); "
        "assert (q / 'optiq_metadata.json').is_file(); "
        "import json; from mlx_lm import load; m, _ = load(str(q)); "
        "c = json.loads((q / 'config.json').read_text())['quantization']; "
        "assert m.layers[3].self_attn.q_proj.bits == "
        "c['language_model.model.layers.3.self_attn.q_proj']['bits']",
        ("grpc",),
    ),
    "optiq_train": ("import optiq.train", ("grpc",)),
    # compiled against MLX's C++ library; must load beside the mlx it was built for
    "optiq_kernels": (
        "import mlx.core as mx, optiq.kernels as k; "
        "w, s, b = mx.quantize(mx.ones((1, 1, 8, 64), dtype=mx.float16)); "
        "o = k.quantized_decode_attention(mx.ones((1, 1, 1, 64)), (w, s, b), (w, s, b), k_bits=4, v_bits=4, group_size=64); "
        "assert mx.allclose(o, mx.ones((1, 1, 1, 64))).item()",
        ("mlx_lm", "grpc"),
    ),
    "optiq_runtime": ("import optiq.runtime, optiq.v1", ()),
    "optiq_cli": ("import optiq.cli.main", ()),
}


@pytest.fixture(scope="module")
def dist(tmp_path_factory, repo_root):
    uv = shutil.which("uv")
    if uv is None:
        pytest.fail("uv is required to build the wheels (pip install uv)")
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([uv, "build", "--all-packages", "--wheel", "-o", str(out), "-q"], cwd=repo_root, check=True)
    return out


@pytest.mark.parametrize("name", sorted(PACKAGES))
def test_wheel_installs_alone(name, dist, tmp_path):
    uv = shutil.which("uv")
    wheels = list(dist.glob(f"{name}-*.whl"))
    assert len(wheels) == 1, f"expected one wheel for {name}, found {wheels}"
    venv = tmp_path / "venv"
    py = venv / "bin" / "python"
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    # siblings (e.g. optiq-core for optiq-train) come from the freshly built wheels only
    subprocess.run(
        [uv, "pip", "install", "-q", "--python", str(py), "--find-links", str(dist), str(wheels[0])],
        check=True,
    )
    code, forbidden = PACKAGES[name]
    subprocess.run([str(py), "-c", code], check=True)
    for mod in forbidden:
        probe = f"import importlib.util, sys; sys.exit(importlib.util.find_spec('{mod}') is not None)"
        assert subprocess.run([str(py), "-c", probe]).returncode == 0, f"{name} pulled in {mod}"
