"""Slow, obvious pure-Python references (loops over samples and experts, ``math`` only;
numpy's lstsq where a reference refits least squares) that the vectorised gatelab code is
tested against."""

from __future__ import annotations

import math

from gatelab import experts as ex
from gatelab import gates as gt


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _norm(u):
    return math.sqrt(sum(a * a for a in u))


def gate_scores(gate: gt.Gate, x: list[list[float]], params: dict) -> list[list[float]]:
    """Scores of every sample (rows) and expert (columns), one at a time."""
    p = {k: v.tolist() for k, v in params.items()}
    return [[_score(gate, row, p, i) for i in range(len(p["beta0"]))] for row in x]


def _score(gate, x, p, i):
    b0 = p["beta0"][i]
    if isinstance(gate, gt.CosineGate):
        w = p["beta1"][i]
        if gate.center:  # both sides lose their mean over the features
            w = [v - sum(w) / len(w) for v in w]
            x = [v - sum(x) / len(x) for v in x]
        beta_norm = _norm(w) + gate.tau1 if gate.unit_beta else 1.0
        x_norm = _norm(x) + gate.tau2 if gate.unit_x else 1.0
        return _dot(w, x) / (beta_norm * x_norm) + b0
    if isinstance(gate, gt.LinearGate):
        return _dot(p["beta1"][i], x) + b0
    if isinstance(gate, gt.QuadraticGate):
        if gate.rank:  # A = U V^T
            u, v = p["U"][i], p["V"][i]
            a = [[sum(u[r][j] * v[c][j] for j in range(gate.rank)) for c in range(len(x))]
                 for r in range(len(x))]
        else:
            a = p["A"][i]
        quad = sum(x[r] * a[r][c] * x[c] for r in range(len(x)) for c in range(len(x)))
        return quad + b0 + (0.0 if gate.monomial else _dot(p["beta1"][i], x))
    if isinstance(gate, gt.LaplaceGate):
        return -_norm([a - b for a, b in zip(p["W"][i], x)]) + b0
    if isinstance(gate, gt.GaussianGate):
        return -_norm([a - b for a, b in zip(p["W"][i], x)]) ** 2 + b0
    if isinstance(gate, gt.InputFreeGate):
        return b0
    raise NotImplementedError(gate)


def _normalise(scores: list[float], normaliser: str, top_k: int | None) -> list[float]:
    kept = list(range(len(scores)))
    if top_k is not None:
        kept = sorted(kept, key=lambda i: -scores[i])[:top_k]
    if normaliser == "sigmoid":
        return [1 / (1 + math.exp(-s)) if i in kept else 0.0 for i, s in enumerate(scores)]
    top = max(scores[i] for i in kept)
    z = sum(math.exp(scores[i] - top) for i in kept)
    return [math.exp(s - top) / z if i in kept else 0.0 for i, s in enumerate(scores)]


def gate_weights(gate: gt.Gate, x: list[list[float]], params: dict) -> list[list[float]]:
    """Weights per sample and expert, hierarchical gates included."""
    if isinstance(gate, gt.HierarchicalGate):
        return _hier_weights(gate, x, params)
    return [_normalise(row, gate.normaliser, gate.top_k) for row in gate_scores(gate, x, params)]


def _hier_weights(gate, x, params):
    outer = gate_weights(gate.outer, x, {k[6:]: v for k, v in params.items() if k.startswith("outer.")})
    inner_p = {k[6:]: v for k, v in params.items() if k.startswith("inner.")}
    rows = []
    for n, xn in enumerate(x):
        row = []
        for g in range(gate.n_groups):
            w_in = gate_weights(gate.inner, [xn], {k: v[g] for k, v in inner_p.items()})[0]
            row += [outer[n][g] * w for w in w_in]
        rows.append(_normalise([math.log(w) if w > 0 else -math.inf for w in row],
                               "softmax", gate.top_k))
    return rows


_ACT = {"relu": lambda t: max(t, 0.0), "tanh": math.tanh,
        "sigmoid": lambda t: 1 / (1 + math.exp(-t)),
        "gelu": lambda t: 0.5 * t * (1 + math.erf(t / math.sqrt(2)))}


def expert_means(expert: ex.Expert, x: list[list[float]], params: dict) -> list[list[float]]:
    """h(x_n; eta_i) per sample and expert."""
    p = {k: v.tolist() for k, v in params.items()}
    n_exp = len(next(iter(p.values())))
    return [[_mean(expert, row, p, i) for i in range(n_exp)] for row in x]


def _monomials(x, degree):
    """Products in the documented order: by degree, then lexicographic index tuples."""
    import itertools
    out = []
    for d in range(1, degree + 1):
        for idx in itertools.combinations_with_replacement(range(len(x)), d):
            out.append(math.prod(x[j] for j in idx))
    return out


def _mean(expert, x, p, i):
    if isinstance(expert, ex.PolynomialExpert):
        return _dot(p["a"][i], _monomials(x, expert.degree)) + p["b"][i]
    if isinstance(expert, ex.LinearExpert):
        return _dot(p["a"][i], x) + p["b"][i]
    if isinstance(expert, ex.FFNExpert):
        return p["kappa2"][i] * _ACT[expert.activation](_dot(p["kappa1"][i], x) + p["kappa0"][i])
    if isinstance(expert, ex.ConstantExpert):
        return p["b"][i]
    raise NotImplementedError(expert)


def split_by_refitting(x, y, min_size: int):
    """The two-segment change-point MLE the obvious way: every split between sorted x
    (at least ``min_size`` per side), both sides refitted by least squares (numpy lstsq),
    scored by the heteroscedastic profile log-likelihood -m/2 (log(2 pi RSS/m) + 1) per
    side. Returns (log-likelihood, last x on the left, first x on the right)."""
    import numpy as np
    order = np.argsort(x)
    xs, ys = x[order], y[order]
    best, where = -math.inf, 0
    for m in range(min_size, len(x) - min_size + 1):
        ll = 0.0
        for sx, sy in ((xs[:m], ys[:m]), (xs[m:], ys[m:])):
            design = np.stack([np.ones_like(sx), sx], 1)
            coef = np.linalg.lstsq(design, sy, rcond=None)[0]
            rss = float(((sy - design @ coef) ** 2).sum())
            ll += -len(sx) / 2 * (math.log(2 * math.pi * rss / len(sx)) + 1)
        if ll > best:
            best, where = ll, m
    return best, xs[where - 1], xs[where]
