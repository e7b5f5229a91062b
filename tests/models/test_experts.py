import math

import pytest
import torch

import gatelab as gl
import reference as ref
from cases import EXPERT_CASES, cases
from gatelab.experts import polynomial_features

T = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731


def test_linear_and_constant_by_hand():
    x = T([[1.0, 2.0]])
    lin = gl.make_expert("linear").mean(x, {"a": T([[1.0, -1.0], [0.5, 0.5]]), "b": T([3.0, 0.0])})
    torch.testing.assert_close(lin, T([[2.0, 1.5]]))
    const = gl.make_expert("constant").mean(T([[1.0], [2.0]]), {"b": T([4.0, -1.0])})
    torch.testing.assert_close(const, T([[4.0, -1.0], [4.0, -1.0]]))


def test_polynomial_features_order_and_count_by_hand():
    x = T([[2.0, 3.0]])
    # degree 2 in 2 variables: x1, x2, x1^2, x1 x2, x2^2
    torch.testing.assert_close(polynomial_features(x, 2), T([[2.0, 3.0, 4.0, 6.0, 9.0]]))
    for d, p in [(1, 4), (3, 2), (3, 3), (4, 2)]:
        feats = polynomial_features(torch.ones(1, d, dtype=torch.float64), p)
        assert feats.shape[-1] == math.comb(d + p, p) - 1


@pytest.mark.parametrize("act,fn", [("relu", lambda t: max(t, 0.0)), ("tanh", math.tanh),
                                    ("sigmoid", lambda t: 1 / (1 + math.exp(-t))),
                                    ("gelu", lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2))))])
def test_ffn_by_hand(act, fn):
    x = T([[1.0, 2.0]])
    p = {"kappa1": T([[0.5, -1.0]]), "kappa0": T([0.25]), "kappa2": T([3.0])}
    got = gl.make_expert("ffn", activation=act).mean(x, p)
    assert got.item() == pytest.approx(3.0 * fn(0.5 - 2.0 + 0.25))


@cases(EXPERT_CASES)
def test_means_match_slow_reference(case):
    expert = EXPERT_CASES[case]()
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    p = expert.random_params(4, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(expert.mean(x, p), T(ref.expert_means(expert, x.tolist(), p)),
                               rtol=1e-12, atol=1e-13)


@cases(EXPERT_CASES)
def test_batched_equals_loop(case):
    expert = EXPERT_CASES[case]()
    x = torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    p = expert.random_params(4, 2, torch.Generator().manual_seed(3), batch_shape=(3,))
    looped = torch.stack([expert.mean(x[r], {k: v[r] for k, v in p.items()}) for r in range(3)])
    torch.testing.assert_close(expert.mean(x, p), looped, rtol=0, atol=1e-13)


@cases(EXPERT_CASES)
def test_gradients_match_finite_differences(case):
    expert = EXPERT_CASES[case]()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    p = expert.random_params(3, 2, torch.Generator().manual_seed(5))
    names = list(p)
    inputs = tuple(p[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(lambda *b: expert.mean(x, dict(zip(names, b))).sum(), inputs)


def test_linear_in_parameters_experts_expose_their_features():
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    poly = gl.make_expert("polynomial", degree=2)
    p = poly.random_params(3, 2, torch.Generator().manual_seed(7))
    design = poly.features(x)
    torch.testing.assert_close(poly.mean(x, p), design @ p["a"].T + p["b"])
    assert poly.linear_in_params and not gl.make_expert("ffn").linear_in_params


def test_bad_expert_names_and_options():
    with pytest.raises(ValueError, match="Unknown expert 'mlp'. Valid names: constant, ffn"):
        gl.make_expert("mlp")
    with pytest.raises(ValueError, match="Unknown activation 'swish'. Valid names: gelu, relu"):
        gl.make_expert("ffn", activation="swish")
    with pytest.raises(ValueError, match="'degree' parameter must be an int in the range"):
        gl.make_expert("polynomial", degree=0)
    with pytest.raises(TypeError, match="Bad options for expert 'linear'"):
        gl.make_expert("linear", degree=2)


def test_relu_experts_normalise_to_unit_inner_weights_and_keep_their_means():
    """kappa2 relu(kappa1 . x + kappa0) is unchanged by (kappa1, kappa0) / c, kappa2 * c;
    the identifiable form has ||(kappa1, kappa0)|| = 1, and other activations stay as given."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 3, generator=g, dtype=torch.float64)
    relu = gl.make_expert("ffn", activation="relu")
    params = relu.random_params(4, 3, g, batch_shape=(2,))
    out = relu.normalise(params)
    torch.testing.assert_close(relu.mean(x, out), relu.mean(x, params))
    inner = torch.cat([out["kappa1"], out["kappa0"].unsqueeze(-1)], -1)
    torch.testing.assert_close(inner.norm(dim=-1), torch.ones(2, 4, dtype=torch.float64))
    scaled = {**params, "kappa1": 3 * params["kappa1"], "kappa0": 3 * params["kappa0"],
              "kappa2": params["kappa2"] / 3}
    for k, v in relu.normalise(scaled).items():
        torch.testing.assert_close(v, out[k])
    gelu = gl.make_expert("ffn", activation="gelu")
    assert all(torch.equal(v, params[k]) for k, v in gelu.normalise(params).items())
    model = gl.MoERegression(4, 3, gate="sigmoid", expert=relu)
    full = model.normalise({**model.random_params(g), **params})
    torch.testing.assert_close(full["kappa2"], out["kappa2"])
