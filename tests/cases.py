"""Registries of test problems, parametrised with readable ids."""

from __future__ import annotations

import pytest
import torch

import gatelab as gl

GATE_CASES = {
    "softmax": lambda: gl.make_gate("softmax"),
    "topk2": lambda: gl.make_gate("topk", top_k=2),
    "sigmoid": lambda: gl.make_gate("sigmoid"),
    "sigmoid-top1": lambda: gl.make_gate("sigmoid", top_k=1),
    "cosine": lambda: gl.make_gate("cosine"),
    "perturbed_cosine": lambda: gl.make_gate("perturbed_cosine", tau1=0.3, tau2=0.7),
    "quadratic": lambda: gl.make_gate("quadratic"),
    "quadratic_monomial": lambda: gl.make_gate("quadratic_monomial"),
    "laplace": lambda: gl.make_gate("laplace"),
    "laplace-top2": lambda: gl.make_gate("laplace", top_k=2),
    "gaussian": lambda: gl.make_gate("gaussian"),
    "input_free": lambda: gl.make_gate("input_free"),
    "hier-SL": lambda: gl.HierarchicalGate(outer=gl.make_gate("softmax"),
                                           inner=gl.make_gate("laplace"), n_groups=2, n_inner=2),
    "hier-LS-top1inner": lambda: gl.HierarchicalGate(
        outer=gl.make_gate("laplace"), inner=gl.make_gate("softmax", top_k=1),
        n_groups=2, n_inner=2),
}
N_EXPERTS = 4  # every gate case routes over 4 experts (hierarchical: 2 groups x 2)

EXPERT_CASES = {
    "linear": lambda: gl.make_expert("linear"),
    "poly3": lambda: gl.make_expert("polynomial", degree=3),
    "ffn-relu": lambda: gl.make_expert("ffn", activation="relu"),
    "ffn-gelu": lambda: gl.make_expert("ffn", activation="gelu"),
    "ffn-tanh": lambda: gl.make_expert("ffn", activation="tanh"),
    "ffn-sigmoid": lambda: gl.make_expert("ffn", activation="sigmoid"),
    "constant": lambda: gl.make_expert("constant"),
}

DENSITY_GATES = [k for k in GATE_CASES if not k.startswith("sigmoid")]

# Variants that deep layers use; tested at the gate level only (the statistical fits
# run over GATE_CASES).
LAYER_GATE_CASES = {
    **GATE_CASES,
    "cosine-x-only": lambda: gl.make_gate("cosine", unit_beta=False),
    "cosine-beta-only": lambda: gl.make_gate("cosine", unit_x=False, tau1=0.2),
    "cosine-centred": lambda: gl.make_gate("cosine", center=True),
    "quadratic-rank2": lambda: gl.make_gate("quadratic", rank=2),
    "quadratic-monomial-rank1": lambda: gl.make_gate("quadratic_monomial", rank=1),
    "laplace-expanded": lambda: gl.make_gate("laplace", expanded=True),
    "gaussian-expanded": lambda: gl.make_gate("gaussian", expanded=True),
}


def gate_params(gate: gl.Gate, dim: int, seed: int = 0, batch_shape=()) -> dict:
    g = torch.Generator().manual_seed(seed)
    return gate.random_params(N_EXPERTS, dim, g, batch_shape)


def cases(registry: dict, keys=None):
    keys = list(registry) if keys is None else keys
    return pytest.mark.parametrize("case", keys, ids=keys)


def _g0(dim: int):
    """A known density for deviated/contaminated models: a fixed 2-expert Gaussian MoE."""
    base = gl.GaussianMoE(2, dim)
    return base.freeze(base.random_params(torch.Generator().manual_seed(99)))


def _gmoe(gate_case, expert="linear", dim=2):
    return lambda: gl.GaussianMoE(N_EXPERTS, dim, GATE_CASES[gate_case](), expert,
                                  covariates=gl.GaussianCovariates(dim=dim))


MODEL_CASES = {
    **{f"gmoe-{g}": _gmoe(g) for g in DENSITY_GATES},
    "gmoe-softmax-ffn": _gmoe("softmax", gl.make_expert("ffn", activation="gelu")),
    "gmoe-laplace-poly2": _gmoe("laplace", gl.make_expert("polynomial", degree=2)),
    "gmoe-1d-uniform": lambda: gl.GaussianMoE(3, 1),
    "gmoe-grid": lambda: gl.GaussianMoE(2, 1, covariates=gl.Grid(dim=1, low=-1, high=1)),
    "hier-SL": lambda: gl.HierarchicalGaussianMoE(2, 3, dim=2, outer="softmax", inner="laplace"),
    "hier-LL": lambda: gl.HierarchicalGaussianMoE(3, 2, dim=1, outer="laplace", inner="laplace"),
    "reg-sigmoid-relu": lambda: gl.MoERegression(3, 2, "sigmoid", gl.make_expert("ffn")),
    "reg-softmax-linear": lambda: gl.MoERegression(3, 2, "softmax", "linear"),
    "reg-cosine-poly": lambda: gl.MoERegression(2, 2, "perturbed_cosine",
                                                gl.make_expert("polynomial", degree=2)),
    "deviated": lambda: gl.DeviatedGaussianMoE(_g0(2), 2, dim=2),
    "contaminated-input_free": lambda: gl.ContaminatedMoE(_g0(2), dim=2, expert="linear"),
    "contaminated-softmax-ffn": lambda: gl.ContaminatedMoE(
        _g0(2), dim=2, expert=gl.make_expert("ffn", activation="tanh"), gate="softmax"),
}


def model_and_params(case: str, seed: int = 0, batch_shape=()):
    model = MODEL_CASES[case]()
    return model, model.random_params(torch.Generator().manual_seed(seed), batch_shape)


#: A small softmax study (two settings, tiny grid) for tests of studies and claims.
TINY = """
name = "tiny"
paper = "2305.03288"
description = "a small softmax study for tests"
seed = 7
replicates = 3
quick_replicates = 2
sizes = [300, 600, 1200]
quick_sizes = [300, 600]

[truth]
n_experts = 2
dim = 1
covariates = { kind = "uniform", low = 0.0, high = 1.0 }

[truth.params]
beta1 = [[25.0], [0.0]]
beta0 = [-8.0, 0.0]
a = [[-20.0], [20.0]]
b = [15.0, -5.0]
var = [0.09, 0.16]

[[settings]]
name = "exact"
fitted_k = 2
loss = "D1"
theory = -0.5

[[settings]]
name = "over"
fitted_k = 3
loss = "D2-softmax"
n_starts = 2
"""


def run_small_study(name: str, db, **changes):
    """A catalogue study with some keys replaced (e.g. a smaller quick grid), run quick
    into the store at ``db``: (the study, its rows)."""
    from gatelab.studies import Store, Study, catalogue, reproduce
    spec = {**catalogue.get(name).to_dict(), **changes}
    if "settings" in changes and "claims" not in changes:  # the claims on the kept settings
        kept = {s["name"] for s in changes["settings"]}
        spec["claims"] = [c for c in spec.get("claims", [])
                          if c["setting"] in kept and c.get("minus") in kept | {None}]
    small = Study.from_dict(spec)
    with Store(db) as store:
        reproduce(small, store, quick=True, progress=False)
        return small, store.rows(small.name)


def assert_rows_score_their_estimates(study, rows) -> None:
    """Each stored loss is the Voronoi loss of the stored estimate against the setting's
    truth at the row's n, recomputed here from the public API (the rows agree with
    themselves)."""
    from gatelab.losses import voronoi_loss
    settings = {s.name: s for s in study.settings}
    for r in rows:
        setting = settings[r.setting]
        estimate = {k: torch.tensor(v, dtype=torch.float64) for k, v in r.params.items()}
        loss = voronoi_loss(estimate, study.truth_params(setting, r.n), setting.loss, strict=False,
                            model=study.fitted_model(setting), truth_model=study.truth_model(setting),
                            blocks=list(setting.loss_blocks) or None)
        assert float(loss.total) == pytest.approx(r.loss, rel=1e-9), (r.setting, r.n, r.replicate)
        for block, err in loss.blocks.items():
            assert float(err) == pytest.approx(r.blocks[block], rel=1e-9, abs=1e-12), block


def sigmoid_regression_data(n: int = 400, seed: int = 0, noise_sd: float = 0.2):
    """x (n, 1) uniform on [-3, 3] and y from a two-expert sigmoid-gated MoE regression
    (gates 2x + 0.5 and -x, experts x and 1 - 2x) plus N(0, noise_sd^2) noise."""
    f64 = torch.float64
    model = gl.MoERegression(2, 1, "sigmoid")
    truth = {"beta1": torch.tensor([[2.0], [-1.0]], dtype=f64),
             "beta0": torch.tensor([0.5, 0.0], dtype=f64),
             "a": torch.tensor([[1.0], [-2.0]], dtype=f64), "b": torch.tensor([0.0, 1.0], dtype=f64),
             "nu": torch.tensor(noise_sd ** 2, dtype=f64)}
    g = torch.Generator().manual_seed(seed)
    x = 6 * torch.rand(n, 1, generator=g, dtype=f64) - 3
    return x, model.predict(x, truth) + noise_sd * torch.randn(n, generator=g, dtype=f64)
