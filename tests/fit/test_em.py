import numpy as np
import pytest
import torch

import gatelab as gl
from cases import cases
from gatelab.demo import reference_truth
from gatelab.fit import fit_em, near_truth, random_starts, select_best
from gatelab.fit.em import gate_q, gate_update, m_step
from gatelab.fit.em.gate_step import closed_form_update
from gatelab.fit.init import covering_assignment
from gatelab.fit.newton import halving_step, newton_ascent, newton_direction
from gatelab.params import pack, pick, unpack

T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
GEN = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def _data(n=2000, reps=3, seed=0):
    model, truth = reference_truth()
    x, y = model.sample(truth, n, GEN(seed), replicates=reps)
    return model, truth, x, y


EM_GATES = {
    "softmax": lambda: gl.make_gate("softmax"),
    "topk2of3": lambda: gl.make_gate("topk", top_k=2),
    "cosine": lambda: gl.make_gate("cosine"),
    "perturbed_cosine": lambda: gl.make_gate("perturbed_cosine"),
    "quadratic": lambda: gl.make_gate("quadratic"),
    "quadratic_monomial": lambda: gl.make_gate("quadratic_monomial"),
    "laplace": lambda: gl.make_gate("laplace"),
    "gaussian": lambda: gl.make_gate("gaussian"),
    "input_free": lambda: gl.make_gate("input_free"),
    "hier-SL": lambda: gl.HierarchicalGate(outer=gl.make_gate("softmax"),
                                           inner=gl.make_gate("laplace"), n_groups=2, n_inner=2),
}


# --- monotonicity ----------------------------------------------------------------------

@cases(EM_GATES)
@pytest.mark.parametrize("expert", ["linear", "ffn"])
def test_em_never_decreases_the_log_likelihood(case, expert):
    gate = EM_GATES[case]()
    k = 4 if isinstance(gate, gl.HierarchicalGate) else 3
    model = gl.GaussianMoE(k, 1, gate, gl.make_expert(expert) if expert == "ffn" else "linear")
    _, _, x, y = _data(n=600, reps=2, seed=1)
    init = random_starts(model, x, y, n_starts=2, generator=GEN(2))
    # Random starts give a flat gate, from which top-K and cosine gates cannot move (issue
    # 11): tilt its score blocks. Locations W stay on data points, as random starts put them.
    free = model.gate.free_mask(k, 1)
    for b, m in free.items():
        if b != "W":
            init[b] = init[b] + 0.5 * torch.randn(init[b].shape, generator=GEN(3),
                                                  dtype=init[b].dtype) * m
    res = fit_em(model, x, y, init, max_iter=60, record=True)
    steps = torch.diff(res.history, dim=-1)
    steps = steps[torch.isfinite(steps)]
    assert steps.numel() > 20
    assert steps.min() >= -1e-9 * res.loglik.abs().max()
    assert torch.all(torch.isfinite(res.loglik))
    # A gate that never moves keeps the likelihood monotone too: every problem's free gate
    # entries must have moved.
    moved = torch.stack([(res.params[b] - init[b]).abs().where(m, 0.0).flatten(2).amax(-1)
                         for b, m in free.items()], -1).amax(-1)           # (starts, reps)
    assert bool((moved > 1e-6).all()), moved


@pytest.mark.parametrize("engine", ["auto", "general"])
def test_squarem_cycles_never_decrease_the_log_likelihood(engine):
    model = gl.GaussianMoE(3, 1)
    _, truth, x, y = _data(n=3000, reps=2, seed=3)
    init = near_truth(model, truth, 3000, n_starts=3, replicates=2, generator=GEN(4))
    res = fit_em(model, x, y, init, accelerate=True, max_iter=300, record=True, engine=engine)
    trace = res.history.reshape(-1, res.history.shape[-1])
    for row in trace:
        vals = row[torch.isfinite(row)]
        assert torch.all(torch.diff(vals) >= -1e-9 * vals.abs().max())


# --- closed forms and references -------------------------------------------------------

@pytest.mark.parametrize("engine", ["auto", "general"])
def test_one_expert_is_ordinary_least_squares(engine):
    model = gl.GaussianMoE(1, 2)
    g = GEN(5)
    x = torch.randn(400, 2, generator=g, dtype=torch.float64)
    y = x @ T([1.5, -2.0]) + 0.3 + 0.7 * torch.randn(400, generator=g, dtype=torch.float64)
    res = fit_em(model, x, y, model.random_params(g), engine=engine)
    design = np.column_stack([np.ones(400), x.numpy()])
    coef, rss, *_ = np.linalg.lstsq(design, y.numpy(), rcond=None)
    np.testing.assert_allclose(res.params["b"].numpy(), coef[:1], rtol=1e-8)
    np.testing.assert_allclose(res.params["a"][0].numpy(), coef[1:], rtol=1e-8)
    np.testing.assert_allclose(res.params["var"].numpy(), rss / 400, rtol=1e-8)


def test_m_step_experts_are_weighted_least_squares_per_expert():
    model = gl.GaussianMoE(3, 2, expert=gl.make_expert("polynomial", degree=2))
    g = GEN(6)
    x = torch.randn(1, 300, 2, generator=g, dtype=torch.float64)
    y = torch.randn(1, 300, generator=g, dtype=torch.float64)
    resp = torch.softmax(torch.randn(1, 300, 3, generator=g, dtype=torch.float64), -1)
    params = {k: v.unsqueeze(0) for k, v in model.random_params(g).items()}
    new, _ = m_step(model, x, y, resp, params, torch.zeros(1, dtype=torch.float64))
    feats = np.column_stack([np.ones(300), gl.experts.polynomial_features(x[0], 2).numpy()])
    for i in range(3):
        sw = np.sqrt(resp[0, :, i].numpy())
        coef = np.linalg.lstsq(feats * sw[:, None], y[0].numpy() * sw, rcond=None)[0]
        np.testing.assert_allclose(new["b"][0, i].item(), coef[0], rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(new["a"][0, i].numpy(), coef[1:], rtol=1e-7, atol=1e-9)
        resid = y[0].numpy() - feats @ coef
        var = (resp[0, :, i].numpy() * resid ** 2).sum() / resp[0, :, i].numpy().sum()
        np.testing.assert_allclose(new["var"][0, i].item(), var, rtol=1e-7)


@pytest.mark.parametrize("rows_sum_to_one", [True, False])
def test_irls_gate_step_equals_autograd_newton_step(rows_sum_to_one):
    """The analytic softmax Hessian matches the autograd one: same Newton step, also
    when responsibilities sum to R_n < 1 (an inner level of a hierarchical gate)."""
    model = gl.GaussianMoE(3, 2)
    g = GEN(7)
    x = torch.randn(2, 500, 2, generator=g, dtype=torch.float64)
    resp = torch.softmax(2 * torch.randn(2, 500, 3, generator=g, dtype=torch.float64), -1)
    if not rows_sum_to_one:
        resp = resp * torch.rand(2, 500, 1, generator=g, dtype=torch.float64)
    params = model.normalise({k: v.expand(2, *v.shape).clone()
                              for k, v in model.random_params(g).items()})
    analytic = closed_form_update(model.gate, 3, x, resp, pick(params, model.gate_blocks()), steps=1)
    shapes = model.gate_blocks()
    free = pack({k: m.expand(2, *m.shape) for k, m in model.gate.free_mask(3, 2).items()}, shapes)
    theta, _ = newton_ascent(lambda t: gate_q(model.gate, x, resp, unpack(t, shapes)),
                             pack({k: params[k] for k in shapes}, shapes), free)
    auto = unpack(theta, shapes)
    for k in shapes:
        # rounding only: the two Hessians are summed in different orders
        torch.testing.assert_close(analytic[k], auto[k], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("outer, inner", [("softmax", "softmax"), ("laplace", "softmax"),
                                          ("softmax", "laplace")])
def test_hierarchical_gate_update_by_level_reaches_the_joint_maximum(outer, inner):
    """Updating each level (and each group) on its own share of Q ends where Newton on
    every gate block at once ends: the same Q, and for concave SS the same parameters."""
    gate = gl.make_gate("hierarchical", outer=outer, inner=inner, n_groups=2, n_inner=3)
    g = GEN(11)
    x = torch.rand(2, 400, 1, generator=g, dtype=torch.float64)
    # responsibilities a smooth function of x, so that Q has a finite maximum
    resp = torch.softmax(x * torch.randn(2, 1, 6, generator=g, dtype=torch.float64) * 4
                         + torch.randn(2, 1, 6, generator=g, dtype=torch.float64)
                         + 0.3 * torch.randn(2, 400, 6, generator=g, dtype=torch.float64), -1)
    shapes = gate.param_shapes(6, 1)
    start = gate.normalise({k: 0.3 * torch.randn(2, *v, generator=g, dtype=torch.float64)
                            for k, v in shapes.items()})
    by_level = gate_update(gate, 6, x, resp, start, steps=40)
    free = pack({k: m.expand(2, *m.shape) for k, m in gate.free_mask(6, 1).items()}, shapes)
    theta, _ = newton_ascent(lambda t: gate_q(gate, x, resp, unpack(t, shapes)),
                             pack(start, shapes), free, steps=40)
    joint = unpack(theta, shapes)
    torch.testing.assert_close(gate_q(gate, x, resp, by_level), gate_q(gate, x, resp, joint),
                               rtol=1e-9, atol=1e-8)
    assert bool((gate_q(gate, x, resp, by_level) > gate_q(gate, x, resp, start) + 1).all())
    if outer == inner == "softmax":
        for k in shapes:
            torch.testing.assert_close(by_level[k], joint[k], rtol=1e-6, atol=1e-6)


def _distance_problem(name, d, seed=3):
    g = GEN(seed)
    x = torch.rand(3, 300, d, generator=g, dtype=torch.float64)
    # rows summing to R_n < 1, as an inner level of a hierarchical gate gets them
    resp = (torch.softmax(3 * torch.randn(3, 300, 3, generator=g, dtype=torch.float64), -1)
            * torch.rand(3, 300, 1, generator=g, dtype=torch.float64))
    theta = 0.5 * torch.randn(3, 3, 1 + d, generator=g, dtype=torch.float64)
    return gl.make_gate(name), x, resp, theta


@pytest.mark.parametrize("name", ["laplace", "gaussian"])
def test_distance_gate_step_equals_the_autograd_newton_step(name):
    gate, x, resp, theta = _distance_problem(name, 2)
    start = gate.normalise({"beta0": theta[..., 0], "W": theta[..., 1:]})
    shapes = gate.param_shapes(3, 2)
    free = pack({k: m.expand(3, *m.shape) for k, m in gate.free_mask(3, 2).items()}, shapes)
    auto, _ = newton_ascent(lambda t: gate_q(gate, x, resp, unpack(t, shapes)),
                            pack(start, shapes), free)
    mine = closed_form_update(gate, 3, x, resp, start, steps=1)
    for k, v in unpack(auto, shapes).items():
        torch.testing.assert_close(mine[k], v, rtol=1e-9, atol=1e-10)
    many = closed_form_update(gate, 3, x, resp, start, steps=20)
    assert bool((gate_q(gate, x, resp, many) >= gate_q(gate, x, resp, mine) - 1e-9).all())


def test_fast_kernel_gives_the_same_fit_as_the_general_one():
    model = gl.GaussianMoE(3, 1)
    _, truth, x, y = _data(n=1500, reps=2, seed=8)
    init = near_truth(model, truth, 1500, n_starts=2, replicates=2, generator=GEN(9))
    fast = fit_em(model, x, y, init, tol=1e-9, max_iter=400)
    slow = fit_em(model, x, y, init, tol=1e-9, max_iter=400, engine="general")
    assert torch.equal(fast.n_iter, slow.n_iter)
    torch.testing.assert_close(fast.loglik, slow.loglik, rtol=1e-12, atol=1e-9)
    for k in fast.params:
        torch.testing.assert_close(fast.params[k], slow.params[k], rtol=1e-7, atol=1e-8)


# --- batching, recovery, degeneracy ----------------------------------------------------

@pytest.mark.parametrize("accelerate", [False, True])
def test_batched_fit_equals_fitting_each_replicate_alone(accelerate):
    model = gl.GaussianMoE(2, 1)
    _, _, x, y = _data(n=1000, reps=4, seed=10)
    init = random_starts(model, x, y, n_starts=1, generator=GEN(11))
    batched = fit_em(model, x, y, init, accelerate=accelerate)
    for r in range(4):
        alone = fit_em(model, x[r], y[r], {k: v[0, r] for k, v in init.items()},
                       accelerate=accelerate)
        assert alone.n_iter.item() == batched.n_iter[0, r].item()
        torch.testing.assert_close(alone.loglik, batched.loglik[0, r], rtol=1e-12, atol=1e-9)
        for k in alone.params:
            torch.testing.assert_close(alone.params[k], batched.params[k][0, r], rtol=1e-8, atol=1e-9)


def test_large_sample_recovers_the_truth():
    model, truth, x, y = _data(n=20_000, reps=1, seed=12)
    init = random_starts(model, x, y, n_starts=4, generator=GEN(13))
    best = select_best(fit_em(model, x, y, init, accelerate=True))
    # Undo label switching: the truth's first expert has the negative slope; then put the
    # gate back in its identifiable form (last expert's gate at zero).
    order = torch.argsort(best.params["a"][0, :, 0])
    est = model.normalise({k: v[0][order] for k, v in best.params.items()})
    for k, tol in [("a", 0.05), ("b", 0.05), ("var", 0.1), ("beta1", 0.15), ("beta0", 0.15)]:
        rel = ((est[k] - truth[k]).abs().max() / truth[k].abs().max()).item()
        assert rel < tol, (k, est[k], truth[k])
    assert bool(best.converged.all())


def test_collapsing_variance_is_floored_and_flagged_not_nan():
    g = GEN(14)
    x = torch.rand(1, 400, 1, generator=g, dtype=torch.float64)
    y = torch.where(x[..., 0] < 0.5, 2.0, torch.randn(1, 400, generator=g, dtype=torch.float64))
    model = gl.GaussianMoE(2, 1)
    init = random_starts(model, x, y, n_starts=3, generator=g)
    res = fit_em(model, x, y, init, max_iter=300)
    assert torch.all(torch.isfinite(res.loglik))
    assert bool(res.degenerate.any())
    floor = 1e-8 * y.var()
    assert torch.all(res.params["var"] >= floor * (1 - 1e-12))


def test_select_best_keeps_the_highest_likelihood_start():
    model = gl.GaussianMoE(3, 1)
    _, truth, x, y = _data(n=800, reps=2, seed=15)
    res = fit_em(model, x, y, near_truth(model, truth, 800, 4, 2, GEN(16)), max_iter=50)
    best = select_best(res)
    torch.testing.assert_close(best.loglik, res.loglik.max(0).values)
    j = res.loglik.argmax(0)
    for r in range(2):
        torch.testing.assert_close(best.params["a"][r], res.params["a"][j[r], r])


# --- starts ------------------------------------------------------------------------------

def test_covering_assignment_covers_every_true_atom_and_pins_the_reference():
    seen = set()
    for seed in range(40):
        atoms = covering_assignment(5, 3, GEN(seed))
        assert sorted(set(atoms.tolist())) == [0, 1, 2] and atoms.numel() == 5
        assert atoms[-1] == 2   # the reference experts correspond
        seen.add(tuple(atoms.tolist()))
    assert len(seen) > 5        # and the rest is random


def test_near_truth_starts_sit_near_the_truth_with_split_masses():
    model = gl.GaussianMoE(3, 1)
    _, truth = reference_truth()
    start = near_truth(model, truth, 10_000, n_starts=200, generator=GEN(17))
    assert start["a"].shape == (200, 3, 1)
    # Every fitted expert copies a true atom up to noise of sd 0.05 n^-0.083 ~ 0.023.
    dist = (start["a"][..., 0].unsqueeze(-1) - truth["a"][:, 0]).abs().amin(-1)
    assert dist.max() < 6 * 0.05 * 10_000 ** -0.083
    # Variances only grow (|N| noise) and stay within 6 sd of a true variance.
    gap = (start["var"].unsqueeze(-1) - truth["var"]).abs().amin(-1)
    assert gap.max() < 6 * 0.005 * 10_000 ** -0.25


def test_near_truth_covers_each_group_of_a_hierarchical_truth():
    # 2 groups of 2 true experts, fitted with 3 per group: the inner level over-specified.
    truth_gate = gl.make_gate("hierarchical", outer="softmax", inner="laplace", n_groups=2, n_inner=2)
    truth_model = gl.GaussianMoE(4, 1, truth_gate)
    truth = truth_model.normalise(truth_model.random_params(GEN(20)))
    gate = gl.make_gate("hierarchical", outer="softmax", inner="laplace", n_groups=2, n_inner=3)
    model = gl.GaussianMoE(6, 1, gate)
    n = 10 ** 12                                  # noise sd 0.05 n^-0.083 ~ 5e-3
    start = near_truth(model, truth, n, n_starts=20, generator=GEN(21))
    assert start["inner.W"].shape == (20, 2, 3, 1) and start["b"].shape == (20, 6)
    x = torch.linspace(0, 1, 50, dtype=torch.float64).unsqueeze(-1)
    true_w = truth_model.log_gate(x, truth).exp()                               # (N, 4)
    for s in range(20):
        params = {k: v[s] for k, v in start.items()}
        # each fitted expert sits on a true expert of its own group ...
        gap = (params["b"].view(2, 3, 1) - truth["b"].view(2, 1, 2)).abs()       # (G, J, J*)
        atom = gap.argmin(-1)
        assert gap.amin(-1).max() < 6 * 0.05 * n ** -0.083
        assert all(set(row.tolist()) == {0, 1} for row in atom)                # every atom covered
        # ... and the weights of the experts on one atom add up to the atom's weight.
        w = model.log_gate(x, params).exp().view(50, 2, 3)
        summed = torch.zeros(50, 2, 2, dtype=torch.float64).scatter_add_(
            2, atom.unsqueeze(0).expand(50, 2, 3), w)
        assert torch.allclose(summed.view(50, 4), true_w, atol=0.02)
    with pytest.raises(ValueError, match="n_groups=2 and n_inner >= 2"):
        small = gl.make_gate("hierarchical", outer="softmax", inner="laplace", n_groups=2, n_inner=1)
        near_truth(gl.GaussianMoE(2, 1, small), truth, 100)


def test_near_truth_needs_at_least_as_many_experts():
    _, truth = reference_truth()
    with pytest.raises(ValueError, match="'k' parameter must be an int in the range \\[2, inf\\)"):
        near_truth(gl.GaussianMoE(1, 1), truth, 100)


# --- Newton helpers ------------------------------------------------------------------------

def test_newton_direction_ignores_non_finite_rows_and_fixed_entries():
    g = T([[1.0, 2.0], [float("nan"), 1.0]])
    h = torch.eye(2, dtype=torch.float64).expand(2, 2, 2).clone()
    d = newton_direction(g, h, free=torch.tensor([[True, False], [True, True]]))
    torch.testing.assert_close(d[0], T([1.0, 0.0]), rtol=1e-8, atol=1e-8)
    assert torch.equal(d[1], T([0.0, 0.0]))


def test_halving_step_never_decreases():
    f = lambda t: -(t - 1.0).square().sum(-1)  # noqa: E731
    theta = T([[0.0], [0.0]])
    out, val = halving_step(f, theta, T([[100.0], [1.0]]), f(theta))
    assert torch.all(val >= f(theta)) and out[1, 0] == 1.0 and 0 < out[0, 0] < 2


def test_newton_ascent_leaves_rows_at_their_maximum_alone():
    """A row already at its maximum is not stepped (nor re-evaluated); the other row
    reaches its maximum in one step (the objective is quadratic)."""
    calls = []

    def f(t):
        calls.append(t.shape[0])
        return -(t - T([[1.0], [3.0]])).square().sum(-1)

    theta, _ = newton_ascent(f, T([[1.0], [0.0]]))
    assert theta[0, 0] == 1.0
    torch.testing.assert_close(theta[1], T([3.0]))
    again, _ = newton_ascent(f, theta)
    assert torch.equal(again, theta)
    assert len(calls) == 3  # one step that moved, then one gradient pass and no halving


def test_bad_fit_arguments():
    model = gl.GaussianMoE(2, 1)
    _, truth, x, y = _data(n=50, reps=1)
    with pytest.raises(ValueError, match="'tol' parameter must be a finite number > 0"):
        fit_em(model, x, y, truth, tol=0)
    with pytest.raises(ValueError, match="Unknown engine 'gpu'"):
        fit_em(model, x, y, truth, engine="gpu")
    with pytest.raises(ValueError, match="'y' must have shape"):
        fit_em(model, x, y[..., :-1], truth)


