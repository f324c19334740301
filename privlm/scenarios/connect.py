"""How the scenario demos reach a running gateway (--target): the same rules as `privlm generate`.

Explicit --tls-dir / --plaintext-dev win; otherwise the profile `privlm up` wrote
(.cache/run/endpoint.json); the bearer token comes from --token, $PRIVLM_TOKEN or the dev token.
"""
from __future__ import annotations

import json

import grpc


def add_target_args(ap) -> None:
    ap.add_argument("--target", default="", help="gateway host:port; default: start the services in this process")
    ap.add_argument("--token", default=None, help="bearer token for --target (default: $PRIVLM_TOKEN or the dev token)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--tls-dir", default=None, help="mTLS certificates for --target (the 'client' identity)")
    g.add_argument("--plaintext-dev", action="store_true", help="DEVELOPMENT ONLY: plaintext channel to --target")


def open_target(args) -> tuple[grpc.aio.Channel, tuple[tuple[str, str], ...]]:
    """(aio channel to args.target, auth metadata)."""
    from privlm.base.config import cache_dir
    from privlm.base.transport import TransportConfig
    from privlm.client_cli import auth_metadata

    profile_path = cache_dir() / "run" / "endpoint.json"
    profile = json.loads(profile_path.read_text()) if profile_path.is_file() else {}
    if args.tls_dir or args.plaintext_dev:
        transport = TransportConfig(tls_dir=args.tls_dir, plaintext_dev=args.plaintext_dev)
    elif profile:
        transport = TransportConfig(tls_dir=profile.get("tls_dir"), plaintext_dev=bool(profile.get("plaintext_dev")))
    else:
        raise SystemExit("no local suite profile (.cache/run/endpoint.json): pass --tls-dir DIR or --plaintext-dev")
    return transport.aio_channel(args.target, "client"), auth_metadata(args.token)
