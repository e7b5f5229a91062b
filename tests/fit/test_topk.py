"""Top-K gates in one covariate: the change-point MLE and the segment fit, against slow
references (every split scored by numpy least squares; EM run on one side by hand), and the
expected gate weights against closed forms and Monte Carlo."""

import math

import pytest
import torch

import reference as ref
from cases import run_small_study
from gatelab.fit import fit_em, near_truth
from gatelab.fit.topk import fit_topk_segments, split_profile
from gatelab.gates import make_gate
from gatelab.models import GaussianMoE

D = torch.float64
TRUTH = {"beta1": torch.tensor([[25.0], [0.0]], dtype=D), "beta0": torch.tensor([-8.0, 0.0], dtype=D),
         "a": torch.tensor([[-20.0], [20.0]], dtype=D), "b": torch.tensor([15.0, -5.0], dtype=D),
         "var": torch.tensor([0.09, 0.16], dtype=D)}
TOP1 = GaussianMoE(2, 1, make_gate("topk", top_k=1))


def _data(n, replicates, seed=0):
    pairs = [TOP1.sample(TRUTH, n, torch.Generator().manual_seed(seed + r)) for r in range(replicates)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def test_split_profile_is_the_brute_force_mle_batched():
    x, y = _data(120, 3)
    # A fourth replicate with no change point: its best split is decided by small
    # differences, so any error in the profile moves it.
    g = torch.Generator().manual_seed(7)
    flat_x = torch.rand(1, 120, 1, generator=g, dtype=D)
    x = torch.cat([x, flat_x])
    y = torch.cat([y, 2 * flat_x[..., 0] + torch.randn(1, 120, generator=g, dtype=D)])
    for min_size in (5, 30):
        split = split_profile(x.squeeze(-1), y, min_size=min_size)
        for r in range(4):
            ll, lo, hi = ref.split_by_refitting(x[r, :, 0].numpy(), y[r].numpy(), min_size)
            assert float(split.loglik[r].sum()) == pytest.approx(ll, rel=1e-10)
            assert lo < float(split.boundary[r]) < hi
    # each side's expert: slope, intercept of its own least squares (left = expert 2)
    assert torch.allclose(split.a[:3, 0], torch.full((3,), 20.0, dtype=D), atol=2.0)
    assert torch.allclose(split.b[:3, 1], torch.full((3,), 15.0, dtype=D), atol=2.0)


def test_split_profile_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 10 samples"):
        split_profile(torch.rand(1, 8, dtype=D), torch.rand(1, 8, dtype=D))
    with pytest.raises(ValueError, match="one shape"):
        split_profile(torch.rand(1, 20, dtype=D), torch.rand(1, 19, dtype=D))


def test_top1_fit_is_exact_and_its_params_give_the_profile_likelihood():
    x, y = _data(400, 2, seed=10)
    init = near_truth(TOP1, TRUTH, 400, 1, replicates=2, generator=torch.Generator().manual_seed(0))
    res = fit_topk_segments(TOP1, x, y, init)
    split = split_profile(x.squeeze(-1), y)
    assert torch.allclose(res.loglik[0], split.loglik.sum(-1), rtol=1e-10)
    for r in range(2):
        params = {k: v[0, r] for k, v in res.params.items()}
        assert float(TOP1.log_likelihood(x[r], y[r], params)) == pytest.approx(
            float(split.loglik[r].sum()), rel=1e-10)
    # the boundary is within a few samples' spacing of t* = 0.32
    t_hat = -res.params["beta0"][0, :, 0] / res.params["beta1"][0, :, 0, 0]
    assert torch.allclose(t_hat, torch.full((2,), 0.32, dtype=D), atol=0.02)


def test_overspecified_segment_fit_equals_em_on_the_split_side():
    model = GaussianMoE(3, 1, make_gate("topk", top_k=2))
    x, y = _data(1500, 2, seed=20)
    init = near_truth(model, TRUTH, 1500, 3, replicates=2, generator=torch.Generator().manual_seed(1))
    res = fit_topk_segments(model, x, y, init, tol=1e-8)
    split = split_profile(x.squeeze(-1), y)
    dense = GaussianMoE(2, 1, "softmax")
    for r in range(2):
        t = split.boundary[r]
        for s in range(3):
            right = torch.stack([init["a"][s, r, :, 0], init["b"][s, r], init["var"][s, r]], -1)
            sides = torch.stack([split.a[r], split.b[r], split.var[r]], -1)
            on_right = ((right[:, None] - sides[None]) ** 2).sum(-1).argmin(-1) == 1
            split_side = bool(on_right.sum() == 2)                     # the side with 2 experts
            mask = x[r, :, 0] > t if split_side else x[r, :, 0] < t
            members = on_right if split_side else ~on_right
            ref = fit_em(dense, x[r][mask], y[r][mask], {k: v[s, r][members] for k, v in init.items()},
                         tol=1e-8)
            other = split.loglik[r, int(not split_side)]
            assert float(res.loglik[s, r]) == pytest.approx(float(ref.loglik + other), rel=1e-8)
            fitted_b = res.params["b"][s, r][members].sort().values
            assert torch.allclose(fitted_b, ref.params["b"].sort().values, rtol=1e-8)


def test_one_data_set_gives_the_batched_answer():
    x, y = _data(600, 2, seed=30)
    init = near_truth(TOP1, TRUTH, 600, 2, replicates=2, generator=torch.Generator().manual_seed(2))
    batched = fit_topk_segments(TOP1, x, y, init)
    single = fit_topk_segments(TOP1, x[1], y[1], {k: v[:, 1] for k, v in init.items()})
    assert single.loglik.shape == (2,) and single.params["a"].shape == (2, 2, 1)
    assert torch.equal(single.loglik, batched.loglik[:, 1])


def test_segment_fit_rejects_dense_gates_and_other_experts():
    x, y = _data(100, 1)
    for model in (GaussianMoE(2, 1, "softmax"), GaussianMoE(2, 1, make_gate("topk", top_k=1), "polynomial")):
        with pytest.raises(ValueError, match="top-K softmax gate"):
            fit_topk_segments(model, x, y, {})
    with pytest.raises(ValueError, match="keeps them all: it is a dense softmax gate"):
        fit_topk_segments(GaussianMoE(2, 1, make_gate("topk", top_k=2)), x, y, {})


def test_expected_weights_closed_forms_and_monte_carlo():
    # top-1 with uniform x: the selection probabilities, 1 - t* and t*
    assert torch.allclose(TOP1.expected_weights(TRUTH), torch.tensor([0.68, 0.32], dtype=D), atol=1e-12)
    from gatelab.covariates import GaussianCovariates
    gauss = GaussianMoE(2, 1, make_gate("topk", top_k=1), covariates=GaussianCovariates(mean=0.5, std=0.2))
    expect = 1 - torch.special.ndtr(torch.tensor((0.32 - 0.5) / 0.2, dtype=D))
    assert float(gauss.expected_weights(TRUTH)[0]) == pytest.approx(float(expect), abs=1e-12)
    # a dense softmax gate with 3 experts: Monte Carlo with 2e6 draws (sd < 4e-4)
    model = GaussianMoE(3, 1, "softmax")
    params = model.random_params(torch.Generator().manual_seed(3))
    x = torch.rand(2_000_000, 1, generator=torch.Generator().manual_seed(4), dtype=D)
    mc = model.log_gate(x, params).exp().mean(0)
    assert torch.allclose(model.expected_weights(params), mc, atol=2e-3)
    # d = 2, top-1 on [0, 1]^2: expert 0 selected where x1 + x2 > 1 (area 1/2) or x1 > 0.75
    # (area 1/4); the quasi-Monte Carlo mean is within 1e-3 of both areas
    top1 = GaussianMoE(2, 2, make_gate("topk", top_k=1))
    for beta1, beta0, area in (([[1.0, 1.0], [0.0, 0.0]], [-1.0, 0.0], 0.5),
                               ([[1.0, 0.0], [0.0, 0.0]], [-0.75, 0.0], 0.25)):
        params = {"beta1": torch.tensor(beta1, dtype=D), "beta0": torch.tensor(beta0, dtype=D)}
        assert float(top1.expected_weights(params)[0]) == pytest.approx(area, abs=1e-3)


def test_topk_study_runs_and_scores_the_boundary_through_the_mass(tmp_path):
    _, rows = run_small_study("topk-gaussian", tmp_path / "topk.sqlite",
                              quick_sizes=[500, 1000], quick_replicates=2)
    assert len(rows) == 2 * 2 * 2 and all(math.isfinite(r.loss) for r in rows)
    # k* = 2 and uniform x: the mass term is twice the boundary's error, well under 0.05 here
    assert all(0 < r.blocks["mass"] < 0.05 for r in rows)
