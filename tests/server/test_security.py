"""Authentication (bearer tokens, session ownership), TLS with and without client certificates."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mouse_client import ActionClient, ActionError, RetryPolicy
from mouse_client.v1 import action_service_pb2 as pb
from mouse_client.v1 import action_service_pb2_grpc as pb_grpc
from tests.helpers import golden_cases
from tests.server_process import ServerProcess

CASE = next(c for c in golden_cases() if c.name == "llama_gqa_long")
NO_RETRY = RetryPolicy(max_attempts=1)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.txt"
    path.write_text("# one token per line\nalpha-token\n\nbeta-token\n")
    return path


@pytest.fixture
def auth_server(token_file: Path) -> Iterator[ServerProcess]:
    args = ["--model", str(CASE.checkpoint), "--token-file", str(token_file), "--max-sessions-per-token", "2"]
    with ServerProcess(*args) as server:
        yield server


def test_calls_without_a_valid_token_are_unauthenticated(auth_server: ServerProcess) -> None:
    for token in (None, "wrong-token"):
        with ActionClient(auth_server.target, token=token, retry=NO_RETRY) as client:
            for call in (client.list_models, client.open_session):
                with pytest.raises(ActionError) as info:
                    call()
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = pb_grpc.ActionServiceStub(channel)
        bad = (("authorization", "Basic abc"),)
        with pytest.raises(grpc.RpcError) as info:
            stub.OpenSession(pb.OpenSessionRequest(), metadata=bad)
        assert (
            info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in info.value.details()
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stub.StreamActions(iter([pb.StreamActionsRequest()])))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as info:
            stub.BatchGetAction(pb.BatchGetActionRequest(), metadata=(("authorization", "Bearer nope"),))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_need_no_token(auth_server: ServerProcess) -> None:
    with grpc.insecure_channel(auth_server.target) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
            ProtoReflectionDescriptorDatabase,
        )

        assert "mouse.action.v1.ActionService" in ProtoReflectionDescriptorDatabase(channel).get_services()


def test_sessions_belong_to_their_token(auth_server: ServerProcess) -> None:
    with (
        ActionClient(auth_server.target, token="alpha-token") as alpha,
        ActionClient(auth_server.target, token="beta-token", retry=NO_RETRY) as beta,
    ):
        session = alpha.open_session(temperature=0.0, recover=False)
        assert session.get_action(CASE.step_record(0, 0)) == CASE.greedy(0)[0]
        stub = beta.stub(session.id)
        md = beta.config.metadata(session.id)
        calls = [
            lambda: stub.GetAction(pb.GetActionRequest(session_id=session.id, seq=2), metadata=md),
            lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=session.id), metadata=md),
            lambda: stub.CloseSession(pb.CloseSessionRequest(session_id=session.id), metadata=md),
        ]
        for call in calls:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "belongs to another token" in info.value.details()
        assert session.get_action(CASE.step_record(0, 1)) == CASE.greedy(0)[1]  # untouched
        second = alpha.open_session()
        with pytest.raises(ActionError, match="RESOURCE_EXHAUSTED: this token already holds 2 sessions"):
            alpha.open_session()
        beta.open_session().close()  # the limit is per token
        second.close()
        session.close()


def test_token_file_is_reloaded(auth_server: ServerProcess, token_file: Path) -> None:
    with ActionClient(auth_server.target, token="beta-token", retry=NO_RETRY) as beta:
        beta.list_models()
    token_file.write_text("alpha-token\ngamma-token\n")
    deadline = time.monotonic() + 10
    while True:
        with ActionClient(auth_server.target, token="beta-token", retry=NO_RETRY) as beta:
            try:
                beta.list_models()
            except ActionError as err:
                assert err.code == grpc.StatusCode.UNAUTHENTICATED
                break
        assert time.monotonic() < deadline, "the token file was not reloaded"
        time.sleep(0.2)
    with ActionClient(auth_server.target, token="gamma-token") as gamma:
        assert gamma.list_models()


def test_a_deleted_token_file_revokes_every_token(auth_server: ServerProcess, token_file: Path) -> None:
    """Fail closed: once the file is gone no token is valid; when it is back, its tokens are."""
    with grpc.insecure_channel(auth_server.target) as channel:
        stub = pb_grpc.ActionServiceStub(channel)
        alpha = (("authorization", "Bearer alpha-token"),)
        stub.ListModels(pb.ListModelsRequest(), metadata=alpha)
        token_file.unlink()

        def refused() -> bool:
            try:
                stub.ListModels(pb.ListModelsRequest(), metadata=alpha)
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED
                return True
            return False

        deadline = time.monotonic() + 10
        while not refused():
            assert time.monotonic() < deadline, "the deleted token file's tokens stayed valid"
            time.sleep(0.2)
        token_file.write_text("alpha-token\n")
        while refused():
            assert time.monotonic() < deadline + 10, "the restored token file was not read"
            time.sleep(0.2)
    assert "cannot read token file" in auth_server.log


# -- TLS ----------------------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=mouse-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d


def _works(target: str, **kw: object) -> bool:
    with ActionClient(target, retry=NO_RETRY, timeout_s=5, **kw) as client:  # type: ignore[arg-type]
        try:
            with client.open_session(temperature=0.0) as s:
                return s.get_action(CASE.step_record(1, 0)) == CASE.greedy(1)[0]
        except ActionError as err:
            assert err.code == grpc.StatusCode.UNAVAILABLE, err
            return False


def test_tls(pki: Path) -> None:
    args = [
        "--model",
        str(CASE.checkpoint),
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
    ]
    with ServerProcess(*args) as server:
        assert "(TLS)" in server.log
        assert _works(server.target, root_certificates=(pki / "ca.pem").read_bytes())
        assert not _works(server.target)  # plaintext client
        assert not _works(server.target, tls=True)  # unknown CA


def test_tls_with_client_certificates(pki: Path) -> None:
    args = [
        "--model",
        str(CASE.checkpoint),
        "--tls-cert",
        str(pki / "server.pem"),
        "--tls-key",
        str(pki / "server.key"),
        "--tls-client-ca",
        str(pki / "ca.pem"),
    ]
    with ServerProcess(*args) as server:
        assert "client certificates required" in server.log
        ca = (pki / "ca.pem").read_bytes()
        assert not _works(server.target, root_certificates=ca)  # no client certificate
        assert _works(
            server.target,
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
