"""Claims: each paper's statement as a rule over the numbers a study measured, and
whether it holds. The rules are data in the study's spec (``[[claims]]``, see
``spec.ClaimSpec``), written before the runs they judge; ``evaluate_claims`` only
measures and applies them, so a claim that does not hold is reported as such.

An entry: the claim in words and its arXiv id, the rule in words, the numbers (the
slope or the difference of two settings' slopes, its 95% bootstrap interval, the
replicates and sizes it rests on), the ``verdict`` (``verdict``): "yes", "NO", or
"inconclusive" where the interval cannot tell (it contains the value a one-sided rule
compares with; for ci_covers, one that contains its value but is wider than the claim's
``max_width``; for within, one wider than ``max_width``), and
"pre-asymptotic" where the number is still moving with n (``ClaimSpec.drift``: with 6
or more sizes, its value over the larger half of the sizes minus that over the smaller
half is at least ``DRIFT_MARGIN`` in size with a 95% interval excluding 0; the drift is in
the numbers either way), and
``holds``: True (yes), False (NO), or None where inconclusive, pre-asymptotic or where the
runs cannot decide (fewer than two sizes, or fewer than ``MIN_VERDICT_REPLICATES``
replicates per size; then there is no verdict), and ``borrowed_loss``: the exponent table
the claim's loss borrows from another paper ("D2-softmax from arXiv 2305.03288"), or None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .rates import MIN_VERDICT_REPLICATES, Rate, by_setting, interval, rate_draws, series
from .spec import CLAIM_RULES, DEFAULT_MAX_WIDTH, ClaimSpec, Study
from .store import FitRow

__all__ = ["evaluate_claims", "evaluate_paired_claims", "paired_interval", "decide", "decide_paired",
           "describe", "claims_text", "holds_word", "measured", "verdict", "verdict_word"]


def holds_word(holds: bool | None) -> str:
    """How reports say it: "yes", "NO" (plainly, where a claim does not hold), "undecided"."""
    return {True: "yes", False: "NO", None: "undecided"}[holds]


def verdict_word(claim: Mapping[str, Any]) -> str:
    """A decided claim's verdict (yes / NO / inconclusive), else ``holds_word``."""
    return claim.get("verdict") or holds_word(claim["holds"])


def verdict(rule: str, r: Rate, value: float, margin: float | None = None,
            max_width: float = DEFAULT_MAX_WIDTH) -> str:
    """"yes", "NO" or "inconclusive" for a measured slope (or difference) ``r``.

    ``ci_above`` / ``ci_below``: inconclusive when the CI contains ``value`` (the data cannot
    tell which side the slope is on), NO when it lies wholly on the wrong side.
    ``ci_covers``: NO when the CI excludes ``value``, however wide (the data rule it out);
    inconclusive when it covers it but is wider than ``max_width``, since a wide enough
    interval covers any theory. ``within``: inconclusive when the CI is wider than
    ``max_width``. Otherwise ``decide``."""
    if rule in ("ci_above", "ci_below"):
        if r.ci_low <= value <= r.ci_high:
            return "inconclusive"
    elif r.ci_high - r.ci_low > max_width and (rule == "within" or decide(rule, r, value)):
        return "inconclusive"
    return "yes" if decide(rule, r, value, margin) else "NO"


def decide(rule: str, r: Rate, value: float, margin: float | None = None) -> bool:
    """Whether a measured slope (or difference) ``r`` satisfies ``rule`` (``CLAIM_RULES``)."""
    if rule == "ci_covers":
        return r.ci_low <= value <= r.ci_high
    if rule == "within":
        assert margin is not None, "rule 'within' needs a margin"
        return abs(r.slope - value) <= margin
    if rule == "ci_below":
        return r.ci_high < value
    if rule == "ci_above":
        return r.ci_low > value
    raise ValueError(f"Unknown claim rule {rule!r}; valid: {', '.join(CLAIM_RULES)}.")


def describe(c: ClaimSpec) -> str:
    """The rule in words, e.g. "slope of mean total loss (exact k=2): |x - -0.5| <= 0.1"."""
    what = f"{c.statistic} {'loss' if c.block == 'total' else c.block + ' error'}"
    x = f"slope({c.setting}) - slope({c.minus})" if c.minus else f"slope({c.setting})"
    if c.minus and c.other_block != c.block:
        x = f"slope({c.setting}, {c.block}) - slope({c.minus}, {c.other_block})"
    rule = (CLAIM_RULES[c.rule].replace("value", f"{c.value:g}")
            .replace("margin", f"{c.margin:g}" if c.margin is not None else "margin"))
    unsure = {"ci_above": f"a CI containing {c.value:g} is inconclusive",
              "ci_below": f"a CI containing {c.value:g} is inconclusive",
              "ci_covers": f"a CI containing {c.value:g} but wider than {c.max_width:g} is "
                           f"inconclusive"}.get(c.rule, f"a CI wider than {c.max_width:g} is inconclusive")
    return f"x = {x}, log({what}) on log(n): {rule} ({unsure})"


def _draws(rows_by_n, block: str, statistic: str, n_boot: int, seed: int):
    """(slope, draws, replicates, sizes) of one setting's block, or None if undecidable."""
    if not rows_by_n:
        return None
    ns, losses = series(rows_by_n, block) if _has_block(rows_by_n, block) else ([], [])
    replicates = min((len(v) for v in losses), default=0)
    if len(ns) < 2 or replicates < MIN_VERDICT_REPLICATES:
        return None
    point, draws = rate_draws(ns, losses, n_boot, seed, statistic)
    return point, draws, replicates, len(ns)


def _has_block(rows_by_n, block: str) -> bool:
    return block == "total" or all(block in r.blocks for rs in rows_by_n.values() for r in rs)


def evaluate_claims(study: Study, rows: Sequence[FitRow], n_boot: int = 1000) -> list[dict[str, Any]]:
    """Every claim of ``study`` decided on ``rows`` (see the module docstring); for a
    deep-learning experiment, its paired claims (``evaluate_paired_claims``)."""
    if getattr(study, "kind", "") == "experiment":
        return evaluate_paired_claims(study, rows)
    grouped, _ = by_setting(rows)
    out = []
    for i, c in enumerate(study.claims):
        first = _draws(grouped.get(c.setting), c.block, c.statistic, n_boot, seed=2 * i)
        second = (_draws(grouped.get(c.minus), c.other_block, c.statistic, n_boot, seed=2 * i + 1)
                  if c.minus else None)
        entry: dict[str, Any] = {"claim": c.text, "arxiv": c.arxiv or study.paper,
                                 "rule": describe(c), "holds": None, "numbers": {},
                                 "borrowed_loss": _borrowed(study, c)}
        if first is None or (c.minus and second is None):
            entry["numbers"] = {"note": "too few sizes or replicates to decide"}
            out.append(entry)
            continue
        point, draws = first[0], first[1]
        if second is not None:
            point, draws = point - second[0], draws - second[1]
        r = interval(point, draws)
        entry["numbers"] = {"x": r.slope, "ci_low": r.ci_low, "ci_high": r.ci_high,
                            "replicates": min(first[2], second[2] if second else first[2]),
                            "sizes": first[3]}
        entry["verdict"] = verdict(c.rule, r, c.value, c.margin, c.max_width)
        moving = _drift(c, grouped, n_boot, seed=2 * i) if c.drift else None
        if moving is not None:
            entry["numbers"]["drift"] = moving._asdict()
            if (moving.ci_low > 0 or moving.ci_high < 0) and abs(moving.slope) >= DRIFT_MARGIN:
                entry["verdict"] = "pre-asymptotic"
        entry["holds"] = {"yes": True, "NO": False}.get(entry["verdict"])
        out.append(entry)
    return out


def _borrowed(study: Study, c: ClaimSpec) -> str | None:
    """"TABLE from arXiv ID" where the claim's loss (or the loss of its ``minus``
    setting) is another paper's exponent table (``Study.borrowed_from``), else None. A
    block that no exponent table makes (the density loss "hellinger", a Wasserstein "W<r>")
    borrows nothing."""
    pairs = [(c.setting, c.block)] + ([(c.minus, c.minus_block or c.block)] if c.minus else [])
    used = {name for name, block in pairs if _from_table(block)}
    settings = [s for s in study.settings if s.name in used]
    found = sorted({f"{s.loss} from arXiv {study.borrowed_from(s)}" for s in settings
                    if study.borrowed_from(s)})
    return ", ".join(found) or None


def _from_table(block: str) -> bool:
    return block != "hellinger" and not (block[:1] == "W" and block[1:].isdigit())


#: Fewest sizes for the drift check: three in each half.
MIN_DRIFT_SIZES = 6
#: The least drift (in slope units) that makes a claim pre-asymptotic: a 95% interval
#: alone would flag one claim in twenty by chance, and a slope moving by less than this is
#: read as settled.
DRIFT_MARGIN = 0.1


def _drift(c: ClaimSpec, grouped, n_boot: int, seed: int) -> Rate | None:
    """How the claim's number moves with n: its value over the larger half of the sizes
    minus its value over the smaller half (halves of ceil(m/2) sizes each), with a 95%
    bootstrap interval; None with fewer than ``MIN_DRIFT_SIZES`` sizes."""
    names = [c.setting] + ([c.minus] if c.minus else [])
    sizes = sorted(set.intersection(*(set(grouped[name]) for name in names)))
    if len(sizes) < MIN_DRIFT_SIZES:
        return None
    half = (len(sizes) + 1) // 2
    parts = []
    for j, part in enumerate((sizes[:half], sizes[-half:])):
        point, draws = 0.0, np.zeros(n_boot)
        for k, name in enumerate(names):
            block = c.block if k == 0 else c.other_block
            got = _draws({n: grouped[name][n] for n in part}, block, c.statistic, n_boot,
                         seed=1000 + 4 * seed + 2 * j + k)
            if got is None:
                return None
            sign = 1.0 if k == 0 else -1.0
            point, draws = point + sign * got[0], draws + sign * got[1]
        parts.append((point, draws))
    return interval(parts[1][0] - parts[0][0], parts[1][1] - parts[0][1])


#: Fewer paired seeds than this leave a paired claim undecided.
MIN_PAIRED_SEEDS = 3


def paired_interval(diffs: Sequence[float], level: float = 0.95) -> Rate:
    """Mean of paired differences with its t interval: mean +- t_{(1+level)/2, k-1} s / sqrt(k)."""
    from scipy import stats
    d = np.asarray(diffs, dtype=float)
    half = stats.t.ppf((1 + level) / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return Rate(float(d.mean()), float(d.mean() - half), float(d.mean() + half))


def decide_paired(rule: str, r: Rate, value: float, margin: float | None = None) -> bool:
    """Whether a paired mean difference and its interval satisfy ``rule`` (PAIRED_RULES)."""
    if rule == "at_least":
        assert margin is not None, "rule 'at_least' needs a margin"
        return r.slope >= value and r.ci_low > value - margin
    return decide(rule, r, value, margin)


def describe_paired(c: Any, n: int) -> str:
    from ..experiments.spec import PAIRED_RULES
    x = f"{c.metric}({c.arm}) - {c.metric}({c.minus}) at n={n}"
    if c.versus_n is not None:
        x = f"[{x}] - [the same at n={c.versus_n}]"
    rule = (PAIRED_RULES[c.rule].replace("value", f"{c.value:g}")
            .replace("margin", f"{c.margin:g}" if c.margin is not None else "margin")
            .replace("level", f"{100 * c.level:.4g}%"))
    return f"x = {x}, paired over seeds: {rule}"


def _paired_diffs(values: dict, c: Any, n: int) -> list[float]:
    """Per seed: the claim's difference, for the seeds that have every run it needs."""
    sizes = [n] if c.versus_n is None else [n, c.versus_n]
    seeds = set.intersection(*(set(values.get((arm, m), {})) for arm in (c.arm, c.minus) for m in sizes))

    def diff(m: int, r: int) -> float:
        return values[(c.arm, m)][r] - values[(c.minus, m)][r]

    return [diff(n, r) - (diff(c.versus_n, r) if c.versus_n is not None else 0.0) for r in sorted(seeds)]


def evaluate_paired_claims(exp: Any, rows: Sequence[FitRow]) -> list[dict[str, Any]]:
    """Every claim of an experiment: the paired mean difference over seeds, its t interval
    (at the claim's level, 95% by default) and the rule's verdict; undecided with fewer
    than MIN_PAIRED_SEEDS seeds."""
    out = []
    for c in exp.claims:
        values: dict[tuple[str, int], dict[int, float]] = {}
        for r in rows:
            if c.metric in r.blocks:
                values.setdefault((r.setting, r.n), {})[r.replicate] = r.blocks[c.metric]
        n = c.n if c.n is not None else max((r.n for r in rows), default=max(exp.sizes))
        entry: dict[str, Any] = {"claim": c.text, "arxiv": c.arxiv or exp.paper,
                                 "rule": describe_paired(c, n), "holds": None, "numbers": {}}
        diffs = _paired_diffs(values, c, n)
        if len(diffs) < MIN_PAIRED_SEEDS:
            entry["numbers"] = {"note": f"{len(diffs)} paired seeds; {MIN_PAIRED_SEEDS} needed to decide"}
        else:
            mean = paired_interval(diffs, c.level)
            entry["numbers"] = {"x": mean.slope, "ci_low": mean.ci_low, "ci_high": mean.ci_high,
                                "seeds": len(diffs), "n": n}
            entry["holds"] = decide_paired(c.rule, mean, c.value, c.margin)
        out.append(entry)
    return out


def measured(nums: dict[str, Any]) -> str:
    """The numbers of a claim in words: x [95% CI] and what it rests on."""
    if "x" not in nums:
        return nums.get("note", "")
    base = f"{nums['x']:+.3f} [{nums['ci_low']:+.3f}, {nums['ci_high']:+.3f}]"
    if "seeds" in nums:
        return f"{base}, {nums['seeds']} seeds"
    return f"{base}, {nums['replicates']} replicates x {nums['sizes']} sizes{_drift_words(nums)}"


def _drift_words(nums: dict[str, Any]) -> str:
    d = nums.get("drift")
    if d is None:
        return ""
    return (f"; larger half of the sizes minus smaller half {d['slope']:+.3f} "
            f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")


def claims_text(claims: Sequence[dict[str, Any]]) -> str:
    """A plain-text claims table: holds (yes / NO / undecided), the number, the claim."""
    lines = []
    for c in claims:
        holds = verdict_word(c)
        nums = c["numbers"]
        number = (f"{nums['x']:+.3f} [{nums['ci_low']:+.3f}, {nums['ci_high']:+.3f}]"
                  if "x" in nums else nums.get("note", ""))
        borrowed = f"; loss borrowed: {c['borrowed_loss']}" if c.get("borrowed_loss") else ""
        lines.append(f"{holds:9s}  {number:28s}  {c['claim']} ({c['rule']}{_drift_words(nums)}"
                     f"{borrowed})")
    return "\n".join(lines)

