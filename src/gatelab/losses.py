"""Voronoi losses between an estimated and a true mixing measure, driven by exponent
tables (data, not code), and the generalized Wasserstein distance as a baseline.

A mixing measure G = sum_i m_i delta(omega_i) collects, per expert, a mass m_i (from the
gate intercept: exp(beta0_i) for softmax-type gates, sigmoid(beta0_i) for sigmoid) and
an atom omega_i (every other parameter block of expert i). The Voronoi cell of true atom
j is A_j = {i : ||omega_i - omega*_j|| <= ||omega_i - omega*_l|| for all l} (ties to the
lowest j). A loss (arXiv 2305.03288, 2309.13850, 2402.03226, 2402.05220) is

  D(G, G*) = sum_j |sum_{i in A_j} m_i - m*_j|
           + sum_j sum_{i in A_j} m_i sum_blocks ||Delta block_ij||^{r(block, |A_j|)}

with the exponent r looked up in an ``ExponentTable`` by block name and cell size. A new
paper's loss is a new table row. A gate that cannot split one atom's mass between experts
(sigmoid, arXiv 2405.13997) needs the cell-sum form instead (``ExponentTable.summed``):

  D(G, G*) = sum_j |sum_{i in A_j} m_i c_i - m*_j c*_j|
           + sum_j sum_{i in A_j} |m_i c_i| sum_blocks ||Delta block_ij||^r(block, |A_j|)

with c_i an expert's output scale, and the intercept beta0 compared expert by expert.
Both measures should be in identifiable form (``model.normalise``) so that masses compare.

Shape legend: K fitted experts, J true atoms; leading ``...`` are replicate dims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import choose

__all__ = ["ExponentTable", "TABLES", "LossResult", "atoms", "hellinger", "masses", "translated_loss",
           "voronoi_cells", "voronoi_loss", "wasserstein"]


@dataclass(frozen=True)
class ExponentTable:
    """Per-block exponents of a Voronoi loss as a function of cell size.

    ``single`` applies to cells with one fitted atom, ``shared`` to cells with more. An
    exponent is a number, or a rule in terms of ``rbar`` ("rbar", "rbar/2", "2*rbar"), with
    rbar(m) looked up in ``rbar`` by cell size m. Blocks not listed get the defaults.

    ``summed`` names an expert block holding each expert's scalar output scale c_i (the
    kappa2 of FFN experts). It makes the loss the cell-sum form of the module docstring,
    for gates whose masses are absolute and cannot be split (sigmoid weights do not sum to
    one, so an over-specified fit shares an atom by splitting c_i, not m_i): the cell term
    compares sum m_i c_i with m*_j c*_j, experts weigh |m_i c_i|, and the intercept beta0
    joins the atoms (the masses no longer carry it).
    """

    name: str
    source: str
    single: Mapping[str, float | str] = field(default_factory=dict)
    shared: Mapping[str, float | str] = field(default_factory=dict)
    rbar: Mapping[int, float] = field(default_factory=dict)
    default_single: float = 1.0
    default_shared: float = 1.0
    summed: str | None = None
    #: The arXiv id the exponents are transcribed from; None for a table that is no one
    #: paper's (D1, the generic exponent-2 table, gatelab's own constructions).
    paper: str | None = None

    def exponent(self, block: str, cell_size: int) -> float:
        """The exponent of ``block`` in a cell of ``cell_size`` fitted atoms. A prefixed
        block (a hierarchical gate's "inner.beta1") takes its own row if the table has
        one, else the row of its bare name ("beta1")."""
        bare = block.rsplit(".", 1)[-1]
        if cell_size <= 1:
            return float(self.single.get(block, self.single.get(bare, self.default_single)))
        rule = self.shared.get(block, self.shared.get(bare, self.default_shared))
        if isinstance(rule, (int, float)):
            return float(rule)
        if cell_size not in self.rbar:
            raise ValueError(f"Loss table {self.name!r} defines rbar only for cells of size "
                             f"{sorted(self.rbar)}; a cell has {cell_size} fitted atoms. Fit fewer "
                             f"experts or add rbar({cell_size}) to the table.")
        return _rbar_rule(rule, self.rbar[cell_size])


def _rbar_rule(rule: str, rbar: float) -> float:
    """Evaluate "rbar", "rbar/c" or "c*rbar"."""
    text = rule.replace(" ", "")
    if text == "rbar":
        return rbar
    if text.startswith("rbar/"):
        return rbar / float(text[5:])
    if text.endswith("*rbar"):
        return float(text[:-5]) * rbar
    raise ValueError(f"Exponent rule {rule!r} is not understood; use a number, 'rbar', "
                     f"'rbar/c' or 'c*rbar'.")


# r-bar(m) of arXiv 2305.03288: the least r for which a polynomial system has no non-trivial
# solution; known values r(2) = 4, r(3) = 6.
_RBAR = {2: 4.0, 3: 6.0}

TABLES: dict[str, ExponentTable] = {
    "D1": ExponentTable("D1", "exact-specified (any model): exponent 1 on every block"),
    "D2-softmax": ExponentTable(
        "D2-softmax", "softmax Gaussian MoE, over-specified (arXiv 2305.03288); var is a variance",
        shared={"beta1": "rbar", "b": "rbar", "a": "rbar/2", "var": "rbar/2"}, rbar=_RBAR,
        paper="2305.03288"),
    "D2-laplace": ExponentTable(
        "D2-laplace", "Laplace-gated Gaussian MoE, over-specified (FuseMoE, arXiv 2402.03226)",
        shared={"W": 2.0, "a": 2.0, "b": "rbar", "var": "rbar/2"}, rbar=_RBAR, paper="2402.03226"),
    "D2-prefix": ExponentTable(
        "D2-prefix", "prefix-MoE regression, over-specified (arXiv 2410.02200): keys and values "
        "of a shared prefix at sqrt(log n / n) in one-atom cells and (log n / n)^(1/4) in "
        "multi-atom cells (the rates of the paper's abstract and introduction; its Section 4 "
        "was not read), so exponent 2 there; no-share fits are scored with the same table",
        shared={"beta1": 2.0, "a": 2.0}),
    "D2-sigmoid": ExponentTable(
        "D2-sigmoid", "sigmoid-gated FFN experts, over-specified (arXiv 2405.13997): the "
        "cell-sum form (a sigmoid gate cannot split an atom's mass, so a cell's experts split "
        "its output scale kappa2; the cell term compares sum sigmoid(beta0_i) kappa2_i), "
        "exponent 2 on every block in multi-expert cells (strongly identifiable experts). "
        "gatelab's construction from the model's identifiability: the paper's own loss "
        "(its Section 3) is not in the sources gatelab could read",
        default_shared=2.0, summed="kappa2"),
    "D2-strong": ExponentTable(
        "D2-strong", "strongly identifiable experts (least-squares papers): exponent 2",
        default_shared=2.0),
}


class LossResult(NamedTuple):
    """A loss per replicate, with its parts."""

    total: Tensor                 # (...,)
    mass: Tensor                  # (...,) the mass-mismatch term
    blocks: dict[str, Tensor]     # per block: max over cells of the cell's mass-weighted
                                  # mean ||Delta block|| (...,)
    cells: Tensor                 # (..., K) the true atom each fitted atom belongs to
    cell_masses: Tensor | None = None   # (..., J) sum of m_i over each cell (before |. - m*_j|)


def masses(params: Mapping[str, Tensor]) -> Tensor:
    """m_i = exp(beta0_i), the masses of a softmax-type gate read from its intercepts:
    (..., K). Other models give theirs through ``mixing_measure``."""
    return torch.exp(params["beta0"])


def _measures(estimate: Mapping[str, Tensor], truth: Mapping[str, Tensor], model, truth_model,
              blocks: list[str] | None, mass: Tensor | None,
              true_mass: Tensor | None) -> tuple[Tensor, Tensor, list[str]]:
    """(m (..., K), m* (J,), the atoms' blocks): from the models' mixing measures
    (``truth_model`` defaults to ``model``), else from softmax intercepts and the truth's
    blocks with an expert axis, unless ``blocks``, ``mass`` or ``true_mass`` are given.
    Relative masses (softmax intercepts have no scale of their own: pinning the last
    fitted intercept at 0 matches the truth's convention only when the last fitted expert
    alone covers the last true atom, not when it shares a split cell) are put on the
    truth's scale: m_i = softmax(log m)_i * sum_j m*_j (finite even for a diverged
    intercept)."""
    truth_model = truth_model or model
    if truth_model is not None:
        measure = truth_model.mixing_measure(truth)
        m_true, atoms = measure.masses, list(measure.atoms)
    else:
        atoms = [b for b in truth if b != "beta0" and truth[b].dim() >= 1]
        m_true = masses(truth) if true_mass is None else true_mass
    m_true, atoms = (m_true if true_mass is None else true_mass), (blocks or atoms)
    if mass is not None:
        return mass, m_true, atoms
    if model is None:
        log_m, relative = estimate["beta0"], True
    else:
        measure = model.mixing_measure(estimate)
        log_m, relative = measure.log_masses, measure.relative
    if relative:
        return torch.softmax(log_m, -1) * m_true.sum(-1, keepdim=True), m_true, atoms
    return log_m.exp(), m_true, atoms


def _atom_values(model, params: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """``params`` with any atom blocks the model derives from others (a reparameterised
    prefix's keys and values, ``PrefixMoERegression.atom_params``)."""
    derive = getattr(model, "atom_params", None)
    return derive(dict(params)) if derive is not None else params


def _block_rows(params: Mapping[str, Tensor], blocks: list[str], event_ndim: Mapping[str, int],
                k: int) -> dict[str, Tensor]:
    """Each block as (..., K, size): one row per expert (the expert axis leads the event)."""
    rows = {}
    for name in blocks:
        t = params[name]
        batch = t.dim() - event_ndim[name]
        rows[name] = t.reshape(*t.shape[:batch], k, -1)
    return rows


def atoms(params: Mapping[str, Tensor], blocks: list[str], event_ndim: Mapping[str, int],
          k: int) -> Tensor:
    """The atoms omega_i: the named blocks of each of the k experts flattened and joined,
    (..., K, P)."""
    return torch.cat(list(_block_rows(params, blocks, event_ndim, k).values()), dim=-1)


def voronoi_cells(atoms_KP: Tensor, true_JP: Tensor) -> Tensor:
    """Index of the nearest true atom for every fitted atom: (..., K)."""
    dist = (atoms_KP.unsqueeze(-2) - true_JP.unsqueeze(-3)).square().sum(-1)
    return dist.argmin(-1)


def voronoi_loss(estimate: Mapping[str, Tensor], truth: Mapping[str, Tensor],
                 table: str | ExponentTable = "D1", *, model=None, truth_model=None,
                 blocks: list[str] | None = None, mass: Tensor | None = None,
                 true_mass: Tensor | None = None, strict: bool = True) -> LossResult:
    """The Voronoi loss of ``estimate`` (blocks (..., K, ...)) against ``truth`` (blocks
    (J, ...), unbatched), batched over the estimate's leading dimensions.

    Masses and atoms come from the models' mixing measures (``model.mixing_measure``, the
    truth's from ``truth_model``, default ``model``): e.g. exp(beta0) for softmax gates,
    sigmoid(beta0) for sigmoid gates, lam p_i in the deviated MoE (arXiv 2402.05220), the
    selection probabilities of a top-K gate. Without a model they are exp(beta0) (a
    softmax-type gate) and the atoms every block of ``truth`` with an expert axis but
    beta0. Relative (softmax) masses of the estimate are put on the truth's scale.
    ``blocks`` overrides the atoms' blocks; ``mass`` (..., K) and ``true_mass`` (J,) the
    masses. Also returns each block's own error for per-parameter
    rates: for every cell the mass-weighted mean of ||Delta block|| over its fitted atoms,
    then the max over cells (weighting by mass keeps a vanishing extra expert, whose
    parameters are free to drift, from dominating).
    A fitted atom in a cell larger than the table defines (e.g. all four experts of a k = 4
    fit near one true atom, where rbar(4) is unknown) raises, or with ``strict=False`` makes
    that replicate's total loss +inf (studies flag such fits and leave them out of rates).
    """
    table = choose("loss table", table, TABLES) if isinstance(table, str) else table
    estimate, truth = _atom_values(model, estimate), _atom_values(truth_model or model, truth)
    m, m_true, blocks = _measures(estimate, truth, model, truth_model, blocks, mass, true_mass)
    if table.summed is not None:
        m, m_true, blocks = _cell_sums(table, estimate, truth, m, m_true, blocks, model)
    weight = m.abs()                                                 # m_i, or |m_i c_i|
    k, j = m.shape[-1], m_true.shape[-1]
    ndim = {b: truth[b].dim() for b in blocks}
    est_rows = _block_rows(estimate, blocks, ndim, k)                # (..., K, size)
    true_rows = _block_rows(truth, blocks, ndim, j)                  # (J, size)
    cells = voronoi_cells(torch.cat(list(est_rows.values()), -1),
                          torch.cat(list(true_rows.values()), -1))
    member = torch.nn.functional.one_hot(cells, j).bool()           # (..., K, J)
    # where, not a product: a diverged gate (m = inf) must give an infinite loss, not 0 * inf.
    cell_mass = torch.where(member, m.unsqueeze(-1), 0.0).sum(-2)   # (..., J)
    mass_term = (cell_mass - m_true).abs().sum(-1)
    sizes = member.sum(-2)                                           # (..., J)
    size_of_atom = sizes.gather(-1, cells)                           # (..., K)
    total, block_err = mass_term.clone(), {}
    for name in blocks:
        target = true_rows[name][cells]                              # (..., K, size)
        dist = (est_rows[name] - target).norm(dim=-1)                # (..., K)
        power = _exponents(table, name, size_of_atom, strict).to(dist.dtype)
        # An atom at zero distance adds nothing, even with a diverged (infinite) mass.
        term = torch.where(dist > 0, weight * dist.pow(power), 0.0)
        # A vanishing atom whose parameters ran off (0 * inf) has no defined term: +inf.
        term = torch.nan_to_num(term, nan=float("inf"), posinf=float("inf"))
        # A cell larger than the table defines (strict=False): the loss is undefined, +inf.
        term = torch.where(torch.isnan(power), float("inf"), term)
        total = total + term.sum(-1)
        block_err[name] = _worst_cell(dist, weight, member)
    return LossResult(total, mass_term, block_err, cells, cell_mass)


def translated_loss(estimate: Mapping[str, Tensor], truth: Mapping[str, Tensor],
                    table: str | ExponentTable = "D1", *,
                    shift_blocks: Sequence[str] | Mapping[str, tuple[int, ...]], model=None,
                    truth_model=None, blocks: list[str] | None = None, strict: bool = True,
                    tol: float = 1e-9) -> LossResult:
    """The Voronoi loss minimised over a translation of the gate parameters,

        D~(G, G*) = min over (t0, t) of D(G shifted by (t0, t), G*),

    for gates whose parameters are identified only up to (beta0_i + t0, beta1_i + t) for
    every expert i (softmax-type gates, arXiv 2305.03288 Section 2; ``Gate.translations``
    names the blocks). Pinning the last fitted expert at zero, as estimators do, is one
    member of that class, and the wrong one for the loss when that expert shares a split
    cell. ``shift_blocks``: the blocks t moves (e.g. beta1, or A and beta1 of a quadratic
    gate), each shifted by one common t (or, given ``model``, by its gate's own shift,
    ``Gate.translations``); or a mapping from block to the shape of its t, which
    broadcasts over the block's shape without the replicate dims (a hierarchical gate's
    inner beta1 (G, J, D) takes one shift per group, (G, 1, D)). They must be blocks whose
    shift leaves the model unchanged.

    t0 scales every relative mass by s = exp(t0), and D is convex and piecewise linear in
    s: sum_j |s S_j - m*_j| + s A (S_j a cell's mass, A the atoms' terms), so s is taken
    exactly at its best kink m*_j / S_j (the limit s -> 0, where every mass vanishes and D
    tends to sum_j m*_j, is not admitted). t is found by a compass search, batched over the
    replicates, started at t = 0 and at each translation that puts one fitted atom's
    shift blocks on its cell's true ones, keeping the best loss seen, so the result is
    never above ``voronoi_loss``'s. The search stops when its step is below ``tol`` times
    the truth's scale. Block errors, cells and the mass term are those at the optimum."""
    table = choose("loss table", table, TABLES) if isinstance(table, str) else table
    if not isinstance(shift_blocks, Mapping):
        # A named block takes its gate's own shift shape where the model knows it (a
        # hierarchical inner level shifts per group), else one common t.
        gate = getattr(model, "gate", None)
        own = gate.translations(model.n_experts, model.dim) if gate is not None else {}
        shift_blocks = {b: own.get(b, (1, *truth[b].shape[1:])) for b in shift_blocks if b in truth}
    shapes = {b: tuple(t) for b, t in shift_blocks.items() if b != "beta0" and b in estimate}
    common = {"model": model, "truth_model": truth_model, "blocks": blocks, "strict": strict}
    if not shapes:
        return voronoi_loss(estimate, truth, table, **common)
    shift = _Translation(estimate, truth, shapes)
    m_true = _measures(_atom_values(model, estimate), _atom_values(truth_model or model, truth),
                       model, truth_model, blocks, None, None)[1]
    relative = model is None or model.mixing_measure(estimate).relative

    def score(t: Tensor) -> tuple[Tensor, Tensor, LossResult]:
        """The loss at each candidate t (C, ..., P), with its best mass scale s."""
        res = voronoi_loss(shift.apply(t), truth, table, **common)
        if not relative:
            return res.total, torch.ones_like(res.total), res
        return (*_best_scale(res, m_true), res)

    start = shift.starts(voronoi_loss(estimate, truth, table, **common).cells, m_true.shape[-1])
    x, fx = _pick(start, score(start)[0])
    step, floor = shift.first_step(start), tol * shift.scale
    for _ in range(400):
        if not bool((step > floor).any()):
            break
        trial = x.unsqueeze(0) + step[..., None] * shift.directions()
        tx, tf = _pick(trial, score(trial)[0])
        better = tf < fx
        x, fx = torch.where(better[..., None], tx, x), torch.where(better, tf, fx)
        step = torch.where(better, step, step / 2)
    total, s, res = score(x.unsqueeze(0))
    cell_masses = (s.unsqueeze(-1) * res.cell_masses)[0]            # type: ignore[operator]
    mass = (cell_masses - m_true).abs().sum(-1)
    return LossResult(total[0], mass, {k: v[0] for k, v in res.blocks.items()}, res.cells[0],
                      cell_masses)


def _best_scale(res: LossResult, m_true: Tensor) -> tuple[Tensor, Tensor]:
    """min over s > 0 of sum_j |s S_j - m*_j| + s A, and the s that attains it, among the
    kinks s = m*_j / S_j and s = 1 (a convex piecewise-linear function is least at a kink
    unless it falls all the way to s -> 0, which ``translated_loss`` does not admit)."""
    assert res.cell_masses is not None
    cell = res.cell_masses
    atoms = res.total - res.mass                                     # A, linear in s
    kinks = torch.cat([m_true / cell, torch.ones_like(cell[..., :1])], -1)
    kinks = torch.where(torch.isfinite(kinks) & (kinks > 0), kinks, 1.0)
    loss = (kinks.unsqueeze(-1) * cell.unsqueeze(-2) - m_true).abs().sum(-1) + kinks * atoms.unsqueeze(-1)
    loss = torch.nan_to_num(loss, nan=float("inf"), posinf=float("inf"))
    best, at = loss.min(-1)
    return best, kinks.gather(-1, at.unsqueeze(-1)).squeeze(-1)


def _pick(points: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """The point (..., P) with the least value among the leading axis's candidates."""
    values = torch.nan_to_num(values, nan=float("inf"), posinf=float("inf"))
    best, at = values.min(0)
    index = at[None, ..., None].expand(1, *points.shape[1:])
    return points.gather(0, index).squeeze(0), best


class _Translation:
    """A shift t (..., P) of the ``shapes`` blocks (each block's t broadcasts over its
    shape), packed flat; ``apply`` adds candidates (C, ..., P) to the estimate, giving
    blocks (C, ..., K, ...)."""

    def __init__(self, estimate: Mapping[str, Tensor], truth: Mapping[str, Tensor],
                 shapes: Mapping[str, tuple[int, ...]]) -> None:
        self.estimate, self.truth, self.shapes = dict(estimate), truth, dict(shapes)
        self.names = list(shapes)
        self.sizes = [math.prod(t) for t in shapes.values()]
        first = estimate[self.names[0]]
        self.batch = tuple(first.shape[:first.dim() - truth[self.names[0]].dim()])
        rows = torch.cat([truth[b].reshape(-1) for b in self.names])
        self.scale = 1.0 + float(rows.abs().max())

    def apply(self, t: Tensor) -> dict[str, Tensor]:
        c = t.shape[0]
        out = {k: v.expand(c, *v.shape) for k, v in self.estimate.items()}
        for b, part in zip(self.names, t.split(self.sizes, -1)):
            out[b] = self.estimate[b] + part.reshape(*part.shape[:-1], *self.shapes[b])
        return out

    def _entries(self, b: str, k: int) -> Tensor:
        """For each of the k experts' rows of block b (K, size), the entries of b's t that
        shift it."""
        block = self.estimate[b].shape[len(self.batch):]
        index = torch.arange(math.prod(self.shapes[b])).reshape(self.shapes[b])
        return index.expand(block).reshape(k, -1)

    def starts(self, cells: Tensor, j: int) -> Tensor:
        """t = 0 and, for each fitted atom, the shift that puts it on its cell's true
        shift blocks (other groups' shifts 0): (1 + K, ..., P), for ``cells`` (..., K) of
        j true atoms; a non-finite candidate becomes t = 0."""
        k = cells.shape[-1]
        out = torch.zeros(1 + k, *self.batch, sum(self.sizes), dtype=self.estimate[self.names[0]].dtype)
        offset = 0
        for b, size in zip(self.names, self.sizes):
            true_rows = self.truth[b].reshape(j, -1)[cells]                   # (..., K, row)
            gaps = true_rows - self.estimate[b].reshape(*self.batch, k, -1)
            entries = self._entries(b, k)
            for i in range(k):
                out[1 + i, ..., offset + entries[i]] = gaps[..., i, :]
            offset += size
        return torch.where(torch.isfinite(out), out, 0.0)

    def first_step(self, starts: Tensor) -> Tensor:
        """Half the spread of the starts, at least 1e-3 of the truth's scale: (...,)."""
        spread = (starts.amax(0) - starts.amin(0)).amax(-1) / 2
        return spread.clamp_min(1e-3 * self.scale)

    def directions(self) -> Tensor:
        """+-e_p for each of the P coordinates: (2P, 1, ..., 1, P)."""
        p = sum(self.sizes)
        eye = torch.eye(p, dtype=self.estimate[self.names[0]].dtype)
        return torch.cat([eye, -eye]).reshape(2 * p, *([1] * len(self.batch)), p)


def _cell_sums(table: ExponentTable, estimate: Mapping[str, Tensor], truth: Mapping[str, Tensor],
               m: Tensor, m_true: Tensor, blocks: list[str],
               model) -> tuple[Tensor, Tensor, list[str]]:
    """The cell-sum form's signed masses m_i c_i (..., K) and m*_j c*_j (J,), and its atom
    blocks: the output scale c out, the intercept beta0 in."""
    scale = table.summed or ""
    if scale not in truth or scale not in estimate:
        raise ValueError(f"Loss table {table.name!r} compares cell sums of the output scale "
                         f"{scale!r}, a block this model does not have; use it with FFN experts "
                         f"or pick another table.")
    if model is None or model.mixing_measure(estimate).relative:
        raise ValueError(f"Loss table {table.name!r} is for gates with absolute masses that "
                         f"cannot be split (sigmoid); a softmax-type gate's masses are relative: "
                         f"use D2-strong or D1.")
    atom_blocks = [b for b in blocks if b != scale]
    if "beta0" in truth and "beta0" not in atom_blocks:
        atom_blocks.append("beta0")
    return m * estimate[scale], m_true * truth[scale], atom_blocks


def _worst_cell(dist_K: Tensor, w_K: Tensor, member_KJ: Tensor) -> Tensor:
    """max over non-empty cells of sum_{i in A_j} w_i d_i / sum_{i in A_j} w_i (w_i the
    expert's weight, its mass); infinite where a weight diverged."""
    weighted = torch.where(member_KJ, (w_K * dist_K).unsqueeze(-1), 0.0).sum(-2)
    cell_weight = torch.where(member_KJ, w_K.unsqueeze(-1), 0.0).sum(-2)
    # A cell whose experts all weigh 0 (output scales 0) has no error to speak of.
    mean = torch.where(cell_weight > 0, weighted / cell_weight.where(cell_weight > 0, 1.0), 0.0)
    per_cell = torch.where(member_KJ.any(-2), mean, float("-inf"))
    worst = per_cell.amax(-1)
    return torch.where(torch.isfinite(worst), worst, float("inf"))


def _exponents(table: ExponentTable, block: str, sizes: Tensor, strict: bool) -> Tensor:
    """Exponent per fitted atom from its cell's size (looked up once per distinct size).
    A size the table does not define raises, or with ``strict=False`` gives NaN."""
    out = torch.empty(sizes.shape, dtype=torch.float64)
    for size in sizes.unique().tolist():
        try:
            out[sizes == size] = table.exponent(block, int(size))
        except ValueError:
            if strict:
                raise
            out[sizes == size] = float("nan")
    return out


def wasserstein(estimate: Mapping[str, Tensor], truth: Mapping[str, Tensor], order: float = 1.0,
                *, model=None, truth_model=None, blocks: list[str] | None = None,
                mass: Tensor | None = None, true_mass: Tensor | None = None) -> Tensor:
    """Generalized Wasserstein distance of order r between the mixing measures (the
    baseline of arXiv 2402.05220): W_r = (min over couplings q of sum_ij q_ij
    ||omega_i - omega*_j||^r)^(1/r), couplings with marginals the normalised masses.
    Solved exactly as a small linear programme per replicate (scipy), so it is meant for
    reports, not inner loops. Masses, atoms and the other options as in ``voronoi_loss``.
    Returns (...,)."""
    import numpy as np
    from scipy.optimize import linprog

    estimate, truth = _atom_values(model, estimate), _atom_values(truth_model or model, truth)
    p, q, blocks = _measures(estimate, truth, model, truth_model, blocks, mass, true_mass)
    k, j = p.shape[-1], q.shape[-1]
    ndim = {b: truth[b].dim() for b in blocks}
    est, tru = atoms(estimate, blocks, ndim, k), atoms(truth, blocks, ndim, j)
    cost = (est.unsqueeze(-2) - tru.unsqueeze(-3)).norm(dim=-1).pow(order)   # (..., K, J)
    p = p / p.sum(-1, keepdim=True)
    q_np = (q / q.sum()).detach().numpy()
    flat_cost = cost.reshape(-1, k * j).detach().numpy()
    flat_p = p.reshape(-1, k).detach().numpy()
    eq = np.zeros((k + j, k * j))
    for i in range(k):
        eq[i, i * j:(i + 1) * j] = 1
    for jj in range(j):
        eq[k + jj, jj::j] = 1
    out = [linprog(c, A_eq=eq, b_eq=np.concatenate([pi, q_np]), bounds=(0, None), method="highs").fun
           for c, pi in zip(flat_cost, flat_p)]
    return torch.tensor(out, dtype=cost.dtype).reshape(cost.shape[:-2]) ** (1.0 / order)


#: Gauss-Hermite nodes per true expert for ``hellinger``: the integrand sqrt(p/p*) under
#: N(mu*, var*) is smooth where the fit is near the truth, the only place a rate is read.
HELLINGER_NODES = 16


def hellinger(model, params: Mapping[str, Tensor], truth_model, truth: Mapping[str, Tensor],
              x_eval: Tensor, nodes: int = HELLINGER_NODES) -> Tensor:
    """The Hellinger distance between fitted and true conditional densities of Gaussian
    MoEs, averaged over covariates: h = (mean_m H^2(x_m))^(1/2), with

        H^2(x) = 1 - integral sqrt(p(y | x) p*(y | x)) dy
               = 1 - sum_j w*_j(x) E_{y ~ N(mu*_j(x), var*_j)} sqrt(p(y | x) / p*(y | x)),

    each expectation by Gauss-Hermite with ``nodes`` points and x_m the evaluation
    covariates (M, D) (a fixed sample of the covariate law, the same for every fit, so
    that fits compare on one functional). The density loss of the top-K paper's density
    results (arXiv 2309.13850; an MLE of a correctly specified parametric density has h of
    order n^-1/2 up to a log). ``params`` (B, ...) against an unbatched ``truth``; (B,)."""
    import numpy as np
    z, w = (torch.as_tensor(v, dtype=x_eval.dtype) for v in np.polynomial.hermite_e.hermegauss(nodes))
    w = w / w.sum()
    w_true = truth_model.log_gate(x_eval, truth).exp()                               # (M, J)
    mu = truth_model.expert_means(x_eval, truth)                                     # (M, J)
    y = mu.unsqueeze(-1) + truth["var"].sqrt()[:, None] * z                          # (M, J, Q)
    m, j, q = y.shape
    xs = x_eval.unsqueeze(1).unsqueeze(1).expand(m, j, q, x_eval.shape[-1]).reshape(-1, x_eval.shape[-1])
    ys = y.reshape(-1)
    log_true = truth_model.log_prob(xs, ys, dict(truth))
    batch = next(iter(params.values())).shape[0]
    per = max(1, (1 << 21) // (ys.numel() * model.n_experts))
    ratio = torch.cat([(model.log_prob(xs, ys, {k: v[i:i + per] for k, v in params.items()})
                        - log_true).mul(0.5).exp() for i in range(0, batch, per)])
    bc = (ratio.reshape(batch, m, j, q) * w).sum(-1)                                 # (B, M, J)
    h2 = (1 - (w_true * bc).sum(-1)).clamp_min(0.0)                                  # (B, M)
    return h2.mean(-1).sqrt()
