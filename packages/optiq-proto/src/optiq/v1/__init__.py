"""The OptiQ gRPC contract, version 1 (protobuf package ``optiq.v1``).

Generated stubs (no MLX needed): ``from optiq.v1 import generation_pb2,
generation_pb2_grpc``. Regenerate them with ``tools/gen_proto.py``. The ``.proto``
files ship next to the stubs (:func:`proto_files`) so other languages can use them.
"""

from __future__ import annotations

from pathlib import Path

SERVICE_NAME = "optiq.v1.GenerationService"


def proto_files() -> list[Path]:
    """The contract's ``.proto`` files as installed with this package."""
    return sorted(Path(__file__).parent.glob("*.proto"))
