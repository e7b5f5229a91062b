"""The C E-step and EM loop (gatelab.fit._fused) against the PyTorch kernel."""

import pytest
import torch

import gatelab as gl
from gatelab._experts_first import neg_hessian
from gatelab.demo import reference_truth
from gatelab.fit import _fused, fit_em, from_responsibilities
from gatelab.fit.em import broadcast_problem
from gatelab.fit.em.softmax_linear import SoftmaxLinearKernel

pytestmark = pytest.mark.skipif(_fused.load() is None, reason="no C compiler: no fused kernel")
GEN = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def _problem(k=3, dim=1, n=1500, reps=2, expert="linear"):
    model, truth = reference_truth()
    x, y = model.sample(truth, n, GEN(0), replicates=reps)
    if dim > 1:  # extra covariates the truth ignores
        x = torch.cat([x, torch.randn(*x.shape[:-1], dim - 1, generator=GEN(1), dtype=x.dtype)], -1)
    fitted = gl.GaussianMoE(k, dim, expert=gl.make_expert(expert))
    init = fitted.random_params(GEN(2), batch_shape=(2, reps))
    init["var"] = init["var"].abs() + 0.5
    return fitted, x, y, init


@pytest.mark.parametrize("k, dim, expert", [(2, 1, "linear"), (4, 1, "linear"), (3, 2, "linear"),
                                            (3, 1, "polynomial")])
def test_fused_statistics_equal_the_tensor_kernel(k, dim, expert):
    model, x, y, init = _problem(k, dim, expert=expert)
    x, y, params, _ = broadcast_problem(model, x, y, model.normalise(init))
    floor = 1e-8 * y.var(-1)
    fused = SoftmaxLinearKernel.build(model, x, y, floor, fused=True)
    tensor = SoftmaxLinearKernel.build(model, x, y, floor, fused=False)
    ll_f, stats_f = fused.e_step(params)
    ll_t, stats_t = tensor.e_step(params)
    torch.testing.assert_close(ll_f, ll_t, rtol=1e-12, atol=0)
    for a, b in zip(stats_f, stats_t):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fused_em_loop_gives_the_iterates_of_the_tensor_loop(k):
    model, x, y, init = _problem(k)
    c = fit_em(model, x, y, init, tol=1e-8, max_iter=300)              # the loop in C
    t = fit_em(model, x, y, init, tol=1e-8, max_iter=300, engine="tensor")
    assert torch.equal(c.n_iter, t.n_iter)
    assert torch.equal(c.converged, t.converged) and torch.equal(c.degenerate, t.degenerate)
    torch.testing.assert_close(c.loglik, t.loglik, rtol=1e-10, atol=0)
    for name in t.params:
        torch.testing.assert_close(c.params[name], t.params[name], rtol=1e-6, atol=1e-7)


def test_fused_em_stops_at_max_iter_and_flags_degenerate_fits():
    model, x, y, init = _problem(3)
    c = fit_em(model, x, y, init, tol=1e-14, max_iter=7)
    assert (c.n_iter == 7).all() and not c.converged.any()
    squeezed = {**init, "var": torch.full_like(init["var"], 1e-30)}
    c = fit_em(model, x[:, :5], y[:, :5], squeezed, max_iter=5)  # 5 samples, 3 experts
    t = fit_em(model, x[:, :5], y[:, :5], squeezed, max_iter=5, engine="tensor")
    assert torch.equal(c.degenerate, t.degenerate) and bool(c.degenerate.any())


@pytest.mark.parametrize("k, soft", [(2, False), (3, True), (1, False)])
def test_fused_m_step_from_responsibilities_equals_the_tensor_one(k, soft):
    model, x, y, _ = _problem(k, reps=3)
    g = GEN(5)
    if soft:
        resp = torch.softmax(torch.randn(3, x.shape[-2], k, generator=g, dtype=x.dtype), -1)
    else:
        resp = torch.nn.functional.one_hot(torch.randint(k, x.shape[:-1], generator=g), k).double()
    c = from_responsibilities(model, x, y, resp, generator=GEN(6))
    t = from_responsibilities(model, x, y, resp, generator=GEN(6), engine="general")
    for name in t:
        torch.testing.assert_close(c[name], t[name], rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("k", [2, 3])
def test_fused_statistics_hold_for_far_apart_components(k):
    """Tiny variances put log-components thousands apart (exp would underflow): the
    responsibilities and the log-likelihood must still equal the tensor kernel's."""
    model, x, y, init = _problem(k)
    init = {**init, "var": torch.full_like(init["var"], 1e-4), "beta1": init["beta1"] * 50}
    x, y, params, _ = broadcast_problem(model, x, y, model.normalise(init))
    floor = 1e-12 * y.var(-1)
    ll_f, stats_f = SoftmaxLinearKernel.build(model, x, y, floor, fused=True).e_step(params)
    ll_t, stats_t = SoftmaxLinearKernel.build(model, x, y, floor, fused=False).e_step(params)
    torch.testing.assert_close(ll_f, ll_t, rtol=1e-12, atol=0)
    for a, b in zip(stats_f, stats_t):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


F64 = torch.float64


def test_kernel_exp_is_within_one_ulp_of_libm_and_keeps_its_edge_cases():
    """The E-step's own exp (AVX2 where built for it): within 1 ulp of torch's (libm) on
    [-708, 709], 0 below -708 and at -inf, NaN kept; lengths not a multiple of 4 too."""
    x = torch.cat([torch.linspace(-708.0, 709.0, 200_003, dtype=F64),
                   torch.tensor([0.0, -0.0, 1e-17, -1e-17, -0.3466, 0.3466], dtype=F64)])
    got, want = _fused.exp(x), torch.exp(x)
    ulp = torch.finfo(F64).eps
    assert ((got - want).abs() / want).max().item() <= 1.01 * ulp
    edge = _fused.exp(torch.tensor([-708.5, -745.2, -1e4, float("-inf"), float("nan")], dtype=F64))
    assert edge[:4].eq(0).all() and edge[4].isnan()


def _statistics_with_negative_hessian(neg_BMM, e, p):
    """Gate statistics (G, Hd, Hc) whose Newton system -H is ``neg_BMM`` ((E-1)P square):
    Hd_i = the diagonal blocks, Hc_ij = -(off-diagonal blocks) (Hc_ii = 0)."""
    b = neg_BMM.shape[0]
    m = (e - 1) * p
    blocks = neg_BMM.view(b, e - 1, p, e - 1, p).permute(0, 1, 3, 2, 4)      # (B, i, j, p, q)
    hd = torch.zeros(b, e, p, p, dtype=F64)
    hc = torch.zeros(b, e, e, p, p, dtype=F64)
    for i in range(e - 1):
        hd[:, i] = blocks[:, i, i]
        for j in range(e - 1):
            if i != j:
                hc[:, i, j] = -blocks[:, i, j]
    g = torch.randn(b, e, p, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert m == neg_BMM.shape[-1]
    return g, hd, hc


def test_c_and_pytorch_share_one_rule_for_systems_that_are_not_positive_definite():
    from gatelab.fit.newton import SOFTMAX_RIDGES, ridged_direction
    e, p = 3, 2
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(4, 4, 4, generator=gen, dtype=F64))
    # eigenvalues: positive definite; singular; slightly indefinite (the first ridge does not
    # fix it, a larger one does); and below, one that no ridge fixes (a zero step)
    evals = torch.tensor([[3.0, 2.0, 1.0, 0.5], [3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, -1e-5],
                          [3.0, 2.0, 1.0, -1e3]], dtype=F64)
    neg = q @ torch.diag_embed(evals) @ q.transpose(-1, -2)
    neg = 0.5 * (neg + neg.transpose(-1, -2))
    # no ridge relative to its diagonal can fix a matrix whose diagonal is (nearly) zero
    neg[3] = torch.tensor([[0, 1, 2, 3], [1, 0, 1, 2], [2, 1, 0, 1], [3, 2, 1, 0]], dtype=F64) * 1e3
    g, hd, hc = _statistics_with_negative_hessian(neg, e, p)
    torch.testing.assert_close(neg_hessian(hd[:, :-1], hc[:, :-1, :-1]), neg)
    mine = ridged_direction(g[:, :-1].reshape(4, -1), neg).view(4, e - 1, p)
    theirs = _fused.gate_direction(g, hd, hc)
    # the same ridge chosen (a different one would differ by orders of magnitude); the
    # singular system's solution (condition ~1e10) agrees to its rounding
    torch.testing.assert_close(theirs, mine, rtol=1e-6, atol=1e-12)
    assert torch.equal(mine[3], torch.zeros(e - 1, p))                  # no ridge helps
    assert bool(mine[2].abs().sum() > 0) and SOFTMAX_RIDGES[0] == 1e-10
    # a NaN statistic (a fit gone wrong) gives no step, in both; the C pivot test reads
    # the bits, which -ffast-math cannot fold away
    hd_nan = hd.clone()
    hd_nan[0, 0, 0, 0] = float("nan")
    assert torch.equal(_fused.gate_direction(g, hd_nan, hc)[0], torch.zeros(e - 1, p, dtype=F64))
    neg_nan = neg_hessian(hd_nan[:, :-1], hc[:, :-1, :-1])
    assert torch.equal(ridged_direction(g[:, :-1].reshape(4, -1), neg_nan)[0], torch.zeros(4, dtype=F64))
    # where the first ridge suffices it is the exact Newton step, up to that ridge
    exact = torch.linalg.solve(neg[0], g[0, :-1].reshape(-1))
    torch.testing.assert_close(mine[0].reshape(-1), exact, rtol=1e-8, atol=0)
