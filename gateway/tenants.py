"""Tenants: bearer-token authentication, per-tenant rate limits, concurrency and token quotas.

Tokens are never stored: the gateway keeps their SHA-256 and compares in constant time. The
authenticated tenant travels with the call in a contextvar (`current_tenant`) so servicers, the
worker request and audit events carry it without trusting anything the client says about itself.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from privlm.base.config import check, from_mapping
from privlm.base.errors import ResourceExhausted, Unauthenticated
from privlm.base.grpcserver import rewrap

log = logging.getLogger("privlm.gateway.tenants")
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("privlm_tenant", default="")
UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")
# Evidence is public by design: a client verifies the service before it trusts it with a token.
PUBLIC_METHODS = frozenset({"/privlm.v1.Confidential/GetEvidence"})
MAX_TOKEN_CHARS = 512                      # issued tokens are ~47 characters; longer is never one of ours


@dataclass(frozen=True)
class TenantConfig:
    tenant: str
    token_sha256: str                      # hex SHA-256 of the bearer token
    requests_per_second: float = 20.0
    burst: int = 40
    max_concurrent: int = 16
    tokens_per_minute: int = 100_000       # completion-token budget (sliding minute)

    def __post_init__(self):
        check(self.tenant.isidentifier() or self.tenant.replace("-", "_").isidentifier(),
              f"tenant name must be an identifier (letters, digits, '-', '_'), got {self.tenant!r}")
        check(len(self.token_sha256) == 64 and all(c in "0123456789abcdef" for c in self.token_sha256),
              f"tenant {self.tenant}: token_sha256 must be 64 lowercase hex characters")
        check(self.requests_per_second > 0 and self.burst >= 1 and self.max_concurrent >= 1
              and self.tokens_per_minute >= 1, f"tenant {self.tenant}: limits must be positive")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tenants(path: str | Path) -> tuple[TenantConfig, ...]:
    data = json.loads(Path(path).read_text())
    return tuple(from_mapping(TenantConfig, d, where=f"{path}[{i}]") for i, d in enumerate(data))


def create_dev_tenant(path: Path, tenant: str = "dev") -> tuple[str, TenantConfig]:
    """A random token for local development, written 0600 to `path`; returns (token, config)."""
    token = "plm_" + secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    path.chmod(0o600)
    return token, TenantConfig(tenant=tenant, token_sha256=hash_token(token))


class _Limits:
    """Token bucket (requests), in-flight count, and a sliding-minute completion-token budget."""

    def __init__(self, cfg: TenantConfig):
        self.cfg = cfg
        self.tokens = float(cfg.burst)
        self.stamp = time.monotonic()
        self.in_flight = 0
        self.spent: list[tuple[float, int]] = []
        self.lock = threading.Lock()

    def acquire(self) -> None:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.cfg.burst, self.tokens + (now - self.stamp) * self.cfg.requests_per_second)
            self.stamp = now
            if self.tokens < 1:
                raise ResourceExhausted(f"tenant {self.cfg.tenant}: rate limit of "
                                        f"{self.cfg.requests_per_second:g} requests/s exceeded; retry later")
            if self.in_flight >= self.cfg.max_concurrent:
                raise ResourceExhausted(f"tenant {self.cfg.tenant}: {self.cfg.max_concurrent} requests already "
                                        "in flight; retry when one finishes")
            self.spent = [(t, n) for t, n in self.spent if now - t < 60]
            if sum(n for _, n in self.spent) >= self.cfg.tokens_per_minute:
                raise ResourceExhausted(f"tenant {self.cfg.tenant}: quota of {self.cfg.tokens_per_minute} "
                                        "completion tokens per minute used up; retry later")
            self.tokens -= 1
            self.in_flight += 1

    def release(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def charge(self, completion_tokens: int) -> None:
        with self.lock:
            self.spent.append((time.monotonic(), completion_tokens))


class TenantRegistry:
    def __init__(self, tenants: tuple[TenantConfig, ...]):
        self.by_hash = {t.token_sha256: _Limits(t) for t in tenants}

    def authenticate(self, metadata) -> _Limits:
        auth = next((v for k, v in (metadata or ()) if k == "authorization"), None)
        if not auth:
            raise Unauthenticated("missing 'authorization: Bearer <token>' metadata")
        if len(auth) > MAX_TOKEN_CHARS:
            raise Unauthenticated(f"authorization metadata is longer than {MAX_TOKEN_CHARS} characters")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization metadata must be 'Bearer <token>'")
        digest = hash_token(token.strip())
        for known, limits in self.by_hash.items():   # constant-time compare against every tenant
            if hmac.compare_digest(known, digest):
                return limits
        raise Unauthenticated("unknown or revoked token")

    def charge(self, tenant: str, completion_tokens: int) -> None:
        for limits in self.by_hash.values():
            if limits.cfg.tenant == tenant:
                limits.charge(completion_tokens)


class TenantInterceptor(grpc.aio.ServerInterceptor):
    """Authenticate every privlm RPC, apply the tenant's limits, and expose the tenant to handlers."""

    def __init__(self, registry: TenantRegistry):
        self.registry = registry

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(UNAUTHENTICATED_PREFIXES) or method in PUBLIC_METHODS:
            return handler
        registry = self.registry

        @contextlib.contextmanager
        def admitted():
            """Authenticate, take a slot within the tenant's limits, expose the tenant; undo after."""
            limits = registry.authenticate(details.invocation_metadata)
            limits.acquire()
            token = current_tenant.set(limits.cfg.tenant)
            try:
                yield
            finally:
                current_tenant.reset(token)
                limits.release()

        def wrap_unary(fn):
            async def call(request, context):
                with admitted():
                    return await fn(request, context)
            return call

        def wrap_stream(fn):
            async def call(request, context):
                with admitted():
                    async for item in fn(request, context):
                        yield item
            return call

        return rewrap(handler, wrap_unary, wrap_stream)
