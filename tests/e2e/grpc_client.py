"""An independent gRPC client of a murmur node, for the end-to-end tests.

It shares no code with murmur and has no .proto files: it learns the
services and message types from the node's server reflection, builds the
messages dynamically, and checks health with the stock grpc.health.v1 client
(grpcio, grpcio-reflection, grpcio-health-checking from PyPI).

    python grpc_client.py ADDR services
    python grpc_client.py ADDR health [SERVICE]
    python grpc_client.py ADDR call METHOD [JSON_REQUEST] [--token TOKEN]
    python grpc_client.py ADDR watchers N

`call` invokes murmur.v1.NodeService/METHOD (unary) and prints the response as
JSON with the .proto field names; a failed call prints {"code", "details"}.
`watchers` opens N WatchStatus streams at once, reads the first status of
each while holding all open, and prints how many opened and the codes of
those refused.
Every result goes to stdout as one JSON document.
"""

import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICE = "murmur.v1.NodeService"
TIMEOUT_S = 10


def services(channel):
    return sorted(ProtoReflectionDescriptorDatabase(channel).get_services())


def health(channel, service):
    stub = health_pb2_grpc.HealthStub(channel)
    reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT_S)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def call(channel, method, request_json, token):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    service = pool.FindServiceByName(SERVICE)
    m = service.FindMethodByName(method)
    request_type = message_factory.GetMessageClass(m.input_type)
    response_type = message_factory.GetMessageClass(m.output_type)
    request = json_format.Parse(request_json, request_type())
    stub = channel.unary_unary(
        f"/{SERVICE}/{method}",
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    metadata = [("authorization", f"Bearer {token}")] if token else None
    reply = stub(request, timeout=TIMEOUT_S, metadata=metadata)
    return json_format.MessageToDict(reply, preserving_proto_field_name=True)


def watchers(channel, n):
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    m = pool.FindServiceByName(SERVICE).FindMethodByName("WatchStatus")
    request_type = message_factory.GetMessageClass(m.input_type)
    response_type = message_factory.GetMessageClass(m.output_type)
    stub = channel.unary_stream(
        f"/{SERVICE}/WatchStatus",
        request_serializer=lambda r: r.SerializeToString(),
        response_deserializer=response_type.FromString,
    )
    held, refused = [], []
    for _ in range(n):
        stream = stub(request_type(), timeout=TIMEOUT_S)
        try:
            next(stream)
            held.append(stream)
        except grpc.RpcError as e:
            refused.append(e.code().name)
    for stream in held:
        stream.cancel()
    return {"opened": len(held), "refused": refused}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("addr")
    p.add_argument("what", choices=["services", "health", "call", "watchers"])
    p.add_argument("args", nargs="*")
    p.add_argument("--token")
    a = p.parse_args()
    with grpc.insecure_channel(a.addr) as channel:
        try:
            if a.what == "services":
                out = services(channel)
            elif a.what == "health":
                out = health(channel, a.args[0] if a.args else "")
            elif a.what == "watchers":
                out = watchers(channel, int(a.args[0]))
            else:
                method = a.args[0]
                request_json = a.args[1] if len(a.args) > 1 else "{}"
                out = call(channel, method, request_json, a.token)
        except grpc.RpcError as e:
            out = {"code": e.code().name, "details": e.details()}
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
