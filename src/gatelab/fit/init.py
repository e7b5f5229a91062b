"""Starting values for the estimators: the near-truth scheme of the reference protocol
and data-driven random starts.

Shape legend: S starts, R replicates, N samples, D features, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._checks import check_inputs, check_int
from .._threads import threads_for, using_threads
from ..gates import HierarchicalGate
from ..models import ContaminatedMoE, DeviatedGaussianMoE, GatedExperts, GaussianMoE, PrefixMoERegression
from ..params import Params
from .em import broadcast_problem, make_kernel

__all__ = ["covering_assignment", "from_responsibilities", "near_truth", "near_truth_known",
           "near_truth_prefix", "near_truth_starts", "NEAR_TRUTH", "random_starts"]


def covering_assignment(k: int, k_star: int, generator: torch.Generator | None = None) -> Tensor:
    """Assign k fitted experts to k* true atoms at random so that every atom gets at
    least one. The last fitted expert always takes the last true atom, so that a start's
    reference expert (intercept fixed at zero) sits on the truth's; the Voronoi loss does
    not rely on it (it rescales the fitted masses, see ``losses._measures``). The other
    k - 1 experts cover atoms 0..k*-2 by a random permutation, padded with uniform draws
    over all atoms, shuffled."""
    check_int("k", k, k_star, fix="Fit at least as many experts as the truth has.")
    pad = torch.randint(k_star, (k - k_star,), generator=generator)
    rest = torch.cat([torch.randperm(k_star - 1, generator=generator), pad])
    rest = rest[torch.randperm(k - 1, generator=generator)]
    return torch.cat([rest, torch.tensor([k_star - 1])])


def near_truth(model: GatedExperts | PrefixMoERegression, truth: Params, n: int, n_starts: int = 1,
               replicates: int | None = None, generator: torch.Generator | None = None) -> Params:
    """Near-truth starts (reference protocol of arXiv 2305.03288's public code):

    each fitted expert copies the atom ``covering_assignment`` gives it, plus Gaussian
    noise with sd 0.005 n^-0.083 on gate blocks and 0.05 n^-0.083 on expert blocks; a
    variance gets + |N(0, (0.005 n^-0.25)^2)|. An atom split over m fitted experts has its
    gate intercept lowered by log m so that its total mass is unchanged (gatelab's choice;
    the protocol leaves it open). ``truth`` is unbatched, for k* experts of the same family.
    Hierarchical gates keep the truth's groups (outer blocks copied); within each group the
    fitted inner experts cover the group's true experts as above, so the inner level may be
    over-specified. Returns blocks of shape (n_starts, [replicates,] k, ...).
    """
    hierarchical = isinstance(getattr(model, "gate", None), HierarchicalGate)
    lead = (n_starts,) if replicates is None else (n_starts, replicates)
    gate_names = set(model.gate_blocks())
    starts = []
    for _ in range(math.prod(lead)):
        plan = (_hierarchical_plan(model, truth, generator) if isinstance(model, GatedExperts)
                and hierarchical else _flat_plan(model, truth, generator))
        start = {}
        for name, value in truth.items():
            if value.dim() == 0:  # no expert axis (a noise variance): copied as it is
                start[name] = value.clone()
                continue
            sd = (0.005 if name in gate_names else 0.05) * n ** -0.083
            block = plan.pick(name, value)
            if name == "var":
                noise = (0.005 * n ** -0.25) * torch.randn(block.shape, generator=generator,
                                                           dtype=block.dtype).abs()
            else:
                noise = sd * torch.randn(block.shape, generator=generator, dtype=block.dtype)
            start[name] = block + noise
        start[plan.intercept] = start[plan.intercept] - plan.log_split
        starts.append(model.normalise(start))
    return {k: torch.stack([s[k] for s in starts]).reshape(*lead, *starts[0][k].shape)
            for k in starts[0]}


class _Plan:
    """Which true row each fitted row copies, per block; ``log_split`` (log of how many
    fitted experts share each one's atom) is taken off the ``intercept`` block."""

    def __init__(self, rows: dict, default: Tensor, intercept: str, log_split: Tensor) -> None:
        self.rows, self.default = rows, default
        self.intercept, self.log_split = intercept, log_split

    def pick(self, name: str, value: Tensor) -> Tensor:
        rows = self.rows.get(name, self.default)
        if rows is None:
            return value.clone()
        if rows.dim() == 2:  # (G, J): per group, along the inner axis
            return value.gather(1, rows.view(*rows.shape, *[1] * (value.dim() - 2)).expand(
                *rows.shape, *value.shape[2:]))
        return value[rows]


def _flat_plan(model: GatedExperts | PrefixMoERegression, truth: Params,
               generator: torch.Generator | None) -> _Plan:
    k_star = truth["beta0"].shape[-1]
    atoms = covering_assignment(model.n_experts, k_star, generator)
    counts = torch.bincount(atoms, minlength=k_star)[atoms]
    return _Plan({}, atoms, "beta0", counts.log().to(truth["beta0"].dtype))


def _hierarchical_plan(model: GatedExperts, truth: Params,
                       generator: torch.Generator | None) -> _Plan:
    gate = model.gate
    assert isinstance(gate, HierarchicalGate)
    groups, j_star = truth["inner.beta0"].shape
    if groups != gate.n_groups or gate.n_inner < j_star:
        raise ValueError(f"near_truth keeps a hierarchical truth's groups and covers each "
                         f"group's experts: fit n_groups={groups} and n_inner >= {j_star}; got "
                         f"n_groups={gate.n_groups}, n_inner={gate.n_inner}.")
    inner = torch.stack([covering_assignment(gate.n_inner, j_star, generator)
                         for _ in range(groups)])                                # (G, J)
    flat = (torch.arange(groups).unsqueeze(-1) * j_star + inner).flatten()      # (G * J,)
    rows: dict[str, Tensor | None] = {name: None for name in model.gate_blocks()
                                      if name.startswith("outer.")}
    rows |= {name: inner for name in model.gate_blocks() if name.startswith("inner.")}
    counts = torch.stack([torch.bincount(r, minlength=j_star)[r] for r in inner])
    return _Plan(rows, flat, "inner.beta0", counts.log().to(truth["inner.beta0"].dtype))


def near_truth_known(model, truth: Params, n: int, n_starts: int = 1,
                     generator: torch.Generator | None = None) -> Params:
    """Near-truth starts for a ``DeviatedGaussianMoE`` or ``ContaminatedMoE``: the trainable
    experts as in ``near_truth`` (with the mixing blocks treated as gate blocks, noise sd
    0.005 n^-0.083), and lam kept inside (0.01, 0.99) so that no start sits on the
    boundary where EM cannot move it. Returns blocks of shape (n_starts, ...)."""
    from .em import trainable_part
    part = trainable_part(model)
    part_truth = {k: v for k, v in truth.items() if k in part.param_shapes()}
    if "beta0" not in part_truth:  # the contaminated prompt: one expert, no intercept
        part_truth["beta0"] = torch.zeros(1, dtype=truth["var"].dtype)
    starts = near_truth(part, part_truth, n, n_starts, generator=generator)
    # the contaminated prompt's fixed intercept is not a block of the model
    starts = {k: v for k, v in starts.items() if k in model.param_shapes()}
    sd = 0.005 * n ** -0.083
    for name in model.mixing_blocks():
        value = truth[name].expand(n_starts, *truth[name].shape)
        noise = sd * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        starts[name] = value + noise
    if "lam" in starts:
        starts["lam"] = starts["lam"].clamp(0.01, 0.99)
    return starts


def near_truth_starts(model, truth: Params, n: int, n_starts: int = 1,
                      generator: torch.Generator | None = None) -> Params:
    """The reference protocol's near-truth starts for any model: the model class names its
    scheme in ``NEAR_TRUTH`` (``near_truth_known`` for models with a known part), else
    ``near_truth`` from the truth in the fitted model's terms. Blocks (n_starts, ...)."""
    scheme = next((NEAR_TRUTH[c] for c in type(model).__mro__ if c in NEAR_TRUTH), None)
    if scheme is not None:
        return scheme(model, truth, n, n_starts, generator=generator)
    return near_truth(model, _in_fitted_terms(truth, model), n, n_starts, generator=generator)


def _in_fitted_terms(truth: Params, model: GatedExperts) -> Params:
    """The truth's blocks in the fitted model's terms. A fitted gate of another family (e.g.
    softmax fitted to a Laplace truth) has no true gate blocks: it starts flat at the
    truth's experts, with the truth's intercepts (masses) kept."""
    gate_shapes = model.gate_blocks()
    if all(name in truth for name in gate_shapes):
        return truth
    k_star = truth["beta0"].shape[-1]
    flat = {name: torch.zeros(k_star, *shape[1:], dtype=truth["beta0"].dtype)
            for name, shape in gate_shapes.items() if name != "beta0"}
    experts = {k: v for k, v in truth.items() if k not in flat and k in model.param_shapes()}
    return {**experts, **flat}


def near_truth_prefix(model: PrefixMoERegression, truth: Params, n: int, n_starts: int = 1,
                      generator: torch.Generator | None = None) -> Params:
    """Near-truth starts for a ``PrefixMoERegression``: ``near_truth`` from the truth in
    the fitted model's terms (a shared truth's keys and values for a no-share fit), the
    prefix scores' blocks (beta1, beta0) perturbed as gate blocks, p and a as expert blocks."""
    return near_truth(model, model.in_own_terms(truth), n, n_starts, generator=generator)


#: Start schemes by model class (their subclasses included); others use ``near_truth``.
NEAR_TRUTH = {DeviatedGaussianMoE: near_truth_known, ContaminatedMoE: near_truth_known,
              PrefixMoERegression: near_truth_prefix}


def from_responsibilities(model: GaussianMoE, x: Tensor, y: Tensor, resp: Tensor,
                          gate_init: Params | None = None,
                          generator: torch.Generator | None = None,
                          engine: str = "auto") -> Params:
    """Parameters from one M-step on given responsibilities (N, E) or (..., N, E), e.g.
    one-hot cluster labels; the gate starts flat (or at ``gate_init``) and takes one
    Newton step. Returns blocks with the leading shape of ``resp``. ``engine`` as in
    ``fit_em`` ("auto": in C for the softmax gate with linear experts, where available)."""
    x, y = check_inputs(x, model.dim, y)
    lead = resp.shape[:-2]
    # Experts that are not linear in their parameters take Newton steps from random values.
    base = model.random_params(generator, lead, x.dtype)
    for name in model.gate_blocks():
        base[name] = torch.zeros_like(base[name]) if gate_init is None else gate_init[name]
    xb, yb, params, _ = broadcast_problem(model, x, y, base)
    resp_b = resp.to(xb.dtype).expand(*lead, *resp.shape[-2:]).reshape(xb.shape[0], *resp.shape[-2:])
    with using_threads(threads_for(resp_b.numel())):
        floor = 1e-8 * yb.var(-1)
        new = make_kernel(model, xb, yb, floor, 1, engine).m_step(resp_b, params)
    return {k: v.reshape(*lead, *v.shape[1:]) for k, v in new.items()}


def random_starts(model: GaussianMoE, x: Tensor, y: Tensor, n_starts: int = 1,
                  generator: torch.Generator | None = None) -> Params:
    """Data-driven random starts: random soft responsibilities (softmax of N(0, 3^2)
    logits per sample) followed by one M-step from a flat gate. Gate location blocks
    ``W`` (Laplace, Gaussian gates, at either level of a hierarchical gate) start at
    randomly chosen data points, and the gate's ``random_start_blocks`` (where a flat gate
    cannot move: cosine and top-K slopes) at N(0, 1 / Var(x_d)) draws.
    x (..., N, D), y (..., N); returns blocks of shape (n_starts, ..., k, ...)."""
    x, y = check_inputs(x, model.dim, y)
    check_int("n_starts", n_starts, 1)
    lead = (n_starts, *x.shape[:-2])
    drawn = set(model.gate.random_start_blocks())
    gate = {}
    for name, shape in model.gate_blocks().items():
        if name.rsplit(".", 1)[-1] == "W":
            gate[name] = _data_points(x, lead, shape[:-1], generator)
        elif name in drawn:
            noise = torch.randn((*lead, *shape), generator=generator, dtype=x.dtype)
            gate[name] = noise / x.std(-2).clamp_min(1e-12).view(*x.shape[:-2], *[1] * (len(shape) - 1), -1)
        else:
            gate[name] = torch.zeros((*lead, *shape), dtype=x.dtype)
    logits = 3.0 * torch.randn((*lead, x.shape[-2], model.n_experts), generator=generator,
                               dtype=x.dtype)
    return from_responsibilities(model, x, y, torch.softmax(logits, -1), gate, generator)


def _data_points(x: Tensor, lead: tuple[int, ...], count: tuple[int, ...],
                 generator: torch.Generator | None) -> Tensor:
    """Randomly chosen rows of x (..., N, D): (*lead, *count, D)."""
    m = math.prod(count)
    rows = torch.randint(x.shape[-2], (*lead, m), generator=generator)
    xs = x.expand(*lead, *x.shape[-2:])
    picked = xs.gather(-2, rows.unsqueeze(-1).expand(*rows.shape, x.shape[-1]))
    return picked.reshape(*lead, *count, x.shape[-1])
