"""Study specifications: a true model, covariates, fitted settings, the n grid, replicates,
losses and a seed, as frozen dataclasses loadable from TOML (or a dict).

Validation errors name the offending key, e.g. ``settings[1].fitted_k: must be an int >= 1,
got 0``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..covariates import make_covariates
from ..experts import make_expert
from ..gates import make_gate
from ..losses import TABLES
from ..models import (
    ContaminatedMoE,
    DensityModel,
    DeviatedGaussianMoE,
    FrozenDensity,
    GaussianMoE,
    MoERegression,
    PrefixMoERegression,
)
from ..models.prefix import SHARINGS
from ..params import Params, pick

__all__ = ["SpecError", "TruthSpec", "Setting", "ClaimSpec", "CLAIM_RULES", "DEFAULT_MAX_WIDTH",
           "Study", "load_study", "schema"]


class SpecError(ValueError):
    """A study specification that does not validate; the message names the key."""


def _key(doc: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    """A spec field with its meaning (``gatelab schema`` and the README show it)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _from_dict(cls, data: Any, path: str):
    """Build a spec dataclass from a mapping, checking unknown and missing keys."""
    if not isinstance(data, Mapping):
        raise SpecError(f"{path or 'study'}: must be a table of keys, got {type(data).__name__}.")
    fields = _fields(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        valid = sorted(k for k in fields if not k.startswith("_"))
        raise SpecError(f"{path or 'study'}: unknown key(s) {unknown}; valid keys: {valid}.")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise SpecError(f"{path or 'study'}: missing key(s) {missing}.")
    return cls(**{k: data[k] for k in data}, _path=path) if "_path" in fields else cls(**data)


def _built(path: str, build_part, *args: Any, **options: Any) -> Any:
    """``build_part(*args, **options)``, its ValueError/TypeError a SpecError at ``path``."""
    try:
        return build_part(*args, **options)
    except (ValueError, TypeError) as err:
        raise SpecError(f"{path}: {err}") from None


def _need(cond: bool, path: str, what: str, got: Any) -> None:
    if not cond:
        raise SpecError(f"{path}: must be {what}, got {got!r}.")


def _is_int(v: Any, low: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


_MODELS = {"gaussian_moe": GaussianMoE, "regression": MoERegression}
# Models with a known (frozen) component, given by the truth's ``known`` table.
_KNOWN_MODELS = ("deviated", "contaminated", "prefix")
# Truths fitted by least squares.
_REGRESSION_KINDS = ("regression", "prefix")


@dataclass(frozen=True)
class TruthSpec:
    """The true model: a Gaussian MoE (``model_kind = "gaussian_moe"``), an MoE regression
    (``"regression"``, with a noise variance ``nu``), a deviated Gaussian MoE
    (``"deviated"``: blocks lam, beta0, a, b, var) or a contaminated MoE
    (``"contaminated"``: one prompt expert, ``gate`` "input_free" (block lam) or "softmax"
    (beta1, beta0)), given by gate, expert, covariates and parameters. The last two mix in
    a known density, ``known``: a table {n_experts, params, gate, expert, expert_options}
    describing a Gaussian MoE that is frozen at those parameters. A prefix-MoE regression
    (``"prefix"``, ``gatelab.models.PrefixMoERegression``, arXiv 2410.02200) has
    ``n_experts`` prefixes, ``gate`` its prefix parameterisation ("shared" or "no_share";
    a setting's ``gate`` picks the fitted one) and ``known`` the pre-trained head and the
    shared map {A, c, a, b, reparam, W1, c1, W2, c2 (mlp) or W (linear)}."""

    n_experts: int = _key("number of true experts k*")
    params: Mapping[str, Any] = _key("the true parameter blocks by name (e.g. beta1, beta0, "
                                     "a, b, var), nested lists of numbers")
    model_kind: str = _key("gaussian_moe, regression, deviated, contaminated or prefix",
                           "gaussian_moe")
    dim: int = _key("number of covariates d", 1)
    gate: str = _key("the true gate, a name from `gatelab gates`", "softmax")
    gate_options: Mapping[str, Any] = _key("options of the gate (e.g. top_k, tau1)", factory=dict)
    expert: str = _key("linear, polynomial, ffn or constant", "linear")
    expert_options: Mapping[str, Any] = _key("options of the expert (degree, activation)",
                                             factory=dict)
    covariates: Mapping[str, Any] = _key("the covariate law: {kind = uniform or grid, low, "
                                         "high} or {kind = gaussian, mean, std}",
                                         factory=lambda: {"kind": "uniform"})
    known: Mapping[str, Any] = _key("deviated/contaminated truths: the frozen Gaussian MoE "
                                    "{n_experts, params, gate, expert, expert_options}; "
                                    "prefix truths: the pre-trained head and shared map",
                                    factory=dict)
    _path: str = "truth"

    def __post_init__(self) -> None:
        kinds = sorted([*_MODELS, *_KNOWN_MODELS])
        _need(self.model_kind in kinds, f"{self._path}.model_kind", f"one of {kinds}",
              self.model_kind)
        _need((self.model_kind in _KNOWN_MODELS) == bool(self.known), f"{self._path}.known",
              "a table for deviated/contaminated/prefix truths and absent otherwise",
              dict(self.known))
        _need(_is_int(self.n_experts), f"{self._path}.n_experts", "an int >= 1", self.n_experts)
        _need(_is_int(self.dim), f"{self._path}.dim", "an int >= 1", self.dim)
        # Each part on its own first, so that an error names the key it comes from.
        if self.model_kind == "prefix":
            _need(self.gate in SHARINGS, f"{self._path}.gate", f"a prefix parameterisation, one "
                  f"of {SHARINGS}", self.gate)
        else:
            _built(f"{self._path}.gate_options", make_gate, self.gate, **dict(self.gate_options))
        _built(f"{self._path}.expert_options", make_expert, self.expert, **dict(self.expert_options))
        _built(f"{self._path}.covariates", self._covariates)
        try:
            model = self.model()
            raw, shapes = self.tensors(), model.param_shapes()
            # Extra blocks are allowed (settings may switch the truth's gate, e.g. softmax
            # or Laplace levels of a hierarchical gate); Study checks that each is used.
            model.check_params(raw if set(shapes) - set(raw) else pick(raw, shapes))
        except (ValueError, TypeError) as err:
            raise SpecError(f"{self._path}: {err}") from None

    def _covariates(self):
        cov = dict(self.covariates)
        return make_covariates(cov.pop("kind", "uniform"), dim=self.dim, **cov)

    def model(self, n_experts: int | None = None, gate: str | None = None,
              gate_options: Mapping[str, Any] | None = None,
              known: Mapping[str, Any] | None = None) -> DensityModel:
        """The true model, or the same family with another number of experts / gate /
        known density (``known`` overrides entries of the truth's ``known`` table)."""
        if self.model_kind == "deviated":
            return DeviatedGaussianMoE(self.known_density(known), n_experts or self.n_experts,
                                       self.dim, self._covariates())
        if self.model_kind == "prefix":
            return PrefixMoERegression(n_experts or self.n_experts, self.dim,
                                       {**self.known, **dict(known or {})}, gate or self.gate,
                                       self._covariates())
        if self.model_kind == "contaminated":
            return ContaminatedMoE(self.known_density(known), self.dim,
                                   make_expert(self.expert, **dict(self.expert_options)),
                                   gate or self.gate, self._covariates())
        options = gate_options if gate_options is not None else self.gate_options
        return _MODELS[self.model_kind](n_experts or self.n_experts, self.dim,
                                        make_gate(gate or self.gate, **dict(options)),
                                        make_expert(self.expert, **dict(self.expert_options)),
                                        self._covariates())

    def known_density(self, override: Mapping[str, Any] | None = None) -> FrozenDensity:
        """The known component: a Gaussian MoE frozen at the ``known`` table's params."""
        spec = {**self.known, **dict(override or {})}
        unknown = sorted(set(spec) - {"n_experts", "params", "gate", "expert", "expert_options"})
        if unknown or "params" not in spec:
            raise ValueError(f"known: needs params (and optionally n_experts, gate, expert, "
                             f"expert_options); unknown keys {unknown}.")
        params = {k: torch.tensor(v, dtype=torch.float64) for k, v in spec["params"].items()}
        base = GaussianMoE(spec.get("n_experts", 1), self.dim, make_gate(spec.get("gate", "softmax")),
                           make_expert(spec.get("expert", "linear"),
                                       **dict(spec.get("expert_options", {}))),
                           self._covariates())
        return base.freeze(base.normalise(params))

    def tensors(self) -> Params:
        """The true parameters as float64 tensors, in identifiable form."""
        raw = {k: torch.tensor(v, dtype=torch.float64) for k, v in self.params.items()}
        # Mismatched block names are returned as given, so that check_params (run in
        # __post_init__) names the missing and unexpected blocks.
        return self.model().normalise(raw) if set(raw) == set(self.model().param_shapes()) else raw


#: Start schemes of a setting (``fit.init.near_truth_starts``).
START_SCHEMES = ("near_truth", "near_truth_fixed")

#: The readings of a study (issue 14): the authors' protocol, or fits certified by a
#: gradient bound (``gatelab.fit.polish``).
READINGS = ("protocol", "certified")
READING_KEYS = ("reading", "grad_bound", "polish_steps")

@dataclass(frozen=True)
class Setting:
    """One fitted configuration of a study: its own number of experts, gate, starts, loss,
    and the theoretical slope of the loss (and optionally of each block) against n, where
    the paper claims one.
    ``loss_blocks`` restricts the Voronoi atoms to some blocks, e.g. the experts' (a, b,
    var) when the fitted gate differs from the true one. ``truth_gate`` makes this
    setting's data come from the truth with another gate (same parameter values), e.g. a
    plain vs a perturbed cosine router; the fitted gate defaults to it. ``known``
    overrides the truth's known density for this setting (deviated / contaminated
    studies: distinguishable or not). ``truth_params`` replaces blocks of ``truth.params``
    for this setting's truth, where its gate needs other values under the same block
    name (e.g. the intercepts of a Laplace level, which place its boundaries differently
    from a softmax level's). ``wasserstein``: orders r of the generalized Wasserstein
    distance to record beside the Voronoi loss, as blocks "W1", "W2", ...."""

    name: str = _key("unique name of the setting (rows are keyed by it)")
    fitted_k: int = _key("number of fitted experts k")
    loss: str = _key(f"the Voronoi loss: one of {', '.join(sorted(TABLES))}", "D1")
    theory: float | None = _key("the paper's slope of the loss against n (for the verdict)", None)
    theory_blocks: Mapping[str, float] = _key("slopes per block, {block = slope}; each key a "
                                              "block of the setting's rows", factory=dict)
    gate: str | None = _key("the fitted gate (default: truth_gate, else the truth's)", None)
    gate_options: Mapping[str, Any] = _key("options of the fitted gate", factory=dict)
    start: str | None = _key("the starts: near_truth (the protocol's, noise shrinking as "
                             "n^-0.083) or near_truth_fixed (the same noise at every n); "
                             "default near_truth, near_truth_fixed for a certified reading",
                             None)
    n_starts: int = _key("starts per fit; the best log-likelihood is kept", 1)
    loss_blocks: tuple[str, ...] = _key("restrict the loss's atoms to these blocks", ())
    truth_gate: str | None = _key("this setting's data come from the truth with this gate", None)
    truth_gate_options: Mapping[str, Any] = _key("options of truth_gate", factory=dict)
    truth_params: Mapping[str, Any] = _key("blocks that replace truth.params for this setting",
                                           factory=dict)
    known: Mapping[str, Any] = _key("overrides entries of truth.known for this setting",
                                    factory=dict)
    wasserstein: tuple[int, ...] = _key("orders r of Wasserstein distances to record (blocks "
                                        "W1, W2, ...)", ())
    density: bool = _key("also record the Hellinger distance between the fitted and true "
                         "conditional densities (block 'hellinger', ``losses.hellinger``)", False)
    truth_path: Mapping[str, Any] = _key("blocks of the truth that move with n: {block = {toward "
                                         "= value, exponent = e, n0 = n0}}, block(n) = toward + "
                                         "(block - toward) (n / n0)^-e", factory=dict)
    _path: str = "settings"

    def __post_init__(self) -> None:
        p = self._path
        _need(isinstance(self.name, str) and bool(self.name), f"{p}.name", "a non-empty string",
              self.name)
        _need(_is_int(self.fitted_k), f"{p}.fitted_k", "an int >= 1", self.fitted_k)
        _need(self.loss in TABLES, f"{p}.loss", f"one of {sorted(TABLES)}", self.loss)
        _need(self.start in (None, *START_SCHEMES), f"{p}.start",
              " or ".join(map(repr, START_SCHEMES)), self.start)
        _need(_is_int(self.n_starts), f"{p}.n_starts", "an int >= 1", self.n_starts)
        _need(self.theory is None or isinstance(self.theory, (int, float)), f"{p}.theory",
              "a number (a slope) or absent", self.theory)
        _need(isinstance(self.loss_blocks, (list, tuple)) and all(isinstance(b, str) for b in
              self.loss_blocks), f"{p}.loss_blocks", "a list of block names", self.loss_blocks)
        _need(isinstance(self.wasserstein, (list, tuple)) and all(_is_int(r) for r in
              self.wasserstein), f"{p}.wasserstein", "a list of orders (ints >= 1)",
              self.wasserstein)
        _need(isinstance(self.density, bool), f"{p}.density", "true or false", self.density)
        _need(isinstance(self.truth_params, Mapping), f"{p}.truth_params",
              "a table of parameter blocks", self.truth_params)
        _need(isinstance(self.truth_path, Mapping), f"{p}.truth_path",
              "a table {block = {toward, exponent, n0}}", self.truth_path)
        for block, path in self.truth_path.items():
            q = f"{p}.truth_path.{block}"
            _need(isinstance(path, Mapping) and set(path) <= {"toward", "exponent", "n0"}
                  and {"toward", "exponent"} <= set(path), q,
                  "a table with toward, exponent and optionally n0", path)
            _need(isinstance(path["exponent"], (int, float)) and path["exponent"] > 0,
                  f"{q}.exponent", "a number > 0 (the rate at which the block reaches toward)",
                  path["exponent"])
            _need(_is_int(path.get("n0", 1000)), f"{q}.n0", "an int >= 1", path.get("n0"))


#: How a claim's number decides it (``ClaimSpec.rule``): x is the slope (or the
#: difference of two settings' slopes), [lo, hi] its 95% bootstrap interval.
#: The widest 95% CI of a slope that can decide a ci_covers or within claim (+-0.15).
DEFAULT_MAX_WIDTH = 0.3

CLAIM_RULES = {
    "ci_covers": "the 95% CI contains value",
    "within": "|x - value| <= margin",
    "ci_below": "the whole 95% CI lies below value",
    "ci_above": "the whole 95% CI lies above value",
}


@dataclass(frozen=True)
class ClaimSpec:
    """One claim of the paper, as a rule over a measured slope: the slope of the
    setting's loss (or one block's error) against n, or with ``minus`` the difference
    slope(setting) - slope(minus), decided by ``rule`` (``CLAIM_RULES``). Written before
    the runs it judges, and not changed after seeing them."""

    text: str = _key("the claim in words")
    setting: str = _key("the setting whose slope is measured")
    rule: str = _key(f"how the number decides the claim: one of {', '.join(CLAIM_RULES)}")
    value: float = _key("the number the rule compares with (e.g. the theory slope)", 0.0)
    margin: float | None = _key("the margin of rule 'within'", None)
    block: str = _key("'total' (the loss) or a block of the setting's rows", "total")
    statistic: str = _key("the slope of log(mean), log(median) or log(10% trimmed mean) loss over "
                          "replicates: 'mean', 'median' or 'trimmed'", "mean")
    minus: str | None = _key("another setting: measure slope(setting) - slope(minus)", None)
    minus_block: str | None = _key("the block of minus's rows (default: block), e.g. a Laplace "
                                   "gate's W against a softmax gate's beta1", None)
    max_width: float = _key("the widest CI that decides a within claim, or a ci_covers claim "
                            "whose CI contains value; a wider one is 'inconclusive' (a ci_covers "
                            "CI excluding value is NO; ci_above / ci_below: a CI containing value "
                            "is inconclusive)",
                            DEFAULT_MAX_WIDTH)
    arxiv: str = _key("arXiv id of the paper that makes the claim (default: the study's)", "")
    drift: bool = _key("with 6 or more sizes, the claim is 'pre-asymptotic' where the slope over "
                       "the larger half of the sizes differs from the smaller half's by 0.1 or more "
                       "(and the 95% CI of the difference excludes 0): the slope is still moving",
                       True)
    _path: str = "claims"

    def __post_init__(self) -> None:
        p = self._path
        _need(isinstance(self.text, str) and bool(self.text), f"{p}.text", "a non-empty string",
              self.text)
        _need(self.rule in CLAIM_RULES, f"{p}.rule", f"one of {sorted(CLAIM_RULES)}", self.rule)
        _need(isinstance(self.value, (int, float)), f"{p}.value", "a number", self.value)
        _need(self.rule != "within" or isinstance(self.margin, (int, float)), f"{p}.margin",
              "a number for rule 'within'", self.margin)
        _need(self.statistic in ("mean", "median", "trimmed"), f"{p}.statistic",
              "'mean', 'median' or 'trimmed'", self.statistic)
        _need(isinstance(self.max_width, (int, float)) and self.max_width > 0, f"{p}.max_width",
              "a positive number", self.max_width)
        _need(isinstance(self.drift, bool), f"{p}.drift", "true or false", self.drift)
        _need(self.minus_block is None or self.minus is not None, f"{p}.minus_block",
              "set only with minus", self.minus_block)

    @property
    def other_block(self) -> str:
        """The block measured on ``minus``: ``minus_block``, else ``block``."""
        return self.minus_block or self.block


@dataclass(frozen=True)
class Study:
    """A convergence-rate study: every (setting, n, replicate) is one fit."""

    name: str = _key("the study's name (rows and reports are filed under it)")
    truth: TruthSpec = _key("the true model: the [truth] table")
    settings: tuple[Setting, ...] = _key("the fitted configurations: [[settings]] tables")
    sizes: tuple[int, ...] = _key("sample sizes n: a list, or {start, stop, num} log-spaced")
    replicates: int = _key("replicates per (setting, n)", 40)
    quick_sizes: tuple[int, ...] = _key("sizes of --quick runs (default: sizes)", ())
    quick_replicates: int = _key("replicates of --quick runs (at most replicates)", 10)
    seed: int = _key("the study's seed; each fit's seed derives from it", 0)
    paper: str = _key("arXiv id of the paper", "")
    description: str = _key("one line on the study", "")
    notes: str = _key("free text shown in the report", "")
    estimator: Mapping[str, Any] = _key("{method, tol, max_iter, accelerate, gate_ridge, "
                                        "temperatures, reading, grad_bound, polish_steps}; "
                                        "method em (default), lsq (regression truths), "
                                        "segments (top-K, one covariate) or continuation "
                                        "(top-K, any d; temperatures, its schedule); "
                                        "reading protocol (default) "
                                        "or certified: EM, then Newton on every parameter "
                                        "until the per-sample gradient norm is <= grad_bound "
                                        "(1e-6), at most polish_steps (100) steps (lsq: "
                                        "Levenberg-Marquardt until the gradient of the mean "
                                        "squared residual is <= grad_bound)",
                                        factory=lambda: {"tol": 1e-6, "max_iter": 2000,
                                                         "accelerate": True})
    claims: tuple[ClaimSpec, ...] = _key("the paper's claims, each a rule over a measured "
                                         "slope: [[claims]] tables", ())

    def __post_init__(self) -> None:
        _need(isinstance(self.name, str) and bool(self.name), "name", "a non-empty string",
              self.name)
        _need(len(self.settings) > 0, "settings", "a non-empty list", self.settings)
        names = [s.name for s in self.settings]
        _need(len(set(names)) == len(names), "settings", "uniquely named", names)
        for key, sizes in (("sizes", self.sizes), ("quick_sizes", self.quick_sizes)):
            _need(all(_is_int(n, 2) for n in sizes), key, "a list of ints >= 2", sizes)
        _need(len(self.sizes) >= 2, "sizes", "at least two sample sizes (a slope)", self.sizes)
        _need(_is_int(self.replicates), "replicates", "an int >= 1", self.replicates)
        _need(_is_int(self.quick_replicates), "quick_replicates", "an int >= 1",
              self.quick_replicates)
        unknown = sorted(set(self.estimator) - {"method", "tol", "max_iter", "accelerate",
                                                "gate_ridge", "temperatures", *READING_KEYS})
        _need(not unknown, "estimator", "a table of method, tol, max_iter, accelerate, "
              "gate_ridge, temperatures, reading, grad_bound, polish_steps", unknown)
        method = self.estimator.get("method", "em")
        if "temperatures" in self.estimator:
            self._check_temperatures(method, self.estimator["temperatures"])
        _need(method in ("em", "lsq", "segments", "continuation"), "estimator.method",
              "'em', 'lsq', 'segments' (top-K gates, one covariate) or 'continuation' (top-K "
              "gates, any number of covariates)", method)
        regression = self.truth.model_kind in _REGRESSION_KINDS
        _need(method == "lsq" or not regression, "estimator.method",
              "'lsq' for a regression truth (EM fits densities)", method)
        _need(method != "lsq" or regression, "estimator.method",
              "'em', 'segments' or 'continuation' for a density truth (least squares fits "
              "regressions)", method)
        self._check_truth_blocks_used()
        self._check_theory_blocks()
        for c in self.claims:
            for key in ("setting", "minus"):
                name = getattr(c, key)
                _need(name is None and key == "minus" or name in names, f"{c._path}.{key}",
                      f"a setting of this study ({', '.join(names)})", name)
        self._check_estimator_fits_models(method)
        self._check_reading(method)

    @property
    def reading(self) -> str:
        """"protocol" (reading (a): the estimator's own stopping rule) or "certified"
        (reading (b): polished until the gradient norm is at most ``grad_bound``)."""
        return str(self.estimator.get("reading", "protocol"))

    def loss_source(self, setting: Setting) -> str:
        """Where the setting's loss exponents come from, said plainly: this study's paper,
        another paper's table (borrowed, because this paper's own is not in the sources
        gatelab could read), or no paper's (D1, the generic exponent-2 table, gatelab's
        constructions: the table's description says which)."""
        table = TABLES[setting.loss]
        if table.paper is None:
            return f"{table.name}: {table.source} (not a paper's own table)"
        if self.borrowed_from(setting) is None:
            return f"{table.name}: this study's paper's table (arXiv {table.paper})"
        return (f"{table.name}: BORROWED from arXiv {table.paper} ({table.source}); the table of "
                f"this study's paper, arXiv {self.paper}, is not in the sources gatelab could read")

    def borrowed_from(self, setting: Setting) -> str | None:
        """The arXiv id of another paper whose exponent table the setting's loss is, else None."""
        paper = TABLES[setting.loss].paper
        return paper if paper is not None and paper != self.paper else None

    @staticmethod
    def _check_temperatures(method: str, temps: Any) -> None:
        from ..fit.topk_continuation import check_temperatures
        _need(method == "continuation", "estimator.temperatures",
              "given only with method = 'continuation'", temps)
        try:
            check_temperatures(temps)
        except ValueError as err:
            raise SpecError(f"estimator.{err}") from None

    def _check_reading(self, method: str) -> None:
        _need(self.reading in READINGS, "estimator.reading", " or ".join(map(repr, READINGS)),
              self.reading)
        if self.reading == "protocol":
            extra = sorted(set(self.estimator) & {"grad_bound", "polish_steps"})
            _need(not extra, "estimator", "grad_bound and polish_steps only with reading = "
                  "'certified'", extra)
            return
        _need(method in ("em", "lsq"), "estimator.reading", "'protocol' unless method is 'em' "
              "or 'lsq' (the certificate is a gradient of the likelihood or of the mean "
              "squared residual)", self.reading)
        bound = self.estimator.get("grad_bound", 1e-6)
        _need(isinstance(bound, (int, float)) and bound > 0, "estimator.grad_bound",
              "a positive number", bound)
        steps = self.estimator.get("polish_steps", 100)
        _need(_is_int(steps), "estimator.polish_steps", "an int >= 1", steps)
        for s in self.settings:
            gate = getattr(self.fitted_model(s), "gate", None)
            if gate is not None and not gate.differentiable(self.truth.dim):
                raise SpecError(f"{s._path}: a certified reading needs a likelihood that is "
                                f"differentiable in the gate parameters; {gate.name} in "
                                f"dim={self.truth.dim} is not (a Laplace gate in one covariate "
                                f"has a kink at every sample, a top-K gate jumps where its "
                                f"selection changes). Use reading = 'protocol' for it.")
            expert = getattr(self.fitted_model(s), "expert", None)
            if expert is not None and not expert.differentiable():
                raise SpecError(f"{s._path}: a certified reading needs a fit differentiable in "
                                f"the expert parameters; {expert!r} is not (a ReLU expert has a "
                                f"hinge at every sample, where the gradient jumps by about 1/n). "
                                f"Use reading = 'protocol', or a smooth activation such as gelu.")

    def _check_estimator_fits_models(self, method: str) -> None:
        """Each setting's model is one the study's estimator can fit (its ``check``)."""
        from ..fit.estimators import estimator
        for s in self.settings:
            try:
                estimator(method).check(self.fitted_model(s))
            except ValueError as err:
                raise SpecError(f"{s._path}: {err}") from None

    def _check_theory_blocks(self) -> None:
        """Each ``theory_blocks`` key names a block the setting's rows have: a parameter
        block of the fitted model (or of ``loss_blocks``), "mass", "W<r>", "translated"
        where the fitted gate has translation blocks (``runner.translation_blocks``), or
        "hellinger" where the setting records the density loss."""
        from .runner import translation_blocks
        for s in self.settings:
            if s.gate_options:
                _built(f"{s._path}.gate_options", make_gate, s.gate or s.truth_gate or self.truth.gate,
                       **dict(s.gate_options))
            fitted = _built(f"{s._path}.gate", self.fitted_model, s)
            blocks = set(s.loss_blocks or fitted.param_shapes()) | {"mass"}
            blocks |= {f"W{r}" for r in s.wasserstein}
            if translation_blocks(fitted, s):
                blocks.add("translated")
            if s.density:
                _need(type(fitted) is GaussianMoE and type(self.truth_model(s)) is GaussianMoE,
                      f"{s._path}.density", "set only where the truth and the fit are Gaussian "
                      "MoEs (losses.hellinger)", s.density)
                blocks.add("hellinger")
            for key in s.theory_blocks:
                _need(key in blocks, f"{s._path}.theory_blocks.{key}",
                      f"a block of this setting's rows ({sorted(blocks)})", key)

    def _check_truth_blocks_used(self) -> None:
        used: set[str] = set()
        for s in self.settings:
            try:
                model = self.truth_model(s)
            except (ValueError, TypeError) as err:
                raise SpecError(f"{s._path}.truth_gate: {err}") from None
            shapes = model.param_shapes()
            extra = sorted(set(s.truth_params) - set(shapes))
            _need(not extra, f"{s._path}.truth_params", f"blocks of this setting's truth "
                  f"({sorted(shapes)}; not {extra})", sorted(s.truth_params))
            missing = sorted(set(shapes) - set(self.truth.params) - set(s.truth_params))
            _need(not missing, f"{s._path}.truth_gate", f"a gate whose blocks truth.params "
                  f"holds (missing {missing})", s.truth_gate)
            try:   # a moving truth must be valid at both ends of both grids
                for n in {min(self.sizes), max(self.sizes), *self.quick_sizes[:1], *self.quick_sizes[-1:]}:
                    self.truth_params(s, n)
            except (ValueError, TypeError) as err:
                raise SpecError(f"{s._path}.truth_params: {err}") from None
            used |= set(shapes) - set(s.truth_params)
        unused = sorted(set(self.truth.params) - used)
        _need(not unused, "truth.params", "blocks that some setting's truth uses (unused: "
              f"{unused})", sorted(self.truth.params))

    def fitted_model(self, setting: Setting) -> DensityModel:
        """The model ``setting`` fits: the truth's family with the setting's number of
        experts, gate (default: its truth gate, else the truth's) and known density."""
        return self.truth.model(setting.fitted_k, setting.gate or setting.truth_gate,
                                setting.gate_options or setting.truth_gate_options or None,
                                setting.known or None)

    def truth_model(self, setting: Setting) -> DensityModel:
        """The model that generates ``setting``'s data."""
        return self.truth.model(gate=setting.truth_gate, known=setting.known or None,
                                gate_options=setting.truth_gate_options or None)

    def truth_params(self, setting: Setting, n: int | None = None) -> Params:
        """``setting``'s true parameters at sample size ``n`` in identifiable form: the
        truth's blocks that its model uses, with the setting's ``truth_params`` in place of
        the shared ones, and its ``truth_path`` blocks moved to n (at n = None, or a
        setting without a path, the values as written). (A setting's gate may have fewer
        blocks than the truth, e.g. a monomial quadratic gate has no beta1.)"""
        model = self.truth_model(setting)
        own = {k: torch.tensor(v, dtype=torch.float64) for k, v in setting.truth_params.items()}
        shared = self.truth.tensors()
        params = {**{k: shared[k] for k in model.param_shapes() if k not in own}, **own}
        if n is not None:
            params = {**params, **_moved(params, setting.truth_path, n)}
        model.check_params(params)
        return model.normalise(params)

    def grid(self, quick: bool = False) -> tuple[tuple[int, ...], int]:
        """(sample sizes, replicates) of the full or the quick run; the quick run never
        has more replicates than the full one."""
        if quick:
            return (self.quick_sizes or self.sizes), min(self.quick_replicates, self.replicates)
        return self.sizes, self.replicates

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Study:
        """Build and validate a study from a mapping (e.g. parsed TOML)."""
        data = dict(data)
        if "truth" not in data or "settings" not in data:
            raise SpecError("study: missing key(s) " + str([k for k in ("truth", "settings")
                                                             if k not in data]) + ".")
        data["truth"] = _from_dict(TruthSpec, data["truth"], "truth")
        if not isinstance(data["settings"], list):
            raise SpecError("settings: must be a list of tables ([[settings]] in TOML).")
        data["settings"] = tuple(_from_dict(Setting, s, f"settings[{i}]")
                                 for i, s in enumerate(data["settings"]))
        if not isinstance(data.get("claims", []), list):
            raise SpecError("claims: must be a list of tables ([[claims]] in TOML).")
        data["claims"] = tuple(_from_dict(ClaimSpec, c, f"claims[{i}]")
                               for i, c in enumerate(data.get("claims", [])))
        for key in ("sizes", "quick_sizes"):
            if key in data:
                data[key] = tuple(_sizes(data[key], key))
        return _from_dict(cls, data, "")

    def to_dict(self) -> dict:
        """A plain-data form (for the results store and reports)."""
        return plain_data(self)


def _moved(params: Params, paths: Mapping[str, Any], n: int) -> Params:
    """The blocks of ``paths`` at sample size n: toward + (value - toward) (n / n0)^-e."""
    out = {}
    for block, path in paths.items():
        if block not in params:
            raise ValueError(f"truth_path names block {block!r}, which this setting's truth does "
                             f"not have ({sorted(params)})")
        toward = torch.as_tensor(path["toward"], dtype=torch.float64)
        try:
            fits = torch.broadcast_shapes(toward.shape, params[block].shape) == params[block].shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"truth_path.{block}.toward has shape {tuple(toward.shape)}; the "
                             f"block has shape {tuple(params[block].shape)}")
        shrink = (n / path.get("n0", 1000)) ** -float(path["exponent"])
        out[block] = toward + (params[block] - toward) * shrink
    return out


def plain_data(obj: Any) -> Any:
    """A spec dataclass as nested dicts and lists (private ``_`` fields left out)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.name.startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [plain_data(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: plain_data(v) for k, v in obj.items()}
    return obj


def _sizes(value: Any, key: str) -> list[int]:
    """A list of ints, or {start, stop, num} for a log-spaced grid (rounded, de-duplicated)."""
    if isinstance(value, Mapping):
        try:
            start, stop, num = float(value["start"]), float(value["stop"]), int(value["num"])
        except (KeyError, TypeError, ValueError):
            raise SpecError(f"{key}: a grid table needs numbers start, stop and an int num; "
                            f"got {dict(value)!r}.") from None
        _need(2 <= start < stop and num >= 2, key, "start >= 2, stop > start, num >= 2", value)
        step = (math.log(stop) - math.log(start)) / (num - 1)
        return sorted({round(math.exp(math.log(start) + i * step)) for i in range(num)})
    _need(isinstance(value, list), key, "a list of ints or a {start, stop, num} table", value)
    return list(value)


def load_study(path: str | Path) -> Study:
    """Load a study from a TOML file."""
    return Study.from_dict(read_toml(path))


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML spec file as a dict; unreadable or invalid files raise SpecError."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        data = tomllib.loads(Path(path).read_text())
    except OSError as err:
        raise SpecError(f"cannot read study file {path}: {err.strerror}.") from None
    except tomllib.TOMLDecodeError as err:
        raise SpecError(f"{path} is not valid TOML: {err}.") from None
    return data


# TOML words for the annotation strings of the spec fields.
_TOML_TYPES = {"int": "integer", "str": "string", "float | None": "number (optional)",
               "str | None": "string (optional)", "Mapping[str, Any]": "table",
               "Mapping[str, float]": "table of numbers", "tuple[str, ...]": "array of strings",
               "tuple[int, ...]": "array of integers", "TruthSpec": "table",
               "tuple[Setting, ...]": "array of tables", "tuple[ClaimSpec, ...]": "array of tables",
               "float": "number"}


def schema() -> str:
    """Every key of a study file with its TOML type, default and meaning, as a Markdown
    table generated from the spec dataclasses (so it cannot drift from what is read)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for prefix, cls in (("", Study), ("truth.", TruthSpec), ("settings[].", Setting),
                        ("claims[].", ClaimSpec)):
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            if f.default is not dataclasses.MISSING:
                default = _toml_value(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = _toml_value(f.default_factory())
            else:
                default = "required"
            kind = _TOML_TYPES.get(str(f.type), str(f.type))
            lines.append(f"| `{prefix}{f.name}` | {kind} | {default} | {f.metadata['doc']} |")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, Mapping):
        if not value:
            return "`{}`"
        return "`{" + ", ".join(f"{k} = {_toml_value(v).strip('`')}" for k, v in value.items()) + "}`"
    if isinstance(value, (list, tuple)):
        return "`[" + ", ".join(_toml_value(v).strip("`") for v in value) + "]`"
    return f"`{value}`"
