"""mTLS: real TLS servers on 127.0.0.1; only the allowed peer identity gets through."""
import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from privlm.base import certs
from privlm.base.grpcserver import add_health_and_reflection, bind, new_server
from privlm.v1 import audit_pb2, audit_pb2_grpc


class _Audit(audit_pb2_grpc.AuditServicer):
    async def GetCheckpoint(self, request, context):
        return audit_pb2.SignedCheckpoint(origin=certs.peer_identity(context) or "")


async def _worker_like_server(certs_dir):
    """A server that, like the worker group, admits only the gateway."""
    server = new_server([certs.PeerIdentityInterceptor({"gateway"})])
    audit_pb2_grpc.add_AuditServicer_to_server(_Audit(), server)
    add_health_and_reflection(server, ["privlm.v1.Audit"])
    port = bind(server, "127.0.0.1", 0, certs.server_credentials(certs_dir, "worker"))
    await server.start()
    return server, port


async def _call(port, creds, target_name="worker"):
    opts = [("grpc.ssl_target_name_override", target_name)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
        return await audit_pb2_grpc.AuditStub(ch).GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=10)


def test_certs_cli_writes_ca_and_service_certs(tmp_path):
    assert certs.main(["--out", str(tmp_path)]) == 0
    for s in certs.SERVICES:
        assert (tmp_path / f"{s}.pem").exists() and oct((tmp_path / f"{s}-key.pem").stat().st_mode)[-3:] == "600"
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((tmp_path / "gateway.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"gateway", "localhost"} <= set(sans.get_values_for_type(x509.DNSName))


def test_worker_accepts_only_gateway_peer(tmp_path):
    certs.create(tmp_path)
    other = tmp_path / "rogue"
    certs.create(other, ["gateway"])  # a "gateway" certificate from a different CA

    async def main():
        server, port = await _worker_like_server(tmp_path)
        ok = await _call(port, certs.channel_credentials(tmp_path, "gateway"))
        results = {"gateway": ok.origin}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(port, certs.channel_credentials(tmp_path, "client"))
        results["client"] = err.value.code()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(port, certs.channel_credentials(other, "gateway"))
        results["rogue_ca"] = err.value.code()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # TLS without a client certificate
            await _call(port, grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes()))
        results["no_cert"] = err.value.code()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await audit_pb2_grpc.AuditStub(ch).GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=5)
        results["plaintext"] = err.value.code()
        opts = [("grpc.ssl_target_name_override", "worker")]
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", certs.channel_credentials(tmp_path, "client"),
                                           options=opts) as ch:
            h = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        results["health"] = h.status
        await server.stop(None)
        return results

    r = asyncio.run(main())
    assert r["gateway"] == "gateway"
    assert r["client"] == grpc.StatusCode.PERMISSION_DENIED
    assert r["rogue_ca"] == grpc.StatusCode.UNAVAILABLE  # handshake fails: untrusted CA
    assert r["no_cert"] == grpc.StatusCode.UNAVAILABLE
    assert r["plaintext"] == grpc.StatusCode.UNAVAILABLE
    assert r["health"] == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_only_behind_the_explicit_flag_and_it_warns(tmp_path, capsys):
    """The one transport switch (privlm.base.transport.TransportConfig): mTLS or explicit dev plaintext."""
    from privlm.base.config import ConfigError
    from privlm.base.transport import TransportConfig

    with pytest.raises(ConfigError, match="plaintext_dev"):
        TransportConfig()
    assert TransportConfig(plaintext_dev=True).server_credentials("worker") is None
    assert "PLAINTEXT" in capsys.readouterr().err
    certs.create(tmp_path)
    mtls = TransportConfig(tls_dir=str(tmp_path))
    assert mtls.server_credentials("worker") is not None

    async def main():
        server, port = await _worker_like_server(tmp_path)
        opts = [("grpc.ssl_target_name_override", "worker")]
        async with mtls.aio_channel(f"127.0.0.1:{port}", "gateway", options=opts) as ch:
            r = await audit_pb2_grpc.AuditStub(ch).GetCheckpoint(audit_pb2.GetCheckpointRequest(), timeout=10)
        await server.stop(None)
        return r.origin

    assert asyncio.run(main()) == "gateway"
