"""Bad model directories give one-line errors and exit 1, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from optiq.cli.main import main
from optiq.core.errors import ModelLoadError
from optiq.core.model_io import validate_model_dir

OPTIQ = str(Path(sys.executable).parent / "optiq")


def run_info(capsys, path) -> str:
    with pytest.raises(SystemExit) as exc:
        main(["info", str(path)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.fixture()
def model_copy(tmp_path, bundled_model_dir) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(bundled_model_dir, dst)
    return dst


def test_missing_directory(capsys, tmp_path):
    assert "does not exist" in run_info(capsys, tmp_path / "nope")


def test_directory_without_config(capsys, model_copy):
    (model_copy / "config.json").unlink()
    assert "no config.json" in run_info(capsys, model_copy)


def test_invalid_config_json(capsys, model_copy):
    (model_copy / "config.json").write_text("{not json")
    assert "not valid JSON" in run_info(capsys, model_copy)


def test_directory_without_tokenizer(capsys, model_copy):
    (model_copy / "tokenizer.json").unlink()
    assert "no tokenizer.json" in run_info(capsys, model_copy)


def test_unsupported_model_type(capsys, model_copy):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"] = "frobnicator9000"
    (model_copy / "config.json").write_text(json.dumps(cfg))
    assert "unsupported model_type 'frobnicator9000'" in run_info(capsys, model_copy)


def test_truncated_safetensors(capsys, model_copy):
    weights = next(model_copy.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert "truncated" in run_info(capsys, model_copy)


def test_garbage_safetensors(model_copy):
    next(model_copy.glob("*.safetensors")).write_bytes(b"\xff" * 4)
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        validate_model_dir(model_copy)


def test_no_weights(capsys, model_copy):
    for f in model_copy.glob("*.safetensors"):
        f.unlink()
    assert "no *.safetensors" in run_info(capsys, model_copy)


def test_console_script_error_is_one_line(tmp_path):
    proc = subprocess.run([OPTIQ, "info", str(tmp_path / "missing")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"error: model directory {tmp_path / 'missing'} does not exist"]


def test_help_and_version():
    out = subprocess.run([OPTIQ, "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("info", "convert", "kv-cache", "serve", "lora", "eval"):
        assert cmd in out
    ver = subprocess.run([OPTIQ, "--version"], capture_output=True, text=True, check=True).stdout
    assert ver.strip() == "optiq, version 0.1.0"


def _adapter_dir(tmp_path, config) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(config))
    return d


@pytest.mark.parametrize("config, says", [
    ({"fine_tune_type": "lora", "model": "/nowhere/base-model"}, "/nowhere/base-model"),
    ({"fine_tune_type": "lora"}, "does not name the adapter's base model"),
])
def test_fuse_without_a_readable_base_is_an_error_not_the_bundled_model(capsys, tmp_path, config, says):
    adapter = _adapter_dir(tmp_path, config)
    out = tmp_path / "fused"
    with pytest.raises(SystemExit) as exc:
        main(["lora", "fuse", "--adapter", str(adapter), "-o", str(out)])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert says in err and "pass the base model as MODEL" in err
    assert not out.exists()  # nothing was fused into a model the adapter was not trained on
