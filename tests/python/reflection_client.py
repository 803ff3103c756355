#!/usr/bin/env python3
"""End-to-end check of strata-sidecar from Python, driven by server reflection only.

Usage: reflection_client.py --socket PATH [--token TOKEN]

No generated code and no .proto file: every message class comes from the server's
reflection service (grpc.reflection.v1alpha) through a protobuf DescriptorPool. Needs only
grpcio, grpcio-reflection and protobuf (scripts/python-env.sh installs them in .cache/pyenv).

Steps: list services (must include strata.v1.Cache, grpc.health.v1.Health and a reflection
service), Health/Check, Cache/OpenNamespace (f16, page-first, 16-token pages, 2 layers,
2 KV heads, head_dim 64: 16384-byte blocks), Put 32 tokens (2 pages), Lookup 48 tokens
(expect 2 of 3 pages), streaming Get of the 32 tokens (header, then the 2 blocks as put),
Stats. Prints one JSON line and exits 0, or prints the error to stderr and exits 1.

Note: grpc-core sends the percent-encoded socket path as :authority on unix: channels
(e.g. "tmp%2Fs.sock"), which the Rust h2 server rejects with RST_STREAM(PROTOCOL_ERROR);
so the channel sets grpc.default_authority to "localhost".
"""
import argparse
import json
import sys

import grpc
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

PAGE, BLOCK = 16, 16384


class Check(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Check(what)


def block(i):
    return bytes((j * 7 + i * 31) % 256 for j in range(BLOCK))


def run(args):
    channel = grpc.insecure_channel(
        f"unix:{args.socket}", options=[("grpc.default_authority", "localhost")]
    )
    try:
        grpc.channel_ready_future(channel).result(timeout=10)
    except grpc.FutureTimeoutError:
        raise Check(f"could not connect to unix:{args.socket} within 10 s")
    db = ProtoReflectionDescriptorDatabase(channel)
    pool = descriptor_pool.DescriptorPool(db)
    md = [("authorization", f"Bearer {args.token}")] if args.token else None

    services = sorted(db.get_services())
    for want in ("strata.v1.Cache", "grpc.health.v1.Health"):
        expect(want in services, f"service {want} not listed: {services}")
    expect(any(".ServerReflection" in s for s in services), f"no reflection service: {services}")

    def method(service, name):
        """Returns (request class, callable) for service/name, unary or server-streaming."""
        m = pool.FindServiceByName(service).FindMethodByName(name)
        req, resp = (message_factory.GetMessageClass(t) for t in (m.input_type, m.output_type))
        kind = channel.unary_stream if m.server_streaming else channel.unary_unary
        call = kind(
            f"/{service}/{name}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )
        return req, lambda **fields: call(req(**fields), metadata=md, timeout=30)

    _, check = method("grpc.health.v1.Health", "Check")
    health = check(service="")
    status = health.DESCRIPTOR.fields_by_name["status"].enum_type.values_by_number[health.status].name
    expect(status == "SERVING", f"health: {status}")

    _, open_ns = method("strata.v1.Cache", "OpenNamespace")
    ns = open_ns(
        model_fingerprint=b"\x42" * 32, dtype=2, layout=1,  # KV_DTYPE_F16, KV_LAYOUT_PAGE_FIRST
        page_size=PAGE, num_layers=2, num_kv_heads=2, head_dim=64,
    )
    expect(ns.namespace, "OpenNamespace: empty namespace")
    expect((ns.block_bytes, ns.page_size) == (BLOCK, PAGE), f"OpenNamespace: {ns}")

    tokens = list(range(1000, 1032))
    blocks = [block(0), block(1)]
    _, put = method("strata.v1.Cache", "Put")
    p = put(namespace=ns.namespace, tokens=tokens, blocks=blocks)
    expect(p.pages == 2 and p.stored + p.existing == 2, f"Put: {p}")

    _, lookup = method("strata.v1.Cache", "Lookup")
    lk = lookup(namespace=ns.namespace, tokens=tokens + list(range(2000, 2016)))
    expect((lk.matched_pages, lk.requested_pages) == (2, 3), f"Lookup: {lk}")

    _, get = method("strata.v1.Cache", "Get")
    msgs = list(get(namespace=ns.namespace, tokens=tokens))
    expect(msgs, "Get: empty stream")
    head, rest = msgs[0], msgs[1:]
    expect(head.matched_pages == 2 and not head.block, f"Get header: matched_pages={head.matched_pages} block={len(head.block)}B")
    got = [m.block for m in rest]
    expect(len(got) == 2, f"Get: {len(got)} blocks, expected 2")
    expect(got == blocks, "Get: block bytes differ from what was put")

    _, stats = method("strata.v1.Cache", "Stats")
    st = stats()
    expect(st.pages >= 2, f"Stats: {st.pages} pages")

    return {
        "services": services,
        "health": status,
        "namespace": ns.namespace,
        "lookup": {"matched_pages": lk.matched_pages, "requested_pages": lk.requested_pages},
        "get_blocks": len(got),
        "get_ok": True,
        "stats_pages": st.pages,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True, help="sidecar gRPC Unix socket path")
    ap.add_argument("--token", help="bearer token (sent as authorization metadata)")
    args = ap.parse_args()
    try:
        print(json.dumps(run(args)))
    except Check as e:
        print(f"reflection_client: check failed: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"reflection_client: RPC failed: {e.code()} {e.details()}", file=sys.stderr)
        return 1
    except KeyError as e:  # a service, method or type missing from reflection
        print(f"reflection_client: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
