import json
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import gatelab.cli as cli
from gatelab.demo import reference_truth
from gatelab.fit import GaussianMoERegressor, NotFittedError


@pytest.fixture(scope="module")
def data():
    model, truth = reference_truth()
    x, y = model.sample(truth, 1500, torch.Generator().manual_seed(0))
    return x.numpy(), y.numpy()


@pytest.fixture(scope="module")
def fitted(data):
    return GaussianMoERegressor(2, n_init=3, random_state=0).fit(*data)


def test_fit_returns_self_with_fitted_attributes(data):
    est = GaussianMoERegressor(2, random_state=1)
    assert est.fit(*data) is est
    assert est.converged_ and est.n_iter_ > 0 and est.n_features_in_ == 1
    assert est.lower_bound_ == pytest.approx(est.loglik_ / 1500)
    assert set(est.params_) == {"beta1", "beta0", "a", "b", "var"}


def test_predictions_and_scores_agree_with_the_model(fitted, data):
    X, y = data
    w = fitted.predict_proba(X)
    np.testing.assert_allclose(w.sum(1), 1.0)
    means = fitted.model_.expert_means(torch.as_tensor(X), fitted.params_).numpy()
    np.testing.assert_allclose(fitted.predict(X), (w * means).sum(1))
    assert fitted.log_likelihood(X, y) == pytest.approx(fitted.loglik_, rel=1e-10)
    r2 = 1 - ((y - fitted.predict(X)) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    assert fitted.score(X, y) == pytest.approx(r2)


def test_information_criteria_by_hand(fitted, data):
    X, y = data
    p = 2 + 2 * 2 + 2  # gate (beta0, beta1 of expert 1), experts (a, b) x 2, variances x 2
    ll = fitted.log_likelihood(X, y)
    assert fitted.aic(X, y) == pytest.approx(-2 * ll + 2 * p)
    assert fitted.bic(X, y) == pytest.approx(-2 * ll + p * math.log(len(y)))


def test_sample_draws_from_the_fitted_conditional(fitted, data):
    X, _ = data
    draws = np.stack([fitted.sample(X, random_state=s) for s in range(40)])
    # Mean of 40 draws per x matches E[y | x] within 5 standard errors on average.
    err = np.abs(draws.mean(0) - fitted.predict(X)) / (draws.std(0) / np.sqrt(40))
    assert np.median(err) < 2 and fitted.sample(X, 3).shape == (1500,)


def test_fit_without_a_seed_follows_torch_manual_seed(data):
    """No random_state: the start comes from torch's global generator, so a run after
    torch.manual_seed repeats exactly, and the caller's later draws repeat too (a reseed
    by torch.seed() inside fit would break both)."""
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        est = GaussianMoERegressor(2).fit(*data)
        runs.append((est.loglik_, torch.rand(3)))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])


def test_same_seed_same_fit(data):
    a = GaussianMoERegressor(2, random_state=5).fit(*data)
    b = GaussianMoERegressor(2, random_state=5).fit(*data)
    assert a.loglik_ == b.loglik_


def test_errors(data):
    X, y = data
    with pytest.raises(NotFittedError, match="not fitted yet"):
        GaussianMoERegressor().predict(X)
    with pytest.raises(ValueError, match="n_samples=8 must exceed the number of free parameters"):
        GaussianMoERegressor(2).fit(X[:8], y[:8])
    with pytest.raises(ValueError, match="X has 2 features, but GaussianMoERegressor is expecting 1"):
        GaussianMoERegressor(2, random_state=0).fit(X, y).predict(np.hstack([X, X]))
    with pytest.raises(ValueError, match="'X' contains 1 NaN"):
        bad = X.copy()
        bad[3, 0] = np.nan
        GaussianMoERegressor(2).fit(bad, y)
    with pytest.raises(ValueError, match="Use a softmax-type gate"):
        GaussianMoERegressor(2, gate="sigmoid").fit(X, y)


def test_estimator_works_without_scikit_learn():
    """scikit-learn is optional: with it blocked, the fallback base classes still give
    get_params / set_params and an R^2 score."""
    code = (
        "import sys; sys.modules['sklearn'] = None\n"
        "import torch\n"
        "from gatelab.demo import reference_truth\n"
        "from gatelab.fit import GaussianMoERegressor\n"
        "m, t = reference_truth()\n"
        "x, y = m.sample(t, 800, torch.Generator().manual_seed(0))\n"
        "est = GaussianMoERegressor(2, random_state=0).set_params(n_init=2)\n"
        "assert est.get_params()['n_init'] == 2\n"
        "est.fit(x, y)\n"
        "r2 = 1 - ((y.numpy() - est.predict(x)) ** 2).sum() / ((y.numpy() - y.numpy().mean()) ** 2).sum()\n"
        "assert abs(est.score(x, y) - r2) < 1e-12 and r2 > 0.5\n"
        "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def _sklearn_checks(estimator, expected):
    from sklearn.utils.estimator_checks import check_estimator
    failed = []

    def record(estimator, check_name, exception, status, expected_to_fail, expected_to_fail_reason):
        if status == "failed" and not expected_to_fail:
            failed.append(f"{check_name}: {exception}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(estimator, expected_failed_checks=expected, on_fail=None, callback=record)
    return failed


PROBA = {"check_regressors_no_decision_function":
         "predict_proba returns the gate's expert probabilities (asked for by the estimation "
         "issue); scikit-learn reserves the name for classifiers"}


def test_scikit_learn_estimator_checks_one_expert():
    pytest.importorskip("sklearn")
    assert _sklearn_checks(GaussianMoERegressor(1, random_state=0), PROBA) == []


def test_scikit_learn_estimator_checks_two_experts():
    pytest.importorskip("sklearn")
    too_few = ("fits 10-20 samples with up to 5 features: more free parameters than samples "
               "for a 2-expert MoE, which gatelab rejects as unidentifiable")
    expected = {name: too_few for name in (
        "check_n_features_in_after_fitting", "check_estimators_dtypes", "check_estimators_nan_inf")}
    expected.update(PROBA)
    assert _sklearn_checks(GaussianMoERegressor(2, n_init=2, random_state=0), expected) == []


# --- gatelab fit -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def csv_path(tmp_path_factory, data):
    X, y = data
    path = tmp_path_factory.mktemp("fit") / "data.csv"
    np.savetxt(path, np.column_stack([X[:, 0], y]), delimiter=",", header="x,y", comments="")
    return path


def test_cli_fit_json(csv_path, capsys):
    assert cli.main(["fit", str(csv_path), "--x", "x", "--y", "y", "--experts", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("loglik", "n_iter", "converged", "seconds", "params"):
        assert key in out
    assert out["converged"] and set(out["params"]) == {"beta1", "beta0", "a", "b", "var"}
    # The estimate is close to the truth (slopes -20 and 20, up to label order).
    assert sorted(round(a[0]) for a in out["params"]["a"]) == [-20, 20]


@pytest.mark.parametrize("content,message", [
    ("x,y\n1,2\n", "no column(s) ['z']"),
    ("x,z\n1,abc\n2,3\n", "line 2, column 'z': 'abc' is not a number"),
    ("x,z\n1,nan\n2,3\n", "line 2, column 'z': 'nan' is not finite"),
    ("", "is empty"),
])
def test_cli_fit_bad_csv_exits_2(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    res = subprocess.run([sys.executable, "-m", "gatelab.cli", "fit", str(path), "--x", "x",
                          "--y", "z", "--experts", "2"], capture_output=True, text=True)
    assert res.returncode == 2 and message in res.stderr, res.stderr
