"""HPKE: RFC 9180 known answers, AES-256-GCM interop with an independent implementation, tamper."""
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hpke as pyca_hpke
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKeyPair

from enclave import hpke

VECTORS = Path(__file__).parent / "data" / "rfc9180_a1_1_base.json"
SUITE_VECTORS = Path(__file__).parent / "data" / "rfc9180_x25519_sha256_aes256gcm.json"


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_rfc9180_official_vectors_for_our_suite(mode):
    """X25519 / HKDF-SHA256 / AES-256-GCM: the suite enclave.hpke uses (mode 0 is what we run)."""
    v = next(e for e in json.loads(SUITE_VECTORS.read_text())["vectors"] if e["mode"] == mode)
    assert (v["kem_id"], v["kdf_id"], v["aead_id"]) == (hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID)
    suite = hpke.SUITE
    kem = suite.kem
    for ikm, pk in (("ikmE", "pkEm"), ("ikmR", "pkRm")):
        assert kem.derive_key_pair(bytes.fromhex(v[ikm])).public_key.to_public_bytes().hex() == v[pk]
    eks = KEMKeyPair(kem.deserialize_private_key(bytes.fromhex(v["skEm"])),
                     kem.deserialize_public_key(bytes.fromhex(v["pkEm"])))
    skr = kem.deserialize_private_key(bytes.fromhex(v["skRm"]))
    pkr = kem.deserialize_public_key(bytes.fromhex(v["pkRm"]))
    sks = kem.deserialize_private_key(bytes.fromhex(v["skSm"])) if "skSm" in v else None
    pks = kem.deserialize_public_key(bytes.fromhex(v["pkSm"])) if "pkSm" in v else None
    psk, psk_id = bytes.fromhex(v.get("psk", "")), bytes.fromhex(v.get("psk_id", ""))
    info = bytes.fromhex(v["info"])
    enc, sender = suite.create_sender_context(pkr, info, sks, psk, psk_id, eks)
    assert enc.hex() == v["enc"]
    recipient = suite.create_recipient_context(enc, skr, info, pks, psk, psk_id)
    assert len(v["encryptions"]) == 257  # sequence numbers 0..256, in order
    for e in v["encryptions"]:
        pt, aad = bytes.fromhex(e["pt"]), bytes.fromhex(e["aad"])
        ct = sender.seal(pt, aad)
        assert ct.hex() == e["ct"]
        assert recipient.open(ct, aad) == pt
    for x in v["exports"]:
        ctx = bytes.fromhex(x["exporter_context"])
        assert sender.export(ctx, x["L"]).hex() == x["exported_value"]
        assert recipient.export(ctx, x["L"]).hex() == x["exported_value"]


def test_rfc9180_a11_known_answers():
    v = json.loads(VECTORS.read_text())
    suite = CipherSuite.new(KEMId(v["kem_id"]), KDFId(v["kdf_id"]), AEADId(v["aead_id"]))
    derived = suite.kem.derive_key_pair(bytes.fromhex(v["ikmE"]))
    assert derived.public_key.to_public_bytes().hex() == v["pkEm"]
    assert suite.kem.derive_key_pair(bytes.fromhex(v["ikmR"])).public_key.to_public_bytes().hex() == v["pkRm"]
    ske, pke = (suite.kem.deserialize_private_key(bytes.fromhex(v["skEm"])),
                suite.kem.deserialize_public_key(bytes.fromhex(v["pkEm"])))
    skr = suite.kem.deserialize_private_key(bytes.fromhex(v["skRm"]))
    pkr = suite.kem.deserialize_public_key(bytes.fromhex(v["pkRm"]))
    info = bytes.fromhex(v["info"])
    enc, sender = suite.create_sender_context(pkr, info, eks=KEMKeyPair(ske, pke))
    assert enc.hex() == v["enc"]
    recipient = suite.create_recipient_context(enc, skr, info)
    seq = 0
    for e in v["encryptions"]:
        while seq < e["seq"]:  # advance both sequence numbers with throw-away messages
            recipient.open(sender.seal(b"", b""), b"")
            seq += 1
        ct = sender.seal(bytes.fromhex(e["pt"]), bytes.fromhex(e["aad"]))
        assert ct.hex() == e["ct"]
        assert recipient.open(ct, bytes.fromhex(e["aad"])).hex() == e["pt"]
        seq += 1
    for x in v["exports"]:
        ctx = bytes.fromhex(x["exporter_context"])
        assert sender.export(ctx, x["L"]).hex() == x["exported_value"]
        assert recipient.export(ctx, x["L"]).hex() == x["exported_value"]


def test_aes256gcm_suite_interoperates_with_pyca_single_shot():
    """Our suite (X25519/HKDF-SHA256/AES-256-GCM) against cryptography's independent HPKE code."""
    key = hpke.ServerKey.generate(7)
    cfg = key.config()
    info = hpke.REQUEST_LABEL + b"\x00" + cfg.header()
    theirs = pyca_hpke.Suite(pyca_hpke.KEM.X25519, pyca_hpke.KDF.HKDF_SHA256, pyca_hpke.AEAD.AES_256_GCM)
    blob = theirs.encrypt(b"sealed by pyca", key.private_key.public_key(), info=info)
    msg = hpke.SealedMessage(7, hpke.KEM_ID, hpke.KDF_ID, hpke.AEAD_ID, blob[:32], blob[32:], b"")
    assert hpke.open_sealed({7: key}, msg)[0] == b"sealed by pyca"
    ours, _ = hpke.seal(cfg, b"sealed by pyhpke")
    assert theirs.decrypt(ours.enc + ours.ciphertext, key.private_key, info=info) == b"sealed by pyhpke"


def test_key_config_roundtrip_rfc9458_layout():
    cfg = hpke.ServerKey.generate(3).config()
    raw = cfg.encode()
    assert raw[0] == 3 and raw[1:3] == b"\x00\x20" and raw[-6:] == b"\x00\x04\x00\x01\x00\x02"
    assert hpke.KeyConfig.decode(raw) == cfg


def _flip(b: bytes, i: int = 0) -> bytes:
    return b[:i] + bytes([b[i] ^ 1]) + b[i + 1:]


@pytest.mark.parametrize("field", ["enc", "ciphertext", "aad", "key_id"])
def test_flipped_bit_is_rejected(field):
    key = hpke.ServerKey.generate(9)
    other = hpke.ServerKey.generate(8)  # a flipped key id lands on another real key: still refused
    msg, _ = hpke.seal(key.config(), b"secret prompt", b"tenant-a")
    changes = {"enc": {"enc": _flip(msg.enc)}, "ciphertext": {"ciphertext": _flip(msg.ciphertext, 5)},
               "aad": {"aad": _flip(msg.aad)}, "key_id": {"key_id": 8}}[field]
    import dataclasses
    bad = dataclasses.replace(msg, **changes)
    with pytest.raises(hpke.SealError) as err:
        hpke.open_sealed({9: key, 8: other}, bad)
    assert err.value.reason == "hpke_open_failed"
    assert hpke.open_sealed({9: key}, msg)[0] == b"secret prompt"


def test_stream_sealing_order_truncation_and_final_flag():
    key = hpke.ServerKey.generate(1)
    msg, sctx = hpke.seal(key.config(), b"req")
    _, rctx = hpke.open_sealed({1: key}, msg)
    sealer = hpke.ResponseSealer(rctx, msg.enc)
    chunks = [sealer.seal(b"a"), sealer.seal(b"b"), sealer.seal(b"c", final=True)]
    opener = hpke.ResponseOpener(sctx, msg.enc, sealer.response_nonce)
    assert [opener.open(chunks[0], False), opener.open(chunks[1], False), opener.open(chunks[2], True)] == [b"a", b"b", b"c"]
    assert opener.finished
    reordered = hpke.ResponseOpener(sctx, msg.enc, sealer.response_nonce)
    with pytest.raises(hpke.SealError):
        reordered.open(chunks[1], False)
    forged_final = hpke.ResponseOpener(sctx, msg.enc, sealer.response_nonce)
    forged_final.open(chunks[0], False)
    with pytest.raises(hpke.SealError):  # claiming a middle chunk is final fails authentication
        forged_final.open(chunks[1], True)
    wrong_ctx = hpke.seal(key.config(), b"other")[1]
    with pytest.raises(hpke.SealError):
        hpke.ResponseOpener(wrong_ctx, msg.enc, sealer.response_nonce).open(chunks[0], False)
