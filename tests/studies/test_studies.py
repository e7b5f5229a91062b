import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import gatelab.cli as cli
from cases import (
    TINY,
    assert_rows_score_their_estimates,
    run_small_study,
)
from gatelab.studies import (
    SpecError,
    Store,
    Study,
    catalogue,
    load_study,
    plan,
    rate,
    rate_table,
    reproduce,
    seed_for,
    verdict,
)
from gatelab.studies.claims import evaluate_claims
from gatelab.studies.rates import Rate
from gatelab.studies.runner import StaleResults, Unit, run_unit, setting_hash


@pytest.fixture
def tiny_path(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture
def tiny(tiny_path):
    return load_study(tiny_path)


# --- specifications ------------------------------------------------------------------

def test_catalogue_studies_load_and_validate():
    assert {"softmax-gaussian", "laplace-gaussian", "cosine-vs-perturbed"} <= set(catalogue.names())
    for name in catalogue.names():
        study = catalogue.get(name)
        if getattr(study, "kind", "") != "experiment":  # experiments: tests/experiments
            study.truth.tensors()
    study = catalogue.get("softmax-gaussian")
    assert len(study.sizes) > 150 and study.sizes[0] == 100 and study.sizes[-1] == 100_000
    assert [s.fitted_k for s in study.settings] == [2, 3, 4]


@pytest.mark.parametrize("change,message", [
    (lambda d: d["settings"][1].update(fitted_k=0), r"settings\[1\]\.fitted_k: must be an int >= 1"),
    (lambda d: d["settings"][0].update(loss="D9"), r"settings\[0\]\.loss: must be one of"),
    (lambda d: d["settings"][0].update(colour="red"), r"settings\[0\]: unknown key\(s\) \['colour'\]"),
    (lambda d: d["truth"]["params"].pop("var"), r"truth: .*missing \['var'\]"),
    (lambda d: d.update(sizes=[300]), r"sizes: must be at least two sample sizes"),
    (lambda d: d.pop("truth"), r"study: missing key\(s\) \['truth'\]"),
    (lambda d: d["estimator"].update(lr=0.1), r"estimator: must be a table of method, tol"),
    (lambda d: d["estimator"].update(method="adam"),
     r"estimator.method: must be .em., .lsq., .segm.* or .contin"),
    (lambda d: d["estimator"].update(method="segments"), r"settings\[0\]: fit_topk_segments fits"),
    (lambda d: d["estimator"].update(temperatures=[1.0, 0.0]),
     r"estimator.temperatures: must be given only with method = 'continuation'"),
    (lambda d: d["estimator"].update(method="continuation", temperatures=[0.1, 1.0, 0.0]),
     r"estimator.temperatures must be a falling list of numbers ending at 0"),
    (lambda d: d["truth"].update(gate_options={"tau": 1}), r"truth\.gate_options: Bad options"),
    (lambda d: d["truth"]["covariates"].update(hgh=1.0), r"truth\.covariates: Bad options"),
    (lambda d: d["truth"].update(expert_options={"degre": 2}), r"truth\.expert_options: Bad"),
    (lambda d: d["settings"][1].update(gate_options={"top_kk": 1}),
     r"settings\[1\]\.gate_options: Bad options"),
])
def test_spec_errors_name_the_key(change, message):
    import tomllib
    data = tomllib.loads(TINY)
    data.setdefault("estimator", {"tol": 1e-6})
    change(data)
    with pytest.raises(SpecError, match=message):
        Study.from_dict(data)


def test_bad_toml_and_unknown_study(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SpecError, match="is not valid TOML"):
        load_study(bad)
    with pytest.raises(ValueError, match="Unknown study 'nope'. Built-in studies and experiments: "
                                         "active-attention, contaminated, "
                                         "cosine-vs-perturbed, cosine-vs-perturbed-certified, "
                                         "deviated"):
        catalogue.get("nope")


def test_log_spaced_grid():
    data = {"name": "g", "truth": {"n_experts": 1, "params": {"beta1": [[0.0]], "beta0": [0.0],
                                                            "a": [[1.0]], "b": [0.0], "var": [1.0]}},
            "settings": [{"name": "s", "fitted_k": 1}], "sizes": {"start": 100, "stop": 10000, "num": 3}}
    assert Study.from_dict(data).sizes == (100, 1000, 10000)


# --- seeds and planning ------------------------------------------------------------------

def test_seeds_depend_on_the_unit_only(tiny):
    a = seed_for(tiny, "exact", 300, 1)
    assert a == seed_for(tiny, "exact", 300, 1)
    others = {seed_for(tiny, s, n, r) for s in ("exact", "over") for n in (300, 600) for r in range(3)}
    assert len(others) == 12 and 0 <= a < 2 ** 63


def test_a_resumed_unit_draws_the_data_of_its_own_replicates(tiny):
    """Replicates 1 and 2 run alone (a resume after replicate 0 was saved) get the seeds,
    data and fits they get inside the full unit: seeds follow the replicate number, not
    the position within the unit."""
    full = run_unit(tiny, Unit("exact", 300, (0, 1, 2)))
    resumed = run_unit(tiny, Unit("exact", 300, (1, 2)))
    assert [r.replicate for r in resumed] == [1, 2]
    for row, ref in zip(resumed, full[1:]):
        assert row.seed == ref.seed == seed_for(tiny, "exact", 300, row.replicate)
        assert row.loglik == pytest.approx(ref.loglik, rel=1e-9)
        assert row.loss == pytest.approx(ref.loss, rel=1e-6)
    assert full[0].loglik != pytest.approx(resumed[0].loglik, rel=1e-6)  # the data differ


def test_plan_skips_finished_replicates(tiny):
    units = plan(tiny)
    assert sum(len(u.replicates) for u in units) == 2 * 3 * 3
    done = {("exact", 300, 0), ("exact", 300, 2)}
    left = [u for u in plan(tiny, done=done) if u.setting == "exact" and u.n == 300]
    assert [u.replicates for u in left] == [(1,)]


# --- running, resuming, rates ------------------------------------------------------------

def test_rerun_skips_finished_rows_and_results_do_not_depend_on_workers(tiny, tmp_path):
    with Store(tmp_path / "a.sqlite") as store:
        first = reproduce(tiny, store, quick=True, progress=False)
        again = reproduce(tiny, store, quick=True, progress=False)
        rows_a = store.rows("tiny")
    assert first.fits == 2 * 2 * 2 and again.fits == 0 and again.skipped == 8
    with Store(tmp_path / "b.sqlite") as store:
        reproduce(tiny, store, quick=True, workers=2, progress=False)
        rows_b = store.rows("tiny")
    key = lambda r: (r.setting, r.n, r.replicate)  # noqa: E731
    assert [(key(r), r.seed, r.loss, r.loglik) for r in rows_a] == \
           [(key(r), r.seed, r.loss, r.loglik) for r in sorted(rows_b, key=key)]


def test_rate_recovers_a_known_slope():
    rng = np.random.default_rng(0)
    ns = [100, 300, 1000, 3000, 10000]
    losses = [3.0 * n ** -0.5 * rng.lognormal(0, 0.3, size=200) for n in ns]
    r = rate(ns, losses)
    assert abs(r.slope + 0.5) < 0.03 and r.ci_low < -0.5 < r.ci_high
    assert r.ci_high - r.ci_low < 0.1


def test_trimmed_mean_by_hand():
    from gatelab.studies.rates import trimmed_mean
    assert trimmed_mean(np.array([1.0, 2.0, 3.0, 4.0, 100.0]), cut=0.2) == pytest.approx(3.0)
    assert trimmed_mean(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == pytest.approx(22.0)  # 10% of 5: none
    rows = np.array([[5.0, 1e6, 1.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0, -1e6], np.arange(10.0)])
    assert trimmed_mean(rows).tolist() == pytest.approx([4.5, 4.5])  # one value dropped at each end


def test_runoff_fractions_count_separated_fits_per_setting_and_n():
    from gatelab.studies.rates import runoff_fractions
    from gatelab.studies.store import FitRow
    def row(setting, n, status):
        return FitRow("s", setting, n, 0, 0, 1.0, 0.0, {}, 0.0, 1, True, False, 0.0, "v", "h", status)
    rows = [row("a", 10, "separated"), row("a", 10, "converged"), row("a", 10, "converged"),
            row("a", 20, "max_iter"), row("b", 10, "separated")]
    assert runoff_fractions(rows) == {"a": {10: pytest.approx(1 / 3), 20: 0.0}, "b": {10: 1.0}}


def test_verdicts():
    assert verdict(-0.5, Rate(-0.45, -0.6, -0.4)) == "within CI"
    assert verdict(-0.5, Rate(-0.9, -1.0, -0.8)) == "faster"
    assert verdict(-0.5, Rate(-0.2, -0.3, -0.1)) == "slower"
    assert verdict(None, Rate(-0.2, -0.3, -0.1)) == "n/a"
    # covering the theory with an interval wider than 0.3, or one that also covers 0, says nothing
    assert verdict(-0.5, Rate(-0.5, -0.7, -0.35)) == "inconclusive"
    assert verdict(-0.5, Rate(-0.5, -0.7, -0.35), max_width=0.4) == "within CI"
    assert verdict(-0.1, Rate(-0.05, -0.15, 0.05)) == "inconclusive"
    assert verdict(-0.5, Rate(-0.1, -0.3, 0.1)) == "slower"  # decisive against the theory


def test_rate_table_covers_every_setting_and_block(tiny, tmp_path):
    with Store(tmp_path / "t.sqlite") as store:
        reproduce(tiny, store, progress=False)
        table = rate_table(tiny, store.rows("tiny"), n_boot=200)
    keys = {(r["setting"], r["block"]) for r in table}
    assert keys == {(s, b) for s in ("exact", "over")
                    for b in ("total", "beta1", "a", "b", "var", "mass", "translated")}
    exact = next(r for r in table if r["setting"] == "exact" and r["block"] == "total")
    assert exact["theory"] == -0.5 and exact["ci_low"] <= exact["slope"] <= exact["ci_high"]


def test_sigkill_mid_run_loses_only_fits_in_flight(tiny_path, tmp_path):
    # Six sizes, so that the run is still going (seconds) when the first unit commits.
    sizes = [300, 600, 1200, 2400, 4800, 9600]
    tiny_path.write_text(TINY.replace("sizes = [300, 600, 1200]", f"sizes = {sizes}"))
    total_fits = len(sizes) * 3 * 2
    db = tmp_path / "kill.sqlite"
    cmd = [sys.executable, "-m", "gatelab.cli", "reproduce", str(tiny_path), "--db", str(db),
           "--out", str(tmp_path / "out"), "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    count = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                count = sqlite3.connect(db).execute("SELECT COUNT(*) FROM fits").fetchone()[0]
            except sqlite3.OperationalError:
                count = 0
            if count >= 3:
                break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # The kill landed mid-run: the process died of it, with some fits committed, not all.
    assert proc.returncode == -signal.SIGKILL
    with Store(db) as store:
        before = {(r.setting, r.n, r.replicate): r.loss for r in store.rows("tiny")}
    assert 3 <= len(before) < total_fits
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    conn = sqlite3.connect(db)
    total, distinct = conn.execute(
        "SELECT COUNT(*), COUNT(DISTINCT setting || n || '/' || replicate) FROM fits").fetchone()
    assert total == distinct == total_fits
    with Store(db) as store:
        after = {(r.setting, r.n, r.replicate): r.loss for r in store.rows("tiny")}
    assert all(after[k] == v for k, v in before.items())


# --- command line and report ---------------------------------------------------------------

def test_cli_studies_lists_the_catalogue(capsys):
    assert cli.main(["studies"]) == 0
    lines = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()}
    assert lines["softmax-gaussian"] == "study" and lines["norga-continual"] == "experiment"


def test_cli_reproduce_json_and_report(tiny_path, tmp_path, capsys):
    db, out = tmp_path / "r.sqlite", tmp_path / "report"
    assert cli.main(["reproduce", str(tiny_path), "--quick", "--db", str(db), "--out", str(out),
                     "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["study"] == "tiny"
    assert "8/8 fits" in captured.err          # progress goes to stderr, JSON alone to stdout
    for key in ("seconds", "fits", "skipped", "db", "report", "rates"):
        assert key in result
    # the printed rates are the store's, computed afresh
    with Store(db) as store:
        want = rate_table(load_study(tiny_path), store.rows("tiny"))
    assert result["rates"] == json.loads(json.dumps(want))
    assert result["fits"] == 8 and result["skipped"] == 0
    html = (out / "tiny" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "Rates" in html
    assert "<h3>Losses</h3>" in html and "D2-softmax" in html
    assert result["report"] == str(out / "tiny" / "report.html")
    assert cli.main(["report", str(db), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "tiny" / "report.html").exists()


def test_reproduce_and_report_put_the_report_beside_the_store(tiny_path, tmp_path, capsys):
    db = tmp_path / "stores" / "mine.sqlite"
    assert cli.main(["reproduce", str(tiny_path), "--quick", "--db", str(db)]) == 0
    first = tmp_path / "stores" / "tiny" / "report.html"
    assert f"report: {first}" in capsys.readouterr().out
    first.unlink()
    assert cli.main(["report", str(db)]) == 0
    assert first.exists()


def test_a_failed_run_leaves_no_empty_store(tiny_path, tmp_path, monkeypatch, capsys):
    import gatelab.studies.runner as runner

    def broken(*args, **kwargs):
        raise ValueError("the fit could not start")
    monkeypatch.setattr(runner, "run_unit", broken)
    db = tmp_path / "new.sqlite"
    assert cli.main(["reproduce", str(tiny_path), "--quick", "--db", str(db)]) == 2
    assert "the fit could not start" in capsys.readouterr().err
    assert not db.exists() and not Path(f"{db}-wal").exists()


def test_a_theory_block_typo_is_an_error_naming_the_key(tiny_path):
    text = tiny_path.read_text().replace('theory = -0.5', 'theory = -0.5\ntheory_blocks = { bta1 = -0.5 }')
    with pytest.raises(SpecError, match=r"settings\[0\]\.theory_blocks\.bta1: must be a block"):
        Study.from_dict(__import__("tomllib").loads(text))


def test_the_valid_key_list_hides_internal_fields(tiny_path):
    text = tiny_path.read_text().replace('fitted_k = 3', 'fitted_k = 3\nfited_k = 3')
    with pytest.raises(SpecError) as err:
        Study.from_dict(__import__("tomllib").loads(text))
    assert "unknown key(s) ['fited_k']" in str(err.value) and "'_path'" not in str(err.value)


def test_ctrl_c_says_how_to_resume(tmp_path):
    path = tmp_path / "slower.toml"
    path.write_text(TINY.replace("sizes = [300, 600, 1200]", "sizes = [300, 400000, 800000]"))
    db = tmp_path / "int.sqlite"
    cmd = [sys.executable, "-m", "gatelab.cli", "reproduce", str(path), "--db", str(db),
           "--out", str(tmp_path / "o")]
    # A shell without job control starts background commands with SIGINT ignored, and the
    # child inherits that (CI runs so): give the child the default action back, as a terminal would.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            with sqlite3.connect(db) as conn:
                try:
                    if conn.execute("SELECT COUNT(*) FROM fits").fetchone()[0] >= 2:
                        break
                except sqlite3.OperationalError:
                    pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    # The first unit commits 3 of 18 rows, so the signal lands mid-run.
    assert proc.returncode == 130 and "run the same command again to resume" in err
    with sqlite3.connect(db) as conn:
        assert 3 <= conn.execute("SELECT COUNT(*) FROM fits").fetchone()[0] < 18


def test_cli_report_on_a_missing_store_exits_2(tmp_path):
    assert cli.main(["report", str(tmp_path / "none.sqlite")]) == 2


def test_least_squares_study_runs_with_its_own_truth_per_setting(tmp_path):
    _, rows = run_small_study("cosine-vs-perturbed", tmp_path / "lsq.sqlite",
                              quick_sizes=[300, 600], quick_replicates=2)
    assert len(rows) == 3 * 2 * 2 and all(np.isfinite(r.loss) for r in rows)
    # the settings draw different data (different routers), from the same seeds' logic
    by = {(r.setting, r.n, r.replicate): r.loglik for r in rows}
    assert by[("plain cosine k=2", 300, 0)] != by[("perturbed cosine k=2", 300, 0)]


def test_ray_backend_gives_the_same_rows_as_local(tiny, tmp_path):
    pytest.importorskip("ray")
    with Store(tmp_path / "local.sqlite") as store:
        reproduce(tiny, store, quick=True, progress=False)
        local = store.rows("tiny")
    with Store(tmp_path / "ray.sqlite") as store:
        stats = reproduce(tiny, store, quick=True, progress=False, backend="ray", workers=2)
        remote = store.rows("tiny")
    assert stats.fits == len(local) == len(remote) == 8
    assert [(r.setting, r.n, r.replicate, r.seed, r.loss, r.loglik) for r in local] == \
           [(r.setting, r.n, r.replicate, r.seed, r.loss, r.loglik) for r in remote]


def test_unknown_backend(tiny, tmp_path):
    with Store(tmp_path / "x.sqlite") as store, pytest.raises(ValueError, match="Unknown backend"):
        reproduce(tiny, store, backend="dask")


def test_truth_blocks_must_be_used_by_some_setting(tmp_path):
    path = tmp_path / "extra.toml"
    path.write_text(TINY.replace("var = [0.09, 0.16]", "var = [0.09, 0.16]\nW = [[0.1], [0.9]]"))
    with pytest.raises(SpecError, match=r"truth.params: must be blocks that some setting's truth "
                                        r"uses \(unused: \['W'\]\)"):
        load_study(path)


def test_a_setting_may_replace_truth_blocks_for_its_own_gate():
    """The Laplace levels of the hierarchical truth take intercepts 0, not the softmax
    levels' shared beta0 blocks; other settings keep the shared values."""
    study = catalogue.get("hierarchical")
    by_name = {s.name: s for s in study.settings}
    ll, ss = study.truth_params(by_name["LL exact"]), study.truth_params(by_name["SS exact"])
    assert torch.equal(ll["outer.beta0"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(ll["inner.beta0"], torch.zeros(2, 2, dtype=torch.float64))
    assert torch.equal(ss["outer.beta0"], torch.tensor([-4.0, 0.0], dtype=torch.float64))
    data = study.to_dict()
    # a block only the settings that need it give
    data["truth"]["params"].pop("outer.W")
    for setting in data["settings"]:
        if setting["truth_gate_options"]["outer"] == "laplace":
            setting["truth_params"] = {**setting.get("truth_params", {}), "outer.W": [[0.7], [0.2]]}
    own = Study.from_dict(data)
    assert torch.equal(own.truth_params(own.settings[3])["outer.W"],
                       torch.tensor([[0.7], [0.2]], dtype=torch.float64))
    data = study.to_dict()
    data["settings"][3]["truth_params"] = {"beta9": [1.0]}
    with pytest.raises(SpecError, match=r"settings\[3\]\.truth_params: must be blocks of this "
                                        r"setting's truth"):
        Study.from_dict(data)
    data["settings"][3]["truth_params"] = {"outer.beta0": [0.0, 0.0, 0.0]}
    with pytest.raises(SpecError, match=r"settings\[3\]\.truth_params: .*outer.beta0"):
        Study.from_dict(data)


def test_a_truth_path_moves_blocks_with_n_as_written():
    """truth_path: block(n) = toward + (block - toward) (n / n0)^-e, hand-computed for the
    contaminated study's vanishing prompt (lam 0.3 toward 0 at n^-1/4 from n0 = 1000) and
    its approaching prompt (a 2.5 toward 2 at n^-0.15); at n0, and without n, as written."""
    study = catalogue.get("contaminated")
    by_name = {s.name: s for s in study.settings}
    vanishing, approaching = by_name["vanishing prompt"], by_name["approaching, distinguishable"]
    assert float(study.truth_params(vanishing, 16000)["lam"]) == pytest.approx(0.3 / 2.0)
    assert float(study.truth_params(vanishing, 1000)["lam"]) == pytest.approx(0.3)
    assert float(study.truth_params(vanishing)["lam"]) == pytest.approx(0.3)
    at = study.truth_params(approaching, 64000)
    assert float(at["a"]) == pytest.approx(2.0 + 0.5 * 64 ** -0.15)
    assert float(at["var"]) == pytest.approx(0.2 + 0.1 * 64 ** -0.15)
    assert float(at["lam"]) == pytest.approx(0.3)      # not on the path: fixed
    data = study.to_dict()
    data["settings"][2]["truth_path"] = {"lam": {"toward": 0.0, "exponent": -1.0}}
    with pytest.raises(SpecError, match=r"truth_path\.lam\.exponent: must be a number > 0"):
        Study.from_dict(data)
    data["settings"][2]["truth_path"] = {"beta9": {"toward": 0.0, "exponent": 0.5}}
    with pytest.raises(SpecError, match=r"truth_params: .*beta9"):
        Study.from_dict(data)
    data["settings"][2]["truth_path"] = {"a": {"toward": [1.0, 2.0], "exponent": 0.5}}
    with pytest.raises(SpecError, match=r"toward has shape \(2,\)"):
        Study.from_dict(data)
    data["settings"][2]["truth_path"] = {"b": {"toward": [1.0, 2.0, 3.0], "exponent": 0.5}}
    with pytest.raises(SpecError, match=r"toward has shape \(3,\)"):
        Study.from_dict(data)
    # lam 0.3 (n / 1000)^-1 is above 1 at the quick grid's n = 100: refused there
    data["settings"][2]["truth_path"] = {"lam": {"toward": 0.0, "exponent": 1.0}}
    data["quick_sizes"] = [100, 1000]
    with pytest.raises(SpecError, match=r"settings\[2\]\.truth_params: .*lam"):
        Study.from_dict(data)


def test_rows_of_a_moving_truth_are_sampled_and_scored_at_their_own_n(tmp_path):
    """A vanishing prompt's rows: the truth's lam at each n is the one the data came from
    (the fitted lam tracks it) and the one the stored loss was scored against."""
    chosen = [s for s in catalogue.get("contaminated").to_dict()["settings"]
              if s["name"] == "vanishing prompt"]
    small, rows = run_small_study("contaminated", tmp_path / "c.sqlite",
                                  quick_sizes=[1000, 81000], quick_replicates=2, settings=chosen)
    assert_rows_score_their_estimates(small, rows)
    for r in rows:
        lam = 0.3 * (r.n / 1000) ** -0.25
        assert r.params["lam"] == pytest.approx(lam, abs=0.05), (r.n, r.params["lam"])


@pytest.mark.parametrize("name, settings", [("hierarchical", ("SS exact", "LL exact")),
                                            ("hierarchical-over", ("SS over", "LL over"))])
def test_hierarchical_studies_run_with_near_truth_starts(tmp_path, name, settings):
    chosen = [s for s in catalogue.get(name).to_dict()["settings"] if s["name"] in settings]
    small, rows = run_small_study(name, tmp_path / "h.sqlite", quick_sizes=[400, 800],
                                  quick_replicates=2, settings=chosen,
                                  estimator={"tol": 1e-6, "max_iter": 200, "accelerate": True})
    assert len(rows) == 2 * 2 * 2
    assert all(math.isfinite(r.loss) for r in rows)
    assert {"inner.W", "a", "b", "var"} <= set(next(r for r in rows if r.setting == settings[1]).blocks)
    assert_rows_score_their_estimates(small, rows)
    # The atoms' masses are the products of the levels' intercept masses: they sum to 1,
    # so a fit at the truth has no mass error.
    laplace = next(s for s in small.settings if s.name == settings[1])
    model = small.truth_model(laplace)
    measure = model.mixing_measure(small.truth_params(laplace))
    assert float(measure.masses.sum()) == pytest.approx(1.0) and not measure.relative


def test_median_rate_resists_a_few_huge_losses():
    ns = [100, 1000, 10000]
    rng = np.random.default_rng(0)
    losses = [n ** -0.5 * rng.uniform(0.8, 1.2, size=40) for n in ns]
    losses[2][0] = 1e6  # one wandering fit at n = 10000
    assert rate(ns, losses, n_boot=200, statistic="median").slope == pytest.approx(-0.5, abs=0.05)
    assert rate(ns, losses, n_boot=200).slope > 0  # the mean follows the outlier
    with pytest.raises(ValueError, match="Unknown statistic"):
        rate(ns, losses, statistic="mode")


# --- results follow the spec ---------------------------------------------------------------

def _run(path, db, text, **options):
    path.write_text(text)
    with Store(db) as store:
        stats = reproduce(load_study(path), store, quick=True, progress=False, **options)
        return stats, {(r.setting, r.n, r.replicate): r for r in store.rows("tiny")}


def test_a_changed_spec_is_refused_not_answered_with_old_rows(tmp_path):
    path, db = tmp_path / "s.toml", tmp_path / "s.sqlite"
    _, before = _run(path, db, TINY)
    changed = TINY.replace("beta1 = [[25.0], [0.0]]", "beta1 = [[20.0], [0.0]]")
    with pytest.raises(StaleResults, match=r"settings exact \(4 fits\), over \(4 fits\).*--overwrite"):
        _run(path, db, changed)
    res = subprocess.run([sys.executable, "-m", "gatelab.cli", "reproduce", str(path), "--quick",
                          "--db", str(db), "--out", str(tmp_path / "o")], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "another version of its spec" in res.stderr, res.stderr
    with Store(db) as store:   # refused before writing anything
        assert store.study_spec("tiny")["truth"]["params"]["beta1"] == [[25.0], [0.0]]
        assert {(r.setting, r.n, r.replicate): r for r in store.rows("tiny")} == before


def test_overwrite_recomputes_exactly_the_changed_settings(tmp_path):
    path, db = tmp_path / "s.toml", tmp_path / "s.sqlite"
    _, before = _run(path, db, TINY)
    stats, after = _run(path, db, TINY.replace("n_starts = 2", "n_starts = 3"), overwrite=True)
    assert stats.fits == 4 and stats.skipped == 4          # the 'over' setting only
    for key, row in after.items():
        if key[0] == "exact":
            assert row == before[key]
        else:
            assert row.spec_hash != before[key].spec_hash and row.seed == before[key].seed


def test_words_theory_claims_and_grid_do_not_make_rows_stale(tmp_path):
    path, db = tmp_path / "s.toml", tmp_path / "s.sqlite"
    _run(path, db, TINY)
    text = (TINY.replace("a small softmax study for tests", "reworded")
            .replace("theory = -0.5", "theory = -0.25").replace("replicates = 3", "replicates = 4"))
    text += ('\n[[claims]]\ntext = "a claim added after the run"\nsetting = "exact"\n'
             'rule = "ci_covers"\nvalue = -0.5\n')
    stats, _ = _run(path, db, text)
    assert stats.fits == 0 and stats.skipped == 8


def test_the_hash_includes_the_fitters_defaults(tiny):
    with_options = lambda est: Study.from_dict({**tiny.to_dict(), "estimator": est})  # noqa: E731
    setting = tiny.settings[0]
    partial = setting_hash(with_options({"tol": 1e-6}), setting)
    # fit_em's own defaults: max_iter 2000, accelerate False
    assert partial == setting_hash(with_options({"tol": 1e-6, "max_iter": 2000,
                                                 "accelerate": False}), setting)
    assert partial != setting_hash(with_options({"tol": 1e-6, "accelerate": True}), setting)
    assert setting_hash(tiny, tiny.settings[0]) != setting_hash(tiny, tiny.settings[1])


def test_the_hash_includes_the_continuation_s_schedule():
    """The top-K continuation's temperatures are resolved like tol (its default is in the
    hash), so a store made with another schedule is stale."""
    from gatelab.fit.topk_continuation import TEMPERATURES
    cells = catalogue.get("topk-cells")
    spec = cells.to_dict()
    setting = cells.settings[0]
    explicit = Study.from_dict({**spec, "estimator": {**spec["estimator"],
                                                      "temperatures": list(TEMPERATURES)}})
    assert setting_hash(explicit, setting) == setting_hash(cells, setting)
    other = Study.from_dict({**spec, "estimator": {**spec["estimator"], "temperatures": [1.0, 0.0]}})
    assert setting_hash(other, setting) != setting_hash(cells, setting)


def test_a_store_from_before_hashes_is_stale(tmp_path, tiny):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:   # the schema without spec_hash, one old row
        conn.executescript(
            "CREATE TABLE fits (study TEXT NOT NULL, setting TEXT NOT NULL, n INTEGER NOT NULL,"
            " replicate INTEGER NOT NULL, seed INTEGER NOT NULL, loss REAL, mass REAL, blocks TEXT"
            " NOT NULL, loglik REAL, n_iter INTEGER, converged INTEGER, degenerate INTEGER, seconds"
            " REAL, version TEXT, created REAL, PRIMARY KEY (study, setting, n, replicate));"
            "INSERT INTO fits VALUES ('tiny', 'exact', 300, 0, 1, 0.1, 0.0, '{}', -1.0, 5, 1, 0, 0.1,"
            " '0.1.0', 0.0);")
    with Store(db) as store:
        with pytest.raises(StaleResults, match=r"exact \(1 fits\)"):
            reproduce(tiny, store, quick=True, progress=False)
        stats = reproduce(tiny, store, quick=True, progress=False, overwrite=True)
        assert stats.fits == 8 and len(store.rows("tiny")) == 8


# --- reports agree with themselves (issue 11, point 6) -------------------------------------

def _synthetic_rows(study, setting, per_n, slope=-0.5, seed=0):
    """Rows of one setting with loss c n^slope (lognormal noise) and block errors alike."""
    from gatelab.studies.store import FitRow
    rng = np.random.default_rng(seed)
    rows = []
    for n in (300, 600, 1200):
        for r in range(per_n):
            v = float(n ** slope * rng.lognormal(0, 0.2))
            rows.append(FitRow(study.name, setting, n, r, 0, v, v, {"a": v, "mass": v}, -1.0,
                               10, True, False, 0.1, "t", "", "converged"))
    return rows


def test_a_left_out_fit_is_left_out_of_every_slope_and_counted_once(tiny):
    import dataclasses

    from gatelab.studies.rates import fit_summary, left_out
    rows = _synthetic_rows(tiny, "exact", 6)
    clean = {r["block"]: r["slope"] for r in rate_table(tiny, rows, n_boot=50)}
    # one run-off fit (finite but huge total, as in the k = 4 report) and one fit with an
    # infinite block error
    rows[0] = dataclasses.replace(rows[0], loss=2.6e18, status="separated")
    rows[7] = dataclasses.replace(rows[7], blocks={"a": math.inf, "mass": 0.1})
    assert [left_out(r) for r in (rows[0], rows[7], rows[1])] == ["separated", "infinite loss", None]
    table = rate_table(tiny, rows, n_boot=50)
    assert {r["block"] for r in table} == {"total", "a", "mass"}
    for r in table:
        assert r["excluded"] == 2
        # the poisoned point drew a steep slope through no point before; now it is gone
        assert abs(r["slope"] - clean[r["block"]]) < 0.2
    assert fit_summary(rows) == ("18 fits: 17 converged, 1 separated; left out of the slopes: "
                                 "2 (1 infinite loss, 1 separated)")


def test_fewer_than_three_replicates_get_no_verdict(tiny):
    def total_verdict(per_n):
        table = rate_table(tiny, _synthetic_rows(tiny, "exact", per_n), n_boot=50)
        return next(r for r in table if r["block"] == "total")["verdict"]

    assert total_verdict(2) == "too few"
    assert total_verdict(3) in ("within CI", "faster", "slower", "inconclusive")
    assert verdict(-0.5, Rate(-0.45, -0.6, -0.4), replicates=2) == "too few"


def test_quick_runs_never_have_more_replicates_than_the_full_grid(tiny):
    import dataclasses
    study = dataclasses.replace(tiny, replicates=2, quick_replicates=10)
    assert study.grid(quick=True)[1] == 2
    assert tiny.grid(quick=True)[1] == 2 and tiny.grid()[1] == 3


def test_report_plots_wrap_and_label_their_panels(tiny, tmp_path):
    from PIL import Image

    from gatelab.studies.report import PANELS_PER_ROW, plot_setting
    from gatelab.studies.store import FitRow
    rows = [FitRow("tiny", "exact", n, r, 0, 1.0 / n, 0.1, {b: 1.0 / n for b in
                                                            ("a", "b", "beta1", "mass", "var")},
                   -1.0, 1, True, False, 0.1, "t", "", "converged")
            for n in (300, 600, 1200) for r in range(3)]
    png = plot_setting(tiny, "exact", rows, tmp_path / "p.png")
    width, height = Image.open(png).size
    assert PANELS_PER_ROW == 3
    assert width < 1000 and height > width / 2    # 6 panels: two rows of three, not one strip


# --- results as data (issue 11, point 5) ------------------------------------------------------

def test_results_give_one_record_per_fit_with_the_estimate(tiny, tmp_path, capsys):
    import csv

    import pandas as pd

    from gatelab.studies import results
    db = tmp_path / "r.sqlite"
    with Store(db) as store:
        reproduce(tiny, store, quick=True, progress=False)
        rows = store.rows("tiny")
    frame = results(db)
    assert isinstance(frame, pd.DataFrame) and len(frame) == len(rows) == 8
    recs = results(db, "tiny", frame=False)
    assert isinstance(recs, list) and [r["loss"] for r in recs] == frame["loss"].tolist()
    # the stored estimate is the fit itself: refit one unit and compare
    first = next(r for r in recs if r["setting"] == "exact" and r["n"] == 300 and r["replicate"] == 0)
    again = run_unit(tiny, Unit("exact", 300, (0,)))[0]
    assert first["param.a[1,0]"] == pytest.approx(again.params["a"][1][0], rel=1e-9)
    assert first["loss"] == pytest.approx(again.loss, rel=1e-9) and first["status"] == again.status
    assert {"error.beta1", "error.mass", "param.var[0]", "param.beta1[0,0]"} <= set(first)
    # over-specified fits have three experts' blocks
    assert "param.var[2]" in next(r for r in recs if r["setting"] == "over")
    assert cli.main(["report", str(db), "--csv", str(tmp_path / "fits.csv")]) == 0
    with open(tmp_path / "fits.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 and float(table[0]["loss"]) == pytest.approx(recs[0]["loss"])
    with pytest.raises(ValueError, match="holds no study 'nope'"):
        results(db, "nope")


def test_the_quick_softmax_study_recovers_the_parametric_rate(tmp_path):
    """The exact-specified setting of the quick softmax-gaussian grid (6 sizes, 1e3 to
    3.2e4, 12 replicates): the D1 slope is the parametric -1/2 (arXiv 2305.03288)."""
    exact = [s for s in catalogue.get("softmax-gaussian").to_dict()["settings"] if s["fitted_k"] == 2]
    study, rows = run_small_study("softmax-gaussian", tmp_path / "sg.sqlite", settings=exact)
    assert len(rows) == 6 * 12
    total = next(r for r in rate_table(study, rows, n_boot=200) if r["block"] == "total")
    assert abs(total["slope"] + 0.5) < 0.1
    assert total["ci_low"] < -0.5 < total["ci_high"] and total["verdict"] == "within CI"
    (claim,) = evaluate_claims(study, rows)   # the paper's claim for this setting holds
    assert claim["holds"] is True and claim["numbers"]["x"] == pytest.approx(total["slope"])


# --- the certified reading (issue 14, reading (b)) ----------------------------------------

CERTIFIED = TINY.replace('[truth]', '[estimator]\nreading = "certified"\ngrad_bound = 1e-7\n\n[truth]')


def test_a_certified_study_stores_certificates_and_the_reading(tmp_path):
    import dataclasses

    from gatelab.studies.report import write_report
    study = Study.from_dict(__import__("tomllib").loads(CERTIFIED))
    with Store(tmp_path / "c.sqlite") as store:
        reproduce(study, store, quick=True, progress=False)
        rows = store.rows("tiny")
    assert len(rows) == 8 and {r.reading for r in rows} == {"certified"}
    for r in rows:
        assert r.gain >= 0 and r.grad_norm is not None and np.isfinite(r.grad_norm)
        # status converged means certified; max_iter that the bound was not met
        assert (r.status == "converged") == (r.grad_norm <= 1e-7) or r.status in (
            "separated", "degenerate", "stuck")
    assert sum(r.status == "converged" for r in rows) >= 6
    from gatelab.studies.rates import certificates
    table = certificates(rows)
    for setting, by_n in table.items():
        for n, cert in by_n.items():
            mine = [r for r in rows if (r.setting, r.n) == (setting, n)]
            assert cert.certified == np.mean([r.status != "max_iter" for r in mine])
            assert cert.gain == np.median([r.gain for r in mine])
    assert certificates([dataclasses.replace(r, reading="protocol") for r in rows]) == {}
    out = write_report(study, rows, rate_table(study, rows, n_boot=20), tmp_path / "rep")
    assert "Certificates (reading: certified)" in out.read_text() and "Reading: certified" in out.read_text()


def test_certified_rows_above_the_bound_are_left_out_but_protocol_rows_are_not(tiny):
    import dataclasses

    from gatelab.studies.rates import left_out
    row = _synthetic_rows(tiny, "exact", 1)[0]
    assert left_out(dataclasses.replace(row, status="max_iter")) is None
    assert left_out(dataclasses.replace(row, status="max_iter", reading="certified")) == "not certified"
    assert left_out(dataclasses.replace(row, reading="certified")) is None


def test_the_reading_is_checked_in_the_spec():
    import tomllib
    with pytest.raises(SpecError, match=r"estimator\.reading: must be 'protocol' or 'certified'"):
        Study.from_dict(tomllib.loads(CERTIFIED.replace('"certified"', '"strict"')))
    with pytest.raises(SpecError, match=r"grad_bound and polish_steps only with reading"):
        Study.from_dict(tomllib.loads(CERTIFIED.replace('reading = "certified"\n', "")))
    with pytest.raises(SpecError, match=r"estimator\.grad_bound: must be a positive number"):
        Study.from_dict(tomllib.loads(CERTIFIED.replace("grad_bound = 1e-7", "grad_bound = 0")))
    laplace = CERTIFIED.replace('n_experts = 2\ndim = 1', 'n_experts = 2\ndim = 1\ngate = "laplace"') \
        .replace("beta1 = [[25.0], [0.0]]", "W = [[0.2], [0.8]]")
    with pytest.raises(SpecError, match=r"settings\[0\]: a certified reading needs a likelihood "
                                        r"that is differentiable .* laplace in dim=1"):
        Study.from_dict(tomllib.loads(laplace))
    Study.from_dict(tomllib.loads(laplace.replace("reading = \"certified\"\ngrad_bound = 1e-7\n", "")))
    with pytest.raises(SpecError, match=r"settings\[0\]\.start: must be 'near_truth' or "
                                        r"'near_truth_fixed'"):
        Study.from_dict(tomllib.loads(TINY.replace('loss = "D1"', 'loss = "D1"\nstart = "far"')))


def test_a_certified_reading_refuses_relu_experts_and_takes_smooth_ones():
    """ReLU experts have a hinge at every sample: no gradient certificate exists there."""
    spec = catalogue.get("sigmoid-vs-softmax").to_dict()
    spec["estimator"] = {**spec["estimator"], "reading": "certified", "grad_bound": 1e-7}
    with pytest.raises(SpecError, match=r"settings\[0\]: a certified reading needs a fit "
                                        r"differentiable in the expert parameters.*relu"):
        Study.from_dict(spec)
    spec["truth"]["expert_options"] = {"activation": "gelu"}
    assert Study.from_dict(spec).reading == "certified"


def test_the_default_start_hashes_as_the_scheme_it_resolves_to(tiny):
    import tomllib
    text = TINY.replace('loss = "D1"', 'loss = "D1"\nstart = "near_truth"')
    explicit = Study.from_dict(tomllib.loads(text))
    assert setting_hash(tiny, tiny.settings[0]) == setting_hash(explicit, explicit.settings[0])
    certified = Study.from_dict(tomllib.loads(CERTIFIED))
    assert setting_hash(certified, certified.settings[0]) != setting_hash(tiny, tiny.settings[0])


def test_an_old_store_gains_the_certificate_columns(tmp_path):
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as conn:   # a store from before the readings, one row
        conn.executescript(
            "CREATE TABLE fits (study TEXT NOT NULL, setting TEXT NOT NULL, n INTEGER NOT NULL,"
            " replicate INTEGER NOT NULL, seed INTEGER NOT NULL, loss REAL, mass REAL, blocks TEXT"
            " NOT NULL, loglik REAL, n_iter INTEGER, converged INTEGER, degenerate INTEGER, seconds"
            " REAL, version TEXT, created REAL, spec_hash TEXT, status TEXT, params TEXT,"
            " PRIMARY KEY (study, setting, n, replicate));"
            "INSERT INTO fits VALUES ('tiny', 'exact', 300, 0, 1, 0.1, 0.0, '{}', -1.0, 5, 1, 0, 0.1,"
            " '0.1.0', 0.0, 'h', 'converged', '{}');")
    from gatelab.studies.store import FitRow
    with Store(db) as store:
        (old,) = store.rows("tiny")
        assert old.reading == "protocol" and old.grad_norm is None and old.gain is None
        store.add([FitRow("tiny", "exact", 600, 0, 1, 0.1, 0.0, {}, -1.0, 5, True, False, 0.1,
                          "t", "h", "converged", {}, "certified", 3e-8, 0.25)])
        new = [r for r in store.rows("tiny") if r.n == 600][0]
    assert (new.reading, new.grad_norm, new.gain) == ("certified", 3e-8, 0.25)


@pytest.mark.parametrize("name", ["softmax-gaussian", "prefix-sharing-lse", "quadratic-gates",
                                  "cosine-vs-perturbed", "deviated"])
def test_a_certified_study_has_its_protocol_s_truth_and_settings(name):
    a, b = catalogue.get(name), catalogue.get(f"{name}-certified")
    assert b.reading == "certified" and a.reading == "protocol"
    assert a.to_dict()["truth"] == b.to_dict()["truth"]
    mine = {s["name"]: s for s in a.to_dict()["settings"]}
    for s in b.to_dict()["settings"]:   # the same fitted settings (a subset), start aside
        assert {**s, "start": None} == {**mine[s["name"]], "start": None}


def test_certified_starts_keep_their_noise_at_every_n(tiny):
    """The protocol's start noise shrinks as n^-0.083; near_truth_fixed (the certified
    default) uses the protocol's noise at n = 1 whatever n is."""
    import tomllib

    from gatelab.studies.runner import _noise_n, start_scheme
    certified = Study.from_dict(tomllib.loads(CERTIFIED))
    protocol_fixed = Study.from_dict(tomllib.loads(
        TINY.replace('loss = "D1"', 'loss = "D1"\nstart = "near_truth_fixed"')))
    assert start_scheme(certified, certified.settings[0]) == "near_truth_fixed"
    assert start_scheme(tiny, tiny.settings[0]) == "near_truth"
    assert [_noise_n(tiny, tiny.settings[0], n) for n in (300, 90000)] == [300, 90000]
    assert [_noise_n(certified, certified.settings[0], n) for n in (300, 90000)] == [1, 1]
    assert _noise_n(protocol_fixed, protocol_fixed.settings[0], 90000) == 1


def test_protocol_rows_store_the_gradient_norm_where_em_stopped(tiny, monkeypatch):
    """Every protocol row records how far from stationary EM stopped, computed in chunks
    of rows that give the same norms as one batch."""
    import gatelab.studies.runner as runner
    from gatelab.fit.polish import gradient_norm
    whole = run_unit(tiny, Unit("over", 600, (0, 1, 2)))
    monkeypatch.setattr(runner, "_MAX_GRADIENT_ELEMENTS", 600 * 4)   # one row per chunk
    chunked = run_unit(tiny, Unit("over", 600, (0, 1, 2)))
    assert [r.grad_norm for r in whole] == pytest.approx([r.grad_norm for r in chunked], rel=1e-9)
    assert all(r.grad_norm > 0 and r.gain is None and r.reading == "protocol" for r in whole)
    # and it is the gradient of the stored estimate's likelihood on the row's data
    setting = tiny.settings[1]
    truth_model, truth = tiny.truth_model(setting), tiny.truth_params(setting)
    g = torch.Generator().manual_seed(whole[0].seed)
    x, y = truth_model.sample(truth, 600, g)
    model = tiny.fitted_model(setting)
    params = {k: torch.tensor(v, dtype=torch.float64).unsqueeze(0) for k, v in whole[0].params.items()}
    want = float(gradient_norm(model, x.unsqueeze(0), y.unsqueeze(0), params)[0])
    assert whole[0].grad_norm == pytest.approx(want, rel=1e-6, abs=1e-12)


def test_the_prefix_study_runs_both_arms_and_rows_score_their_estimates(tmp_path):
    study, rows = run_small_study("prefix-sharing-lse", tmp_path / "prefix.sqlite",
                                  quick_sizes=[400, 800], quick_replicates=2,
                                  estimator={"method": "lsq", "tol": 1e-8, "max_iter": 60})
    assert len(rows) == 4 * 2 * 2 and all(np.isfinite(r.loss) for r in rows)
    assert_rows_score_their_estimates(study, rows)
    by = {(r.setting, r.n, r.replicate): r for r in rows}
    assert set(by[("shared L=3", 400, 0)].params) == {"p", "beta0", "nu"}
    assert set(by[("no-share L=3", 400, 0)].params) == {"beta1", "beta0", "a", "nu"}
    assert len(by[("no-share L=3", 400, 0)].params["a"]) == 3


def test_a_certified_least_squares_study_stops_on_the_gradient_and_stores_its_gain(tmp_path):
    spec = catalogue.get("prefix-sharing-lse").to_dict()
    spec["estimator"] = {"method": "lsq", "tol": 1e-4, "max_iter": 50, "reading": "certified",
                         "grad_bound": 1e-8, "polish_steps": 300}
    spec["settings"] = [s for s in spec["settings"] if s["name"] == "shared L=2"]
    spec["claims"] = [c for c in spec["claims"] if c["setting"] == "shared L=2"]
    study, rows = run_small_study("prefix-sharing-lse", tmp_path / "cert.sqlite", **{
        k: spec[k] for k in ("estimator", "settings", "claims")}, quick_sizes=[500, 1000],
        quick_replicates=3)
    assert {r.reading for r in rows} == {"certified"} and len(rows) == 6
    for r in rows:   # LM never raises the RSS, so the profile log-likelihood never falls
        assert r.gain is not None and r.gain >= 0
        assert (r.grad_norm <= 1e-8) == (r.status == "converged"), (r.grad_norm, r.status)
    assert sum(r.status == "converged" for r in rows) >= 5
    assert_rows_score_their_estimates(study, rows)


def test_a_collapsed_fit_gets_no_gradient_and_does_not_stop_the_study():
    """The full softmax grid's k = 4 fits at n = 200 include one whose variance runs to
    inf: its row's gradient norm is NaN (None when stored), the others' are
    gradient_norm's, and the unit runs."""
    from types import SimpleNamespace

    from gatelab.fit.polish import gradient_norm
    from gatelab.studies.runner import _stop_gradient
    study = catalogue.get("softmax-gaussian")
    setting = study.settings[0]
    model, truth = study.fitted_model(setting), study.truth_params(setting)
    x, y = study.truth_model(setting).sample(truth, 300, torch.Generator().manual_seed(0))
    params = {k: torch.stack([v, v, v]) for k, v in truth.items()}
    params["var"] = params["var"].clone()
    params["var"][1, 0] = float("inf")
    params["var"][2, 1] = 0.0
    xs, ys = torch.stack([x] * 3), torch.stack([y] * 3)
    got = _stop_gradient(study, model, xs, ys, SimpleNamespace(params=params))
    want = gradient_norm(model, xs[:1], ys[:1], {k: v[:1] for k, v in params.items()})
    assert torch.isnan(got[1:]).all() and torch.equal(got[:1], want)


def test_a_certified_reading_polishes_around_a_collapsed_fit():
    """Reading (b) on a batch with a fit whose variance ran to inf: that row keeps its
    estimate with NaN certificate and gain and is not certified; the other rows are polished
    exactly as they would be alone."""
    from gatelab.fit import fit_em
    from gatelab.fit.polish import polish
    from gatelab.studies.runner import _certify
    study = catalogue.get("softmax-gaussian-certified")
    setting = study.settings[0]
    model, truth = study.fitted_model(setting), study.truth_params(setting)
    x, y = study.truth_model(setting).sample(truth, 300, torch.Generator().manual_seed(1))
    xs, ys = torch.stack([x] * 3), torch.stack([y] * 3)
    res = fit_em(model, xs, ys, {k: torch.stack([v] * 3) for k, v in truth.items()}, max_iter=5)
    var = res.params["var"].clone()
    var[1, 0] = float("inf")
    res = res._replace(params={**res.params, "var": var})
    polished, grad_norm, gain = _certify(study, model, xs, ys, res)
    assert torch.isnan(grad_norm[1]) and torch.isnan(gain[1]) and not bool(polished.converged[1])
    assert torch.equal(polished.params["var"][1], var[1])
    alone = polish(model, xs[::2], ys[::2], {k: v[::2] for k, v in res.params.items()},
                   float(study.estimator["grad_bound"]), int(study.estimator["polish_steps"]))
    torch.testing.assert_close(grad_norm[::2], alone.grad_norm)
    torch.testing.assert_close(polished.params["beta1"][::2], alone.params["beta1"])


def test_a_study_says_where_each_loss_comes_from():
    """A loss table transcribed from another paper is called borrowed, never silently."""
    deviated, softmax = catalogue.get("deviated"), catalogue.get("softmax-gaussian")
    over = next(s for s in deviated.settings if s.loss == "D2-softmax")
    assert deviated.loss_source(over).startswith("D2-softmax: BORROWED from arXiv 2305.03288")
    assert "arXiv 2402.05220, is not in the sources" in deviated.loss_source(over)
    own = next(s for s in softmax.settings if s.loss == "D2-softmax")
    assert softmax.loss_source(own) == "D2-softmax: this study's paper's table (arXiv 2305.03288)"
    exact = next(s for s in softmax.settings if s.loss == "D1")
    assert softmax.loss_source(exact).endswith("(not a paper's own table)")
