"""Top-K gates in any number of covariates: the smoothed selection against the hard one
and the dense softmax (its two limits), the continuation fit against the truth's own
likelihood and a looped fit, and the Hellinger density loss against closed forms and a
brute-force integral."""

import math

import pytest
import torch

from gatelab.covariates import make_covariates
from gatelab.fit.init import near_truth_starts
from gatelab.fit.topk_continuation import fit_topk_continuation, smoothed_model
from gatelab.gates import make_gate, smoothed_top_k, top_k_mask
from gatelab.losses import hellinger
from gatelab.models import GaussianMoE

D = torch.float64
BOX = make_covariates("uniform", dim=2, low=-1.0, high=1.0)
TRUTH = {"beta1": torch.tensor([[4.0, 3.0], [0.0, 0.0]], dtype=D), "beta0": torch.tensor([0.5, 0.0], dtype=D),
         "a": torch.tensor([[2.0, -1.0], [-1.0, 1.5]], dtype=D), "b": torch.tensor([1.0, -1.0], dtype=D),
         "var": torch.tensor([0.25, 0.16], dtype=D)}
TOP1 = GaussianMoE(2, 2, make_gate("topk", top_k=1), "linear", BOX)


def test_smoothed_top_k_tends_to_the_hard_selection_and_to_the_dense_softmax():
    s = torch.randn(50, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    hard = torch.softmax(top_k_mask(s, 2), -1)
    cold = torch.softmax(smoothed_top_k(s, 2, 1e-6), -1)
    # rows whose 2nd and 3rd scores are 1e-3 apart or more are selected exactly
    gap = (s.topk(3, -1).values[:, 1] - s.topk(3, -1).values[:, 2]) > 1e-3
    assert torch.allclose(cold[gap], hard[gap], atol=1e-12)
    assert torch.allclose(torch.softmax(smoothed_top_k(s, 2, 1e8), -1), torch.softmax(s, -1), atol=1e-7)
    assert torch.equal(smoothed_top_k(s, 5, 0.1), s)
    with pytest.raises(ValueError, match="temperature > 0"):
        smoothed_top_k(s, 2, 0.0)


def test_smoothed_top_k_gradient_matches_finite_differences():
    s = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=D, requires_grad=True)
    f = lambda t: torch.log_softmax(smoothed_top_k(t, 2, 0.3), -1)[:, 0].sum()   # noqa: E731
    (g,) = torch.autograd.grad(f(s), s)
    eps, fd = 1e-6, torch.zeros_like(s)
    for idx in torch.cartesian_prod(torch.arange(4), torch.arange(4)):
        e = torch.zeros_like(s)
        e[tuple(idx)] = eps
        fd[tuple(idx)] = (f(s + e) - f(s - e)) / (2 * eps)
    assert torch.allclose(g, fd, atol=1e-6)


@pytest.mark.parametrize("k,temperature,n_experts,d", [(1, 0.3, 4, 2), (2, 0.05, 4, 1), (2, 1.0, 3, 2),
                                                        (4, 0.2, 4, 2)])
def test_smoothed_gate_derivatives_equal_autograd(k, temperature, n_experts, d):
    """SmoothedTopK.q_derivatives (EM's closed-form gate step) is the gradient and negative
    Hessian of Q = sum r log w over the free entries, as autograd finds them; rows of r
    need not sum to 1; k >= E is the dense softmax."""
    from gatelab.fit.newton import grad_and_hessian
    from gatelab.fit.topk_continuation import SmoothedTopK
    from gatelab.params import pack, unpack

    base = make_gate("topk", top_k=min(k, n_experts - 1))
    gate = SmoothedTopK(base=base, temperature=temperature, normaliser="softmax", top_k=base.top_k)
    if k >= n_experts:   # the base cannot be built with top_k = E; bypass its check
        object.__setattr__(base, "top_k", k)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 200, d, generator=g, dtype=D)
    resp = torch.softmax(2 * torch.randn(2, 200, n_experts, generator=g, dtype=D), -1)
    resp = resp * torch.rand(2, 200, 1, generator=g, dtype=D)
    shapes = gate.param_shapes(n_experts, d)
    params = gate.normalise(gate.random_params(n_experts, d, g, (2,)))
    grad, neg_hess = gate.q_derivatives(x, resp, params)
    free = torch.cat([m.flatten() for m in gate.free_mask(n_experts, d).values()])
    q = lambda t: (resp * gate.log_weights(x, unpack(t, shapes))).sum((-1, -2))  # noqa: E731
    _, auto_grad, hess = grad_and_hessian(q, pack(params, shapes))
    torch.testing.assert_close(grad, auto_grad[:, free], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(neg_hess, -hess[:, free][:, :, free], rtol=1e-9, atol=1e-9)
    assert float(auto_grad.abs().max()) > 1.0      # not a comparison of zeros


def _data(n, replicates, seed=0):
    g = torch.Generator().manual_seed(seed)
    pairs = [TOP1.sample(TRUTH, n, g) for _ in range(replicates)]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def test_continuation_finds_the_boundary_in_two_covariates():
    x, y = _data(1500, 2)
    init = torch.Generator().manual_seed(5)
    starts = [near_truth_starts(TOP1, TRUTH, 1500, 2, init) for _ in range(2)]
    init = {k: torch.stack([s[k] for s in starts], 1) for k in starts[0]}
    res = fit_topk_continuation(TOP1, x, y, init)
    truth_ll = TOP1.log_likelihood(x, y, {k: v.expand(2, *v.shape) for k, v in TRUTH.items()})
    best = res.loglik.max(0).values
    # the MLE's likelihood is at least the truth's, and above it by about half the 10 free
    # parameters (a chi-square over 2), not by tens: 15 is far in that tail
    assert bool((best >= truth_ll).all()) and bool((best - truth_ll < 15).all())
    # the fitted selection agrees with the true one at nearly every covariate
    grid = BOX.sample(20000, torch.Generator().manual_seed(9))
    chosen = TOP1.log_gate(grid, {k: v[0, 0] for k, v in res.params.items()}).argmax(-1)
    true = TOP1.log_gate(grid, TRUTH).argmax(-1)
    assert float((chosen == true).double().mean()) > 0.99
    # a hard-model stationary point: the experts' gradient certificate is met
    assert bool(res.converged.all())
    # batched == looped (one data set, its own starts)
    one = fit_topk_continuation(TOP1, x[1], y[1], {k: v[:, 1] for k, v in init.items()})
    assert torch.allclose(one.loglik, res.loglik[:, 1], rtol=1e-9, atol=1e-6)


def test_a_top2_fit_converges_at_a_kink_of_the_hard_likelihood():
    """K = 2 of 3 in d = 2: the fit ends where the experts' gradient is below the bound and
    a Newton step on everything gains next to nothing, though the gate's gradient is not 0
    (a boundary through a covariate). Converged means exactly that: 30 more Newton steps
    gain under 1e-6 in all, and a fit with a boundary moved off its place, polished one
    step, is not called converged."""
    from gatelab.fit.polish import DEFAULT_BOUND, gradient_norm, polish
    from gatelab.fit.topk_continuation import _polish_hard
    truth = {"beta1": torch.tensor([[3.0, 0.0], [-1.5, 2.5], [0.0, 0.0]], dtype=D),
             "beta0": torch.tensor([0.3, 0.0, 0.0], dtype=D),
             "a": torch.tensor([[2.0, -1.0], [-1.0, 1.5], [0.5, 2.0]], dtype=D),
             "b": torch.tensor([1.0, -1.0, -0.5], dtype=D), "var": torch.tensor([0.25, 0.16, 0.2], dtype=D)}
    top2 = GaussianMoE(3, 2, make_gate("topk", top_k=2), "linear", BOX)
    x, y = top2.sample(truth, 2000, torch.Generator().manual_seed(3))
    init = near_truth_starts(top2, truth, 2000, 2, torch.Generator().manual_seed(4))
    res = fit_topk_continuation(top2, x, y, init)
    assert bool(res.converged.all())
    assert float(res.loglik.max()) > float(top2.log_likelihood(x, y, truth))
    xs, ys = x.expand(2, *x.shape), y.expand(2, *y.shape)
    assert bool((gradient_norm(top2, xs, ys, res.params, blocks=["a", "b", "var"]) <= DEFAULT_BOUND).all())
    more = polish(top2, xs, ys, res.params, DEFAULT_BOUND, 30)
    assert bool((more.gain >= 0).all()) and float(more.gain.max()) < 1e-6
    assert bool((more.grad_norm > 100 * DEFAULT_BOUND).all()), "no kink: the second rule is untested"
    moved = {k: v.clone() for k, v in res.params.items()}
    moved["beta0"][:, 0] += 0.3
    _, _, converged = _polish_hard(top2, xs, ys, moved, DEFAULT_BOUND, 1)
    assert not bool(converged.any())


def test_the_dense_stage_is_used_only_where_it_stayed_usable():
    """Rows whose dense fit overflowed (status degenerate) or is not finite restart the
    smoothed stages from their own start; the others go on from the dense fit."""
    from gatelab.fit.em import FitResult
    from gatelab.fit.status import FitStatus
    from gatelab.fit.topk_continuation import _warm_start
    start = {"beta0": torch.zeros(3, 2, dtype=D), "var": torch.ones(3, 2, dtype=D)}
    fitted = {"beta0": torch.tensor([[1.0, 0.0], [1e294, 0.0], [float("nan"), 0.0]], dtype=D),
              "var": torch.full((3, 2), 0.5, dtype=D)}
    status = torch.tensor([FitStatus.SEPARATED, FitStatus.DEGENERATE, FitStatus.CONVERGED], dtype=torch.int8)
    dense = FitResult(fitted, torch.tensor([-10.0, 0.0, -5.0], dtype=D), torch.ones(3, dtype=torch.long),
                      torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool), status)
    warm = _warm_start(dense, start)
    assert torch.equal(warm["beta0"][0], fitted["beta0"][0]) and torch.equal(warm["var"][0], fitted["var"][0])
    for row in (1, 2):
        assert torch.equal(warm["beta0"][row], start["beta0"][row])
        assert torch.equal(warm["var"][row], start["var"][row])


def test_continuation_starts_from_the_dense_softmax_when_the_schedule_is_only_hard():
    # T = infinity then T = 0 alone: the dense fit's parameters, polished on the hard model
    x, y = _data(800, 1, seed=3)
    start = {k: v.unsqueeze(0).unsqueeze(0) for k, v in TRUTH.items()}
    res = fit_topk_continuation(TOP1, x, y, start, temperatures=(0.0,), polish_steps=0)
    from gatelab.fit.em import fit_em
    dense = fit_em(GaussianMoE(2, 2, "softmax", "linear", BOX), x, y, {k: v[0] for k, v in start.items()},
                   tol=1e-8, max_iter=300, accelerate=True)
    assert torch.allclose(res.params["a"][0], dense.params["a"], atol=1e-12)


def test_continuation_refuses_what_it_cannot_fit():
    x, y = _data(100, 1)
    for other in ("softmax", make_gate("laplace", top_k=1)):
        with pytest.raises(ValueError, match="top-K sparse softmax gate of linear scores"):
            fit_topk_continuation(GaussianMoE(2, 2, other, "linear", BOX), x, y, {})
    with pytest.raises(ValueError, match="keeps them all"):
        fit_topk_continuation(GaussianMoE(2, 2, make_gate("topk", top_k=2), "linear", BOX), x, y, {})
    with pytest.raises(ValueError, match="falling list of numbers ending at 0"):
        fit_topk_continuation(TOP1, x, y, {}, temperatures=(1.0, 0.1))
    assert smoothed_model(TOP1, 0.0) is TOP1


def _one_gaussian(b, var):
    return {"beta1": torch.zeros(1, 1, dtype=D), "beta0": torch.zeros(1, dtype=D),
            "a": torch.tensor([[0.5]], dtype=D), "b": torch.tensor([b], dtype=D),
            "var": torch.tensor([var], dtype=D)}


def test_hellinger_closed_form_of_two_gaussians_and_zero_at_the_truth():
    model = GaussianMoE(1, 1, "softmax")
    x = torch.rand(7, 1, generator=torch.Generator().manual_seed(0), dtype=D)
    truth, fit = _one_gaussian(0.0, 1.0), _one_gaussian(0.7, 2.0)
    s2 = 1.0 + 2.0
    closed = math.sqrt(1 - math.sqrt(2 * math.sqrt(2.0) / s2) * math.exp(-0.49 / (4 * s2)))
    batched = {k: torch.stack([v, truth[k]]) for k, v in fit.items()}
    h = hellinger(model, batched, model, truth, x)
    assert float(h[0]) == pytest.approx(closed, rel=1e-10)
    assert float(h[1]) == pytest.approx(0.0, abs=1e-7)


def test_hellinger_of_mixtures_matches_a_brute_force_integral():
    # a top-1 truth against a dense 3-expert fit, in two covariates: the integral over y
    # by the trapezoid rule on a fine grid, at each evaluation covariate
    x = BOX.sample(40, torch.Generator().manual_seed(2))
    fitted = GaussianMoE(3, 2, "softmax", "linear", BOX)
    params = fitted.random_params(torch.Generator().manual_seed(3))
    params["var"] = params["var"].abs() + 0.2
    grid = torch.linspace(-15, 15, 60001, dtype=D)
    h2 = []
    for xm in x:
        xs = xm.expand(len(grid), 2)
        p = fitted.log_prob(xs, grid, params).exp()
        q = TOP1.log_prob(xs, grid, TRUTH).exp()
        h2.append(1 - torch.trapezoid((p * q).sqrt(), grid))
    brute = torch.stack(h2).mean().sqrt()
    ours = hellinger(fitted, {k: v.unsqueeze(0) for k, v in params.items()}, TOP1, TRUTH, x, nodes=40)
    assert float(ours[0]) == pytest.approx(float(brute), rel=1e-4)


def test_topk_cells_study_rows_carry_the_density_loss_of_their_estimates(tmp_path):
    from cases import assert_rows_score_their_estimates, run_small_study
    from gatelab.studies.runner import DENSITY_POINTS, setting_hash
    study, rows = run_small_study("topk-cells", tmp_path / "s.db", quick_sizes=[300, 600],
                                  quick_replicates=1)
    assert_rows_score_their_estimates(study, rows)
    settings = {s.name: s for s in study.settings}
    for r in rows:
        setting = settings[r.setting]
        estimate = {k: torch.tensor(v, dtype=D).unsqueeze(0) for k, v in r.params.items()}
        truth_model = study.truth_model(setting)
        x = truth_model.covariates.sample(DENSITY_POINTS, torch.Generator().manual_seed(0))
        h = hellinger(study.fitted_model(setting), estimate, truth_model, study.truth_params(setting, r.n), x)
        assert r.blocks["hellinger"] == pytest.approx(float(h[0]), rel=1e-9)
    # a setting that records no density hashes as it did before the field existed
    from gatelab.studies import Study, catalogue
    spec = catalogue.get("softmax-gaussian").to_dict()
    plain = Study.from_dict(spec)
    spec["settings"][0]["density"] = False
    assert setting_hash(Study.from_dict(spec), plain.settings[0]) == setting_hash(plain, plain.settings[0])
    spec["settings"][0]["density"] = True
    assert setting_hash(Study.from_dict(spec), plain.settings[0]) != setting_hash(plain, plain.settings[0])
