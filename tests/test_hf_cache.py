"""MODEL as a Hugging Face id ``org/name``, read from the local cache only (no network):
the bundled model placed into a temporary cache in the hub's layout, then loaded by id."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from optiq.cli.main import main
from optiq.core.errors import ModelLoadError
from optiq.core.model_io import hf_hub_cache, model_name, resolve_model_path, validate_model_dir

MODEL_ID = "optiq-test/tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def place_in_hub_cache(src: Path, cache: Path, model_id: str, revision: str = REVISION) -> Path:
    """Lay ``src`` out as huggingface_hub does: content-addressed blobs, a snapshot of
    symlinks to them and ``refs/main`` naming the revision. Returns the snapshot dir."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if not f.is_file():
            continue
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


@pytest.fixture()
def hub(tmp_path, bundled_model_dir, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    snapshot = place_in_hub_cache(bundled_model_dir, cache, MODEL_ID)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no ./optiq-test/tiny here: the id is an id
    return snapshot


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cache_location_follows_the_hub_environment(tmp_path, monkeypatch):
    for var in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hf_hub_cache() == tmp_path / "home" / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hf_hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hf_hub_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hf_hub_cache() == tmp_path / "c"


def test_id_resolves_to_the_snapshot_refs_main_names(hub, tmp_path, monkeypatch):
    assert resolve_model_path(MODEL_ID) == hub
    assert model_name(hub) == MODEL_ID
    # the same cache found through HF_HOME
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model_path(MODEL_ID) == hub


def test_a_local_directory_wins_over_an_id(hub, tmp_path):
    local = tmp_path / "optiq-test" / "tiny"
    local.mkdir(parents=True)
    assert resolve_model_path(MODEL_ID) == Path(MODEL_ID)  # relative to the cwd, as given
    assert resolve_model_path(MODEL_ID).resolve() == local.resolve()


def test_cli_info_by_id(hub, capsys):
    code, out, err = run(capsys, "info", MODEL_ID, "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["path"] == str(hub)
    assert data["parameters"] == 2_243_184 and data["model_type"] == "qwen3_5"
    assert data["disk_bytes"] > 4_000_000  # sizes follow the snapshot's symlinks to the blobs


@pytest.mark.slow
def test_cli_eval_by_id_with_an_id_reference(hub, capsys, bundled_model_dir):
    code, out, err = run(capsys, "eval", MODEL_ID, "--reference", MODEL_ID, "--max-tokens", "256",
                         "--seq-len", "128", "--json")
    assert code == 0, err
    by_id = json.loads(out)
    assert by_id["model"] == str(hub) and by_id["reference"] == str(hub)
    assert by_id["mean_kl"] < 1e-6  # the same weights
    code, out, err = run(capsys, "eval", str(bundled_model_dir), "--max-tokens", "256",
                         "--seq-len", "128", "--json")
    assert code == 0, err
    assert json.loads(out)["perplexity"] == pytest.approx(by_id["perplexity"])


def test_id_not_in_the_cache_is_a_one_line_error_naming_the_cache(hub, capsys):
    code, _, err = run(capsys, "info", "nobody/nothing")
    assert code == 1
    err = err.strip()
    assert err.startswith("error: ") and "\n" not in err
    cache = hf_hub_cache()
    assert f"not in the local cache {cache}" in err and str(cache / "models--nobody--nothing") in err
    assert "huggingface-cli download nobody/nothing" in err


def test_broken_cache_entries_are_errors(hub):
    ref = hub.parent.parent / "refs" / "main"
    ref.write_text("feedface" * 5)
    with pytest.raises(ModelLoadError, match=r"names revision 'feedfacefeedface.*' but .* is missing"):
        resolve_model_path(MODEL_ID)
    ref.unlink()
    with pytest.raises(ModelLoadError, match=rf"has no refs/main .*snapshots there: {REVISION}"):
        resolve_model_path(MODEL_ID)


def test_paths_are_never_taken_for_ids(hub, tmp_path):
    for given in ("./nobody/nothing", str(tmp_path / "nobody" / "nothing"), "nothing"):
        with pytest.raises(ModelLoadError, match="does not exist"):
            validate_model_dir(given)


def test_serve_takes_an_id(hub):
    from optiq.runtime.config import ServeConfig
    from optiq.runtime.server import GenerationServer

    srv = GenerationServer(ServeConfig(model=MODEL_ID, port=0))  # validates, loads nothing yet
    assert srv.model_dir == hub
