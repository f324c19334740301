"""How services reach each other: mTLS with the private CA (privlm/base/certs.py), or plaintext only
behind an explicit development flag that warns. No silent fallback from one to the other."""
from __future__ import annotations

from dataclasses import dataclass

import grpc

from privlm.base.config import check


@dataclass(frozen=True)
class TransportConfig:
    tls_dir: str | None = None        # folder from `privlm certs` (ca.pem, SERVICE.pem, SERVICE-key.pem)
    plaintext_dev: bool = False       # development only: no TLS, no peer authentication

    def __post_init__(self):
        check(bool(self.tls_dir) != self.plaintext_dev,
              "transport: set tls_dir (mTLS, `privlm certs --out DIR`) or plaintext_dev (development), exactly one")

    def server_credentials(self, service: str) -> grpc.ServerCredentials | None:
        from privlm.base import certs

        if self.plaintext_dev:
            certs.dev_plaintext_warning(service)
            return None
        return certs.server_credentials(self.tls_dir, service)

    def channel_credentials(self, service: str) -> grpc.ChannelCredentials | None:
        """Credentials presenting `service`'s certificate, or None in plaintext development mode."""
        from privlm.base import certs

        return None if self.plaintext_dev else certs.channel_credentials(self.tls_dir, service)

    def aio_channel(self, target: str, as_service: str, interceptors=(), options=()) -> grpc.aio.Channel:
        creds = self.channel_credentials(as_service)
        if creds is None:
            return grpc.aio.insecure_channel(target, options=list(options), interceptors=list(interceptors))
        return grpc.aio.secure_channel(target, creds, options=list(options), interceptors=list(interceptors))

    def channel(self, target: str, as_service: str) -> grpc.Channel:
        creds = self.channel_credentials(as_service)
        return grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)


PLAINTEXT_DEV = TransportConfig(plaintext_dev=True)


def add_transport_args(ap) -> None:
    """--tls-dir DIR or --plaintext-dev: one of them is required (no silent default)."""
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--tls-dir", help="mTLS certificates from `privlm certs --out DIR`")
    g.add_argument("--plaintext-dev", action="store_true",
                   help="DEVELOPMENT ONLY: plaintext gRPC without peer authentication (warns)")


def transport_from_args(args) -> TransportConfig:
    return TransportConfig(tls_dir=args.tls_dir, plaintext_dev=args.plaintext_dev)
