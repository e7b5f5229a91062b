"""The fitting commands of the command line: ``fit``, ``fit-lsq``, ``predict`` and
``plot``. Kept apart from ``cli`` (the parser), and importing torch only when called.

Times reported by ``fit --json``: ``seconds``, the fit itself (random starts and EM, for
every k tried); ``seconds_read``, reading the CSV file; ``seconds_since_start``, the whole
process up to the result (imports included)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from .cli import UsageError, _gate_options, _read_csv, _seconds_since_process_start
from .fit.inference import (
    SingularInformation,
    choose_experts,
    fit_loglik,
    load_model,
    predict,
    save_model,
    standard_errors,
)
from .fit.single import aic, bic
from .fit.status import STATUS_MEANING, FitStatus
from .gates import make_gate

__all__ = ["run_fit", "run_predict", "run_plot"]


def _fitter(args: argparse.Namespace, lsq: bool):
    """fit(x, y, gate, k) -> (model, result) with the command line's options."""
    from .fit.single import fit_best_of_starts, fit_lsq_best_of_starts
    common = {"n_init": args.n_init, "tol": args.tol, "max_iter": args.max_iter, "seed": args.seed}
    if lsq:
        return lambda x, y, gate, k: fit_lsq_best_of_starts(x, y, k, gate, args.expert, **common)
    return lambda x, y, gate, k: fit_best_of_starts(x, y, k, gate, args.expert,
                                                    gate_ridge=args.gate_ridge, **common)


def _numbers_of_experts(args: argparse.Namespace, gate) -> list[int]:
    """--experts, or for a hierarchical gate n_groups * n_inner (which it must equal)."""
    if args.experts is not None:
        return args.experts
    groups = getattr(gate, "n_groups", None)
    if groups is None:
        raise UsageError("--experts K is required (the number of experts, or a range 1-5).")
    return [groups * gate.n_inner]


def run_fit(args: argparse.Namespace, lsq: bool) -> int:
    """Read the CSV, fit each k asked for, keep the --select choice, then report (and
    --se, --save, --plot). The status is information, not an error: exit code 0."""
    start = time.perf_counter()
    X, y = _read_csv(args.data, args.x, args.y)
    read = time.perf_counter() - start
    gate = make_gate(args.gate, **_gate_options(args))
    ks = _numbers_of_experts(args, gate)
    x, t = torch.from_numpy(X), torch.from_numpy(y)
    fit = _fitter(args, lsq)
    start = time.perf_counter()
    fits = {k: fit(x, t, gate, k) for k in ks}
    seconds = time.perf_counter() - start
    selection = choose_experts(fits, len(y), args.select) if len(ks) > 1 else None
    model, res = fits[selection.best if selection else ks[0]]
    result = _result(model, res, len(y), seconds, read)
    if selection is not None:
        result["selection"] = {"criterion": selection.criterion, "best": selection.best,
                               "table": selection.table}
    if args.se:
        result["standard_errors"] = _standard_errors(model, res, x, t, gate, fits, fit)
    if args.save:
        save_model(args.save, model, res.params, x=args.x, y=args.y, status=result["status"],
                   loglik=result["loglik"], n_samples=len(y))
        result["saved"] = args.save
    if args.plot:
        from .plot import plot_fit
        result["plot"] = str(plot_fit(args.plot, model, res.params, x, t, args.x[0], args.y))
    if args.json:
        print(json.dumps(result))
    else:
        _print_fit(args, lsq, model, result)
    return 0


def _result(model, res, n: int, seconds: float, read: float) -> dict:
    loglik = fit_loglik(res, n)
    status = FitStatus(int(res.status))
    out = {"status": status.name.lower(), "status_meaning": STATUS_MEANING[status],
           "n_experts": model.n_experts, "loglik": loglik, "n_iter": int(res.n_iter),
           "converged": bool(res.converged), "seconds": seconds, "seconds_read": read,
           "seconds_since_start": _seconds_since_process_start(), "n_samples": n,
           "aic": aic(loglik, model), "bic": bic(loglik, model, n),
           "params": {k: v.tolist() for k, v in res.params.items()}}
    rss = getattr(res, "rss", None)
    if rss is None:
        out["degenerate"] = bool(res.degenerate)
    else:
        out["rss"] = float(rss)
    return out


def _standard_errors(model, res, x, y, gate, fits: dict, fit) -> dict:
    """Wald table, or {"error": why}: refused for a failed fit, and where BIC prefers one
    expert fewer (a sign of an over-specified fit, where the information is singular in
    the limit and Wald intervals do not hold)."""
    k = model.n_experts
    if int(res.status) not in (FitStatus.CONVERGED, FitStatus.MAX_ITER):
        return {"error": f"no standard errors for a fit that is {FitStatus(int(res.status)).name.lower()}."}
    if k > 1 and not getattr(gate, "n_groups", None):
        fewer = fits.get(k - 1) or fit(x, y, gate, k - 1)
        choice = choose_experts({k - 1: fewer, k: (model, res)}, len(y), "bic")
        if choice.best != k:
            return {"error": f"BIC prefers {k - 1} experts to {k}: this fit looks over-specified, "
                             f"where the information is singular and Wald intervals do not hold. "
                             f"Fit --experts {k - 1}, or compare --experts 1-{k}."}
    try:
        w = standard_errors(model, x, y, res.params)
    except SingularInformation as err:
        return {"error": str(err)}
    return {"level": w.level, "rows": [{"name": n, "estimate": float(e), "se": float(s),
                                        "low": float(lo), "high": float(hi)}
                                       for n, e, s, lo, hi in zip(w.names, w.estimate, w.se,
                                                                  w.low, w.high)]}


def _print_fit(args: argparse.Namespace, lsq: bool, model, result: dict) -> None:
    what = "MoE regression (least squares)" if lsq else "Gaussian MoE"
    if "selection" in result:
        sel = result["selection"]
        print(f"{'k':>3} {'log-likelihood':>15} {'AIC':>12} {'BIC':>12}  status")
        for r in sel["table"]:
            mark = "  <- chosen" if r["k"] == sel["best"] else ""
            print(f"{r['k']:>3} {r['loglik']:>15.4f} {r['aic']:>12.3f} {r['bic']:>12.3f}  "
                  f"{r['status']}{mark}")
        print(f"{sel['criterion'].upper()} chooses {sel['best']} experts.")
    print(f"{what}, {model.n_experts} experts, gate {args.gate}, expert {args.expert}; "
          f"n = {result['n_samples']}")
    print(f"status: {result['status_meaning']}")
    fit_line = f"RSS {result['rss']:.6f}  " if "rss" in result else ""
    print(f"{fit_line}log-likelihood {result['loglik']:.6f}  iterations {result['n_iter']}  "
          f"fit {result['seconds']:.3f} s  AIC {result['aic']:.3f}  BIC {result['bic']:.3f}")
    for name, value in result["params"].items():
        print(f"  {name:<6} {np.round(np.asarray(value), 6).tolist()}")
    se = result.get("standard_errors")
    if se is not None and "error" in se:
        print(f"standard errors: {se['error']}")
    elif se is not None:
        print(f"{'parameter':<14} {'estimate':>12} {'std. error':>12}  {se['level']:.0%} Wald interval")
        for r in se["rows"]:
            print(f"{r['name']:<14} {r['estimate']:>12.6f} {r['se']:>12.6f}  "
                  f"[{r['low']:.6f}, {r['high']:.6f}]")
    for key, label in (("saved", "model saved to"), ("plot", "plot written to")):
        if key in result:
            print(f"{label} {result[key]}")


def run_predict(args: argparse.Namespace) -> int:
    """Write, per row of the CSV: its covariates, the predictive mean, the --level
    interval, each expert's mean and the gate weights."""
    import csv
    model, params, meta = load_model(args.model)
    X, _ = _read_csv(args.data, meta["x"], None)
    if not 0 < args.level < 1:
        raise UsageError(f"--level must be between 0 and 1; got {args.level}.")
    pred = predict(model, params, torch.from_numpy(X), args.level)
    e = pred.weights.shape[-1]
    header = [*meta["x"], "mean", "low", "high", *[f"expert_mean_{i}" for i in range(e)],
              *[f"weight_{i}" for i in range(e)]]
    table = torch.cat([torch.from_numpy(X), pred.mean[:, None], pred.low[:, None],
                       pred.high[:, None], pred.expert_means, pred.weights], -1).tolist()
    out = sys.stdout if args.out is None else open(args.out, "w", newline="")
    try:
        writer = csv.writer(out)
        writer.writerow(header)
        writer.writerows(table)
    finally:
        if out is not sys.stdout:
            out.close()
            print(f"{len(table)} predictions written to {args.out}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from .plot import plot_fit
    model, params, meta = load_model(args.model)
    X, y = _read_csv(args.data, meta["x"], meta["y"])
    path = plot_fit(args.out, model, params, torch.from_numpy(X), torch.from_numpy(y),
                    meta["x"][0], meta["y"])
    print(f"plot written to {path}")
    return 0
