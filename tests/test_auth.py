"""Bearer-token auth: the full matrix of no token, bad token and each role × method class."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clipsearch.settings import AuthSettings, load_settings
from clipsearch.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)
from gateway.auth import (
    TokenStore,
    digest,
    is_loopback,
    method_class,
    parse_plain_tokens,
    parse_tokens_file,
)
from gateway.server import check_exposure
from tests.gateway_harness import DIM, bearer, code_of, gateway

TOKENS = {"reader": "r-secret", "writer": "w-secret", "admin": "a-secret"}
ROLE_OF_TOKEN = {"reader": "read", "writer": "write", "admin": "admin"}
OK, UNAUTH, DENIED = (
    grpc.StatusCode.OK,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)


def _calls(channel: grpc.aio.Channel) -> dict[str, tuple[str, object]]:
    """One valid call per method: method -> (class, factory(metadata) -> awaitable)."""
    search = search_pb2_grpc.SearchServiceStub(channel)
    encoder = encoder_pb2_grpc.EncoderServiceStub(channel)
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    vec = {"values": [1.0] + [0.0] * (DIM - 1)}
    doc = search_pb2.UpsertDocument(id="a", image_vector=vec)
    return {
        "Search": ("read", lambda md: search.Search(
            search_pb2.SearchRequest(text="a red circle", top_k=3), metadata=md, timeout=10)),
        "Get": ("read", lambda md: search.Get(
            search_pb2.GetRequest(ids=["a"], allow_missing=True), metadata=md, timeout=10)),
        "EncodeText": ("read", lambda md: encoder.EncodeText(
            encoder_pb2.EncodeTextRequest(texts=["x"]), metadata=md, timeout=10)),
        "Upsert": ("write", lambda md: search.Upsert(
            search_pb2.UpsertRequest(documents=[doc]), metadata=md, timeout=10)),
        "Delete": ("write", lambda md: search.Delete(
            search_pb2.DeleteRequest(ids=["zzz"]), metadata=md, timeout=10)),
        "Stats": ("admin", lambda md: admin.Stats(
            admin_pb2.StatsRequest(), metadata=md, timeout=10)),
    }  # fmt: skip


def _token_settings() -> dict[str, object]:
    plain = ";".join(f"{ROLE_OF_TOKEN[name]}={tok}" for name, tok in TOKENS.items())
    return {"auth": {"tokens": plain}}


async def test_auth_matrix() -> None:
    async with gateway(**_token_settings()) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls = _calls(channel)
            for method, (klass, call) in calls.items():
                assert await code_of(call(())) == UNAUTH, method
                assert await code_of(call(bearer("not-a-token"))) == UNAUTH, method
                assert await code_of(call((("authorization", "r-secret"),))) == UNAUTH, method
                assert await code_of(call((("authorization", "Bearer "),))) == UNAUTH, method
                for name, token in TOKENS.items():
                    expected = OK if ROLE_OF_TOKEN[name] == klass else DENIED
                    assert await code_of(call(bearer(token))) == expected, (method, name)


async def test_refusals_name_the_problem_and_never_the_token() -> None:
    async with gateway(**_token_settings()) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = admin_pb2_grpc.AdminServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Stats(admin_pb2.StatsRequest(), metadata=bearer("r-secret"))
            assert err.value.code() == DENIED and "admin" in err.value.details()
            assert "r-secret" not in err.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Stats(admin_pb2.StatsRequest(), metadata=bearer("guess"))
            assert "guess" not in err.value.details()
            ids = dict(err.value.trailing_metadata() or ())
            assert ids.get("x-request-id")  # refused calls still get a request id


async def test_the_token_is_checked_before_the_body_is_parsed() -> None:
    garbage = b"\xff\xff\xff\xff"  # not a protobuf message
    async with gateway(**_token_settings()) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            raw = channel.unary_unary("/clipsearch.v1.SearchService/Search")
            assert await code_of(raw(garbage, timeout=10)) == UNAUTH
            assert await code_of(raw(garbage, metadata=bearer("w-secret"), timeout=10)) == DENIED
            bad = await code_of(raw(garbage, metadata=bearer("r-secret"), timeout=10))
            assert bad == grpc.StatusCode.INVALID_ARGUMENT


async def test_health_and_reflection_stay_open() -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with gateway(**_token_settings()) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            async for answer in refl.ServerReflectionInfo(iter([request]), timeout=10):
                names = {s.name for s in answer.list_services_response.service}
                assert "clipsearch.v1.SearchService" in names
                break


async def test_tokens_file_holds_digests(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(
        f"# comment\n{digest('file-reader').hex()} read reader\n"
        f"{digest('file-both').hex()} read,write\n"
    )
    async with gateway(auth={"tokens_file": str(path)}) as (port, _):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            calls = _calls(channel)
            assert await code_of(calls["Search"][1](bearer("file-reader"))) == OK
            assert await code_of(calls["Delete"][1](bearer("file-reader"))) == DENIED
            assert await code_of(calls["Delete"][1](bearer("file-both"))) == OK
            assert await code_of(calls["Search"][1](bearer(digest("file-reader").hex()))) == UNAUTH


def test_store_lookup_and_parsing() -> None:
    store = TokenStore(parse_plain_tokens("read=a;read,admin=b=c"))
    assert store.lookup("a").roles == {"read"}  # type: ignore[union-attr]
    assert store.lookup("b=c").roles == {"read", "admin"}  # type: ignore[union-attr]
    assert store.lookup("b") is None and store.lookup("") is None
    for bad in ("read", "=tok", "root=tok", "read="):
        with pytest.raises(ValueError):
            parse_plain_tokens(bad)
    for bad in ("abc read", f"{'zz' * 32} read", f"{'00' * 32} superuser"):
        with pytest.raises(ValueError, match="line 1"):
            parse_tokens_file(bad)


def test_method_classes() -> None:
    assert method_class("/clipsearch.v1.SearchService/Search") == "read"
    assert method_class("/clipsearch.v1.SearchService/Upsert") == "write"
    assert method_class("/clipsearch.v1.AdminService/Stats") == "admin"
    assert method_class("/clipsearch.v1.AdminService/SomethingNew") == "admin"
    assert method_class("/grpc.health.v1.Health/Check") == "open"
    assert method_class("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == "open"


def test_auth_off_only_on_loopback_unless_told() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3")
    check_exposure(load_settings(), auth_on=False, tls_on=False)
    exposed = load_settings(gateway={"host": "0.0.0.0"})
    with pytest.raises(ValueError, match="allow_insecure"):
        check_exposure(exposed, auth_on=False, tls_on=False)
    check_exposure(exposed, auth_on=True, tls_on=False)
    check_exposure(exposed, auth_on=False, tls_on=True)
    check_exposure(load_settings(gateway={"host": "0.0.0.0", "allow_insecure": True}), False, False)


def test_enabled_without_tokens_is_a_configuration_error() -> None:
    from gateway.auth import authenticator_for

    with pytest.raises(ValueError, match="no tokens"):
        authenticator_for(AuthSettings(enabled=True))
    assert authenticator_for(AuthSettings()) is None
    assert authenticator_for(AuthSettings(tokens="read=x")) is not None  # type: ignore[arg-type]
    assert authenticator_for(AuthSettings(enabled=False, tokens="read=x")) is None  # type: ignore[arg-type]
