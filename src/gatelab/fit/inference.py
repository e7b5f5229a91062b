"""Inference for a fitted Gaussian MoE: standard errors and Wald intervals from the
observed information, the predictive distribution, and the choice of the number of
experts by AIC/BIC.

Standard errors hold for exact-specified fits only. When the model has more experts
than the data need, the MLE sits where the information matrix is singular (two experts
on one atom, or an expert with vanishing weight), and the usual root-n asymptotics fail
(the rates of arXiv 2305.03288 are slower); ``standard_errors`` then says so instead of
printing a number.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..models import GatedExperts, GaussianMoE
from ..params import Params
from .lsq import profile_loglik
from .polish import free_masks

__all__ = ["Wald", "SingularInformation", "observed_information", "standard_errors",
           "MAX_CONDITION", "Prediction", "predict", "Selection", "choose_experts",
           "select_experts", "fit_loglik", "save_model", "load_model"]

#: Largest condition number of the information matrix in correlation form (unit
#: diagonal) for which standard errors are reported. Beyond it, some combination of
#: parameters is (nearly) undetermined by the data: the fit is over-specified or on a
#: boundary, and inverting would give numbers, not standard errors.
MAX_CONDITION = 1e8


class SingularInformation(ValueError):
    """The observed information cannot be inverted into standard errors."""


class Wald(NamedTuple):
    """Per free parameter: its name (``beta1[0,0]``), estimate, standard error and the
    Wald interval estimate +- z se at ``level``."""

    names: list[str]
    estimate: Tensor
    se: Tensor
    low: Tensor
    high: Tensor
    level: float


def observed_information(model: GaussianMoE, x: Tensor, y: Tensor,
                         params: Params) -> tuple[Tensor, list[str], Tensor]:
    """(I, names, theta): I = -d^2 l / d theta^2 at ``params`` over the free entries theta
    (unbatched fit; x (N, D), y (N,)), by autograd; names like ``beta1[0,0]``."""
    masks = free_masks(model)
    base = {k: v.detach().to(torch.float64) for k, v in params.items()}
    names = [b if m.dim() == 0 else f"{b}[{','.join(map(str, i.tolist()))}]"
             for b, m in masks.items() for i in (m.nonzero() if m.dim() else m.view(1, 1))]
    theta = torch.cat([base[b][m].reshape(-1) for b, m in masks.items()])
    x, y = x.to(torch.float64), y.to(torch.float64)

    def loglik(t: Tensor) -> Tensor:
        p, offset = dict(base), 0
        for b, m in masks.items():
            count = int(m.sum())
            p[b] = base[b].masked_scatter(m, t[offset:offset + count])
            offset += count
        return model.log_likelihood(x, y, p)

    return -torch.autograd.functional.hessian(loglik, theta), names, theta


def standard_errors(model: GaussianMoE, x: Tensor, y: Tensor, params: Params,
                    level: float = 0.95) -> Wald:
    """Standard errors sqrt(diag(I^-1)) from the observed information I at the MLE
    ``params``, and Wald intervals at ``level``. Raises ``SingularInformation`` where I is
    not positive definite or its correlation form has a condition number above
    ``MAX_CONDITION`` (over-specified fits, gates that separated the data, unidentified
    directions such as a plain cosine router's scale)."""
    info, names, theta = observed_information(model, x, y, params)
    d = info.diagonal()
    if not bool((d > 0).all()):
        raise SingularInformation(_singular("some parameter has no curvature: " + ", ".join(
            n for n, v in zip(names, d.tolist()) if v <= 0)))
    scaled = info / torch.outer(d.sqrt(), d.sqrt())
    evals = torch.linalg.eigvalsh(scaled)
    if float(evals[0]) <= 0 or float(evals[-1] / evals[0]) > MAX_CONDITION:
        raise SingularInformation(_singular(f"condition number {float(evals[-1] / evals[0]):.3g}"
                                            if float(evals[0]) > 0 else
                                            "the likelihood is not at a maximum there"))
    se = torch.linalg.inv(info).diagonal().sqrt()
    z = _z(level)
    return Wald(names, theta, se, theta - z * se, theta + z * se, level)


def _singular(why: str) -> str:
    return (f"The observed information is singular ({why}): standard errors do not exist "
            f"here. This happens when the model has more experts than the data need "
            f"(over-specified: fit fewer experts, see --experts 1-K), when the gate separates "
            f"the data, or where the model is not identified.")


class Prediction(NamedTuple):
    """Per sample: the mixture mean E[y | x], the ``level`` predictive interval of the
    mixture (its quantiles), each expert's mean (N, E) and the gate weights (N, E)."""

    mean: Tensor
    low: Tensor
    high: Tensor
    expert_means: Tensor
    weights: Tensor
    level: float


def predict(model: GatedExperts, params: Params, x: Tensor, level: float = 0.95) -> Prediction:
    """The predictive distribution of y given x, summarised. A Gaussian MoE:
    p(y | x) = sum_i w_i(x) N(h_i(x), var_i), mean sum_i w_i h_i, and the interval between
    its (1 -+ level)/2 quantiles, by bisection on the mixture CDF (to 1e-20 of the
    spread). An MoE regression: y ~ N(f(x), nu), the interval f -+ z sqrt(nu)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    weights = model.log_gate(x, params).exp()
    means = model.expert_means(x, params).expand_as(weights)
    mean = (weights * means).sum(-1)
    tail = (1 - level) / 2
    if "var" not in params:
        half = _z(level) * params["nu"].sqrt()
        return Prediction(mean, mean - half, mean + half, means, weights, level)
    sd = params["var"].sqrt().expand_as(weights)
    return Prediction(mean, _quantile(model, params, x, means, sd, tail),
                      _quantile(model, params, x, means, sd, 1 - tail), means, weights, level)


def _z(level: float) -> float:
    """The two-sided standard normal quantile: P(|Z| <= z) = level."""
    return math.sqrt(2) * float(torch.erfinv(torch.tensor(level, dtype=torch.float64)))


def _quantile(model, params, x, means, sd, q: float) -> Tensor:
    """The q-quantile of the mixture at each x, by bisection between the extreme experts'
    +-10 sd (the mixture's quantile lies between its components' ones)."""
    lo = (means - 10 * sd).amin(-1)
    hi = (means + 10 * sd).amax(-1)
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = model.cdf(x, mid, params) < q
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return 0.5 * (lo + hi)


class Selection(NamedTuple):
    """Fits for several numbers of experts: ``table`` rows {k, loglik, aic, bic, status};
    ``best`` the k the criterion chose."""

    table: list[dict]
    best: int
    criterion: str


def fit_loglik(res, n: int) -> float:
    """The log-likelihood of a fit: EM's own, or for least squares the profile one."""
    rss = getattr(res, "rss", None)
    return float(res.loglik) if rss is None else float(profile_loglik(rss, n))


def choose_experts(fits: dict, n: int, criterion: str = "bic") -> Selection:
    """The lowest AIC or BIC among fits ``{k: (model, result)}`` on n samples that did not
    fail (status converged or max_iter; if all failed, among all); every fit stays in the
    table with its status. AIC = -2 l + 2 p, BIC = -2 l + p log n."""
    from .single import aic, bic
    from .status import status_names
    if criterion not in ("aic", "bic"):
        raise ValueError(f"criterion must be 'aic' or 'bic'; got {criterion!r}.")
    table = []
    for k, (model, res) in sorted(fits.items()):
        ll = fit_loglik(res, n)
        table.append({"k": k, "loglik": ll, "aic": aic(ll, model), "bic": bic(ll, model, n),
                      "status": status_names(res.status)[0]})
    usable = [r for r in table if r["status"] in ("converged", "max_iter")] or table
    return Selection(table, min(usable, key=lambda r: r[criterion])["k"], criterion)


def select_experts(x: Tensor, y: Tensor, ks, criterion: str = "bic",
                   **fit_options) -> tuple[Selection, dict]:
    """``choose_experts`` over ``fit_best_of_starts`` fits for each k in ``ks`` (same
    options); returns the selection and the fits {k: (model, result)}."""
    from .single import fit_best_of_starts
    fits = {k: fit_best_of_starts(x, y, k, **fit_options) for k in ks}
    return choose_experts(fits, len(y), criterion), fits


_FORMAT = "gatelab-model"


def save_model(path: str, model: GatedExperts, params: Params, **meta) -> None:
    """Write a fitted model as JSON: its family (kind, experts, dimension, gate and expert
    as data), its parameters, and ``meta`` (e.g. column names, status, log-likelihood)."""
    import json

    from .._specs import to_spec
    from ..models import MoERegression
    data = {"format": _FORMAT, "version": 1,
            "kind": "regression" if isinstance(model, MoERegression) else "gaussian_moe",
            "n_experts": model.n_experts, "dim": model.dim, "gate": to_spec(model.gate),
            "expert": to_spec(model.expert), "params": {k: v.tolist() for k, v in params.items()},
            **meta}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)


def load_model(path: str) -> tuple[GatedExperts, Params, dict]:
    """(model, params, meta) from a file written by ``save_model``."""
    import json

    from .._specs import from_spec
    from ..models import MoERegression
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read the model file {path}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a gatelab model file; write one with "
                         f"'gatelab fit ... --save {path}'.")
    cls = MoERegression if data["kind"] == "regression" else GaussianMoE
    model = cls(data["n_experts"], data["dim"], from_spec(data["gate"]), from_spec(data["expert"]))
    params = {k: torch.tensor(v, dtype=torch.float64) for k, v in data.pop("params").items()}
    model.check_params(params)
    return model, params, data
