import math

import pytest
import torch

import gatelab as gl
import reference as ref
from cases import LAYER_GATE_CASES as GATE_CASES
from cases import N_EXPERTS, cases, gate_params

T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
X = T([[1.0, 2.0]])  # one sample, D = 2; ||x|| = sqrt(5)


def _softmax(scores):
    z = sum(math.exp(s) for s in scores)
    return [math.exp(s) / z for s in scores]


# --- hand-computed values on one sample ------------------------------------------------

def test_softmax_gate_by_hand():
    p = {"beta1": T([[1.0, 0.0], [0.0, 1.0], [0.5, -1.0]]), "beta0": T([0.5, 0.0, 1.0])}
    s = gl.make_gate("softmax").scores(X, p)[0].tolist()
    assert s == pytest.approx([1.5, 2.0, -0.5])
    w = gl.make_gate("softmax").weights(X, p)[0].tolist()
    assert w == pytest.approx(_softmax([1.5, 2.0, -0.5]))


def test_topk_keeps_the_two_largest_by_hand():
    p = {"beta1": T([[1.0, 0.0], [0.0, 1.0], [0.5, -1.0]]), "beta0": T([0.5, 0.0, 1.0])}
    w = gl.make_gate("topk", top_k=2).weights(X, p)[0].tolist()
    kept = _softmax([1.5, 2.0])
    assert w == pytest.approx([kept[0], kept[1], 0.0])


def test_sigmoid_gate_by_hand():
    p = {"beta1": T([[1.0, 0.0], [0.0, 1.0]]), "beta0": T([0.5, -3.0])}
    w = gl.make_gate("sigmoid").weights(X, p)[0].tolist()
    assert w == pytest.approx([1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(1.0))])


def test_cosine_and_perturbed_cosine_by_hand():
    p = {"beta1": T([[3.0, 4.0], [0.0, -2.0]]), "beta0": T([0.1, 0.0])}
    s = gl.make_gate("cosine").scores(X, p)[0].tolist()
    assert s == pytest.approx([11 / (5 * math.sqrt(5)) + 0.1, -4 / (2 * math.sqrt(5))])
    s = gl.make_gate("perturbed_cosine", tau1=0.5, tau2=0.25).scores(X, p)[0].tolist()
    assert s == pytest.approx([11 / (5.5 * (math.sqrt(5) + 0.25)) + 0.1,
                               -4 / (2.5 * (math.sqrt(5) + 0.25))])


def test_quadratic_gates_by_hand():
    # x^T A x with A = [[1, 2], [0, 3]] at x = (1, 2): 1 + 2*1*2 + 0 + 3*4 = 17
    p = {"A": T([[[1.0, 2.0], [0.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]]),
         "beta1": T([[1.0, 1.0], [0.0, 0.0]]), "beta0": T([0.5, 0.0])}
    assert gl.make_gate("quadratic").scores(X, p)[0].tolist() == pytest.approx([17 + 3 + 0.5, 0])
    mono = {k: p[k] for k in ("A", "beta0")}
    assert gl.make_gate("quadratic_monomial").scores(X, mono)[0].tolist() == pytest.approx([17.5, 0])


def test_laplace_and_gaussian_gates_by_hand():
    p = {"W": T([[1.0, 0.0], [4.0, 6.0]]), "beta0": T([0.0, 1.0])}  # distances 2 and 5
    assert gl.make_gate("laplace").scores(X, p)[0].tolist() == pytest.approx([-2.0, -4.0])
    assert gl.make_gate("gaussian").scores(X, p)[0].tolist() == pytest.approx([-4.0, -24.0])


def test_input_free_gate_ignores_x():
    p = {"beta0": T([0.0, math.log(3.0)])}
    w = gl.make_gate("input_free").weights(T([[1.0], [-7.0]]), p)
    torch.testing.assert_close(w, T([[0.25, 0.75], [0.25, 0.75]]))


def test_hierarchical_gate_is_the_product_of_levels_by_hand():
    gate = gl.HierarchicalGate(outer=gl.make_gate("input_free"), inner=gl.make_gate("laplace"),
                               n_groups=2, n_inner=2)
    p = {"outer.beta0": T([0.0, math.log(3.0)]),
         "inner.W": T([[[1.0, 0.0], [4.0, 6.0]], [[1.0, 2.0], [1.0, 2.0]]]),
         "inner.beta0": T([[0.0, 1.0], [0.0, 0.0]])}
    w = gate.weights(X, p)[0].tolist()
    g0 = _softmax([-2.0, -4.0])
    assert w == pytest.approx([0.25 * g0[0], 0.25 * g0[1], 0.75 * 0.5, 0.75 * 0.5])


# --- every gate against the slow reference, batched, with gradients ----------------------

@cases(GATE_CASES)
def test_weights_match_slow_reference(case):
    gate = GATE_CASES[case]()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    p = gate_params(gate, dim=3)
    got = gate.weights(x, p)
    want = T(ref.gate_weights(gate, x.tolist(), p))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


@cases(GATE_CASES)
def test_batched_equals_loop_over_replicates(case):
    gate = GATE_CASES[case]()
    x = torch.randn(3, 6, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = gate_params(gate, dim=2, batch_shape=(3,))
    batched = gate.log_weights(x, p)
    looped = torch.stack([gate.log_weights(x[r], {k: v[r] for k, v in p.items()})
                          for r in range(3)])
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-13)
    # Unbatched parameters broadcast against replicated covariates.
    p0 = {k: v[0] for k, v in p.items()}
    torch.testing.assert_close(gate.weights(x, p0),
                               torch.stack([gate.weights(x[r], p0) for r in range(3)]))


@cases(GATE_CASES)
def test_gradients_match_finite_differences(case):
    gate = GATE_CASES[case]()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = gate_params(gate, dim=2, seed=4)
    names = list(p)

    def f(*blocks):
        w = gate.weights(x, dict(zip(names, blocks)))
        return (w * torch.arange(1.0, w.shape[-1] + 1, dtype=w.dtype)).sum()

    inputs = tuple(p[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


@cases(GATE_CASES)
def test_normalise_keeps_the_weights(case):
    gate = GATE_CASES[case]()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    p = gate_params(gate, dim=2, seed=6)
    q = gate.normalise(p)
    torch.testing.assert_close(gate.weights(x, q), gate.weights(x, p), rtol=1e-12, atol=1e-13)


def test_plain_cosine_normalise_puts_beta1_on_the_unit_sphere():
    gate, perturbed = gl.make_gate("cosine"), gl.make_gate("perturbed_cosine")
    p = gate_params(gate, dim=3)
    norms = gate.normalise(p)["beta1"].norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert torch.equal(perturbed.normalise(p)["beta1"], p["beta1"])  # the norm matters there


def test_normalise_fixes_the_last_expert_at_zero():
    gate = gl.make_gate("softmax")
    q = gate.normalise(gate_params(gate, dim=2, batch_shape=(3,)))
    assert torch.all(q["beta1"][:, -1] == 0) and torch.all(q["beta0"][:, -1] == 0)
    lap = gl.make_gate("laplace")
    p = gate_params(lap, dim=2)
    q = lap.normalise(p)
    assert torch.equal(q["W"], p["W"]) and q["beta0"][-1] == 0  # W is not shift-invariant
    sig = gl.make_gate("sigmoid")
    p = gate_params(sig, dim=2)
    assert torch.equal(sig.normalise(p)["beta0"], p["beta0"])  # sigmoid is not shift-invariant


# --- top-K -----------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_k_and_renormalises(k):
    scores = torch.randn(4, 50, 5, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
    scores[0, :10] = 1.0  # ties must still keep exactly k
    masked = gl.top_k_mask(scores, k)
    kept = torch.isfinite(masked)
    assert torch.all(kept.sum(-1) == k)
    # the kept ones are the k largest
    assert torch.all(scores.masked_fill(kept, -1e9).amax(-1) <= scores.masked_fill(~kept, 1e9).amin(-1))
    # A linear gate with beta1 = I, beta0 = 0 scores each sample by its own covariates.
    gate = gl.make_gate("topk", top_k=k)
    eye = {"beta1": torch.eye(5, dtype=torch.float64), "beta0": torch.zeros(5, dtype=torch.float64)}
    w = gate.weights(scores, eye)
    want = torch.exp(scores) * kept / (torch.exp(scores) * kept).sum(-1, keepdim=True)
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(w.sum(-1), torch.ones(4, 50, dtype=torch.float64))
    assert torch.all(w[~kept] == 0)


# --- bad input -------------------------------------------------------------------------

def test_unknown_gate_lists_valid_names():
    with pytest.raises(ValueError, match="Unknown gate 'softmx'. Valid names: .*softmax"):
        gl.make_gate("softmx")


def test_topk_needs_k_and_k_at_least_one():
    with pytest.raises(ValueError, match="needs top_k"):
        gl.make_gate("topk")
    with pytest.raises(ValueError, match="'top_k' parameter must be an int in the range"):
        gl.make_gate("softmax", top_k=0)


def test_top_k_larger_than_experts_is_rejected():
    with pytest.raises(ValueError, match=r"top_k.*\[1, 3\]. Got 4.*top_k <= n_experts"):
        gl.GaussianMoE(3, gate=gl.make_gate("topk", top_k=4))


def test_perturbed_cosine_needs_positive_taus():
    with pytest.raises(ValueError, match="'tau1' parameter must be a finite number > 0"):
        gl.make_gate("perturbed_cosine", tau1=0.0)


def test_bad_gate_options_are_named():
    with pytest.raises(TypeError, match="Bad options for gate 'laplace'"):
        gl.make_gate("laplace", tau1=1.0)


def test_hierarchical_levels_must_be_normalised():
    with pytest.raises(ValueError, match="outer gate of a hierarchical gate must be a softmax"):
        gl.HierarchicalGate(outer=gl.make_gate("sigmoid"), inner=gl.make_gate("softmax"),
                            n_groups=2, n_inner=2)
    gate = gl.HierarchicalGate(outer=gl.make_gate("softmax"), inner=gl.make_gate("softmax"),
                               n_groups=2, n_inner=3)
    with pytest.raises(ValueError, match="Set n_experts = n_groups \\* n_inner"):
        gl.GaussianMoE(5, gate=gate)


def test_gates_registry_is_complete():
    assert set(gl.GATES) == {"softmax", "topk", "sigmoid", "cosine", "perturbed_cosine",
                             "quadratic", "quadratic_monomial", "laplace", "gaussian", "input_free",
                             "hierarchical"}
    for name in set(gl.GATES) - {"hierarchical"}:
        gate = gl.gates.example_gate(name)
        shapes = gate.param_shapes(N_EXPERTS, 2)
        assert shapes["beta0"] == (N_EXPERTS,)


def test_hierarchical_gate_from_level_names():
    gate = gl.make_gate("hierarchical", outer="softmax", inner="laplace", n_groups=2, n_inner=2,
                        inner_options={"expanded": True})
    assert isinstance(gate.inner, gl.LaplaceGate) and gate.inner.expanded
    assert gate.param_shapes(4, 3)["inner.W"] == (2, 2, 3)
    with pytest.raises(ValueError, match="n_experts = n_groups \\* n_inner"):
        gate.check(5)


#: Gates that give EM closed-form derivatives of their Q (the rest: autograd).
CLOSED_FORM_Q = {"softmax", "laplace", "gaussian"}


@pytest.mark.parametrize("name", sorted(gl.GATES))
@pytest.mark.parametrize("rows_sum_to_one", [True, False], ids=["R=1", "R<1"])
@pytest.mark.parametrize("d", [1, 2])
def test_q_derivatives_equal_autograd(name, rows_sum_to_one, d):
    """Gate.q_derivatives is the gradient and negative Hessian of
    Q = sum_n sum_i r_ni log w_i(x_n) over the free entries, in pack order: checked
    against autograd for every gate that gives them; the others give None."""
    from gatelab.fit.newton import grad_and_hessian
    from gatelab.params import pack, unpack

    gate = gl.gates.example_gate(name)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(2, 200, d, generator=g, dtype=torch.float64) + 0.1  # cosine: |x| > 0
    resp = torch.softmax(2 * torch.randn(2, 200, 4, generator=g, dtype=torch.float64), -1)
    if not rows_sum_to_one:
        resp = resp * torch.rand(2, 200, 1, generator=g, dtype=torch.float64)
    shapes = gate.param_shapes(4, d)
    params = gate.normalise(gate.random_params(4, d, g, (2,)))
    derivs = gate.q_derivatives(x, resp, params)
    if name not in CLOSED_FORM_Q:
        assert derivs is None
        return
    assert derivs is not None, f"{name} lost its closed-form derivatives"
    free = torch.cat([m.flatten() for m in gate.free_mask(4, d).values()])
    q = lambda t: (resp * gate.log_weights(x, unpack(t, shapes))).sum((-1, -2))  # noqa: E731
    _, grad, hess = grad_and_hessian(q, pack(params, shapes))
    torch.testing.assert_close(derivs[0], grad[:, free], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(derivs[1], -hess[:, free][:, :, free], rtol=1e-9, atol=1e-9)


def test_which_gates_a_gradient_certificate_applies_to():
    from gatelab.gates import HierarchicalGate, LaplaceGate, LinearGate, make_gate
    assert LinearGate().differentiable(1) and make_gate("gaussian").differentiable(1)
    assert not LinearGate(top_k=1).differentiable(3)
    assert not LaplaceGate().differentiable(1) and LaplaceGate().differentiable(2)
    hier = HierarchicalGate(outer=LinearGate(), inner=LaplaceGate(), n_groups=2, n_inner=2)
    assert not hier.differentiable(1) and hier.differentiable(2)


@pytest.mark.parametrize("x_shape,w_shape", [((7, 3), (4, 3)), ((2, 7, 3), (2, 4, 3)),
                                             ((2, 7, 3), (4, 3)), ((2, 7, 3), (1, 4, 3))])
def test_the_expanded_laplace_distance_has_autograd_s_gradients(x_shape, w_shape):
    from gatelab.gates import _ExpandedDistance, _sq_dist
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(_ExpandedDistance.apply, (x, w))
    torch.autograd.gradgradcheck(_ExpandedDistance.apply, (x, w))
    # the same as autograd through the explicit (unexpanded) distance
    weights = torch.randn(torch.broadcast_shapes(x_shape[:-1] + (1,), w_shape[:-2] + (1, 1))[:-1]
                          + (w_shape[-2],), generator=g, dtype=torch.float64)
    fused = torch.autograd.grad((_ExpandedDistance.apply(x, w) * weights).sum(), (x, w))
    plain = torch.autograd.grad((_sq_dist(x, w).sqrt() * weights).sum(), (x, w))
    for a, b in zip(fused, plain):
        assert a.shape == b.shape and torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_an_expanded_laplace_gate_scores_as_the_plain_one_and_a_sample_on_a_centre_has_no_nan():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    params = {"W": torch.cat([x[:1], torch.randn(2, 3, generator=g, dtype=torch.float64)]),
              "beta0": torch.zeros(3, dtype=torch.float64)}
    params["W"].requires_grad_(True)
    fused = gl.make_gate("laplace", expanded=True).scores(x, params)
    assert torch.allclose(fused, gl.make_gate("laplace").scores(x, params), atol=1e-7)
    (grad,) = torch.autograd.grad(fused.sum(), params["W"])
    assert torch.isfinite(grad).all()
