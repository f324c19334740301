"""A synthetic annual financial report, generated in code and deterministic from a seed.

The report-analysis scenario needs a long, realistic document prompt (~5k tokens for SmolLM2's
tokenizer, which splits numbers into single digits, so tables are token-dense): a company profile,
an income statement, a balance sheet and a cash-flow statement over several years, segment and
quarterly tables, and narrative sections (results, liquidity, risk factors, outlook). The figures
are internally consistent (totals add up, the balance sheet balances) so an analysis can be checked.
No I/O, no model: `build_report(seed)` is pure.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SECTORS = ("regional banking", "industrial equipment", "specialty chemicals", "logistics",
           "consumer electronics retail", "commercial real estate services")
NAMES = ("Northbridge", "Caldera", "Ashford", "Meridian", "Tallis", "Brennock", "Orsino", "Halvard")
SUFFIXES = ("Holdings plc", "Group AG", "Industries Inc.", "Partners SA", "Capital Corp.")
SEGMENTS = ("Domestic", "Europe", "Americas", "Asia-Pacific", "Services")
QUARTERS = ("Q1", "Q2", "Q3", "Q4")
RISKS = (
    ("Interest-rate risk", "A 100 basis point parallel rise in rates would change net interest expense by "
                           "about {v} million over twelve months, given the floating share of borrowings."),
    ("Credit risk", "Receivables overdue by more than 90 days were {v} million at year end; the allowance "
                    "for expected credit losses covers {p}% of them."),
    ("Liquidity risk", "Committed undrawn facilities of {v} million mature in {y}; management expects to "
                       "refinance them twelve months before maturity."),
    ("Foreign-exchange risk", "About {p}% of revenue is invoiced in currencies other than the reporting "
                              "currency; a 10% adverse move would reduce operating profit by {v} million."),
    ("Concentration risk", "The five largest customers account for {p}% of revenue; the largest single "
                           "contract, worth {v} million a year, renews in {y}."),
    ("Operational risk", "A data-centre migration planned for {y} carries a budget of {v} million; a delay "
                         "would extend dual-running costs by about {p}% of the budget per quarter."),
    ("Regulatory risk", "New capital and reporting rules effective in {y} are expected to cost {v} million "
                        "to implement, about {p}% of annual administrative expenses."),
)


@dataclass(frozen=True)
class Report:
    company: str
    sector: str
    years: tuple[int, ...]
    text: str
    figures: dict          # key totals by year, for checking an analysis


def _m(x: float) -> str:
    """Millions with one decimal and thousands separators; negatives in parentheses (accounting style)."""
    s = f"{abs(x):,.1f}"
    return f"({s})" if x < 0 else s


def _table(title: str, header: list[str], rows: list[tuple[str, list[float]]]) -> str:
    width = max(len(r[0]) for r in rows) + 2
    lines = [title, " | ".join(["Line item".ljust(width), *header])]
    lines.append("-" * len(lines[-1]))
    for label, values in rows:
        lines.append(" | ".join([label.ljust(width), *(_m(v).rjust(len(h)) for v, h in zip(values, header))]))
    return "\n".join(lines)


def _income(rng: random.Random, years: int) -> dict[str, list[float]]:
    revenue = [rng.uniform(800, 2400)]
    for _ in range(years - 1):
        revenue.append(revenue[-1] * (1 + rng.uniform(-0.06, 0.14)))
    rows = {"Revenue": revenue}
    rows["Cost of sales"] = [-r * rng.uniform(0.52, 0.66) for r in revenue]
    rows["Gross profit"] = [a + b for a, b in zip(revenue, rows["Cost of sales"])]
    rows["Selling and distribution"] = [-r * rng.uniform(0.08, 0.12) for r in revenue]
    rows["Administrative expenses"] = [-r * rng.uniform(0.07, 0.10) for r in revenue]
    rows["Research and development"] = [-r * rng.uniform(0.02, 0.05) for r in revenue]
    rows["Other operating income"] = [r * rng.uniform(0.0, 0.012) for r in revenue]
    rows["Operating profit"] = [sum(rows[k][i] for k in ("Gross profit", "Selling and distribution",
                                                          "Administrative expenses", "Research and development",
                                                          "Other operating income")) for i in range(years)]
    rows["Finance income"] = [r * rng.uniform(0.001, 0.004) for r in revenue]
    rows["Finance costs"] = [-r * rng.uniform(0.012, 0.03) for r in revenue]
    rows["Profit before tax"] = [a + b + c for a, b, c in zip(rows["Operating profit"], rows["Finance income"],
                                                               rows["Finance costs"])]
    rows["Income tax"] = [-max(p, 0) * rng.uniform(0.21, 0.28) for p in rows["Profit before tax"]]
    rows["Profit for the year"] = [a + b for a, b in zip(rows["Profit before tax"], rows["Income tax"])]
    return rows


def _balance(rng: random.Random, income: dict[str, list[float]], years: int) -> dict[str, list[float]]:
    rev = income["Revenue"]
    b: dict[str, list[float]] = {}
    b["Property, plant and equipment"] = [r * rng.uniform(0.45, 0.6) for r in rev]
    b["Intangible assets and goodwill"] = [r * rng.uniform(0.15, 0.25) for r in rev]
    b["Inventories"] = [r * rng.uniform(0.1, 0.16) for r in rev]
    b["Trade receivables"] = [r * rng.uniform(0.14, 0.2) for r in rev]
    b["Cash and cash equivalents"] = [r * rng.uniform(0.05, 0.12) for r in rev]
    assets = ("Property, plant and equipment", "Intangible assets and goodwill", "Inventories",
              "Trade receivables", "Cash and cash equivalents")
    b["Total assets"] = [sum(b[k][i] for k in assets) for i in range(years)]
    b["Trade payables"] = [r * rng.uniform(0.1, 0.15) for r in rev]
    b["Short-term borrowings"] = [r * rng.uniform(0.04, 0.09) for r in rev]
    b["Long-term borrowings"] = [r * rng.uniform(0.2, 0.32) for r in rev]
    b["Provisions and other liabilities"] = [r * rng.uniform(0.03, 0.06) for r in rev]
    liabilities = ("Trade payables", "Short-term borrowings", "Long-term borrowings",
                   "Provisions and other liabilities")
    b["Total liabilities"] = [sum(b[k][i] for k in liabilities) for i in range(years)]
    b["Total equity"] = [a - l for a, l in zip(b["Total assets"], b["Total liabilities"])]
    b["Total equity and liabilities"] = list(b["Total assets"])
    return b


def _cashflow(rng: random.Random, income: dict[str, list[float]], years: int) -> dict[str, list[float]]:
    rev = income["Revenue"]
    c: dict[str, list[float]] = {}
    c["Profit for the year"] = list(income["Profit for the year"])
    c["Depreciation and amortisation"] = [r * rng.uniform(0.04, 0.07) for r in rev]
    c["Change in working capital"] = [r * rng.uniform(-0.04, 0.02) for r in rev]
    c["Net cash from operating activities"] = [sum(c[k][i] for k in list(c)) for i in range(years)]
    c["Capital expenditure"] = [-r * rng.uniform(0.05, 0.09) for r in rev]
    c["Acquisitions"] = [-r * rng.uniform(0.0, 0.05) for r in rev]
    c["Net cash used in investing activities"] = [a + b for a, b in zip(c["Capital expenditure"], c["Acquisitions"])]
    c["Dividends paid"] = [-max(p, 0) * rng.uniform(0.3, 0.5) for p in income["Profit for the year"]]
    c["Net change in borrowings"] = [r * rng.uniform(-0.03, 0.04) for r in rev]
    c["Net cash from financing activities"] = [a + b for a, b in zip(c["Dividends paid"], c["Net change in borrowings"])]
    c["Free cash flow"] = [a + b for a, b in zip(c["Net cash from operating activities"], c["Capital expenditure"])]
    return c


def _narrative(rng: random.Random, company: str, years: tuple[int, ...], inc, bal, cf) -> list[str]:
    last, prev = years[-1], years[-2]
    g = inc["Revenue"][-1] / inc["Revenue"][-2] - 1
    margin = inc["Operating profit"][-1] / inc["Revenue"][-1]
    prev_margin = inc["Operating profit"][-2] / inc["Revenue"][-2]
    debt = bal["Short-term borrowings"][-1] + bal["Long-term borrowings"][-1]
    net_debt = debt - bal["Cash and cash equivalents"][-1]
    ebitda = inc["Operating profit"][-1] + cf["Depreciation and amortisation"][-1]
    paras = [
        f"Results of operations. Revenue for {last} was {_m(inc['Revenue'][-1])} million, "
        f"{'up' if g >= 0 else 'down'} {abs(g) * 100:.1f}% on {prev}. The operating margin moved from "
        f"{prev_margin * 100:.1f}% to {margin * 100:.1f}%, reflecting input-cost changes, pricing actions taken "
        "in the second half and the timing of research spending. Management regards the gross margin as "
        "the clearest indicator of pricing power and tracks it monthly by segment.",
        f"Liquidity and capital resources. Gross borrowings were {_m(debt)} million and net debt "
        f"{_m(net_debt)} million at the end of {last}, which is {net_debt / ebitda:.2f} times EBITDA of "
        f"{_m(ebitda)} million. Free cash flow was {_m(cf['Free cash flow'][-1])} million after capital "
        f"expenditure of {_m(-cf['Capital expenditure'][-1])} million. The covenant on the revolving credit "
        "facility requires net debt below 3.0 times EBITDA, tested semi-annually.",
        f"Working capital. Trade receivables stood at {_m(bal['Trade receivables'][-1])} million "
        f"({bal['Trade receivables'][-1] / inc['Revenue'][-1] * 365:.0f} days of revenue) and inventories at "
        f"{_m(bal['Inventories'][-1])} million. The change in working capital contributed "
        f"{_m(cf['Change in working capital'][-1])} million to operating cash flow in {last}.",
        f"Dividend policy. {company} paid dividends of {_m(-cf['Dividends paid'][-1])} million in {last}, "
        "in line with its policy of distributing 30% to 50% of profit for the year while keeping leverage "
        "inside the covenant with headroom of at least one turn of EBITDA.",
    ]
    chosen = rng.sample(RISKS, 5)
    risk_lines = [f"- {name}: " + text.format(v=f"{rng.uniform(2, 60):.1f}", p=rng.randint(8, 45),
                                             y=last + rng.randint(1, 3)) for name, text in chosen]
    paras.append("Principal risks.\n" + "\n".join(risk_lines))
    paras.append(
        f"Outlook. For {last + 1} management guides revenue growth of {rng.uniform(1, 8):.1f}% to "
        f"{rng.uniform(8, 12):.1f}% at constant currency, capital expenditure of about "
        f"{_m(-cf['Capital expenditure'][-1] * rng.uniform(0.9, 1.2))} million and a stable operating margin. "
        "The guidance assumes no further acquisitions and no change in the scope of consolidation.")
    return paras


def _ratios(inc, bal, cf, years: int) -> list[tuple[str, list[float]]]:
    """Key ratios in percent or times, derived from the statements (so they are consistent)."""
    rev, op = inc["Revenue"], inc["Operating profit"]
    debt = [a + b for a, b in zip(bal["Short-term borrowings"], bal["Long-term borrowings"])]
    ebitda = [o + d for o, d in zip(op, cf["Depreciation and amortisation"])]
    return [("Revenue growth (%)", [0.0] + [(rev[i] / rev[i - 1] - 1) * 100 for i in range(1, years)]),
            ("Gross margin (%)", [g / r * 100 for g, r in zip(inc["Gross profit"], rev)]),
            ("Operating margin (%)", [o / r * 100 for o, r in zip(op, rev)]),
            ("Net margin (%)", [p / r * 100 for p, r in zip(inc["Profit for the year"], rev)]),
            ("Return on equity (%)", [p / e * 100 for p, e in zip(inc["Profit for the year"], bal["Total equity"])]),
            ("Net debt / EBITDA (x)", [(d - c) / e for d, c, e in zip(debt, bal["Cash and cash equivalents"], ebitda)]),
            ("Interest cover (x)", [o / -f for o, f in zip(op, inc["Finance costs"])]),
            ("Cash conversion (%)", [c / e * 100 for c, e in zip(cf["Net cash from operating activities"], ebitda)])]


def _debt_maturities(rng: random.Random, bal, last: int) -> tuple[list[str], list[tuple[str, list[float]]]]:
    total = bal["Short-term borrowings"][-1] + bal["Long-term borrowings"][-1]
    kinds = ("Revolving credit facility", "Term loan A", "Senior notes", "Private placement", "Leases")
    shares = [rng.uniform(0.5, 2) for _ in kinds]
    rows = []
    for kind, w in zip(kinds, shares):
        amount = total * w / sum(shares)
        split = [rng.uniform(0, 1) for _ in range(5)]
        rows.append((kind, [amount * x / sum(split) for x in split]))
    return [str(last + k) for k in range(1, 5)] + ["Later"], rows


def _segment_notes(rng: random.Random, seg_rows, years: tuple[int, ...]) -> str:
    lines = ["Segment review."]
    for name, values in seg_rows:
        g = (values[-1] / values[-2] - 1) * 100
        lines.append(f"- {name}: revenue of {_m(values[-1])} million in FY{years[-1]} ({g:+.1f}%), "
                     f"segment margin {rng.uniform(6, 22):.1f}%, order backlog {_m(values[-1] * rng.uniform(0.2, 0.6))} "
                     f"million, headcount {rng.randint(400, 6000):,}, customer retention {rng.uniform(80, 97):.1f}%.")
    return "\n".join(lines)


def build_report(seed: int = 0, years: int = 7) -> Report:
    """The whole report as text (about 5k SmolLM2 tokens at the default 7 years)."""
    rng = random.Random(seed)
    company = f"{rng.choice(NAMES)} {rng.choice(SUFFIXES)}"
    sector = rng.choice(SECTORS)
    last = 2021 + rng.randint(0, 4)
    ys = tuple(range(last - years + 1, last + 1))
    header = [f"FY{y}" for y in ys]
    inc = _income(rng, years)
    bal = _balance(rng, inc, years)
    cf = _cashflow(rng, inc, years)
    seg_share = [rng.uniform(0.5, 1.5) for _ in SEGMENTS]
    total = sum(seg_share)
    seg_rows = [(s, [inc["Revenue"][i] * w / total * rng.uniform(0.95, 1.05) for i in range(years)])
                for s, w in zip(SEGMENTS, seg_share)]
    q_rows = []
    for label in ("Revenue", "Gross profit", "Operating profit", "Profit for the year"):
        for k in (-2, -1):
            weights = [rng.uniform(0.22, 0.28) for _ in QUARTERS]
            q_rows.append((f"{label} FY{ys[k]}", [inc[label][k] * w / sum(weights) for w in weights]))
    parts = [
        f"{company.upper()}: ANNUAL REPORT AND ACCOUNTS FY{last}",
        f"{company} operates in {sector} across {len(SEGMENTS)} reporting segments. All amounts are in "
        "millions of the reporting currency unless stated otherwise; figures in parentheses are negative. "
        "The consolidated statements are prepared under IFRS and were audited without qualification.",
        _table("Consolidated income statement", header, list(inc.items())),
        _table("Consolidated balance sheet (31 December)", header, list(bal.items())),
        _table("Consolidated cash-flow statement", header, list(cf.items())),
        _table("Revenue by segment", header, seg_rows),
        _table(f"Quarterly results FY{last - 1} and FY{last}", list(QUARTERS), q_rows),
        _table("Key ratios", header, _ratios(inc, bal, cf, years)),
        _table("Note 14: borrowings by contractual maturity", *_debt_maturities(rng, bal, last)),
        _segment_notes(rng, seg_rows, ys),
        *_narrative(rng, company, ys, inc, bal, cf),
    ]
    figures = {"revenue": inc["Revenue"], "operating_profit": inc["Operating profit"],
               "profit": inc["Profit for the year"], "total_assets": bal["Total assets"],
               "free_cash_flow": cf["Free cash flow"]}
    return Report(company, sector, ys, "\n\n".join(parts) + "\n", figures)


ANALYST_SYSTEM = ("You are a credit analyst at a bank. Read the annual report and write a concise analysis: "
                  "revenue and margin trend, leverage and liquidity, cash generation, the main risks, and "
                  "a one-line credit view.")


def analysis_messages(report: Report) -> tuple[tuple[str, str], ...]:
    """The chat the demo and the benchmark send: system instruction + the report + the question."""
    return (("system", ANALYST_SYSTEM),
            ("user", report.text + f"\nWrite the credit analysis of {report.company} for FY{report.years[-1]}."))
