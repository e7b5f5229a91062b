"""Batched EM for models with a known component: the deviated Gaussian MoE (arXiv
2402.05220) and the contaminated MoE of prompt learning (arXiv 2410.12258),

    p(y | x) = (1 - lam(x)) k(y | x) + lam(x) sum_i p_i N(y | h_i(x), var_i),

with k known (for the contaminated MoE one trainable expert, p_1 = 1).

E-step: responsibilities over the known part (r_0) and the trainable experts (r_i), in
log space. M-step, every part exact or monotone, so the log-likelihood never decreases:
- lam (covariate-free): mean_n (1 - r_n0), the exact maximiser;
- lam(x) = sigmoid(beta1 . x + beta0) (softmax-contaminated): Newton steps with halving
  on sum_n [(1 - r_n0) log lam(x_n) + r_n0 log(1 - lam(x_n))];
- p_i: sum_n r_ni / sum_n (1 - r_n0), i.e. beta0 = log p relative to the last expert;
- experts: weighted least squares (experts linear in their parameters) or damped
  Newton; variances in closed form, floored as in ``fit_em``.
``fit_em`` runs these steps (``KnownPartKernel``) for such models, with everything it
offers: batching, per-problem stopping, SQUAREM, recording.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...models import ContaminatedMoE, DeviatedGaussianMoE, GaussianMoE
from ...params import Params, pack, pick, unpack
from ..newton import newton_ascent
from .gate_step import expected_log
from .kernel import FitResult, State, Step
from .steps import newton_experts, variances, wls_experts

__all__ = ["KnownPartKernel", "trainable_part"]

KnownPlusPart = DeviatedGaussianMoE | ContaminatedMoE


def trainable_part(model: KnownPlusPart) -> GaussianMoE:
    """The trainable experts as a Gaussian MoE with a covariate-free gate (one expert,
    intercept fixed at 0, for the contaminated MoE): ``model.trainable_part()``."""
    return model.trainable_part()


def _e_step(model: KnownPlusPart, part: GaussianMoE, x: Tensor, y: Tensor,
            params: Params) -> tuple[Tensor, Tensor]:
    """Log-likelihood (B,) and responsibilities (B, N, 1 + E), the known part first."""
    log_keep, log_new = model.log_mixing(x, params)
    known = (log_keep + model.known.log_prob(x, y)).unsqueeze(-1)
    experts = log_new.unsqueeze(-1) + part.component_log_probs(x, y, model.part_params(params))
    logs = torch.cat([known.expand(*experts.shape[:-1], 1), experts], -1)
    ll_BN = torch.logsumexp(logs, -1)
    return ll_BN.sum(-1), torch.exp(logs - ll_BN.unsqueeze(-1))


def _mixing_step(model: KnownPlusPart, x: Tensor, r0: Tensor, params: Params,
                 steps: int) -> Params:
    if model.mixing == "input_free":
        return {"lam": (1 - r0).mean(-1)}
    gate, shapes = model.mix_gate, model.mixing_blocks()
    assert gate is not None  # a softmax mixing has its gate
    resp = torch.stack([1 - r0, r0], -1)  # (B, N, 2): the prompt first, f0 second

    def q(theta: Tensor) -> Tensor:
        s = gate.scores(x, unpack(theta, shapes))[..., 0]
        # lam(x) = softmax(s, 0)_1 = sigmoid(s); 1 - lam(x) = sigmoid(-s).
        log_w = torch.stack([F.logsigmoid(s), F.logsigmoid(-s)], -1)
        return expected_log(resp, log_w)

    theta, _ = newton_ascent(q, pack(pick(params, shapes), shapes), steps=steps)
    return unpack(theta, shapes)


def _m_step(model: KnownPlusPart, part: GaussianMoE, x: Tensor, y: Tensor, resp: Tensor,
            params: Params, floor: Tensor, steps: int) -> tuple[Params, Tensor]:
    r0, r = resp[..., 0], resp[..., 1:]
    current = model.part_params(params)
    if part.expert.linear_in_params:
        experts = wls_experts(part, x, y, r, current)
    else:
        experts = newton_experts(part, x, y, r, current, steps)
    var, low = variances(part, x, y, r, {**current, **experts}, floor)
    out = {**params, **experts, "var": var, **_mixing_step(model, x, r0, params, steps)}
    if "beta0" in model.part_blocks():  # the deviated MoE's proportions p = softmax(beta0)
        mass = r.sum(-2).clamp_min(1e-300)
        out["beta0"] = mass.log() - mass[..., -1:].log()
    return out, low


class KnownPartKernel:
    """The ``EMKernel`` ``fit_em`` uses for these models (state: (responsibilities,),
    the known part first), so batching, per-problem stopping, SQUAREM and recording come
    from ``fit_em``."""

    def __init__(self, model: KnownPlusPart, x: Tensor, y: Tensor, floor: Tensor,
                 gate_steps: int):
        self.model, self.part = model, trainable_part(model)
        self.x, self.y, self.floor, self.gate_steps = x, y, floor, gate_steps

    def e_step(self, params: Params) -> tuple[Tensor, State]:
        ll, resp = _e_step(self.model, self.part, self.x, self.y, params)
        return ll, (resp,)

    def m_step(self, resp_BNE: Tensor, params: Params) -> Params:
        return _m_step(self.model, self.part, self.x, self.y, resp_BNE, params, self.floor,
                       self.gate_steps)[0]

    def update(self, params: Params, state: State, loglik: Tensor) -> Step:
        new, low = _m_step(self.model, self.part, self.x, self.y, state[0], params, self.floor,
                           self.gate_steps)
        ll_new, state_new = self.e_step(new)
        return Step(new, ll_new, state_new, low)

    def subset(self, idx: Tensor) -> KnownPartKernel:
        return KnownPartKernel(self.model, self.x[idx], self.y[idx], self.floor[idx],
                               self.gate_steps)

    def plain_em(self, params: Params, tol: float, max_iter: int) -> FitResult | None:
        return None
