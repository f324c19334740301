"""mTLS for every service pair: a private CA, per-service certificates, credentials, peer checks.

`privlm certs --out DIR` writes ca.pem (+ ca-key.pem, 0600) and SERVICE.pem / SERVICE-key.pem for
gateway, worker, he and client. Each certificate's identity is its service name: CN=SERVICE and a
DNS SAN SERVICE (plus localhost / 127.0.0.1 so tests and single-host deployments can dial them).
Servers require client certificates; PeerIdentityInterceptor then checks *which* service called.
Plaintext is only for development, behind an explicit flag, and it warns (`dev_plaintext_warning`).
"""
from __future__ import annotations

import argparse
import datetime
import ipaddress
import logging
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger("privlm.certs")
SERVICES = ("gateway", "worker", "he", "client")
PLAINTEXT_WARNING = ("PLAINTEXT gRPC (development flag): no TLS, no peer authentication; never use "
                     "this outside a developer machine")


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "privlm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key) -> None:
    path.touch(mode=0o600)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def make_ca(common_name: str = "privlm private CA", days: int = 825):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca_key, ca_cert, service: str, days: int = 397, extra_dns: Iterable[str] = ()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    sans = [x509.DNSName(service), x509.DNSName("localhost"), *(x509.DNSName(d) for d in extra_dns),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = (x509.CertificateBuilder().subject_name(_name(service)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def create(out: str | Path, services: Iterable[str] = SERVICES, extra_dns: Iterable[str] = ()) -> Path:
    """Write a CA and one certificate per service into `out` (CA reused if already there)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.pem").exists() and (out / "ca-key.pem").exists():
        ca_cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((out / "ca-key.pem").read_bytes(), None)
    else:
        ca_key, ca_cert = make_ca()
        _write_key(out / "ca-key.pem", ca_key)
        (out / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for service in services:
        key, cert = issue(ca_key, ca_cert, service, extra_dns=extra_dns)
        _write_key(out / f"{service}-key.pem", key)
        (out / f"{service}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def _read(certs_dir: str | Path, service: str) -> tuple[bytes, bytes, bytes]:
    d = Path(certs_dir)
    for p in (d / "ca.pem", d / f"{service}.pem", d / f"{service}-key.pem"):
        if not p.exists():
            raise FileNotFoundError(f"{p} missing: run `privlm certs --out {d}`")
    return (d / "ca.pem").read_bytes(), (d / f"{service}.pem").read_bytes(), (d / f"{service}-key.pem").read_bytes()


def server_credentials(certs_dir: str | Path, service: str) -> grpc.ServerCredentials:
    """TLS server credentials for `service` that require a client certificate from the same CA."""
    ca, cert, key = _read(certs_dir, service)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(certs_dir: str | Path, service: str) -> grpc.ChannelCredentials:
    """TLS channel credentials presenting `service`'s certificate (the caller's identity)."""
    ca, cert, key = _read(certs_dir, service)
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def dev_plaintext_warning(service: str) -> None:
    """Call when a service runs without TLS because the developer passed the plaintext flag."""
    log.warning("%s: %s", service, PLAINTEXT_WARNING)
    print(f"WARNING [{service}]: {PLAINTEXT_WARNING}", file=sys.stderr)


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The caller's service name: the CN of its verified client certificate (None without TLS)."""
    auth = context.auth_context()
    cn = auth.get("x509_common_name") or []
    return cn[0].decode() if cn else None


class PeerIdentityInterceptor(grpc.aio.ServerInterceptor):
    """Admit only callers whose verified certificate names one of `allowed` services.

    grpc.aio interceptors see no context in intercept_service, so the check wraps each handler
    and runs with the call's context; a refused caller gets PERMISSION_DENIED before the servicer runs.
    Health checks and reflection stay open to any authenticated peer so probes still work.
    """

    OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

    def __init__(self, allowed: set[str]):
        self.allowed = frozenset(allowed)

    async def intercept_service(self, continuation: Callable[[Any], Awaitable[Any]], details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.OPEN_PREFIXES):
            return handler
        allowed = self.allowed

        async def deny(context) -> None:
            peer = peer_identity(context)
            if peer not in allowed:
                log.warning("refused %s from peer %r (allowed: %s)", details.method, peer, sorted(allowed))
                await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                    f"peer {peer!r} may not call this service (allowed: {sorted(allowed)})")

        def unary(fn):
            async def call(req, context):
                await deny(context)
                return await fn(req, context)
            return call

        def stream(fn):
            async def call(req, context):
                await deny(context)
                async for item in fn(req, context):
                    yield item
            return call

        from privlm.base.grpcserver import rewrap

        return rewrap(handler, unary, stream)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="privlm certs", description="create a private CA and per-service mTLS certificates")
    ap.add_argument("--out", required=True, help="output folder (keys are written 0600)")
    ap.add_argument("--services", default=",".join(SERVICES), help="comma-separated service names")
    ap.add_argument("--dns", default="", help="extra DNS SANs for every certificate (comma-separated)")
    args = ap.parse_args(argv)
    services = [s for s in args.services.split(",") if s]
    out = create(args.out, services, [d for d in args.dns.split(",") if d])
    print(f"wrote CA and certificates for {', '.join(services)} to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
