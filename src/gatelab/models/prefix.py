"""Prefix tuning as an MoE regression, for the statistics lab (arXiv 2410.02200, on the
attention-as-MoE reading of arXiv 2405.14124).

A frozen pre-trained attention head is an MoE whose N experts are linear (value rows) and
whose gate scores are quadratic in the input (q . k); prefix tuning adds L experts whose
scores are linear in the input (the prefix keys) and whose outputs are the prefix values.
As a regression y = f(x) + eps, eps ~ N(0, nu):

    f(x) = [sum_j exp(x^T A_j x + c_j) (a_j . x + b_j) + sum_l exp(k_l . x + beta0_l) (v_l . x)]
           / [sum_j exp(x^T A_j x + c_j) + sum_l exp(k_l . x + beta0_l)],

with the pre-trained part (A_j, c_j, a_j, b_j) known and the prefixes estimated:

- ``sharing="no_share"``: keys k_l and values v_l free (blocks beta1 = k, a = v, beta0);
- ``sharing="shared"`` (the reparameterisation): (k_l, v_l) = split(sigma(p_l)), one known
  map sigma for all prefixes applied to a small table p (L, P) (blocks p, beta0). sigma is
  the authors' Linear(P, H) -> tanh -> Linear(H, 2D) ("mlp": sigma(p) = W2 tanh(W1 p + c1)
  + c2) or linear ("linear": sigma(p) = W p). Key and value of one prefix are then two
  functions of one vector: the shared structure 2410.02200 credits for the sample
  efficiency of reparameterised prefixes.

Sources and choices. The corpora gatelab can read hold 2410.02200's abstract and
introduction, not its Section 4, so this model is gatelab's reading, not a transcription:
the pre-trained quadratic scores and linear experts are 2405.14124's view of a head; the
prefix intercepts beta0_l (the prefix masses) are kept, as in the softmax-gate regression
papers (2402.02952); the map sigma is known (the authors train it with the table; fixed
here so that the prefixes are identifiable); the authors' channel interleaving of the
key/value split is dropped (a fixed map's split is a relabelling). The known pre-trained
scores fix the common shift of all scores, so every prefix intercept is identifiable and
the masses exp(beta0_l) are absolute.

Shape legend: N samples, D features, L prefixes, P prefix-table width, H hidden width;
``...`` are batch (replicate) dims.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..covariates import Covariates
from ..experts import make_expert
from ..gates import LinearGate, QuadraticGate
from ..params import Params, Shapes
from .base import MixingMeasure
from .moe import Regression

__all__ = ["PrefixMoERegression", "SHARINGS", "REPARAMS"]

SHARINGS = ("shared", "no_share")
#: The shared map's form and the blocks of the known table that define it.
REPARAMS = {"mlp": ("W1", "c1", "W2", "c2"), "linear": ("W",)}
_PRETRAINED = ("A", "c", "a", "b")


class PrefixMoERegression(Regression):
    """The prefix-MoE regression of the module docstring: a known pre-trained head (N
    experts) plus ``n_experts`` = L estimated prefixes, free (``"no_share"``) or through a
    shared map (``"shared"``). ``known`` holds the pre-trained blocks A (N, D, D), c (N,),
    a (N, D), b (N,), the map's form ``reparam`` ("mlp" or "linear") and its blocks (mlp:
    W1 (H, P), c1 (H,), W2 (2D, H), c2 (2D,); linear: W (2D, P)). A no-share model keeps
    the map too, to read a shared truth in its own terms (``in_own_terms``).
    """

    _scores_pre = QuadraticGate(monomial=True)
    _scores_prefix = LinearGate()
    _expert = make_expert("linear")

    def __init__(self, n_experts: int, dim: int, known: Mapping[str, object],
                 sharing: str = "shared", covariates: Covariates | str | None = None) -> None:
        super().__init__(dim, covariates)
        if sharing not in SHARINGS:
            raise ValueError(f"Unknown prefix sharing {sharing!r}. Valid: {', '.join(SHARINGS)}.")
        if not isinstance(n_experts, int) or n_experts < 1:
            raise ValueError(f"A prefix model needs at least one prefix; got n_experts={n_experts!r}.")
        self.n_experts, self.sharing = n_experts, sharing
        self.pretrained, self.reparam, self.map = _known_blocks(known, dim)
        self.n_pretrained = self.pretrained["c"].shape[0]
        self._cache: tuple[Tensor, int, tuple[Tensor, Tensor]] | None = None
        self.width = next(iter(self.map.values())).shape[-1] if self.reparam == "linear" \
            else self.map["W1"].shape[-1]

    def param_shapes(self) -> Shapes:
        k, d = self.n_experts, self.dim
        if self.sharing == "shared":
            return {"p": (k, self.width), "beta0": (k,), "nu": ()}
        return {"beta1": (k, d), "beta0": (k,), "a": (k, d), "nu": ()}

    def gate_blocks(self) -> Shapes:
        """The blocks of the prefix scores alone (near-truth starts perturb them least)."""
        return {k: v for k, v in self.param_shapes().items() if k in ("beta1", "beta0")}

    def shared_map(self, p: Tensor) -> tuple[Tensor, Tensor]:
        """(keys, values) = split(sigma(p)) for a prefix table p (..., L, P): each (..., L, D)."""
        m = {k: v.to(p.dtype) for k, v in self.map.items()}
        if self.reparam == "linear":
            out = p @ m["W"].T
        else:
            out = torch.tanh(p @ m["W1"].T + m["c1"]) @ m["W2"].T + m["c2"]
        return out[..., :self.dim], out[..., self.dim:]

    def prefix_rows(self, params: Params) -> tuple[Tensor, Tensor]:
        """The prefixes' keys k_l and values v_l: each (..., L, D)."""
        if self.sharing == "shared":
            return self.shared_map(params["p"])
        return params["beta1"], params["a"]

    def atom_params(self, params: Params) -> Params:
        """``params`` with the atoms' blocks the losses read: beta1 = keys, a = values (for
        a shared model computed from p), so that shared and no-share fits are scored in the
        same (key, value) space."""
        keys, values = self.prefix_rows(params)
        return {**params, "beta1": keys, "a": values}

    def mixing_measure(self, params: Params) -> MixingMeasure:
        """Masses exp(beta0_l), absolute (the pre-trained scores fix the common shift);
        atoms (k_l, v_l), read from ``atom_params``."""
        return MixingMeasure(params["beta0"], ("beta1", "a"), False)

    def in_own_terms(self, truth: Params) -> Params:
        """A truth's blocks as this model's: a shared truth (blocks p) for a no-share model
        becomes its keys and values; blocks already in this model's terms pass."""
        if "p" in truth and self.sharing == "no_share":
            keys, values = self.shared_map(truth["p"])
            return {"beta1": keys, "beta0": truth["beta0"], "a": values, "nu": truth["nu"]}
        if "p" not in truth and self.sharing == "shared":
            raise ValueError("A free-prefix truth (blocks beta1, a) need not lie on the shared "
                             "map; give the truth as a prefix table p.")
        return dict(truth)

    def _regression(self, x_ND: Tensor, params: Params) -> Tensor:
        return self._mixture(x_ND, params)[0]

    def _mixture(self, x_ND: Tensor, params: Params) -> tuple[Tensor, Tensor, Tensor]:
        """f(x) (..., N), the prefix weights w_l(x) and outputs h_l = v_l . x, (..., L, N)."""
        keys, values = self.prefix_rows(params)
        s_pre, h_pre = self._pretrained_part(x_ND)
        # Scores and outputs as (..., experts, N): reductions over the few experts then run
        # along contiguous samples (several times faster than over a short last axis).
        x_DN = x_ND.transpose(-1, -2)
        s_new = keys @ x_DN + params["beta0"].unsqueeze(-1)                          # (..., L, N)
        h_new = values @ x_DN
        # The softmax written out over the two groups, without concatenating them: the
        # pre-trained half (most of the work) has no parameter to track. f does not depend
        # on the shift, so it is taken without derivatives.
        top = torch.maximum(s_pre.amax(-2), s_new.detach().amax(-2)).unsqueeze(-2)
        e_pre, e_new = (s_pre - top).exp(), (s_new - top).exp()
        den = e_pre.sum(-2) + e_new.sum(-2)
        f = ((e_pre * h_pre).sum(-2) + (e_new * h_new).sum(-2)) / den
        return f, e_new / den.unsqueeze(-2), h_new

    def mean_jacobian(self, x_ND: Tensor, params: Params) -> tuple[Tensor, Tensor]:
        """f(x) (..., N) and its Jacobian (..., N, P) over every entry of the blocks but nu,
        in ``param_shapes`` order (``params.pack``'s), in closed form: with w_l(x) the
        prefix weights and h_l = v_l . x, df/dbeta0_l = w_l (h_l - f), df/dk_l = w_l (h_l -
        f) x, df/dv_l = w_l x, and for a shared map df/dp_l = J_sigma(p_l)^T (df/dk_l,
        df/dv_l). Least squares (``fit_lsq``) uses it instead of one forward-mode pass
        per parameter."""
        f, w_LN, h_new = self._mixture(x_ND, params)
        w = w_LN.transpose(-1, -2)                                                   # (..., N, L)
        d_b0 = w * (h_new.transpose(-1, -2) - f.unsqueeze(-1))                        # (..., N, L)
        x = x_ND.unsqueeze(-2)                                                       # (..., N, 1, D)
        d_k, d_v = d_b0.unsqueeze(-1) * x, w.unsqueeze(-1) * x                       # (..., N, L, D)
        lead = d_b0.shape[:-1]
        if self.sharing == "no_share":
            return f, torch.cat([d_k.reshape(*lead, -1), d_b0, d_v.reshape(*lead, -1)], -1)
        d_out = torch.cat([d_k, d_v], -1)                                            # (..., N, L, 2D)
        d_p = (d_out.unsqueeze(-2) @ self._map_jacobian(params["p"]).unsqueeze(-4)).squeeze(-2)
        return f, torch.cat([d_p.reshape(*lead, -1), d_b0], -1)

    def _map_jacobian(self, p: Tensor) -> Tensor:
        """d sigma(p_l) / d p_l: (..., L, 2D, P)."""
        m = {k: v.to(p.dtype) for k, v in self.map.items()}
        if self.reparam == "linear":
            return m["W"].expand(*p.shape[:-1], *m["W"].shape)
        slope = 1 - torch.tanh(p @ m["W1"].T + m["c1"]).square()                    # (..., L, H)
        return m["W2"] @ (slope.unsqueeze(-1) * m["W1"])

    def _pretrained_part(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        """The pre-trained scores x^T A_j x + c_j and outputs a_j . x + b_j, (..., J, N)
        each. A least-squares fit evaluates them at the same x in every step, and they do
        not depend on the parameters: the last x's are kept (by identity: the tensor is
        held, so its memory cannot be reused by another) unless x was written to since."""
        key = (x_ND, x_ND._version)
        if self._cache is not None and self._cache[0] is x_ND and self._cache[1] == key[1]:
            return self._cache[2]
        pre = {k: v.to(x_ND.dtype) for k, v in self.pretrained.items()}
        x_DN = x_ND.transpose(-1, -2)
        quad = (x_ND.unsqueeze(-3) @ pre["A"] * x_ND.unsqueeze(-3)).sum(-1)        # (..., J, N)
        out = (quad + pre["c"].unsqueeze(-1), pre["a"] @ x_DN + pre["b"].unsqueeze(-1))
        self._cache = (x_ND, x_ND._version, out)
        return out

    def __repr__(self) -> str:
        return (f"PrefixMoERegression(n_experts={self.n_experts}, dim={self.dim}, "
                f"sharing={self.sharing!r}, reparam={self.reparam!r}, "
                f"n_pretrained={self.n_pretrained})")


def _known_blocks(known: Mapping[str, object], dim: int) -> tuple[Params, str, Params]:
    """The pre-trained blocks, the map's form and the map's blocks, checked."""
    reparam = str(known.get("reparam", "mlp"))
    if reparam not in REPARAMS:
        raise ValueError(f"known.reparam must be one of {', '.join(REPARAMS)}; got {reparam!r}.")
    wanted = {*_PRETRAINED, *REPARAMS[reparam], "reparam"}
    missing, extra = sorted(wanted - set(known)), sorted(set(known) - wanted)
    if missing or extra:
        raise ValueError(f"The known table of a prefix model needs {sorted(wanted)}: missing "
                         f"{missing}, unexpected {extra}.")
    t = {k: torch.as_tensor(known[k], dtype=torch.float64) for k in wanted - {"reparam"}}
    n = t["c"].shape[0] if t["c"].dim() == 1 else -1
    shapes = {"A": (n, dim, dim), "c": (n,), "a": (n, dim), "b": (n,)}
    for name, shape in shapes.items():
        if tuple(t[name].shape) != shape:
            raise ValueError(f"known.{name} must have shape {shape} for {n} pre-trained experts "
                             f"in dim={dim}; got {tuple(t[name].shape)}.")
    out = 2 * dim
    if reparam == "linear":
        _need_shape("W", t["W"], t["W"].dim() == 2 and t["W"].shape[0] == out, f"(2D = {out}, P)")
    else:
        h = t["W1"].shape[0] if t["W1"].dim() == 2 else -1
        _need_shape("W1", t["W1"], t["W1"].dim() == 2, "(H, P)")
        _need_shape("c1", t["c1"], tuple(t["c1"].shape) == (h,), f"({h},)")
        _need_shape("W2", t["W2"], tuple(t["W2"].shape) == (out, h), f"({out}, {h})")
        _need_shape("c2", t["c2"], tuple(t["c2"].shape) == (out,), f"({out},)")
    return ({k: t[k] for k in _PRETRAINED}, reparam,
            {k: t[k] for k in REPARAMS[reparam]})


def _need_shape(name: str, value: Tensor, ok: bool, shape: str) -> None:
    if not ok:
        raise ValueError(f"known.{name} must have shape {shape}; got {tuple(value.shape)}.")
