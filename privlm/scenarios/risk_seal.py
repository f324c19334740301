"""HPKE for the risk stream: the session parameters and memos sealed to the attested key, each under its
own label (domain separation: a sealed memo can never be opened as a GenerateRequest or a released
key, and the reverse), opened with the confidential runtime's keys, replay guard and audit log.

Protobuf-free: the caller passes parsers for the authenticated context (aad).
"""
from __future__ import annotations

from enclave.hpke import SealedMessage, SealError, open_sealed
from enclave.runtime import ConfidentialRuntime, sha256_hex

SESSION_LABEL = b"privlm/v1 sealed RiskSessionParams"
MEMO_LABEL = b"privlm/v1 sealed RiskMemo"


def open_labeled(rt: ConfidentialRuntime, msg: SealedMessage, label: bytes, parse_context, tenant: str = ""):
    """(plaintext, HPKE recipient context, parsed aad). Blocking (audit fsync): call from a thread.

    Refusals (tampered enc/ciphertext/aad/key id, unknown key, replay, stale timestamp, unparsable
    context, oversize) are counted in rt.rejections and audited by reason, as the runtime does for
    sealed generation requests; an opened message is audited with its ciphertext hash.
    """
    if len(msg.ciphertext) + len(msg.aad) > rt.config.max_sealed_request_bytes:
        rt.reject("too_large", msg, tenant)
        raise SealError("too_large", "sealed message exceeds the configured maximum")
    try:
        plaintext, ctx = open_sealed(rt.keys, msg, label=label)
        meta = parse_context(msg.aad)
        rt.replay.check_and_remember(msg.enc, meta.sent_at_unix_ms)
    except SealError as exc:
        rt.reject(exc.reason, msg, tenant)
        raise
    except ValueError as exc:
        rt.reject("bad_context", msg, tenant)
        raise SealError("bad_context", "sealed message context does not parse") from exc
    rt.record("sealed_request_opened", tenant=tenant if _ident(tenant) else "",
              hashes={"ciphertext_sha256": sha256_hex(msg.ciphertext)},
              labels={"key_id": str(msg.key_id), "service": "risk"})
    return plaintext, ctx, meta


def _ident(tenant: str) -> bool:
    from enclave.audit.events import _IDENT

    return bool(_IDENT.match(tenant or ""))
