"""Incremental detokenization and stop matching, on the default model's real tokenizer."""
import pytest

from gateway.text import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def tok(default_model):
    from gateway.tokenizer import ModelTokenizer

    return ModelTokenizer(default_model)


@pytest.mark.parametrize("text", ["Grüße aus 東京 🙂 — ok", "€100 → ¥15,000; naïve café", "plain ascii"])
def test_detokenizer_emits_whole_characters(tok, text):
    ids = tok.encode_prompt(text)
    d = IncrementalDetokenizer(tok.core)
    parts = [d.push([i]) for i in ids] + [d.flush()]
    assert "".join(parts) == tok.hf.decode(ids)
    for p in parts:
        assert "\ufffd" not in p
        p.encode("utf-8")          # raises on lone surrogates


def test_detokenizer_holds_back_split_character(tok):
    # "東" is split across two byte-level tokens by this tokenizer: the first alone emits nothing.
    ids = tok.encode_prompt(" 東")
    assert len(ids) >= 2, "test premise: the character spans several tokens"
    d = IncrementalDetokenizer(tok.core)
    assert d.push(ids[:1]) == ""
    assert d.push(ids[1:]) == " 東"


def test_stop_matcher_across_chunks():
    m = StopMatcher(["END", "\n\n"])
    assert m.push("hello E") == ("hello ", False)      # "E" could start "END": held back
    assert m.push("N") == ("", False)
    assert m.push("Dxyz") == ("", True)


def test_stop_matcher_releases_false_prefix():
    m = StopMatcher(["END"])
    assert m.push("abc EN") == ("abc ", False)
    assert m.push("X") == ("ENX", False)
    assert m.flush() == ""


def test_stop_matcher_without_stops_passes_through():
    assert StopMatcher([]).push("anything") == ("anything", False)
