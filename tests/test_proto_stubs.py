"""The committed optiq.v1 stubs match proto/ and import without MLX."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _gen_proto_module():
    spec = importlib.util.spec_from_file_location("gen_proto", REPO / "tools" / "gen_proto.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_fresh():
    gen = _gen_proto_module()
    stale = gen.stale_files()
    assert not stale, f"stale optiq.v1 stubs {stale}: run `uv run python tools/gen_proto.py`"


def test_stubs_import_without_mlx():
    code = (
        "import sys\n"
        "from optiq.v1 import generation_pb2 as pb, generation_pb2_grpc as rpc, proto_files\n"
        "assert 'mlx' not in sys.modules, sorted(m for m in sys.modules if 'mlx' in m)\n"
        "assert hasattr(rpc, 'GenerationServiceStub')\n"
        "names = [p.name for p in proto_files()]\n"
        "assert 'generation.proto' in names, names\n"
        "print(pb.DESCRIPTOR.package)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "optiq.v1"


def test_contract_shape():
    """The contract keeps what clients rely on: unset != zero, exactly-once enums."""
    from optiq.v1 import generation_pb2 as pb

    sampling = pb.SamplingParams()
    assert not sampling.HasField("temperature")
    sampling.temperature = 0.0
    assert sampling.HasField("temperature")
    assert pb.FinishReason.Value("FINISH_REASON_UNSPECIFIED") == 0
    assert pb.Channel.Value("CHANNEL_UNSPECIFIED") == 0
    for reason in ("LENGTH", "STOP", "EOS", "CANCELLED", "ERROR"):
        pb.FinishReason.Value(f"FINISH_REASON_{reason}")
    service = pb.DESCRIPTOR.services_by_name["GenerationService"]
    methods = {m.name: m for m in service.methods}
    assert set(methods) == {"Generate", "Tokenize", "Detokenize", "GetModelInfo", "GetLoad"}
    assert methods["Generate"].server_streaming is True
    assert pb.DESCRIPTOR.GetOptions().java_package == "dev.optiq.v1"
    assert pb.DESCRIPTOR.GetOptions().go_package.endswith(";optiqv1")
