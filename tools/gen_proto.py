"""Regenerate the Python gRPC stubs of the OptiQ contract (``proto/optiq/v1``).

The stubs are committed in ``packages/optiq-proto/src/optiq/v1/`` so that installing
``optiq-proto`` needs neither protoc nor grpcio-tools; ``tests/test_proto_stubs.py``
fails when they are stale. A copy of each ``.proto`` file goes into the package too,
so users of other languages can take the contract from the wheel.

Usage::

    uv run python tools/gen_proto.py            # rewrite the committed stubs
    uv run python tools/gen_proto.py --check    # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROTO_ROOT = REPO / "proto"
PACKAGE = "optiq/v1"
STUB_DIR = REPO / "packages" / "optiq-proto" / "src" / PACKAGE


def proto_files() -> list[Path]:
    return sorted((PROTO_ROOT / PACKAGE).glob("*.proto"))


def generate(out_root: Path) -> Path:
    """Write stubs (and proto copies) for every ``proto/optiq/v1/*.proto`` under
    ``out_root/optiq/v1``; returns that directory."""
    import grpc_tools
    from grpc_tools import protoc

    out_root.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    if not files:
        raise SystemExit(f"no .proto files in {PROTO_ROOT / PACKAGE}")
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed (see messages above)")
    out = out_root / PACKAGE
    for p in proto_files():
        shutil.copyfile(p, out / p.name)
    return out


def generated_names() -> list[str]:
    names = []
    for p in proto_files():
        stem = p.stem
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_pb2_grpc.py", p.name]
    return names


def stale_files(committed: Path = STUB_DIR) -> list[str]:
    """Names of generated files that differ from (or are missing in) ``committed``."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            name
            for name in generated_names()
            if not (committed / name).exists()
            or (committed / name).read_bytes() != (fresh / name).read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale stubs")
    args = ap.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale stubs: " + ", ".join(stale) + " (run: python tools/gen_proto.py)")
            return 1
        print("stubs are up to date")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        STUB_DIR.mkdir(parents=True, exist_ok=True)
        for name in generated_names():
            shutil.copyfile(fresh / name, STUB_DIR / name)
            print(f"wrote {(STUB_DIR / name).relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
