"""What a client author gets without this repo's Python: the shipped health.proto matches
the health service the server runs, and reflection answers on grpc.reflection.v1 as well
as v1alpha (checked with a client built from the standard v1 reflection.proto)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2

from optiq.core.errors import ModelLoadError
from optiq.runtime import reflection
from optiq.runtime.client import Client
from optiq.runtime.config import ServeConfig
from serving import HANG_S

REPO = Path(__file__).resolve().parents[1]
# the standard grpc/reflection/v1/reflection.proto (Debian's grpc-proto package), test data
TEST_PROTOS = Path(__file__).resolve().parent / "protos"


def compile_proto(root: Path, name: str, tmp: Path) -> descriptor_pb2.FileDescriptorProto:
    """``name`` under ``root`` compiled by protoc (grpcio-tools) into a descriptor."""
    from grpc_tools import protoc

    out = tmp / "set.pb"
    assert protoc.main(["protoc", f"-I{root}", f"--descriptor_set_out={out}", name]) == 0
    fds = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    (fdp,) = fds.file
    return fdp


def shape(fdp: descriptor_pb2.FileDescriptorProto, keep_options: bool = False) -> descriptor_pb2.FileDescriptorProto:
    """The descriptor without file name, comments, json names and declaration order."""

    def drop_json_names(messages) -> None:
        for m in messages:
            for field in m.field:
                field.ClearField("json_name")
            drop_json_names(m.nested_type)

    f = descriptor_pb2.FileDescriptorProto()
    f.CopyFrom(fdp)
    f.ClearField("name")
    f.ClearField("source_code_info")
    if not keep_options:
        f.ClearField("options")
    messages = sorted(f.message_type, key=lambda m: m.name)
    f.ClearField("message_type")
    f.message_type.extend(messages)
    drop_json_names(f.message_type)
    for s in f.service:
        methods = sorted(s.method, key=lambda m: m.name)
        s.ClearField("method")
        s.method.extend(methods)
    return f


def test_shipped_health_proto_is_the_service_the_server_runs(tmp_path):
    shipped = compile_proto(REPO / "proto", "grpc/health/v1/health.proto", tmp_path)
    served = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(served)
    assert shipped.package == "grpc.health.v1"
    assert shape(shipped) == shape(served)
    assert {m.name for m in shipped.service[0].method} == {"Check", "List", "Watch"}


def test_v1_descriptor_equals_the_standard_v1_reflection_proto(tmp_path):
    standard = compile_proto(TEST_PROTOS, "grpc/reflection/v1/reflection.proto", tmp_path)
    derived = reflection.v1_file_descriptor()
    assert derived.name == standard.name == "grpc/reflection/v1/reflection.proto"
    assert shape(derived, keep_options=True) == shape(standard, keep_options=True)


def _v1_classes(tmp_path):
    """ServerReflectionRequest/Response of the standard v1 proto, in a pool of their own
    (so nothing the server registered is reused by the client)."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(compile_proto(TEST_PROTOS, "grpc/reflection/v1/reflection.proto", tmp_path))
    return tuple(
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{n}"))
        for n in ("ServerReflectionRequest", "ServerReflectionResponse")
    )


def _reflect(channel, method: str, request, response_cls):
    call = channel.stream_stream(
        method, request_serializer=type(request).SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    (response,) = list(call(iter([request]), timeout=HANG_S))
    return response


@pytest.fixture(scope="module")
def server(bundled_model_dir):
    """A server whose model never loads: reflection and health answer regardless."""
    from optiq.runtime.server import GenerationServer

    def no_model():
        raise ModelLoadError("not needed: reflection only")

    srv = GenerationServer(ServeConfig(model=str(bundled_model_dir), port=0), loader=no_model)
    srv.start()
    with pytest.raises(ModelLoadError):
        srv.wait_ready(HANG_S)
    yield srv
    srv.shutdown(0)


def test_reflection_v1_lists_and_describes_services(server, tmp_path):
    Request, Response = _v1_classes(tmp_path)
    with Client(f"127.0.0.1:{server.port}") as c:
        path = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
        listed = _reflect(c.channel, path, Request(list_services=""), Response)
        names = {s.name for s in listed.list_services_response.service}
        assert names == {"optiq.v1.GenerationService", "grpc.health.v1.Health",
                         "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
        for symbol, package in [("optiq.v1.GenerationService", "optiq.v1"),
                                ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1")]:
            found = _reflect(c.channel, path, Request(file_containing_symbol=symbol), Response)
            assert found.WhichOneof("message_response") == "file_descriptor_response", found
            files = [descriptor_pb2.FileDescriptorProto.FromString(b)
                     for b in found.file_descriptor_response.file_descriptor_proto]
            assert package in {f.package for f in files}
        missing = _reflect(c.channel, path, Request(file_containing_symbol="no.such.Symbol"), Response)
        assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_reflection_v1alpha_still_answers(server):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with Client(f"127.0.0.1:{server.port}") as c:
        db = ProtoReflectionDescriptorDatabase(c.channel)
        assert "grpc.reflection.v1.ServerReflection" in set(db.get_services())
        assert db.FindFileContainingSymbol("optiq.v1.GenerationService").package == "optiq.v1"
