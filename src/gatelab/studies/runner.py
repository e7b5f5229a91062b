"""Running a study: work units, seeds, batched fits, a local process pool, progress.

A work unit is one (setting, n) and a list of replicates; its replicates are sampled,
started and fitted as one batch (``fit_em`` over a (starts, replicates) batch), their
losses computed, and the rows returned to the parent, which commits them to the store in
one transaction. Seeds depend on (study seed, study, setting, n, replicate) only, so
results do not depend on worker count, order or chunking.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, NamedTuple, Protocol, TextIO

import torch

from .. import __version__
from .._threads import available_cores
from ..fit import FitResult, select_best
from ..fit.estimators import estimator
from ..fit.init import near_truth_starts
from ..fit.lsq import fit_lsq, profile_loglik, rss_gradient_norm
from ..fit.polish import DEFAULT_BOUND, gradient_norm, polish
from ..fit.status import FitStatus, fit_status, status_codes, status_names
from ..losses import hellinger, translated_loss, voronoi_loss, wasserstein
from .spec import READING_KEYS, Setting, Study
from .store import FitRow, Store

__all__ = ["seed_for", "setting_hash", "StaleResults", "Unit", "plan", "run_unit", "RunStats",
           "reproduce"]

# Largest (starts x replicates x n x experts) batch one unit fits at once (memory bound).
_MAX_BATCH_ELEMENTS = 20_000_000
# Largest (replicates x n x experts) batch of one gradient by autograd (a dozen saved tensors).
_MAX_GRADIENT_ELEMENTS = 2_000_000


class _Seeded(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def seed(self) -> int: ...


def _experiment(study: Any) -> bool:
    """Whether ``study`` is a deep-learning experiment (``gatelab.experiments``), whose
    units, hashes and rows the experiments package makes."""
    return getattr(study, "kind", "") == "experiment"


def seed_for(study: _Seeded, setting: str, n: int, replicate: int) -> int:
    """A 63-bit seed from (study seed, study name, setting, n, replicate) alone."""
    key = f"{study.seed}|{study.name}|{setting}|{n}|{replicate}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


# Bumped whenever a change to sampling, starts, fitting or losses changes the rows that an
# unchanged spec gives, so that stores recompute rather than mix old rows with new.
# 2: rows carry a fit status and the estimate; top-K segment fits balance the sides
# instead of skipping starts.
ROWS_VERSION = 2
# Spec fields that change what is reported, not any row: the grid (a row is keyed by its
# n and replicate), words, and the theory a slope is compared with.
# Claims are judged on the rows; they make none (a claim's block is computed whatever the
# claims say), so a claim added to a study keeps its stored rows.
_STUDY_PRESENTATION = ("sizes", "quick_sizes", "replicates", "quick_replicates", "paper",
                       "description", "notes", "claims")
_SETTING_PRESENTATION = ("theory", "theory_blocks")
def resolved_estimator(study: Study) -> dict:
    """The estimator options a fit runs with: the study's, over the fitter's defaults."""
    method = study.estimator.get("method", "em")
    defaults = estimator(method).options()
    # The continuation's schedule and polish are part of what a fit does (both changed once).
    options: dict[str, Any] = {name: defaults[name] for name in ("tol", "max_iter", "accelerate",
                                                                 "temperatures", "polish_steps")
                               if name in defaults}
    options.update({k: v for k, v in study.estimator.items() if k in defaults or k == "method"})
    if study.reading == "certified":
        options.update(reading="certified",
                       grad_bound=study.estimator.get("grad_bound", DEFAULT_BOUND),
                       polish_steps=study.estimator.get("polish_steps", 100))
    return {**options, "method": method}


def setting_hash(study: Study, setting: Setting) -> str:
    """A hash of everything that makes one setting's rows: the study's seed, name, truth
    and resolved estimator, the setting's fields (defaults included) and ROWS_VERSION."""
    if _experiment(study):
        from ..experiments.run import arm_hash
        return arm_hash(study, setting)  # type: ignore[arg-type]
    spec = study.to_dict()
    inputs = {k: v for k, v in spec.items() if k not in ("settings", *_STUDY_PRESENTATION)}
    inputs["estimator"] = resolved_estimator(study)
    mine = next(s for s in spec["settings"] if s["name"] == setting.name)
    inputs["setting"] = {k: v for k, v in mine.items() if k not in _SETTING_PRESENTATION}
    if not inputs["setting"].get("density"):
        # A setting that records no density makes the rows it made before the field existed.
        inputs["setting"].pop("density", None)
    inputs["setting"]["start"] = start_scheme(study, setting)   # resolved, as fits use it
    inputs["rows_version"] = ROWS_VERSION
    text = json.dumps(inputs, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StaleResults(ValueError):
    """The store holds rows of this study made from other inputs than the spec's."""


def _check_stale(study: Study, store: Store, hashes: dict[str, str], overwrite: bool) -> None:
    stale = store.stale(study.name, hashes)
    if not stale:
        return
    if overwrite:
        store.delete_stale(study.name, hashes)
        return
    what = ", ".join(f"{name} ({count} fits{'' if name in hashes else ', no longer in the spec'})"
                     for name, count in sorted(stale.items()))
    raise StaleResults(
        f"{store.path} holds fits of study {study.name!r} made from another version of its "
        f"spec, or by another version of gatelab's fitting code (settings {what}): they "
        f"would not match the spec you ran. Rerun with "
        f"--overwrite (reproduce(..., overwrite=True)) to recompute exactly those settings, "
        f"keeping the others, or pass a new --db.")


@dataclass(frozen=True)
class Unit:
    setting: str
    n: int
    replicates: tuple[int, ...]


def plan(study: Study, quick: bool = False, done: set | frozenset = frozenset()) -> list[Unit]:
    """The work units still to run: missing replicates of every (setting, n), in chunks
    small enough to fit in memory, smallest n first."""
    if _experiment(study):
        from ..experiments.run import plan_runs
        return plan_runs(study, quick, done)  # type: ignore[arg-type]
    sizes, replicates = study.grid(quick)
    units = []
    for n in sizes:
        for setting in study.settings:
            todo = [r for r in range(replicates) if (setting.name, n, r) not in done]
            per = max(1, _MAX_BATCH_ELEMENTS // (setting.n_starts * n * setting.fitted_k))
            units += [Unit(setting.name, n, tuple(todo[i:i + per])) for i in range(0, len(todo), per)]
    return units


def run_unit(study: Study, unit: Unit) -> list[FitRow]:
    """Sample, start, fit and score the replicates of one unit (one batched fit); for an
    experiment, train and evaluate one run."""
    if _experiment(study):
        from ..experiments.run import run_experiment_unit
        return run_experiment_unit(study, unit)  # type: ignore[arg-type]
    setting = next(s for s in study.settings if s.name == unit.setting)
    truth_model, truth = study.truth_model(setting), study.truth_params(setting, unit.n)
    model = study.fitted_model(setting)
    seeds = [seed_for(study, unit.setting, unit.n, r) for r in unit.replicates]
    xs, ys, starts = [], [], []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x, y = truth_model.sample(truth, unit.n, g)
        xs.append(x)
        ys.append(y)
        starts.append(near_truth_starts(model, truth, _noise_n(study, setting, unit.n),
                                        setting.n_starts, g))
    init = {k: torch.stack([s[k] for s in starts], dim=1) for k in starts[0]}   # (S, R, ...)
    start = time.perf_counter()
    x_all, y_all = torch.stack(xs), torch.stack(ys)
    res = select_best(_fit(study, model, x_all, y_all, init))
    gain = torch.full_like(res.loglik, float("nan"))
    if study.reading == "certified":
        res, grad_norm, gain = _certify(study, model, x_all, y_all, res)
    else:
        grad_norm = _stop_gradient(study, model, x_all, y_all, res)
    seconds = (time.perf_counter() - start) / len(seeds)
    # Losses compare identifiable forms (e.g. ReLU experts' scale, a cosine router's norm).
    estimate = model.normalise(res.params)
    loss, blocks = _losses(model, truth_model, setting, estimate, truth)
    # Rows whose gate separated the data or whose loss is not finite are kept and
    # counted, and left out of the slopes (``rates.left_out``).
    digest = setting_hash(study, setting)
    status = status_names(res.status)
    return [FitRow(study.name, unit.setting, unit.n, r, seed, float(loss.total[i]),
                   float(loss.mass[i]), {k: float(v[i]) for k, v in blocks.items()},
                   float(res.loglik[i]), int(res.n_iter[i]), bool(res.converged[i]),
                   bool(res.degenerate[i]), seconds, __version__, digest, status[i],
                   {k: v[i].tolist() for k, v in estimate.items()}, study.reading,
                   _number(grad_norm[i]), _number(gain[i]))
            for i, (r, seed) in enumerate(zip(unit.replicates, seeds))]


def start_scheme(study: Study, setting: Setting) -> str:
    """The setting's start scheme: its own, else near_truth_fixed for a certified reading
    and near_truth (the protocol's) otherwise."""
    return setting.start or ("near_truth_fixed" if study.reading == "certified" else "near_truth")


def _noise_n(study: Study, setting: Setting, n: int) -> int:
    """The n that sets the start noise: the sample size for the protocol's near-truth
    starts (noise shrinking as n^-0.083), 1 for near_truth_fixed (the same noise at every
    n: the protocol's at n = 1)."""
    return n if start_scheme(study, setting) == "near_truth" else 1


def _number(value: torch.Tensor) -> float | None:
    """A row's optional number: None where there is none (NaN), so rows compare equal."""
    out = float(value)
    return None if math.isnan(out) else out


def _stop_gradient(study: Study, model, x: torch.Tensor, y: torch.Tensor, res) -> torch.Tensor:
    """The protocol's fits: the gradient norm where the estimator stopped, so that a row
    says how far from stationary it is (not enforced): for maximum likelihood the
    certificate of ``fit.polish``, for least squares that of the mean squared residual
    (``fit.lsq.rss_gradient_norm``); NaN for gates whose weights are not differentiable
    (``Gate.differentiable``). Rows go in chunks, so that the Jacobians and autograd's
    saved tensors stay small beside the fit's own batch."""
    gate = getattr(model, "gate", None)
    if gate is not None and not gate.differentiable(model.dim):
        return torch.full((x.shape[0],), float("nan"), dtype=x.dtype)
    lsq = study.estimator.get("method", "em") == "lsq"
    norm = rss_gradient_norm if lsq else gradient_norm
    width = sum(math.prod(s) for s in model.param_shapes().values()) if lsq else \
        getattr(model, "n_experts", 1) + 1
    per = max(1, _MAX_GRADIENT_ELEMENTS // (x.shape[-2] * width))
    # A fit that collapsed (a variance 0 or not finite) has no gradient; its row says NaN
    # and its status says why, instead of stopping the study.
    rows = _valid_rows(model, res.params).nonzero().squeeze(-1)
    out = torch.full((x.shape[0],), float("nan"), dtype=x.dtype)
    for i in range(0, len(rows), per):
        idx = rows[i:i + per]
        out[idx] = norm(model, x[idx], y[idx], {k: v[idx] for k, v in res.params.items()})
    return out


def _valid_rows(model, params: dict) -> torch.Tensor:
    """(B,) whether each fit's blocks are finite and its positive blocks (variances) > 0."""
    ok = torch.ones(next(iter(params.values())).shape[0], dtype=torch.bool)
    for name, value in params.items():
        flat = value.reshape(value.shape[0], -1)
        ok &= torch.isfinite(flat).all(-1)
        if name in getattr(model, "positive_blocks", ()):
            ok &= (flat > 0).all(-1)
    return ok


def _certify(study: Study, model, x: torch.Tensor, y: torch.Tensor, res: FitResult):
    """Reading (b): the protocol's fit continued until its gradient norm is at most the
    study's ``grad_bound``, for at most ``polish_steps`` steps: Newton on the likelihood
    after EM (``fit.polish``), Levenberg-Marquardt stopping on the certificate
    ``rss_gradient_norm`` after least squares. Returns the continued result (status
    recomputed at the new estimate; converged means certified, max_iter that the bound
    was not reached), the gradient norms and the log-likelihood gains over the protocol's
    stop (least squares: of the profile log-likelihood)."""
    bound = float(study.estimator.get("grad_bound", DEFAULT_BOUND))
    steps = int(study.estimator.get("polish_steps", 100))
    if study.estimator.get("method", "em") == "lsq":
        more = fit_lsq(model, x, y, res.params, tol=float(study.estimator.get("tol", 1e-8)),
                       max_iter=steps, grad_bound=bound)
        params, loglik = more.params, profile_loglik(more.rss, x.shape[-2])
        grad_norm = _stop_gradient(study, model, x, y, more)
        gain = loglik - res.loglik
    else:
        params, loglik, grad_norm, gain = _polish_valid(model, x, y, res, bound, steps)
    certified = grad_norm <= bound
    stuck = status_codes(res) == FitStatus.STUCK
    status = fit_status(model, x, y, res.params, params, certified, res.degenerate, stuck)
    polished = res._replace(params=params, loglik=loglik, converged=certified, status=status)
    return polished, grad_norm, gain


def _polish_valid(model, x: torch.Tensor, y: torch.Tensor, res: FitResult, bound: float,
                  steps: int) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``fit.polish`` on the rows whose estimate is valid (``_valid_rows``): parameters,
    log-likelihoods, certificates and gains. A collapsed fit keeps its estimate and gets
    NaN for both numbers (it cannot be certified; its status says why)."""
    idx = _valid_rows(model, res.params).nonzero().squeeze(-1)
    params = {k: v.clone() for k, v in res.params.items()}
    loglik = res.loglik.clone()
    grad_norm = torch.full_like(loglik, float("nan"))
    gain = grad_norm.clone()
    if len(idx):
        done = polish(model, x[idx], y[idx], {k: v[idx] for k, v in res.params.items()}, bound, steps)
        for k in params:
            params[k][idx] = done.params[k]
        loglik[idx], grad_norm[idx], gain[idx] = done.loglik, done.grad_norm, done.gain
    return params, loglik, grad_norm, gain


def _losses(model, truth_model, setting, params: dict, truth: dict):
    """The setting's Voronoi loss and per-block errors, its mass term (block "mass"), and
    any Wasserstein baselines (blocks "W1", "W2", ...), from the models' mixing measures."""
    options = {"model": model, "truth_model": truth_model, "blocks": list(setting.loss_blocks) or None}
    # strict=False: a cell the table has no exponent for makes that fit's loss +inf
    # (counted and left out of the slopes), instead of stopping the whole study.
    loss = voronoi_loss(params, truth, setting.loss, strict=False, **options)
    blocks = {**loss.blocks, "mass": loss.mass}
    shift = translation_blocks(model, setting)
    if shift:
        blocks["translated"] = translated_loss(params, truth, setting.loss, shift_blocks=shift,
                                               strict=False, **options).total
    for order in setting.wasserstein:
        blocks[f"W{order}"] = wasserstein(params, truth, order, **options)
    if setting.density:
        blocks["hellinger"] = hellinger(model, params, truth_model, truth, _evaluation_x(truth_model))
    return loss, blocks


#: Covariates of the density loss: one fixed sample (seed 0) of the truth's covariate law.
DENSITY_POINTS = 4096


def _evaluation_x(truth_model) -> torch.Tensor:
    return truth_model.covariates.sample(DENSITY_POINTS, torch.Generator().manual_seed(0))


def translation_blocks(model, setting: Setting) -> dict[str, tuple[int, ...]]:
    """The fitted gate's blocks that a shift leaves the model unchanged under
    (``Gate.translations``, with the shapes of their shifts) and that the setting's loss
    compares: a setting with any also records block "translated", its loss minimised
    over that translation (``losses.translated_loss``)."""
    gate = getattr(model, "gate", None)
    if gate is None:
        return {}
    compared = set(setting.loss_blocks or gate.atom_blocks(model.n_experts, model.dim))
    return {b: t for b, t in gate.translations(model.n_experts, model.dim).items() if b in compared}


def _fit(study: Study, model, x: torch.Tensor, y: torch.Tensor, init: dict) -> FitResult:
    """The study's estimator (``fit.estimators``): EM (maximum likelihood), the top-K
    segment fit (maximum likelihood for top-K gates in one covariate) or least squares."""
    options = {k: v for k, v in study.estimator.items() if k not in ("method", *READING_KEYS)}
    return estimator(study.estimator.get("method", "em")).fit(model, x, y, init, **options)




class Progress:
    """Fits done, rate and ETA on one updating line (a line every 5 s when not a TTY)."""

    def __init__(self, total: int, stream: TextIO | None = None, enabled: bool = True,
                 what: str = "fits") -> None:
        self.total, self.done, self.start, self.what = total, 0, time.perf_counter(), what
        self.stream, self.enabled, self.last = stream or sys.stderr, enabled and total > 0, 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, k: int) -> None:
        self.done += k
        now = time.perf_counter()
        if not self.enabled or (now - self.last < (0.2 if self.tty else 5.0) and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        bar = "#" * int(30 * self.done / self.total)
        pace = f"{rate:.1f} {self.what}/s" if rate >= 1 else f"{1 / max(rate, 1e-9):.1f} s each"
        line = f"[{bar:<30}] {self.done}/{self.total} {self.what}  {pace}  ETA {eta:,.0f} s"
        self.stream.write(("\r" + line) if self.tty else (line + "\n"))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


class RunStats(NamedTuple):
    fits: int          # fits run now
    skipped: int       # fits already in the store
    seconds: float


def _init_worker(threads: int) -> None:
    """A pool worker's share of the cores: its fits choose their threads within it."""
    torch.set_num_threads(threads)


def pool_shape(workers: int, cores: int) -> tuple[int, int]:
    """(workers, threads per worker) with workers x threads <= cores: more workers than
    cores would only make them take turns, so they are capped at the cores."""
    workers = max(1, min(workers, cores))
    return workers, max(1, cores // workers)


BACKENDS = ("local", "ray")


def reproduce(study: Study, store: Store, quick: bool = False, workers: int = 1,
              progress: bool = True, on_rows: Callable[[list[FitRow]], None] | None = None,
              backend: str = "local", address: str | None = None,
              overwrite: bool = False) -> RunStats:
    """Run every missing fit of ``study`` and commit each unit's rows as it finishes.

    ``backend="local"``: in this process, or with ``workers`` > 1 a local process pool
    (spawned workers, at most one per core, the cores split between them). ``backend="ray"``: the same work
    units as Ray tasks, on the cluster at ``address`` (``ray.init(address=...)``) or, with
    no address, on a local Ray instance of ``workers`` CPUs. Either way only this process
    writes the store. Interrupting (Ctrl-C, SIGKILL) loses only the units in flight; a
    rerun skips every committed row. Rows made from another version of the spec (see
    ``setting_hash``) raise ``StaleResults``, or with ``overwrite`` are deleted and
    recomputed (rows of unchanged settings are kept).
    """
    if backend not in BACKENDS:
        raise ValueError(f"Unknown backend {backend!r}. Valid: {', '.join(BACKENDS)}.")
    hashes = {s.name: setting_hash(study, s) for s in study.settings}
    _check_stale(study, store, hashes, overwrite)
    store.save_study(study.name, study.to_dict())
    sizes, replicates = study.grid(quick)
    done = store.done(study.name, hashes)
    units = plan(study, quick, done)
    todo = sum(len(u.replicates) for u in units)
    skipped = len(study.settings) * len(sizes) * replicates - todo
    if units and _experiment(study):
        from ..experiments.run import prepare
        prepare(study)  # type: ignore[arg-type]
    bar = Progress(todo, enabled=progress, what="runs" if _experiment(study) else "fits")
    start = time.perf_counter()

    def commit(rows: list[FitRow]) -> None:
        store.add(rows)
        bar.update(len(rows))
        if on_rows is not None:
            on_rows(rows)

    try:
        if backend == "ray":
            _run_ray(study, units, max(workers, 1), address, commit)
        elif workers <= 1:
            for unit in units:
                commit(run_unit(study, unit))
        else:
            _run_pool(study, units, workers, commit)
    finally:
        bar.close()
    return RunStats(todo, skipped, time.perf_counter() - start)


def _run_pool(study: Study, units: list[Unit], workers: int, commit) -> None:
    workers, threads = pool_shape(workers, available_cores())
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        pending = {pool.submit(run_unit, study, u) for u in units}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    commit(fut.result())
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _run_ray_unit(study: Study, unit: Unit) -> list[FitRow]:
    """A Ray task: as many torch threads as the CPUs Ray gave it (``num_cpus``)."""
    import ray
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    return run_unit(study, unit)


def _run_ray(study: Study, units: list[Unit], cpus: int, address: str | None, commit) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install 'gatelab[ray]' (or pip install "
                         "ray), then start or point at a cluster with --address.") from None
    started = not ray.is_initialized()
    if started:
        options = {"address": address} if address else {"num_cpus": cpus}
        ray.init(include_dashboard=False, log_to_driver=False, **options)
    task = ray.remote(num_cpus=1)(_run_ray_unit)
    pending = [task.remote(study, u) for u in units]
    try:
        while pending:
            finished, pending = ray.wait(pending, num_returns=1)
            for ref in finished:
                commit(ray.get(ref))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()
