"""Gated mixtures of experts: the Gaussian MoE (a conditional density, fitted by maximum
likelihood), its hierarchical form, and MoE regression (fitted by least squares).

Shape legend: N samples, D features, E experts; ``...`` are batch (replicate) dims.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .._checks import check_int
from ..covariates import Covariates
from ..experts import Expert, make_expert
from ..gates import NORMALISERS, Gate, HierarchicalGate, LinearGate, make_gate
from ..params import Params, Shapes, pick
from .base import DensityModel, MixingMeasure, normal_cdf, normal_log_prob, sample_categorical

__all__ = ["GatedExperts", "GaussianMoE", "HierarchicalGaussianMoE", "MoERegression", "Regression"]


class GatedExperts(DensityModel):
    """The part shared by every gated MoE: a gate over ``n_experts`` experts of one family.

    Parameter blocks are the gate's blocks, the experts' blocks, and the model's own
    (noise) blocks, all in one flat dict.
    """

    def __init__(self, n_experts: int, dim: int = 1, gate: str | Gate = "softmax",
                 expert: str | Expert = "linear",
                 covariates: Covariates | str | None = None) -> None:
        super().__init__(dim, covariates)
        self.n_experts = check_int("n_experts", n_experts, 1,
                                   fix="A mixture needs at least one expert.")
        self.gate, self.expert = make_gate(gate), make_expert(expert)
        self.gate.check(self.n_experts)
        clash = set(self.gate_blocks()) & set(self.expert_blocks())
        if clash:
            raise ValueError(f"Gate {self.gate!r} and expert {self.expert!r} both name blocks "
                             f"{sorted(clash)}; rename the blocks of one of them.")

    def gate_blocks(self) -> Shapes:
        """The gate's blocks and their shapes (its part of ``param_shapes``)."""
        return self.gate.param_shapes(self.n_experts, self.dim)

    def expert_blocks(self) -> Shapes:
        """The experts' blocks and their shapes."""
        return self.expert.param_shapes(self.n_experts, self.dim)

    def noise_blocks(self) -> Shapes:
        """The noise blocks: what ``param_shapes`` holds besides gate and experts."""
        own = {**self.gate_blocks(), **self.expert_blocks()}
        return {k: v for k, v in self.param_shapes().items() if k not in own}

    def mixing_measure(self, params: Params) -> MixingMeasure:
        """The fit as a mixing measure: masses from the gate (``Gate.log_masses``), or for
        a top-K gate the expected weight of each expert E_X[w_i(X)] (for K = 1 the
        probability that it is selected; its intercepts alone are not identifiable);
        atoms: the gate's atom blocks, every expert block and each noise block with an
        expert axis."""
        if self.gate.top_k is not None:
            log_m, relative = self.expected_weights(params).log(), False
        else:
            log_m, relative = self.gate.log_masses(pick(params, self.gate_blocks()))
        noise = [k for k, v in self.noise_blocks().items() if len(v) >= 1]
        atoms = self.gate.atom_blocks(self.n_experts, self.dim) + list(self.expert_blocks()) + noise
        return MixingMeasure(log_m, tuple(atoms), relative)

    def log_gate(self, x_ND: Tensor, params: Params) -> Tensor:
        """Log gate weights log w_i(x): (..., N, E)."""
        return self.gate.log_weights(x_ND, pick(params, self.gate_blocks()))

    def expert_means(self, x_ND: Tensor, params: Params) -> Tensor:
        """Expert means h(x; eta_i): (..., N, E)."""
        return self.expert.mean(x_ND, pick(params, self.expert_blocks()))

    def _regression(self, x_ND: Tensor, params: Params) -> Tensor:
        return (self.log_gate(x_ND, params).exp() * self.expert_means(x_ND, params)).sum(-1)

    def predict(self, x: Tensor, params: Params) -> Tensor:
        """E[y | x] = f(x) = sum_i w_i(x) h(x; eta_i): (..., N)."""
        x, _ = self._prepare(x, params)
        return self._regression(x, params)

    def expected_weights(self, params: Params, nodes: int = 48) -> Tensor:
        """E_X[w_i(X)] under the covariate law: (..., E). In d >= 2 covariates a quasi-Monte
        Carlo mean (``_expected_weights_qmc``); in one covariate quadrature, as follows.

        The masses of a top-K gate, whose intercepts are not identifiable on their own
        (with K = 1, exp(beta0_i) never enters the density; the probability that expert i
        is selected does). Gauss-Legendre with ``nodes`` points on each interval between
        crossings of two linear scores (where a top-K selection can switch), in the
        covariate's quantile scale, so a selection boundary costs no accuracy. Other gates
        get one interval, which suits smooth (dense) weights only.
        """
        import numpy as np
        if self.dim != 1:
            return self._expected_weights_qmc(params)
        gate = pick(params, self.gate_blocks())
        beta0 = gate["beta0"]
        edges = [torch.zeros_like(beta0[..., :1]), torch.ones_like(beta0[..., :1])]
        if isinstance(self.gate, LinearGate):
            i, j = torch.triu_indices(self.n_experts, self.n_experts, 1)
            slope = gate["beta1"][..., i, 0] - gate["beta1"][..., j, 0]
            cross = (beta0[..., j] - beta0[..., i]) / slope
            edges.append(self.covariates.cdf(torch.nan_to_num(cross, nan=0.0)))
        cuts = torch.cat(edges, -1).sort(-1).values                          # (..., P)
        lo, width = cuts[..., :-1], cuts[..., 1:] - cuts[..., :-1]           # (..., P-1)
        g, w = (torch.as_tensor(v, dtype=beta0.dtype) for v in np.polynomial.legendre.leggauss(nodes))
        u = lo.unsqueeze(-1) + width.unsqueeze(-1) * (g + 1) / 2             # (..., P-1, Q)
        tiny = torch.finfo(beta0.dtype).eps
        x = self.covariates.quantile(u.clamp(tiny, 1 - tiny)).flatten(-2).unsqueeze(-1)
        weights = self.log_gate(x, params).exp()                             # (..., M, E)
        quad = (width.unsqueeze(-1) * w / 2).flatten(-2)                     # (..., M)
        return (quad.unsqueeze(-1) * weights).sum(-2)

    def _expected_weights_qmc(self, params: Params, points: int = 1 << 16) -> Tensor:
        """E_X[w_i(X)] in d >= 2 covariates: the mean over a fixed scrambled Sobol sample
        of the covariate law (seed 0, so every fit is scored on the same points, and a
        mass difference between two fits counts the points between their boundaries, in
        steps of 1/points = 1.5e-5)."""
        u = torch.quasirandom.SobolEngine(self.dim, scramble=True, seed=0).draw(points)
        tiny = torch.finfo(torch.float64).eps
        x = self.covariates.quantile(u.to(torch.float64).clamp(tiny, 1 - tiny))
        beta0 = params["beta0"]
        return self.log_gate(x.to(beta0.dtype), params).exp().mean(-2)

    def normalise(self, params: Params) -> Params:
        """Gate and expert blocks in their identifiable form (e.g. the last expert's shift
        blocks at zero, ReLU experts' inner weights on the unit sphere)."""
        gate = self.gate.normalise(pick(params, self.gate_blocks()))
        experts = self.expert.normalise(pick(params, self.expert_blocks()))
        return {**params, **gate, **experts}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n_experts={self.n_experts}, dim={self.dim}, "
                f"gate={self.gate!r}, expert={self.expert!r}, covariates={self.covariates!r})")


class GaussianMoE(GatedExperts):
    """Gaussian mixture of experts (arXiv 2305.03288, 2309.13850, 2402.03226):

        p(y | x) = sum_i w_i(x) N(y | h(x; eta_i), var_i),

    with w(x) from any normalised gate (softmax, top-K, cosine, quadratic, Laplace,
    hierarchical, ...). Blocks: the gate's, the expert's, and ``var`` (E,), the expert
    variances. Sigmoid gates do not give a density (weights need not sum to one): use
    ``MoERegression`` for them.
    """

    positive_blocks = ("var",)

    def __init__(self, n_experts: int, dim: int = 1, gate: str | Gate = "softmax",
                 expert: str | Expert = "linear",
                 covariates: Covariates | str | None = None) -> None:
        super().__init__(n_experts, dim, gate, expert, covariates)
        if not self.gate.sums_to_one:
            raise ValueError(f"GaussianMoE needs gate weights that sum to one; {self.gate!r} does "
                             f"not. Use a softmax-type gate, or MoERegression for sigmoid gating.")

    def param_shapes(self) -> Shapes:
        return {**self.gate_blocks(), **self.expert_blocks(), "var": (self.n_experts,)}

    def component_log_probs(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        """log w_i(x_n) + log N(y_n | h(x_n; eta_i), var_i): (..., N, E)."""
        log_dens = normal_log_prob(y_N.unsqueeze(-1), self.expert_means(x_ND, params),
                                   params["var"].unsqueeze(-2))
        return self.log_gate(x_ND, params) + log_dens

    def responsibilities(self, x: Tensor, y: Tensor, params: Params) -> Tensor:
        """Posterior probability of each expert given (x_n, y_n): (..., N, E)."""
        x, checked = self._prepare(x, params, y)
        assert checked is not None
        return torch.softmax(self.component_log_probs(x, checked, params), dim=-1)

    def _log_prob(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        return torch.logsumexp(self.component_log_probs(x_ND, y_N, params), dim=-1)

    def _cdf(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        cdfs = normal_cdf(y_N.unsqueeze(-1), self.expert_means(x_ND, params),
                          params["var"].unsqueeze(-2))
        return (self.log_gate(x_ND, params).exp() * cdfs).sum(-1)

    def _sample_y(self, x_ND: Tensor, params: Params, generator: torch.Generator | None) -> Tensor:
        log_w = self.log_gate(x_ND, params)
        z = sample_categorical(log_w, generator).unsqueeze(-1)
        means = self.expert_means(x_ND, params).expand_as(log_w)
        var = params["var"].unsqueeze(-2).expand_as(log_w)
        noise = torch.randn(z.shape[:-1], generator=generator, dtype=x_ND.dtype)
        return means.gather(-1, z).squeeze(-1) + var.gather(-1, z).sqrt().squeeze(-1) * noise


class HierarchicalGaussianMoE(GaussianMoE):
    """Hierarchical Gaussian MoE (arXiv 2410.02935): a Gaussian MoE whose weights come from
    a two-level gate, w_(g,j)(x) = w_outer_g(x) w_inner_{j|g}(x), with ``n_groups`` groups
    of ``n_inner`` experts. Each level picks its own gate: ``outer="softmax",
    inner="laplace"`` is the paper's "SL". Expert (g, j) is expert number g * n_inner + j.
    """

    def __init__(self, n_groups: int, n_inner: int, dim: int = 1, outer: str | Gate = "softmax",
                 inner: str | Gate = "softmax", expert: str | Expert = "linear",
                 covariates: Covariates | str | None = None) -> None:
        gate = HierarchicalGate(outer=make_gate(outer), inner=make_gate(inner),
                                n_groups=n_groups, n_inner=n_inner)
        super().__init__(n_groups * n_inner, dim, gate, expert, covariates)


class Regression(DensityModel):
    """A regression model y = f(x) + eps, eps ~ N(0, nu), estimated by least squares: its
    density, CDF and sampling follow from the mean ``_regression`` and the scalar noise
    variance block ``nu``."""

    positive_blocks = ("nu",)
    n_experts: int

    @abstractmethod
    def _regression(self, x_ND: Tensor, params: Params) -> Tensor:
        """f(x) (..., N), without checks."""

    def predict(self, x: Tensor, params: Params) -> Tensor:
        """E[y | x] = f(x): (..., N)."""
        x, _ = self._prepare(x, params)
        return self._regression(x, params)

    def _log_prob(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        return normal_log_prob(y_N, self._regression(x_ND, params), params["nu"].unsqueeze(-1))

    def _cdf(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        return normal_cdf(y_N, self._regression(x_ND, params), params["nu"].unsqueeze(-1))

    def _sample_y(self, x_ND: Tensor, params: Params, generator: torch.Generator | None) -> Tensor:
        f = self._regression(x_ND, params)
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype)
        return f + params["nu"].unsqueeze(-1).sqrt() * noise


class MoERegression(GatedExperts, Regression):
    """MoE regression, estimated by least squares (arXiv 2402.02952, 2405.13997, 2405.14131):

        y = f(x) + eps,  f(x) = sum_i w_i(x) h(x; eta_i),  eps ~ N(0, nu).

    Any gate works, sigmoid included (then w_i(x) = sigmoid(s_i(x)) need not sum to one).
    Blocks: the gate's, the expert's, and ``nu`` (scalar noise variance).
    """

    def param_shapes(self) -> Shapes:
        return {**self.gate_blocks(), **self.expert_blocks(), "nu": ()}

    def mean_jacobian(self, x_ND: Tensor, params: Params) -> tuple[Tensor, Tensor] | None:
        """f(x) (..., N) and its Jacobian (..., N, P) over the packed blocks but nu, by
        forward mode that uses the model's structure. Score s_i depends only on expert
        i's rows of the gate blocks and h_i only on eta_i, so

            df/dtheta_(i,r) = (df/ds_i) ds_i/dtheta_(i,r),   df/deta_(i,r) = w_i dh_i/deta_(i,r),

        and one pass per entry r of an expert's row serves all E experts at once (E times
        fewer passes than one per column, each through the gate or the experts alone);
        df/ds_i is the normaliser's closed form. None where the structure does not hold
        (a gate without ``separable_scores``, as the hierarchical one, or a block without
        a leading expert axis): least squares then takes one pass of the whole model per
        column. ``benchmarks/lsq_jacobian.py`` times it against torch.func.jacfwd."""
        gate_p, expert_p = pick(params, self.gate_blocks()), pick(params, self.expert_blocks())
        shapes = {**self.gate_blocks(), **self.expert_blocks()}
        if not self.gate.separable_scores or any(
                len(v) == 0 or v[0] != self.n_experts for v in shapes.values()):
            return None
        s = self.gate.scores(x_ND, gate_p)
        h = self.expert.mean(x_ND, expert_p)
        w, df_ds = self._score_slopes(s, h)
        cols = {name: _row_tangents(lambda p: self.gate.scores(x_ND, p), gate_p, name,
                                    len(shapes[name])) * df_ds.unsqueeze(-1) for name in gate_p}
        cols.update({name: _row_tangents(lambda p: self.expert.mean(x_ND, p), expert_p, name,
                                         len(shapes[name])) * w.unsqueeze(-1)
                     for name in expert_p})
        jac = torch.cat([cols[name].flatten(-2) for name in shapes], dim=-1)
        return (w * h).sum(-1), jac

    def _score_slopes(self, s_NE: Tensor, h_NE: Tensor) -> tuple[Tensor, Tensor]:
        """The weights w(s) (..., N, E) and df/ds_i (..., N, E) for f = sum_l w_l(s) h_l:
        the normaliser's closed form (a top-K selection is locally constant: a dropped
        expert has w_i = 0 and slope 0), else one forward pass per expert."""
        norm = NORMALISERS[self.gate.normaliser]
        # exp of the log weights, as ``_regression`` computes them: f agrees to the bit, so
        # least squares compares RSS values computed the same way.
        w = norm.log_weights(self.gate.select(s_NE)).exp()
        if norm.score_slope is not None:
            return w, norm.score_slope(w, h_NE)
        slopes = []
        for i in range(s_NE.shape[-1]):
            with fwAD.dual_level():
                tangent = torch.zeros_like(s_NE)
                tangent[..., i] = 1.0
                out = norm.weights(self.gate.select(fwAD.make_dual(s_NE, tangent)))
                slopes.append((fwAD.unpack_dual(out).tangent * h_NE).sum(-1))
        return w, torch.stack(slopes, dim=-1)


def _row_tangents(fn, params: Params, name: str, event_ndim: int) -> Tensor:
    """d fn(params)_(..., n, i) / d params[name]_(i, r) for every expert i and entry r of
    its row: (..., N, E, R), one forward pass per r with entry r of every expert's row
    perturbed at once (``fn``'s output i must depend on row i of the block alone; the
    block's event, ``event_ndim`` trailing dims, leads with the expert axis)."""
    block = params[name]
    rows = block.reshape(*block.shape[:block.dim() - event_ndim + 1], -1)      # (..., E, R)
    out = []
    for r in range(rows.shape[-1]):
        tangent = torch.zeros_like(rows)
        tangent[..., r] = 1.0
        with fwAD.dual_level():
            dual = fwAD.make_dual(block, tangent.reshape(block.shape))
            out.append(fwAD.unpack_dual(fn({**params, name: dual})).tangent)
    return torch.stack(out, dim=-1)
