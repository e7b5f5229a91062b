"""The prefix-MoE regression (arXiv 2410.02200 as gatelab reads it): its mean against the
formula evaluated sample by sample, the shared map by hand, shared == no-share at the
mapped keys and values, the pre-trained cache, least squares, losses and spec errors."""

import math

import pytest
import torch

from gatelab.covariates import make_covariates
from gatelab.fit.init import near_truth_starts
from gatelab.fit.lsq import fit_lsq
from gatelab.losses import voronoi_loss
from gatelab.models import PrefixMoERegression
from gatelab.studies import SpecError, Study, catalogue

F64 = torch.float64
KNOWN = dict(A=[[[0.5, 0.0], [0.0, -0.5]], [[-0.3, 0.2], [0.2, 0.3]]], c=[0.2, -0.1],
             a=[[1.0, 0.0], [0.0, -1.0]], b=[0.5, -0.5], reparam="mlp",
             W1=[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], c1=[0.1, 0.0, -0.2],
             W2=[[1.0, 0.0, 0.5], [0.0, 1.0, 0.0], [0.5, 0.0, 1.0], [0.0, -0.5, 1.0]],
             c2=[0.0, 0.1, 0.0, -0.1])
TRUTH = {"p": torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=F64),
         "beta0": torch.tensor([0.3, -0.2], dtype=F64), "nu": torch.tensor(0.01, dtype=F64)}


def model(sharing="shared", k=2, known=KNOWN):
    return PrefixMoERegression(k, 2, known, sharing, make_covariates("gaussian", dim=2))


def test_the_mean_is_the_formula_sample_by_sample():
    m = model()
    x = torch.randn(7, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    got = m.predict(x, TRUTH)
    t = {k: torch.tensor(v, dtype=F64) for k, v in KNOWN.items() if k != "reparam"}
    for n in range(7):
        xn = x[n]
        num = den = 0.0
        for j in range(2):   # pre-trained experts: quadratic score, linear output
            w = math.exp(float(xn @ t["A"][j] @ xn + t["c"][j]))
            num, den = num + w * float(t["a"][j] @ xn + t["b"][j]), den + w
        for p, b0 in zip(TRUTH["p"], TRUTH["beta0"]):   # prefixes through the map
            out = t["W2"] @ torch.tanh(t["W1"] @ p + t["c1"]) + t["c2"]
            w = math.exp(float(out[:2] @ xn + b0))
            num, den = num + w * float(out[2:] @ xn), den + w
        assert float(got[n]) == pytest.approx(num / den, rel=1e-12)


def test_the_shared_map_by_hand():
    keys, values = model().shared_map(torch.tensor([[0.0, 0.0]], dtype=F64))
    h = torch.tanh(torch.tensor([0.1, 0.0, -0.2], dtype=F64))
    out = [h[0] + 0.5 * h[2], h[1] + 0.1, 0.5 * h[0] + h[2], -0.5 * h[1] + h[2] - 0.1]
    assert torch.allclose(keys[0], torch.stack(out[:2]))
    assert torch.allclose(values[0], torch.stack(out[2:]))


def test_a_linear_map_is_a_matrix():
    known = {k: v for k, v in KNOWN.items() if k not in ("W1", "c1", "W2", "c2")}
    w = [[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5], [3.0, 0.0]]
    m = model(known={**known, "reparam": "linear", "W": w})
    keys, values = m.shared_map(TRUTH["p"])
    full = TRUTH["p"] @ torch.tensor(w, dtype=F64).T
    assert torch.equal(keys, full[:, :2]) and torch.equal(values, full[:, 2:])


def test_shared_equals_no_share_at_the_mapped_keys_and_values_and_scores_the_same():
    shared, free = model("shared"), model("no_share")
    own = free.in_own_terms(TRUTH)
    assert set(own) == {"beta1", "beta0", "a", "nu"}
    x = torch.randn(3, 50, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(shared.predict(x, TRUTH), free.predict(x, own), rtol=1e-13)
    moved = {**TRUTH, "p": TRUTH["p"] + 0.1, "beta0": TRUTH["beta0"] - 0.2}
    a = voronoi_loss(moved, TRUTH, "D1", model=shared, truth_model=shared)
    b = voronoi_loss(free.in_own_terms(moved), TRUTH, "D1", model=free, truth_model=shared)
    assert float(a.total) == pytest.approx(float(b.total), rel=1e-12) and float(a.total) > 0.1
    # masses are absolute: exp(beta0) against the truth's, not rescaled
    mass = (torch.exp(moved["beta0"]) - torch.exp(TRUTH["beta0"])).abs().sum()
    assert float(a.mass) == pytest.approx(float(mass), rel=1e-12)
    with pytest.raises(ValueError, match="shared map"):
        shared.in_own_terms(own)


def test_the_pretrained_part_is_recomputed_when_x_changes():
    m = model()
    x = torch.randn(40, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    first = m.predict(x, TRUTH)
    x.mul_(2.0)   # in place: the cached scores of the old values must not be used
    fresh = model().predict(x.clone(), TRUTH)
    assert torch.equal(m.predict(x, TRUTH), fresh) and not torch.allclose(first, fresh)


def test_least_squares_recovers_the_truth_and_batched_equals_looped():
    truth_model = model()
    g = torch.Generator().manual_seed(3)
    data = [truth_model.sample(TRUTH, 3000, g) for _ in range(2)]
    x, y = torch.stack([d.x for d in data]), torch.stack([d.y for d in data])
    for sharing in ("shared", "no_share"):
        m = model(sharing)
        init = near_truth_starts(m, TRUTH, 1, 1, torch.Generator().manual_seed(4))
        init = {k: v.expand(2, *v.shape[1:]).clone() for k, v in init.items()}
        # a start moved well away, so the fit has to travel
        init["beta0"] = init["beta0"] + 0.5
        res = fit_lsq(m, x, y, init, tol=1e-12, max_iter=200)
        assert bool(res.converged.all())
        loss = voronoi_loss(res.params, TRUTH, "D1", model=m, truth_model=truth_model)
        assert float(loss.total.max()) < 0.3, sharing
        one = fit_lsq(m, x[1], y[1], {k: v[1] for k, v in init.items()}, tol=1e-12, max_iter=200)
        for k in res.params:
            assert torch.allclose(res.params[k][1], one.params[k], rtol=1e-8, atol=1e-10), k
        assert float(res.params["nu"].mean()) == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("change,message", [
    ({"truth": {"gate": "softmax"}}, "truth.gate"),
    ({"truth": {"known": {"reparam": "cubic"}}}, "reparam"),
    ({"truth": {"known": {"W2": [[1.0]]}}}, "W2"),
    ({"settings": [{"gate": "free"}]}, "settings"),
    ({"estimator": {"method": "em"}}, "estimator.method"),
])
def test_spec_errors_name_what_is_wrong(change, message):
    spec = catalogue.get("prefix-sharing-lse").to_dict()
    for key, value in change.items():
        if key == "truth":
            for k, v in value.items():
                spec["truth"][k] = {**spec["truth"][k], **v} if isinstance(v, dict) else v
        elif key == "settings":
            spec["settings"] = [{**spec["settings"][0], **value[0]}]
            spec["claims"] = []
        else:
            spec[key] = value
    with pytest.raises(SpecError, match=message):
        Study.from_dict(spec)


@pytest.mark.parametrize("sharing,reparam", [("shared", "mlp"), ("shared", "linear"),
                                             ("no_share", "mlp")])
def test_the_closed_form_jacobian_is_autograd_s(sharing, reparam):
    known = dict(KNOWN)
    if reparam == "linear":
        known = {k: v for k, v in KNOWN.items() if k not in ("W1", "c1", "W2", "c2")}
        known |= {"reparam": "linear", "W": [[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5], [3.0, 0.0]]}
    m = model(sharing, k=3, known=known)
    g = torch.Generator().manual_seed(5)
    params = m.random_params(g, (2,))
    x = torch.randn(2, 30, 2, dtype=F64, generator=g)
    f, jac = m.mean_jacobian(x, params)
    shapes = {k: v for k, v in m.param_shapes().items() if k != "nu"}
    from gatelab.params import pack, unpack
    theta = pack(params, shapes)

    def mean(t):
        return m._regression(x, {**unpack(t, shapes), "nu": params["nu"]})
    want = torch.autograd.functional.jacobian(mean, theta)          # (2, N, 2, P)
    want = torch.stack([want[b, :, b] for b in range(2)])
    assert torch.allclose(f, mean(theta), rtol=1e-13)
    assert jac.shape == want.shape and torch.allclose(jac, want, rtol=1e-10, atol=1e-12)
