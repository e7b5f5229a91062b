"""Inference and model selection (issue 11, point 4): standard errors against closed forms
and the bootstrap, predictive intervals against their coverage, AIC/BIC choices, saved
models, and the command line around them."""

from __future__ import annotations

import json
import math

import pytest
import torch

import gatelab as gl
from gatelab import cli
from gatelab.demo import reference_truth
from gatelab.fit import fit_em
from gatelab.fit.inference import (
    SingularInformation,
    choose_experts,
    load_model,
    predict,
    save_model,
    select_experts,
    standard_errors,
)
from gatelab.fit.polish import free_masks
from gatelab.fit.single import fit_best_of_starts, n_free_parameters

F64 = torch.float64


@pytest.fixture(scope="module")
def reference_fit():
    model, truth = reference_truth()
    x, y = model.sample(truth, n=2000, generator=torch.Generator().manual_seed(0))
    fitted, res = fit_best_of_starts(x, y, 2)
    return fitted, res, x, y


def test_one_expert_standard_errors_are_the_ols_ones():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(500, 1, generator=g, dtype=F64)
    y = 1 + 2 * x[:, 0] + 0.3 * torch.randn(500, generator=g, dtype=F64)
    model, res = fit_best_of_starts(x, y, 1)
    w = standard_errors(model, x, y, res.params)
    design = torch.cat([torch.ones(500, 1, dtype=F64), x], 1)
    var = float(res.params["var"])                        # the MLE RSS / n
    cov = var * torch.linalg.inv(design.T @ design)
    want = {"b[0]": cov[0, 0].sqrt(), "a[0,0]": cov[1, 1].sqrt(), "var[0]": var * math.sqrt(2 / 500)}
    got = dict(zip(w.names, w.se))
    assert set(got) == set(want)
    for name, value in want.items():
        assert float(got[name]) == pytest.approx(float(value), rel=1e-6), name
    i = w.names.index("a[0,0]")
    assert float(w.high[i] - w.low[i]) == pytest.approx(2 * 1.959964 * float(w.se[i]), rel=1e-6)


def test_standard_errors_match_the_bootstrap(reference_fit):
    model, res, x, y = reference_fit
    w = standard_errors(model, x, y, res.params)
    replicates = 200
    xb, yb = model.sample(res.params, n=2000, generator=torch.Generator().manual_seed(5),
                          replicates=replicates)
    start = {k: v.expand(replicates, *v.shape).clone() for k, v in res.params.items()}
    boot = fit_em(model, xb, yb, start)
    assert bool(boot.converged.all())
    theta = torch.cat([boot.params[b][:, m].reshape(replicates, -1)
                       for b, m in free_masks(model).items()], -1)
    ratio = w.se / theta.std(0)
    assert len(ratio) == 8
    assert abs(float(ratio.median()) - 1) < 0.2
    assert float(ratio.min()) > 0.7 and float(ratio.max()) < 1.3


def test_identical_experts_have_no_standard_errors(reference_fit):
    model, res, x, y = reference_fit
    twin = {"beta1": torch.zeros(2, 1, dtype=F64), "beta0": torch.zeros(2, dtype=F64),
            "a": res.params["a"][:1].expand(2, 1).clone(), "b": res.params["b"][:1].expand(2).clone(),
            "var": res.params["var"][:1].expand(2).clone()}
    with pytest.raises(SingularInformation, match="singular"):
        standard_errors(model, x, y, twin)


def test_predictive_intervals_cover_new_data_at_their_level(reference_fit):
    model, res, x, y = reference_fit
    truth_model, truth = reference_truth()
    xn, yn = truth_model.sample(truth, n=20000, generator=torch.Generator().manual_seed(9))
    pred = predict(model, res.params, xn, level=0.9)
    inside = ((yn >= pred.low) & (yn <= pred.high)).double().mean()
    assert abs(float(inside) - 0.9) < 0.01
    torch.testing.assert_close(pred.mean, model.predict(xn, res.params))
    # the interval's ends are the mixture's quantiles
    torch.testing.assert_close(model.cdf(xn[:50], pred.high[:50], res.params),
                               torch.full((50,), 0.95, dtype=F64), atol=1e-9, rtol=0)
    # one expert: the normal interval mean +- z sd
    one = gl.GaussianMoE(1, 1)
    p1 = {"beta1": torch.zeros(1, 1, dtype=F64), "beta0": torch.zeros(1, dtype=F64),
          "a": torch.tensor([[2.0]], dtype=F64), "b": torch.tensor([1.0], dtype=F64),
          "var": torch.tensor([0.25], dtype=F64)}
    single = predict(one, p1, xn[:10], level=0.95)
    torch.testing.assert_close(single.high - single.mean, torch.full((10,), 1.959964 * 0.5, dtype=F64),
                               atol=1e-6, rtol=0)


def test_bic_chooses_the_true_number_of_experts(reference_fit):
    _, _, x, y = reference_fit
    selection, fits = select_experts(x, y, [1, 2, 3, 4])
    assert selection.best == 2 and [r["k"] for r in selection.table] == [1, 2, 3, 4]
    row = selection.table[2]
    model3, res3 = fits[3]
    assert row["bic"] == pytest.approx(-2 * float(res3.loglik)
                                       + n_free_parameters(model3) * math.log(len(y)))
    # the log-likelihood never falls as experts are added (nested models, best of starts)
    lls = [r["loglik"] for r in selection.table]
    assert lls[1] > lls[0] + 100
    # a failed fit is not chosen, however good its criterion
    broken = {k: (m, r._replace(status=torch.tensor(3, dtype=torch.int8))) if k == 2 else (m, r)
              for k, (m, r) in fits.items()}
    assert choose_experts(broken, len(y)).best != 2


def test_a_saved_model_predicts_as_the_fitted_one(reference_fit, tmp_path):
    model, res, x, y = reference_fit
    path = tmp_path / "m.json"
    save_model(str(path), model, res.params, x=["x"], y="y", status="converged")
    loaded, params, meta = load_model(str(path))
    assert meta["x"] == ["x"] and meta["status"] == "converged"
    torch.testing.assert_close(predict(loaded, params, x[:20]).high,
                               predict(model, res.params, x[:20]).high, rtol=0, atol=0)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a gatelab model file"):
        load_model(str(path))


@pytest.fixture
def reference_csv(tmp_path, reference_fit):
    _, _, x, y = reference_fit
    path = tmp_path / "ref.csv"
    path.write_text("x,y\n" + "".join(f"{a},{b}\n" for a, b in zip(x[:, 0].tolist(), y.tolist())))
    return path


def test_cli_selects_saves_predicts_and_plots(reference_csv, tmp_path, capsys):
    from PIL import Image
    model_path, png = tmp_path / "m.json", tmp_path / "fit.png"
    assert cli.main(["fit", str(reference_csv), "--x", "x", "--y", "y", "--experts", "1-3",
                     "--se", "--save", str(model_path), "--plot", str(png), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selection"]["best"] == 2 and out["n_experts"] == 2
    assert [r["name"] for r in out["standard_errors"]["rows"]][:2] == ["beta1[0,0]", "beta0[0]"]
    assert Image.open(png).size[0] > 400
    assert cli.main(["predict", str(model_path), str(reference_csv), "--level", "0.8"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split(",")[:4] == ["x", "mean", "low", "high"] and len(lines) == 2001
    assert cli.main(["plot", str(model_path), str(reference_csv), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").exists()


def test_cli_refuses_standard_errors_for_an_over_specified_fit(reference_csv, capsys):
    assert cli.main(["fit", str(reference_csv), "--x", "x", "--y", "y", "--experts", "3",
                     "--se", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "BIC prefers 2 experts to 3" in out["standard_errors"]["error"]


@pytest.mark.parametrize("value", ["0", "3-1x", "a,b", "0-2"])
def test_bad_numbers_of_experts_are_refused(reference_csv, value, capsys):
    with pytest.raises(SystemExit):
        cli.main(["fit", str(reference_csv), "--x", "x", "--y", "y", "--experts", value])
    assert "--experts: must be K, K1-K2 or K1,K2" in capsys.readouterr().err
