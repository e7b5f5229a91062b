import pytest
import torch
from scipy import stats

import gatelab as gl
from cases import MODEL_CASES, cases, model_and_params

T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


# --- samples match the density ---------------------------------------------------------

@cases(MODEL_CASES)
def test_samples_match_the_conditional_cdf(case):
    """Probability integral transform: F(y | x) at the model's own samples is U(0, 1).
    A Kolmogorov-Smirnov test on 20,000 draws (fixed seed) detects a wrong component
    choice, a variance used as a standard deviation, or a wrong mixing proportion."""
    model, params = model_and_params(case)
    x, y = model.sample(params, 20_000, torch.Generator().manual_seed(1))
    u = model.cdf(x, y, params)
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3


@cases(MODEL_CASES)
def test_density_integrates_to_one_and_is_the_cdf_derivative(case):
    model, params = model_and_params(case, seed=2)
    x = model.covariates.sample(4, torch.Generator().manual_seed(3))
    ygrid = torch.linspace(-40, 40, 40_001, dtype=torch.float64)
    xs, ys = x[:, None, :].expand(4, ygrid.numel(), model.dim), ygrid.expand(4, -1)
    dens = model.log_prob(xs.reshape(-1, model.dim), ys.reshape(-1), params).exp().reshape(4, -1)
    torch.testing.assert_close(torch.trapezoid(dens, ygrid), torch.ones(4, dtype=torch.float64),
                               rtol=1e-6, atol=1e-6)
    h = 1e-5
    flat_x = xs.reshape(-1, model.dim)[::400]
    flat_y = ys.reshape(-1)[::400]
    deriv = (model.cdf(flat_x, flat_y + h, params) - model.cdf(flat_x, flat_y - h, params)) / (2 * h)
    torch.testing.assert_close(deriv, dens.reshape(-1)[::400], rtol=1e-5, atol=1e-8)


def test_one_expert_gaussian_moe_is_gaussian_regression():
    model = gl.GaussianMoE(1, dim=2)
    params = {"beta1": T([[0.3, -0.2]]), "beta0": T([0.7]), "a": T([[1.5, -2.0]]),
              "b": T([0.25]), "var": T([0.64])}
    x, y = model.sample(params, 500, torch.Generator().manual_seed(4))
    want = stats.norm.logpdf(y.numpy(), (x @ T([1.5, -2.0]) + 0.25).numpy(), 0.8).sum()
    assert model.log_likelihood(x, y, params).item() == pytest.approx(want, rel=1e-12)


def test_reference_truth_log_likelihood_by_hand():
    """The lambda-shape truth of the reference protocol at one point, by hand."""
    import math
    model = gl.GaussianMoE(2, dim=1)
    p = {"beta1": T([[25.0], [0.0]]), "beta0": T([-8.0, 0.0]), "a": T([[-20.0], [20.0]]),
         "b": T([15.0, -5.0]), "var": T([0.09, 0.16])}
    x0, y0 = 0.4, 6.0
    w1 = 1 / (1 + math.exp(-(-8 + 25 * x0)))
    dens = (w1 * math.exp(-(y0 - (15 - 20 * x0)) ** 2 / 0.18) / math.sqrt(2 * math.pi * 0.09)
            + (1 - w1) * math.exp(-(y0 - (-5 + 20 * x0)) ** 2 / 0.32) / math.sqrt(2 * math.pi * 0.16))
    assert model.log_prob(T([[x0]]), T([y0]), p).item() == pytest.approx(math.log(dens), rel=1e-12)


# --- batching, gradients, identifiability ----------------------------------------------

@cases(MODEL_CASES)
def test_batched_log_prob_equals_loop(case):
    model, params = model_and_params(case, seed=5, batch_shape=(3,))
    x, y = model.sample(params, 40, torch.Generator().manual_seed(6))
    assert x.shape == (3, 40, model.dim) and y.shape == (3, 40)
    looped = torch.stack([model.log_prob(x[r], y[r], {k: v[r] for k, v in params.items()})
                          for r in range(3)])
    torch.testing.assert_close(model.log_prob(x, y, params), looped, rtol=0, atol=1e-12)


@cases(MODEL_CASES)
def test_log_prob_gradients_match_finite_differences(case):
    model, params = model_and_params(case, seed=7)
    x, y = model.sample(params, 8, torch.Generator().manual_seed(8))
    names = list(params)
    inputs = tuple(params[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(lambda *b: model.log_prob(x, y, dict(zip(names, b))).sum(),
                                    inputs, eps=1e-6, atol=1e-6)


@cases(MODEL_CASES)
def test_normalise_keeps_the_density(case):
    model, params = model_and_params(case, seed=9)
    x, y = model.sample(params, 30, torch.Generator().manual_seed(10))
    torch.testing.assert_close(model.log_prob(x, y, model.normalise(params)),
                               model.log_prob(x, y, params), rtol=1e-11, atol=1e-11)


def test_replicates_and_seeds():
    model, params = model_and_params("gmoe-softmax")
    a = model.sample(params, 25, torch.Generator().manual_seed(11), replicates=4)
    b = model.sample(params, 25, torch.Generator().manual_seed(11), replicates=4)
    assert a.x.shape == (4, 25, 2) and a.y.shape == (4, 25)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y[0], a.y[1])


def test_regression_predict_is_the_conditional_mean():
    model, params = model_and_params("reg-sigmoid-relu", seed=12)
    x = model.covariates.sample(5, torch.Generator().manual_seed(13))
    xs = x.expand(20_000, 5, 2)
    y = model._sample_y(xs, params, torch.Generator().manual_seed(14))
    se = (params["nu"].sqrt() / 20_000 ** 0.5).item()
    assert torch.all((y.mean(0) - model.predict(x, params)).abs() < 5 * se)


def test_contaminated_with_vanishing_prompt_is_the_frozen_model():
    f0_model = gl.GaussianMoE(2, 1)
    f0_params = f0_model.random_params(torch.Generator().manual_seed(15))
    model = gl.ContaminatedMoE(f0_model.freeze(f0_params), dim=1)
    params = model.random_params(torch.Generator().manual_seed(16))
    params["lam"] = T(0.0)
    x, y = model.sample(params, 200, torch.Generator().manual_seed(17))
    torch.testing.assert_close(model.log_prob(x, y, params), f0_model.log_prob(x, y, f0_params))


def test_deviated_at_lambda_one_is_the_mixture():
    model, params = model_and_params("deviated", seed=18)
    params["lam"] = T(1.0)
    x, y = model.sample(params, 100, torch.Generator().manual_seed(19))
    mix = {k: params[k] for k in model.mixture.param_shapes()}
    torch.testing.assert_close(model.log_prob(x, y, params), model.mixture.log_prob(x, y, mix))


def test_grid_covariates():
    x = gl.Grid(dim=2, low=0, high=1).sample(9)
    assert x.shape == (9, 2) and sorted(set(x[:, 0].tolist())) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match="needs n = m\\^2 points. Got n=10; try n=9 or n=16"):
        gl.Grid(dim=2).sample(10)


# --- bad input -------------------------------------------------------------------------

@pytest.fixture
def softmax_moe():
    return model_and_params("gmoe-softmax")


def test_nan_and_inf_inputs_are_rejected(softmax_moe):
    model, params = softmax_moe
    x, y = model.sample(params, 10, torch.Generator().manual_seed(0))
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="'x' contains 1 NaN or infinite value"):
        model.log_prob(x, y, params)
    x[3, 1], y[2] = 0.0, float("inf")
    with pytest.raises(ValueError, match="'y' contains 1 NaN or infinite"):
        model.log_prob(x, y, params)
    params["beta0"] = params["beta0"].clone()
    params["beta0"][0] = float("nan")
    with pytest.raises(ValueError, match="params\\['beta0'\\]' contains 1 NaN"):
        model.log_prob(x, torch.zeros(10, dtype=torch.float64), params)


def test_wrong_shapes_are_rejected(softmax_moe):
    model, params = softmax_moe
    with pytest.raises(ValueError, match="'x' must have shape \\(..., n_samples, 2\\)"):
        model.log_prob(torch.zeros(10, 3), torch.zeros(10), params)
    with pytest.raises(ValueError, match="'y' must have shape \\(10,\\)"):
        model.log_prob(torch.zeros(10, 2), torch.zeros(9), params)
    bad = dict(params, a=torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="block 'a' must have shape \\(..., 4, 2\\)"):
        model.log_prob(torch.zeros(10, 2), torch.zeros(10), bad)
    with pytest.raises(ValueError, match="missing \\['var'\\]"):
        model.log_prob(torch.zeros(10, 2), torch.zeros(10), {k: v for k, v in params.items()
                                                                if k != "var"})
    batched = model.random_params(batch_shape=(3,))
    with pytest.raises(ValueError, match="x has batch shape \\(2,\\) but the parameters have \\(3,\\)"):
        model.log_prob(torch.zeros(2, 10, 2), torch.zeros(2, 10), batched)


def test_non_positive_variances_are_rejected(softmax_moe):
    model, params = softmax_moe
    for v in (0.0, -1.0):
        bad = dict(params, var=torch.full((4,), v, dtype=torch.float64))
        with pytest.raises(ValueError, match="'var' \\(a variance\\) must be > 0"):
            model.sample(bad, 5)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="'n_experts' parameter must be an int in the range "
                                         "\\[1, inf\\). Got 0"):
        gl.GaussianMoE(0)
    with pytest.raises(TypeError, match="'n_experts' parameter must be an int"):
        gl.GaussianMoE(2.5)
    with pytest.raises(ValueError, match="Use a softmax-type gate, or MoERegression"):
        gl.GaussianMoE(2, gate="sigmoid")
    with pytest.raises(ValueError, match="covariate distribution has dim=1 but the model has dim=2"):
        gl.GaussianMoE(2, dim=2, covariates=gl.UniformBox(dim=1))
    with pytest.raises(ValueError, match="Unknown covariate distribution 'beta'"):
        gl.GaussianMoE(2, covariates="beta")
    with pytest.raises(ValueError, match="'n' parameter must be an int in the range \\[1, inf\\)"):
        model, params = model_and_params("gmoe-softmax")
        model.sample(params, 0)
    with pytest.raises(TypeError, match="must have a log_prob\\(\\) method"):
        gl.ContaminatedMoE(object(), dim=1)


def test_proportions_outside_unit_interval_are_rejected():
    model, params = model_and_params("deviated")
    params["lam"] = T(1.5)
    with pytest.raises(ValueError, match="'lam' \\(a proportion\\) must lie in \\[0, 1\\]"):
        model.sample(params, 5)


def test_softmax_contamination_with_constant_score_is_input_free():
    """lam(x) = sigmoid(beta1 . x + beta0): with beta1 = 0 it is the constant sigmoid(beta0)."""
    f0 = gl.GaussianMoE(2, 2).freeze(gl.GaussianMoE(2, 2).random_params(torch.Generator().manual_seed(20)))
    gated = gl.ContaminatedMoE(f0, dim=2, gate="softmax")
    const = gl.ContaminatedMoE(f0, dim=2, gate="input_free")
    expert = {"a": T([[1.0, -1.0]]), "b": T([0.5]), "var": T([0.3])}
    x, y = const.sample({**expert, "lam": T(0.2)}, 50, torch.Generator().manual_seed(21))
    lam_gate = {"beta1": T([[0.0, 0.0]]), "beta0": T([torch.logit(T(0.2)).item()])}
    torch.testing.assert_close(gated.log_prob(x, y, {**expert, **lam_gate}),
                               const.log_prob(x, y, {**expert, "lam": T(0.2)}))
