"""The fast EM kernel for the common case: a dense linear softmax gate
(``Gate.is_linear_softmax``) and experts linear in their parameters. Same mathematics
as ``GeneralKernel``, organised for speed:

- the E-step ends in the sufficient statistics the M-step needs (``_stats``), so the
  state between steps is small: S_i = sum_n r_ni [f f^T, f y, y^2] (f = (1,
  features(x))), the gate gradient sum_n (r_ni - w_ni) z_n and the blocks of its
  Hessian, sum_n w_ni z z^T and sum_n w_ni w_nj z z^T (z = (1, x));
- the E-step is one fused pass in C where a compiler is available (``fit._fused``),
  else tensor code in the experts-first layout (B, E, N) of ``gatelab._experts_first``;
- the gate's Newton/IRLS step is taken in full and verified by the next E-step's
  log-likelihood; rows where it lowered the likelihood halve the gate step (down to
  no gate move, a plain ECM step), so the likelihood never decreases;
- plain EM can run every iteration in C (``plain_em``), without a Python round trip
  per iteration, which is what small fits spend most of their time on.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _experts_first as ef
from ..._threads import split_threads
from ...models import GaussianMoE
from ...params import Params
from .. import _fused
from ..newton import ridged_direction
from ..status import MIN_EXPERT_WEIGHT
from .kernel import FitResult, State, Step, rows, set_rows
from .steps import m_step, solve_ridge

__all__ = ["SoftmaxLinearKernel", "applies"]

_TWO_PI = 2 * torch.pi
_MAX_FUSED_EXPERTS = 16  # the C kernel's fixed-size buffers


def applies(model: GaussianMoE, gate_steps: int, gate_ridge: float) -> bool:
    """Whether this kernel fits ``model`` with these options."""
    return (model.gate.is_linear_softmax() and model.expert.linear_in_params
            and gate_steps == 1 and gate_ridge == 0)


class SoftmaxLinearKernel:
    """``EMKernel`` for a dense softmax gate with linear experts. ``data`` holds the
    per-problem tensors (batch axis first): f_T (B, Q, N) expert features with a column
    of ones, z_T (B, P, N) gate covariates with ones, y (B, 1, N), and for the PyTorch
    path zz (B, N, P*P) and design (B, N, Q*Q+Q+1)."""

    def __init__(self, model: GaussianMoE, data: dict[str, Tensor], floor: Tensor, fused: bool,
                 threads: int):
        self.model, self.data, self.floor, self.fused, self.threads = model, data, floor, fused, threads
        self.has_a = "a" in model.expert_blocks()

    @classmethod
    def build(cls, model: GaussianMoE, x: Tensor, y: Tensor, floor: Tensor,
              fused: bool | None = None) -> SoftmaxLinearKernel:
        """The kernel for data x (B, N, D), y (B, N); ``fused`` None: in C where available."""
        # Built feature-major directly: transposing a (B, N, small) tensor is a slow copy.
        ones = torch.ones_like(y).unsqueeze(-2)                        # (B, 1, N)
        data = {"f_T": torch.cat([ones, model.expert.features(x).transpose(-1, -2)], 1),
                "z_T": torch.cat([ones, x.transpose(-1, -2)], 1),
                "y": y.unsqueeze(-2).contiguous()}
        use_c = _fused.load() is not None if fused is None else fused
        use_c = use_c and model.n_experts <= _MAX_FUSED_EXPERTS and x.dtype == torch.float64
        if not use_c:
            f, z = data["f_T"].transpose(-1, -2), data["z_T"].transpose(-1, -2)
            data["zz"] = ef.outer(z)
            data["design"] = torch.cat([ef.outer(f), f * y.unsqueeze(-1), y.unsqueeze(-1).square()], -1)
        return cls(model, data, floor, use_c, split_threads(x.shape[0], y.numel() * model.n_experts))

    def subset(self, idx: Tensor) -> SoftmaxLinearKernel:
        return SoftmaxLinearKernel(self.model, {k: v[idx] for k, v in self.data.items()},
                                   self.floor[idx], self.fused, self.threads)

    def _coef(self, params: Params) -> Tensor:
        parts = [params["b"].unsqueeze(-1)] + ([params["a"]] if self.has_a else [])
        return torch.cat(parts, dim=-1)                                # (B, E, Q)

    def _experts_from(self, coef: Tensor) -> Params:
        out = {"b": coef[..., 0]}
        if self.has_a:
            out["a"] = coef[..., 1:]
        return out

    def e_step(self, params: Params) -> tuple[Tensor, State]:
        """Log-likelihood (B,) and the statistics (S, G, Hd, Hc) of ``_stats``."""
        d = self.data
        gate = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
        if self.fused:
            ll, s, g, hd, hc = _fused.estep(d["f_T"], d["z_T"], d["y"].squeeze(-2),
                                            self._coef(params), gate, params["var"], self.threads)
            return ll, (s, g[:, :-1], hd[:, :-1], hc[:, :-1, :-1])
        var = params["var"].unsqueeze(-1)
        s = ef.combine(gate, d["z_T"])                                 # scores
        comp = ef.combine(self._coef(params), d["f_T"])                # expert means
        comp.sub_(d["y"]).square_().mul_(-0.5 / var).add_(s).sub_(0.5 * torch.log(_TWO_PI * var))
        resp, ll_n = ef.softmax_experts_first(comp)                    # log sum_i e^{s_i} N_i
        w, lse_s = ef.softmax_experts_first(s)
        return (ll_n - lse_s).sum((-1, -2)), self._stats(resp, w)

    def loglik_derivatives(self, params: Params, want: bool = True):
        """The log-likelihood (B,) and, with ``want``, its gradient (B, M) and Hessian
        (B, M, M) in every parameter, summed over the samples, in C (fused kernels only):
        per expert i, entries i W .. i W + W - 1 (W = P + Q + 1) hold (beta0_i, beta1_i),
        (b_i, a_i) and log var_i (``_fused.loglik_derivatives``; for ``fit.polish``)."""
        if not self.fused:
            raise RuntimeError("loglik_derivatives needs the fused C kernel")
        d = self.data
        gate = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
        return _fused.loglik_derivatives(d["f_T"], d["z_T"], d["y"].squeeze(-2),
                                         self._coef(params), gate, params["var"], want,
                                         self.threads)

    def _stats(self, resp: Tensor, w: Tensor) -> State:
        """S (B, E, Q*Q+Q+1) and the gate's ``gate_stats``."""
        return (resp @ self.data["design"], *ef.gate_stats(resp, w, self.data["z_T"], self.data["zz"]))

    def m_step(self, resp_BNE: Tensor, params: Params) -> Params:
        """One M-step from given responsibilities: in C where fused, else by the
        statistics of the PyTorch path (the gate takes its full IRLS step)."""
        if self.fused:
            d = self.data
            gate = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
            coef, gate, var, _ = _fused.mstep(d["f_T"], d["z_T"], d["y"].squeeze(-2), resp_BNE,
                                              self.floor, self._coef(params), gate, params["var"],
                                              self.threads)
            return {**params, **self._experts_from(coef), "beta0": gate[..., 0],
                    "beta1": gate[..., 1:], "var": var}
        # the reference M-step (x is z_T without its column of ones)
        return m_step(self.model, self.data["z_T"][:, 1:].transpose(-1, -2), self.data["y"][:, 0],
                      resp_BNE, params, self.floor)[0]

    def _experts_and_variances(self, params: Params, stats: Tensor) -> tuple[Params, Tensor]:
        q = self.data["f_T"].shape[1]
        gram, rhs, syy = stats[..., : q * q].unflatten(-1, (q, q)), stats[..., q * q: -1], stats[..., -1]
        coef = solve_ridge(gram, rhs.unsqueeze(-1), self._coef(params)).squeeze(-1)
        rss = syy - 2 * (coef * rhs).sum(-1) + (coef.unsqueeze(-2) @ gram @ coef.unsqueeze(-1))[..., 0, 0]
        nk = gram[..., 0, 0]
        var = torch.where(nk > 1e-10, rss.clamp_min(0) / nk.clamp_min(1e-300), params["var"])
        low = (var < self.floor.unsqueeze(-1)) | (nk < MIN_EXPERT_WEIGHT)
        out = {**self._experts_from(coef), "var": torch.maximum(var, self.floor.unsqueeze(-1))}
        return out, low.any(-1)

    def _gate_direction(self, grad: Tensor, diag: Tensor, cross: Tensor) -> Tensor:
        """IRLS direction for the free experts' (beta0, beta1): (B, E-1, P).
        gradient_i = sum_n (r_ni - w_ni) z_n; -Hessian_ij = sum_n w_ni (d_ij - w_nj) z_n z_n^T."""
        b, m, p = grad.shape
        return ridged_direction(grad.reshape(b, -1), ef.neg_hessian(diag, cross)).view(b, m, p)

    @staticmethod
    def _with_gate_step(params: Params, direction: Tensor, t: Tensor) -> Params:
        beta0 = params["beta0"].clone()
        beta1 = params["beta1"].clone()
        step = t.view(-1, 1, 1) * direction
        beta0[:, :-1] += step[..., 0]
        beta1[:, :-1] += step[..., 1:]
        return {**params, "beta0": beta0, "beta1": beta1}

    def update(self, params: Params, state: State, loglik: Tensor) -> Step:
        s, grad, diag, cross = state
        experts, degenerate = self._experts_and_variances(params, s)
        new = {**params, **experts}
        if s.shape[1] == 1:
            ll_new, state_new = self.e_step(new)
            return Step(new, ll_new, state_new, degenerate)
        direction = self._gate_direction(grad, diag, cross)
        cand = self._with_gate_step(new, direction, torch.ones_like(loglik))
        ll_new, state_new = self.e_step(cand)
        bad = ~(ll_new >= loglik - 1e-12 * loglik.abs())
        if bool(bad.any()):
            self._halve(bad, new, direction, loglik, cand, ll_new, state_new)
        return Step(cand, ll_new, state_new, degenerate)

    def _halve(self, bad, new, direction, ll, cand, ll_new, state_new) -> None:
        """Halve the gate step on rows ``bad`` until the likelihood does not decrease;
        the last try (t = 0) is the ECM step with the gate unchanged. Writes in place."""
        idx = bad.nonzero().squeeze(-1)
        sub = self.subset(idx)
        sub_new = {k: v[idx] for k, v in new.items()}
        sub_dir, sub_ll = direction[idx], ll[idx]
        pending = torch.ones_like(sub_ll, dtype=torch.bool)
        for t in [0.5 ** h for h in range(1, 11)] + [0.0]:
            trial = sub._with_gate_step(sub_new, sub_dir, torch.full_like(sub_ll, t))
            ll_t, state_t = sub.e_step(trial)
            ok = pending & ((ll_t >= sub_ll - 1e-12 * sub_ll.abs()) | (t == 0.0))
            taken = idx[ok]
            for k in cand:
                cand[k][taken] = trial[k][ok]
            ll_new[taken] = ll_t[ok]
            set_rows(state_new, taken, rows(state_t, ok))
            pending &= ~ok
            if not bool(pending.any()):
                break

    def plain_em(self, params: Params, tol: float, max_iter: int) -> FitResult | None:
        """Plain EM with every iteration in C (``_fused.em``): the same updates and
        stopping rule as ``loop.run_em`` over this kernel. None on the PyTorch path."""
        if not self.fused:
            return None
        d = self.data
        gate = torch.cat([params["beta0"].unsqueeze(-1), params["beta1"]], dim=-1)
        coef, gate, var, ll, n_iter, converged, degenerate = _fused.em(
            d["f_T"], d["z_T"], d["y"].squeeze(-2), self.floor, self._coef(params), gate,
            params["var"], tol, max_iter, self.threads)
        out = {**self._experts_from(coef), "beta0": gate[..., 0], "beta1": gate[..., 1:], "var": var}
        return FitResult({k: out[k] for k in params}, ll, n_iter, converged, degenerate)
