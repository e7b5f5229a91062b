"""Deep-learning experiments (issue 13): paired claims on hand-made rows, spec errors, and a
whole run on a tiny random BERT (resumed without redoing finished runs)."""

import pytest

from gatelab.experiments.spec import Experiment
from gatelab.studies.claims import evaluate_claims, paired_interval
from gatelab.studies.spec import SpecError
from gatelab.studies.store import FitRow
from markers import needs_real_data

BASE = {"kind": "experiment", "name": "toy", "task": "prefix-sharing", "sizes": [4, 8], "seeds": 5,
        "arms": [{"name": "a", "options": {"kind": "mlp"}}, {"name": "b", "options": {"kind": "no-share"}}]}


def _claim(**kw):
    return {"text": "a beats b", "arm": "a", "minus": "b", "rule": "ci_above", "value": 0.0, **kw}


def _rows(diffs_by_n, base=50.0):
    """Rows where arm a's accuracy exceeds b's by the given per-seed differences."""
    rows = []
    for n, diffs in diffs_by_n.items():
        for r, d in enumerate(diffs):
            for arm, acc in (("a", base + d), ("b", base)):
                rows.append(FitRow("toy", arm, n, r, 0, 0.0, 0.0, {"accuracy": acc}, 0.0, 0, True, False, 1.0,
                                   "x"))
    return rows


def _decide(claim, rows):
    exp = Experiment.from_dict({**BASE, "claims": [claim]})
    return evaluate_claims(exp, rows)[0]


def test_paired_interval_is_the_t_interval_by_hand():
    r = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * 1.5811388 / 5 ** 0.5  # t(0.975, 4) * sd / sqrt(5)
    assert r.slope == pytest.approx(3.0) and r.ci_low == pytest.approx(3 - half, abs=1e-6)
    assert r.ci_high == pytest.approx(3 + half, abs=1e-6)


def test_ci_above_holds_and_fails():
    assert _decide(_claim(n=4), _rows({4: [1.0, 1.2, 0.8, 1.1, 0.9]}))["holds"] is True
    entry = _decide(_claim(n=4), _rows({4: [1.0, -1.2, 0.8, -1.1, 0.9]}))
    assert entry["holds"] is False and entry["numbers"]["seeds"] == 5
    assert entry["numbers"]["x"] == pytest.approx(0.08)


def test_at_least_uses_the_mean_and_the_margin():
    claim = _claim(n=4, rule="at_least", margin=0.5)
    assert _decide(claim, _rows({4: [0.1, 0.2, 0.0, 0.1, 0.1]}))["holds"] is True
    assert _decide(claim, _rows({4: [-0.1, -0.2, 0.0, -0.1, -0.1]}))["holds"] is False  # mean < 0
    assert _decide(claim, _rows({4: [3.0, -3.0, 2.0, -2.0, 0.5]}))["holds"] is False  # CI too wide


def test_a_higher_level_widens_the_interval_and_can_undo_a_claim():
    diffs = [0.5, 1.5, 0.8, 1.2, 0.2]  # mean 0.84, sd 0.5, t-interval at 95% above 0, at 99.5% not
    assert _decide(_claim(n=4), _rows({4: diffs}))["holds"] is True
    strict = _decide(_claim(n=4, level=0.995), _rows({4: diffs}))
    assert strict["holds"] is False and "99.5% CI" in strict["rule"]
    assert strict["numbers"]["ci_low"] == pytest.approx(paired_interval(diffs, 0.995).ci_low)
    with pytest.raises(SpecError, match=r"claims\[0\].level"):
        Experiment.from_dict({**BASE, "claims": [_claim(level=95.0)]})


def test_versus_n_compares_the_differences_of_two_sizes():
    rows = _rows({4: [2.0, 2.1, 1.9, 2.2, 2.0], 8: [0.1, 0.0, 0.2, 0.1, 0.0]})
    entry = _decide(_claim(n=4, versus_n=8), rows)
    assert entry["holds"] is True and entry["numbers"]["x"] == pytest.approx(1.96)
    assert _decide(_claim(n=8, versus_n=4), rows)["holds"] is False


def test_too_few_paired_seeds_leave_a_claim_undecided():
    entry = _decide(_claim(n=8), _rows({4: [1.0] * 5, 8: [1.0, 1.0]}))
    assert entry["holds"] is None and "2 paired seeds" in entry["numbers"]["note"]


@pytest.mark.parametrize("change,match", [
    ({"task": "nope"}, "task: must be one of"),
    ({"arms": [{"name": "a", "options": {"kind": "shared"}}]}, r"arms\[0\].options.*Unknown prefix kind"),
    ({"arms": [{"name": "a", "options": {"gate": "softmaxx"}}]}, "Unknown prefix score gate"),
    ({"arms": [{"name": "a", "options": {"length": -1}}]}, "prefix length"),
    ({"arms": [{"name": "a", "options": {"colour": 1}}]}, r"unknown key\(s\) \['colour'\]"),
    ({"options": {"steps": 3}}, r"options: unknown key\(s\) \['steps'\]"),
    ({"claims": [_claim(arm="c")]}, r"claims\[0\].arm: must be an arm"),
    ({"claims": [_claim(n=16)]}, r"claims\[0\].n: must be one of the sizes"),
    ({"claims": [_claim(rule="bigger")]}, r"claims\[0\].rule"),
])
def test_bad_specs_name_the_key(change, match):
    with pytest.raises(SpecError, match=match):
        Experiment.from_dict({**BASE, **change})


@pytest.mark.parametrize("name,arms", [("prefix-sharing", {"shared", "no-share"}),
                                       ("norga-continual", {"linear", "norga-tanh", "norga-sigmoid"}),
                                       ("active-attention", {"standard", "relu", "gelu", "tanh", "monomial"}),
                                       ("fusemoe-missing", {"joint-laplace@0.5", "concat@0.8", "late@0.0"}),
                                       ("hmoe-gates", {"SS", "SL", "LS", "LL"}),
                                       ("fusemoe-irregular", {"fusemoe-laplace@0.6", "impute@0.3"}),
                                       ("dewi", {"ce", "mixup", "dewi"})])
def test_the_catalogue_experiments_load_and_their_claims_name_real_arms(name, arms):
    from gatelab.studies import catalogue
    exp = catalogue.get(name)
    assert exp.kind == "experiment" and exp.seeds >= 5 and exp.quick_seeds >= 5
    assert {a.name for a in exp.arms} >= arms and exp.claims
    assert all(c.n is None or c.n in exp.sizes for c in exp.claims)


@pytest.fixture
def tiny_spec(tiny_backbone):
    """A toy experiment on a tiny random BERT (MiniLM's tokenizer), 2 x 3 seeds x 2 arms."""
    return {**BASE, "sizes": [2, 3], "seeds": 3, "options": {
        "backbone": tiny_backbone, "layers": [1], "test_per_class": 2, "pool_per_class": 3, "max_length": 16,
        "min_steps": 2, "epochs": 0},
        "arms": [{"name": "a", "options": {"kind": "mlp", "length": 2, "bottleneck": 4}},
                 {"name": "b", "options": {"length": 0}}],
        "claims": [_claim(n=2)]}


def _toml(spec, path):
    import json
    lines = [f"{k} = {json.dumps(v)}" for k, v in spec.items() if not isinstance(v, (dict, list))
             or k in ("sizes",)]
    lines += ["[options]"] + [f"{k} = {json.dumps(v)}" for k, v in spec["options"].items()]
    for arm in spec["arms"]:
        opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in arm["options"].items())
        lines += ["[[arms]]", f'name = "{arm["name"]}"', f"options = {{ {opts} }}"]
    for c in spec["claims"]:
        lines += ["[[claims]]"] + [f"{k} = {json.dumps(v)}" for k, v in c.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@needs_real_data
def test_the_cli_reproduces_an_experiment_with_claims_and_a_report(tiny_spec, tmp_path, capsys, monkeypatch):
    import json

    from gatelab.cli import main
    tiny = tiny_spec["options"].pop("backbone")  # given on the command line instead
    spec_file = _toml(tiny_spec, tmp_path / "toy.toml")
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", str(spec_file), "--json", "--backbone", tiny]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["db"] == "runs/toy@tiny-bert.sqlite" and (tmp_path / out["db"]).is_file()
    assert out["fits"] == 12 and len(out["claims"]) == 1 and out["claims"][0]["numbers"]["seeds"] == 3
    assert {e["arm"] for e in out["results"]} == {"a", "b"}
    assert "Claims" in (tmp_path / "runs" / "toy" / "report.html").read_text()
    assert main(["reproduce", str(spec_file), "--backbone", str(tmp_path / "none")]) == 2
    assert "No backbone at" in capsys.readouterr().err
    assert main(["reproduce", "softmax-gaussian", "--backbone", tiny]) == 2
    assert "statistics study" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "toy@none.sqlite").exists()


@needs_real_data
def test_a_tiny_experiment_runs_resumes_and_reports(tiny_spec, tmp_path):
    from gatelab.studies import Store, reproduce
    from gatelab.studies.catalogue import from_dict
    exp = from_dict(tiny_spec)
    with Store(tmp_path / "runs.sqlite") as store:
        stats = reproduce(exp, store, progress=False)
        rows = store.rows("toy")
        assert stats.fits == 12 and len(rows) == 12
        assert all(0 <= r.blocks["accuracy"] <= 100 for r in rows)
        # the arms of one seed share their seed (paired), seeds differ
        assert len({r.seed for r in rows if r.n == 2}) == 3
        store.conn.execute("DELETE FROM fits WHERE setting = 'a' AND n = 3 AND replicate = 1")
        store.conn.commit()
        again = reproduce(exp, store, progress=False)
        assert again.fits == 1 and again.skipped == 11
        redone = [r for r in store.rows("toy") if (r.setting, r.n, r.replicate) == ("a", 3, 1)]
        before = [r for r in rows if (r.setting, r.n, r.replicate) == ("a", 3, 1)]
        assert redone[0].blocks["accuracy"] == before[0].blocks["accuracy"]  # seeded: the same run
        claims = evaluate_claims(exp, store.rows("toy"))
        assert claims[0]["numbers"]["seeds"] == 3 and claims[0]["holds"] in (True, False)
