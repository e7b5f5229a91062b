"""Claims: rules in the spec, decided on measured slopes; hand-made result tables where
each rule holds and where it fails."""

import json

import numpy as np
import pytest

from cases import TINY
from gatelab import cli
from gatelab.studies import Store, Study, catalogue
from gatelab.studies.claims import DRIFT_MARGIN, claims_text, decide, evaluate_claims, verdict
from gatelab.studies.rates import Rate
from gatelab.studies.runner import translation_blocks
from gatelab.studies.spec import SpecError
from gatelab.studies.store import FitRow

SIZES = [100, 400, 1600, 6400]


def _rows(setting, exponent, replicates=20, seed=0, noise=0.2):
    """Losses C n^exponent times log-normal noise: the slope is exponent, up to noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        for r in range(replicates):
            loss = 3.0 * n ** exponent * float(np.exp(noise * rng.standard_normal()))
            rows.append(FitRow("s", setting, n, r, 0, loss, 0.0, {"a": 2 * loss}, 0.0, 10,
                               True, False, 0.0, "test", status="converged"))
    return rows


def _study(claims):
    spec = catalogue.get("softmax-gaussian").to_dict()
    spec["settings"] = [dict(spec["settings"][0], name="fast"), dict(spec["settings"][1], name="slow")]
    return Study.from_dict({**spec, "claims": claims})


def test_each_rule_holds_and_fails_by_hand():
    r = Rate(-0.48, -0.55, -0.41)
    assert decide("ci_covers", r, -0.5) and not decide("ci_covers", r, -0.25)
    assert decide("within", r, -0.5, 0.1) and not decide("within", r, -0.5, 0.01)
    assert decide("ci_below", r, -0.4) and not decide("ci_below", r, -0.45)
    assert decide("ci_above", r, -0.6) and not decide("ci_above", r, -0.5)


def test_verdicts_by_hand_hold_fail_or_are_inconclusive():
    narrow, wide = Rate(-0.48, -0.55, -0.41), Rate(-0.48, -0.7, -0.3)
    assert verdict("ci_covers", narrow, -0.5) == "yes" and verdict("ci_covers", narrow, -0.25) == "NO"
    assert verdict("ci_covers", wide, -0.5) == "inconclusive"  # 0.4 wide: it would cover much
    assert verdict("ci_covers", wide, -0.5, max_width=0.5) == "yes"
    # a wide CI that excludes the value rules the claim out (k = 3 D2 mean: -5.7 [-6.0, -3.1])
    assert verdict("ci_covers", Rate(-5.7, -6.0, -3.1), -0.5) == "NO"
    assert verdict("ci_covers", wide, -0.2) == "NO"
    assert verdict("within", wide, -0.5, 0.1) == "inconclusive"
    assert verdict("within", narrow, -0.5, 0.01) == "NO"
    # one-sided rules: a CI containing the value cannot tell the side
    assert verdict("ci_below", narrow, -0.5) == "inconclusive"
    assert verdict("ci_below", narrow, -0.4) == "yes" and verdict("ci_below", narrow, -0.6) == "NO"
    assert verdict("ci_above", narrow, -0.6) == "yes" and verdict("ci_above", narrow, -0.3) == "NO"
    assert verdict("ci_above", wide, 0.0) == "NO" and verdict("ci_above", Rate(0.1, -0.1, 0.3), 0.0) == \
        "inconclusive"


def test_an_inconclusive_claim_is_reported_as_such():
    study = _study([{"text": "fast vs slow", "setting": "fast", "minus": "slow", "rule": "ci_below",
                     "value": -0.25}])
    claims = evaluate_claims(study, _rows("fast", -0.5) + _rows("slow", -0.25, seed=1))
    (c,) = claims
    assert c["numbers"]["ci_low"] < -0.25 < c["numbers"]["ci_high"]
    assert c["verdict"] == "inconclusive" and c["holds"] is None
    assert claims_text(claims).startswith("inconclusive") and "inconclusive" in c["rule"]


def test_claims_are_decided_on_the_rows():
    study = _study([
        {"text": "fast is root-n", "setting": "fast", "rule": "ci_covers", "value": -0.5},
        {"text": "fast is n^-1/4", "setting": "fast", "rule": "within", "value": -0.25,
         "margin": 0.05},
        {"text": "fast beats slow", "setting": "fast", "minus": "slow", "rule": "ci_below"},
        {"text": "slow beats fast", "setting": "fast", "minus": "slow", "rule": "ci_above"},
        {"text": "block a of slow", "setting": "slow", "block": "a", "rule": "within",
         "value": -0.25, "margin": 0.05, "statistic": "median"},
    ])
    claims = evaluate_claims(study, _rows("fast", -0.5) + _rows("slow", -0.25, seed=1))
    assert [c["holds"] for c in claims] == [True, False, True, False, True]
    assert claims[0]["numbers"]["x"] == pytest.approx(-0.5, abs=0.03)
    assert claims[2]["numbers"]["x"] == pytest.approx(-0.25, abs=0.04)
    assert claims[2]["numbers"]["ci_high"] < 0 and claims[0]["arxiv"] == "2305.03288"
    assert "slope(fast) - slope(slow)" in claims[2]["rule"]


def test_too_few_replicates_or_sizes_leave_a_claim_undecided():
    study = _study([{"text": "x", "setting": "fast", "rule": "ci_covers", "value": -0.5},
                    {"text": "y", "setting": "slow", "rule": "ci_covers", "value": -0.5}])
    claims = evaluate_claims(study, _rows("fast", -0.5, replicates=2))
    assert [c["holds"] for c in claims] == [None, None]
    assert "too few" in claims[0]["numbers"]["note"]


def test_bad_claims_name_their_key():
    with pytest.raises(SpecError, match=r"claims\[0\]\.setting: must be a setting of this study"):
        _study([{"text": "x", "setting": "nope", "rule": "ci_covers"}])
    with pytest.raises(SpecError, match=r"claims\[0\]\.margin: must be a number for rule 'within'"):
        _study([{"text": "x", "setting": "fast", "rule": "within"}])
    with pytest.raises(SpecError, match=r"claims\[0\]\.rule: must be one of"):
        _study([{"text": "x", "setting": "fast", "rule": "probably"}])
    with pytest.raises(SpecError, match=r"claims\[0\]: missing key\(s\) \['rule'\]"):
        _study([{"text": "x", "setting": "fast"}])


def test_every_catalogue_claim_names_real_settings_and_blocks():
    for name in catalogue.names():
        study = catalogue.get(name)
        if getattr(study, "kind", "") == "experiment":  # paired claims name arms: tests/experiments
            continue
        settings = {s.name: s for s in study.settings}
        for c in study.claims:
            assert c.setting in settings and (c.minus is None or c.minus in settings)
            if c.block != "total":
                model = study.fitted_model(settings[c.setting])
                translated = c.block == "translated" and translation_blocks(model, settings[c.setting])
                density = c.block == "hellinger" and settings[c.setting].density
                assert c.block in model.param_shapes() or c.block == "mass" or translated or density, \
                    (name, c.block)


def test_a_claim_on_a_borrowed_loss_says_so():
    deviated = catalogue.get("deviated")
    rows = [FitRow("deviated", s.name, n, r, 0, 0.3 * n ** -0.5, 0.0, {}, 0.0, 10, True, False,
                   0.0, "test", status="converged")
            for s in deviated.settings for n in SIZES for r in range(8)]
    claims = evaluate_claims(deviated, rows, n_boot=50)
    over = next(s.name for s in deviated.settings if s.loss == "D2-softmax")
    on_over = [c for c, spec in zip(claims, deviated.claims) if over in (spec.setting, spec.minus)]
    assert on_over and all(c["borrowed_loss"] == "D2-softmax from arXiv 2305.03288" for c in on_over)
    others = [c for c, spec in zip(claims, deviated.claims) if over not in (spec.setting, spec.minus)]
    assert others and all(c["borrowed_loss"] is None for c in others)
    assert "loss borrowed: D2-softmax from arXiv 2305.03288" in claims_text(on_over)


def test_a_claim_on_the_density_loss_borrows_no_table():
    cells = catalogue.get("topk-cells")
    rows = [FitRow("topk-cells", s.name, n, r, 0, 0.3 * n ** -0.5, 0.0, {"hellinger": n ** -0.5},
                   0.0, 10, True, False, 0.0, "test", status="converged")
            for s in cells.settings for n in SIZES for r in range(8)]
    claims = evaluate_claims(cells, rows, n_boot=50)
    by_block = {(spec.block, spec.setting): c["borrowed_loss"] for c, spec in zip(claims, cells.claims)}
    assert by_block[("hellinger", "over k=3 K=2")] is None
    assert by_block[("total", "over k=3 K=2")] == "D2-softmax from arXiv 2305.03288"


# TINY with 3 replicates (enough to decide), one setting, and a claim that fails.
SMALL = (TINY.replace('name = "tiny"', 'name = "small"')
         .replace("quick_replicates = 2", "quick_replicates = 3")
         .split("[[settings]]")[0] + """[[settings]]
name = "exact"
fitted_k = 2
loss = "D1"
theory = -0.5

[[claims]]
text = "root-n"
setting = "exact"
rule = "ci_covers"
value = -0.5

[[claims]]
text = "impossibly fast"
setting = "exact"
rule = "ci_below"
value = -5.0
""")


def test_reproduce_json_and_report_end_with_the_claims(tmp_path, capsys):
    path, db = tmp_path / "small.toml", tmp_path / "s.sqlite"
    path.write_text(SMALL)
    assert cli.main(["reproduce", str(path), "--db", str(db), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with Store(db) as store:
        want = evaluate_claims(Study.from_dict(store.study_spec("small")), store.rows("small"))
    assert result["claims"] == json.loads(json.dumps(want))
    assert [c["holds"] for c in want][1] is False          # it says so when a claim fails
    html = (tmp_path / "small" / "report.html").read_text()
    assert html.index("Claims") < html.index("Rates") and "impossibly fast" in html
    assert "holds-NO" in html
    assert cli.main(["report", str(db)]) == 0
    assert "NO " in capsys.readouterr().out


def _bent_rows(setting, early, late, sizes, replicates=20, seed=0, noise=0.1):
    """Losses with slope ``early`` up to the middle size and ``late`` beyond it."""
    rng = np.random.default_rng(seed)
    knee = sizes[len(sizes) // 2]
    rows = []
    for n in sizes:
        base = (min(n, knee) ** early) * ((max(n, knee) / knee) ** late)
        for r in range(replicates):
            loss = base * float(np.exp(noise * rng.standard_normal()))
            rows.append(FitRow("s", setting, n, r, 0, loss, 0.0, {}, 0.0, 10, True, False, 0.0,
                               "test", status="converged"))
    return rows


def test_a_slope_still_moving_across_n_is_pre_asymptotic():
    sizes = [1000 * 2 ** i for i in range(8)]
    # The whole range's slope is about -0.45: a claim of -0.45 holds there.
    claim = {"text": "a slope of -0.45", "setting": "fast", "rule": "ci_covers", "value": -0.45,
             "max_width": 1.0}
    study = _study([claim, {**claim, "text": "unchecked", "drift": False}])
    (moving, unchecked) = evaluate_claims(study, _bent_rows("fast", -0.2, -0.8, sizes, replicates=80,
                                                             noise=0.6))
    # Over all sizes the CI covers -0.45; the halves differ by about -0.6 (the larger
    # half's slope -0.8 against the smaller half's -0.2).
    assert moving["numbers"]["ci_low"] < -0.45 < moving["numbers"]["ci_high"]
    drift = moving["numbers"]["drift"]
    assert drift["ci_high"] < 0 and drift["slope"] == pytest.approx(-0.6, abs=0.2)
    assert moving["verdict"] == "pre-asymptotic" and moving["holds"] is None
    assert "larger half of the sizes minus smaller half" in claims_text([moving])
    assert unchecked["verdict"] == "yes" and "drift" not in unchecked["numbers"]
    # A straight line: the drift interval covers 0 and the verdict stands.
    (straight, _) = evaluate_claims(study, _bent_rows("fast", -0.45, -0.45, sizes, replicates=80,
                                                           noise=0.6))
    assert straight["numbers"]["drift"]["ci_low"] < 0 < straight["numbers"]["drift"]["ci_high"]
    assert straight["verdict"] == "yes"
    # Fewer than 6 sizes: no drift check.
    (short, _) = evaluate_claims(study, _bent_rows("fast", -0.05, -0.9, sizes[:5]))
    assert "drift" not in short["numbers"]


def test_a_difference_claim_is_checked_for_drift_on_the_difference():
    sizes = [1000 * 2 ** i for i in range(6)]
    study = _study([{"text": "fast beats slow", "setting": "fast", "minus": "slow",
                     "rule": "ci_below"}])
    # Same bend in both settings: the difference does not move (by less than DRIFT_MARGIN,
    # whatever its interval says).
    rows = (_bent_rows("fast", -0.6, -1.0, sizes, noise=0.05)
            + _bent_rows("slow", -0.1, -0.5, sizes, seed=1, noise=0.05))
    (c,) = evaluate_claims(study, rows)
    assert abs(c["numbers"]["drift"]["slope"]) < DRIFT_MARGIN and c["verdict"] == "yes"
    # Only one setting bends: the difference moves.
    rows = _bent_rows("fast", -0.6, -1.4, sizes) + _bent_rows("slow", -0.1, -0.1, sizes, seed=1)
    (c,) = evaluate_claims(study, rows)
    assert c["numbers"]["drift"]["ci_high"] < 0 and c["verdict"] == "pre-asymptotic"


def _block_rows(setting, exponents, replicates=20, seed=0):
    """Rows whose block errors fall as n^exponents[block], log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in SIZES:
        for r in range(replicates):
            blocks = {b: n ** e * float(np.exp(0.2 * rng.standard_normal()))
                      for b, e in exponents.items()}
            rows.append(FitRow("s", setting, n, r, 0, 1.0, 0.0, blocks, 0.0, 10, True, False,
                               0.0, "test", status="converged"))
    return rows


def test_a_claim_may_compare_different_blocks_of_two_settings():
    """minus_block: a Laplace gate's W against a softmax gate's beta1. fast's W falls as
    n^-1/2 and slow's beta1 as n^-1/8, so W - beta1 is about -0.375 (yes); slow's own W
    falls as n^-1/2 too, so the same-block claim cannot tell (inconclusive)."""
    claim = {"text": "W faster than beta1", "setting": "fast", "minus": "slow", "block": "W",
             "rule": "ci_below", "value": 0.0}
    study = _study([{**claim, "minus_block": "beta1"}, claim])
    rows = (_block_rows("fast", {"W": -0.5}) +
            _block_rows("slow", {"W": -0.5, "beta1": -0.125}, seed=1))
    other, same = evaluate_claims(study, rows)
    assert other["numbers"]["x"] == pytest.approx(-0.375, abs=0.06) and other["verdict"] == "yes"
    assert "slope(fast, W) - slope(slow, beta1)" in other["rule"]
    assert abs(same["numbers"]["x"]) < 0.06 and same["verdict"] == "inconclusive"
    with pytest.raises(SpecError, match=r"minus_block: must be set only with minus"):
        _study([{"text": "t", "setting": "fast", "rule": "ci_below", "minus_block": "a"}])
