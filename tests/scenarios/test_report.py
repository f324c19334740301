"""The synthetic financial report: deterministic, internally consistent, ~5k tokens, fits the context."""
from __future__ import annotations

import json
import re

import pytest

from privlm.scenarios.finreport import analysis_messages, build_report


def test_same_seed_same_report_other_seed_other_report():
    assert build_report(3).text == build_report(3).text
    assert build_report(3).text != build_report(4).text


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_statements_are_consistent(seed):
    r = build_report(seed)
    text = r.text

    def row(label):
        line = next(line for line in text.splitlines() if line.startswith(label + " "))
        cells = [c.strip() for c in line.split("|")[1:]]
        return [-float(c[1:-1].replace(",", "")) if c.startswith("(") else float(c.replace(",", "")) for c in cells]

    assets, eq_liab = row("Total assets"), row("Total equity and liabilities")
    assert assets == eq_liab
    for a, l, e in zip(assets, row("Total liabilities"), row("Total equity")):
        assert a == pytest.approx(l + e, abs=0.15)           # rounding of three one-decimal figures
    assert [round(v, 1) for v in r.figures["revenue"]] == row("Revenue")
    assert len(r.years) == 7 and re.search(r"FY\d{4}", text)


def test_report_prompt_is_about_5k_tokens_and_fits_the_context(default_model):
    from gateway.tokenizer import ModelTokenizer

    tok = ModelTokenizer(str(default_model))
    context = json.loads((default_model / "config.json").read_text())["max_position_embeddings"]
    for seed in (0, 1):
        n = len(tok.encode_chat(analysis_messages(build_report(seed))))
        assert 4500 <= n <= 5500, n
        assert n + 512 <= context, f"{n} prompt tokens + 512 for the answer exceed the {context}-token window"
