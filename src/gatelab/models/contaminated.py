"""Mixtures of a known conditional density with a trainable part: the deviated Gaussian
MoE (arXiv 2402.05220) and the contaminated MoE of prompt learning (arXiv 2410.12258,
follow-up 2505.18455).

Both have the form p(y | x) = (1 - lam(x)) k(y | x) + lam(x) q(y | x), with k known
(a ``ConditionalDensity``, e.g. ``model.freeze(params)``) and q trainable.
Shape legend: N samples, D features, E experts; ``...`` are batch (replicate) dims.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import Tensor

from ..covariates import Covariates
from ..experts import Expert, make_expert
from ..gates import InputFreeGate, LinearGate
from ..params import Params, Shapes, pick
from .base import ConditionalDensity, DensityModel, MixingMeasure, normal_cdf, normal_log_prob
from .moe import GaussianMoE

__all__ = ["DeviatedGaussianMoE", "ContaminatedMoE"]

_MIXINGS = ("input_free", "softmax")


class _KnownPlusPart(DensityModel):
    """(1 - lam(x)) k(y | x) + lam(x) q(y | x). With ``mixing="input_free"`` lam is the
    block ``lam`` in [0, 1] (it may be exactly 0: the trainable part vanishes); with
    ``mixing="softmax"`` lam(x) = softmax over the scores (0, beta1 . x + beta0), i.e.
    sigmoid(beta1 . x + beta0), with blocks beta1 (1, D), beta0 (1,)."""

    def __init__(self, known: ConditionalDensity, dim: int, mixing: str,
                 covariates: Covariates | str | None) -> None:
        super().__init__(dim, covariates)
        if mixing not in _MIXINGS:
            raise ValueError(f"Unknown mixing {mixing!r}. Valid: {', '.join(_MIXINGS)}.")
        for method in ("log_prob", "cdf", "sample_y"):
            if not callable(getattr(known, method, None)):
                raise TypeError(f"The known density must have a {method}() method (a "
                                f"ConditionalDensity); got {type(known).__name__}. Use "
                                f"model.freeze(params) to turn a gatelab model into one.")
        if getattr(known, "dim", dim) != dim:
            raise ValueError(f"The known density has dim={known.dim}, the model dim={dim}.")
        self.known, self.mixing = known, mixing
        # lam(x) = sigmoid(beta1 . x + beta0) for a softmax mixing; None for a constant lam.
        self.mix_gate = LinearGate(normaliser="sigmoid") if mixing == "softmax" else None
        self.unit_blocks = ("lam",) if mixing == "input_free" else ()

    def mixing_measure(self, params: Params) -> MixingMeasure:
        """The trainable part as a mixing measure. Deviated: masses lam p_i (arXiv
        2402.05220); contaminated: lam, or for a softmax prompt gate sigmoid(beta0) (its
        weight at x = 0). Atoms: every block with an expert axis but the intercept."""
        if self.mixing == "input_free":
            log_m = params["lam"].log().unsqueeze(-1) + self._part_log_masses(params)
        else:
            log_m = F.logsigmoid(params["beta0"])
        atoms = tuple(k for k, v in self.param_shapes().items() if len(v) >= 1 and k != "beta0")
        return MixingMeasure(log_m, atoms, False)

    def _part_log_masses(self, params: Params) -> Tensor:
        """log p_i of the trainable part's experts (0 for a single prompt)."""
        return torch.zeros_like(params["lam"]).unsqueeze(-1)

    def mixing_blocks(self) -> Shapes:
        if self.mix_gate is None:
            return {"lam": ()}
        return self.mix_gate.param_shapes(1, self.dim)

    @abstractmethod
    def part_blocks(self) -> Shapes: ...

    @abstractmethod
    def trainable_part(self) -> GaussianMoE:
        """The trainable part q as a Gaussian MoE with a covariate-free gate."""

    def part_params(self, params: Params) -> Params:
        """The trainable part's parameters in the terms of ``trainable_part()``."""
        return pick(params, self.trainable_part().param_shapes())

    @abstractmethod
    def _part_log_prob(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor: ...

    @abstractmethod
    def _part_cdf(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor: ...

    @abstractmethod
    def _part_sample_y(self, x_ND: Tensor, params: Params,
                       generator: torch.Generator | None) -> Tensor: ...

    def param_shapes(self) -> Shapes:
        return {**self.mixing_blocks(), **self.part_blocks()}

    def log_mixing(self, x_ND: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """(log(1 - lam(x)), log lam(x)), each of shape (..., N)."""
        if self.mix_gate is None:
            lam = params["lam"].unsqueeze(-1).expand(*params["lam"].shape, x_ND.shape[-2])
            return torch.log1p(-lam), torch.log(lam)
        s_N = self.mix_gate.scores(x_ND, pick(params, self.mixing_blocks()))[..., 0]
        return F.logsigmoid(-s_N), F.logsigmoid(s_N)

    def _log_prob(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        log_keep, log_new = self.log_mixing(x_ND, params)
        return torch.logaddexp(log_keep + self.known.log_prob(x_ND, y_N),
                               log_new + self._part_log_prob(x_ND, y_N, params))

    def _cdf(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        log_keep, log_new = self.log_mixing(x_ND, params)
        return (log_keep.exp() * self.known.cdf(x_ND, y_N)
                + log_new.exp() * self._part_cdf(x_ND, y_N, params))

    def _sample_y(self, x_ND: Tensor, params: Params, generator: torch.Generator | None) -> Tensor:
        _, log_new = self.log_mixing(x_ND, params)
        from_part = torch.rand(log_new.shape, generator=generator, dtype=x_ND.dtype) < log_new.exp()
        y_known = self.known.sample_y(x_ND, generator)
        y_part = self._part_sample_y(x_ND, params, generator)
        return torch.where(from_part, y_part, y_known)


class DeviatedGaussianMoE(_KnownPlusPart):
    """Deviated Gaussian MoE (arXiv 2402.05220):

        p(y | x) = (1 - lam) g0(y | x) + lam sum_i p_i N(y | a_i . x + b_i, var_i),

    with g0 known, covariate-free proportions p = softmax(beta0) and lam in [0, 1].
    "Distinguishable" when g0 is not itself one of the Gaussian experts.
    Blocks: lam (), beta0 (E,), a (E, D), b (E,), var (E,).
    """

    positive_blocks = ("var",)

    def __init__(self, g0: ConditionalDensity, n_experts: int, dim: int = 1,
                 covariates: Covariates | str | None = None) -> None:
        super().__init__(g0, dim, "input_free", covariates)
        self.mixture = GaussianMoE(n_experts, dim, InputFreeGate(), "linear", self.covariates)
        self.n_experts = n_experts

    def part_blocks(self) -> Shapes:
        return self.mixture.param_shapes()

    def trainable_part(self) -> GaussianMoE:
        return self.mixture

    def _part_log_masses(self, params: Params) -> Tensor:
        return torch.log_softmax(params["beta0"], -1)

    def _part_log_prob(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        return self.mixture._log_prob(x_ND, y_N, pick(params, self.part_blocks()))

    def _part_cdf(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        return self.mixture._cdf(x_ND, y_N, pick(params, self.part_blocks()))

    def _part_sample_y(self, x_ND: Tensor, params: Params,
                       generator: torch.Generator | None) -> Tensor:
        return self.mixture._sample_y(x_ND, pick(params, self.part_blocks()), generator)

    def normalise(self, params: Params) -> Params:
        return {**params, **self.mixture.normalise(pick(params, self.part_blocks()))}

    def __repr__(self) -> str:
        return f"DeviatedGaussianMoE(g0={self.known!r}, n_experts={self.n_experts}, dim={self.dim})"


class ContaminatedMoE(_KnownPlusPart):
    """Contaminated MoE, the model of prompt learning (arXiv 2410.12258; softmax-gated
    follow-up 2505.18455): a frozen pre-trained density f0 mixed with one trainable
    Gaussian "prompt" expert,

        p(y | x) = (1 - lam(x)) f0(y | x) + lam(x) N(y | h(x; eta), var).

    ``gate="input_free"``: lam(x) = lam, a block in [0, 1] that may vanish.
    ``gate="softmax"``: lam(x) = exp(beta1 . x + beta0) / (1 + exp(beta1 . x + beta0)),
    the softmax over the prompt's score and f0's score fixed at 0 (the paper's (beta, tau)
    are beta1, beta0 here). Blocks: the mixing blocks, the expert's blocks with one
    expert (e.g. a (1, D), b (1,)), and var (1,).
    """

    positive_blocks = ("var",)

    def __init__(self, f0: ConditionalDensity, dim: int = 1, expert: str | Expert = "linear",
                 gate: str = "input_free", covariates: Covariates | str | None = None) -> None:
        super().__init__(f0, dim, gate, covariates)
        self.expert = make_expert(expert)
        self._part = GaussianMoE(1, dim, InputFreeGate(), self.expert, self.covariates)

    def part_blocks(self) -> Shapes:
        return {**self.expert.param_shapes(1, self.dim), "var": (1,)}

    def trainable_part(self) -> GaussianMoE:
        """One expert whose weight is 1 (its gate intercept, beta0 = 0, is not a block of
        this model: beta0 here is the mixing gate's)."""
        return self._part

    def part_params(self, params: Params) -> Params:
        zero = params["var"].new_zeros(params["var"].shape)
        return {**pick(params, self.part_blocks()), "beta0": zero}

    def _prompt_mean(self, x_ND: Tensor, params: Params) -> Tensor:
        return self.expert.mean(x_ND, pick(params, self.expert.param_shapes(1, self.dim)))[..., 0]

    def _part_log_prob(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        return normal_log_prob(y_N, self._prompt_mean(x_ND, params), params["var"])

    def _part_cdf(self, x_ND: Tensor, y_N: Tensor, params: Params) -> Tensor:
        return normal_cdf(y_N, self._prompt_mean(x_ND, params), params["var"])

    def _part_sample_y(self, x_ND: Tensor, params: Params,
                       generator: torch.Generator | None) -> Tensor:
        mean = self._prompt_mean(x_ND, params)
        return mean + params["var"].sqrt() * torch.randn(mean.shape, generator=generator,
                                                          dtype=mean.dtype)

    def __repr__(self) -> str:
        return (f"ContaminatedMoE(f0={self.known!r}, dim={self.dim}, expert={self.expert!r}, "
                f"gate={self.mixing!r})")
