"""A picture of one fitted model: the data, each expert's mean line, the predictive
interval, and the gate weights, against the first covariate."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .models import GatedExperts
from .params import Params

__all__ = ["plot_fit"]


def plot_fit(path: str | Path, model: GatedExperts, params: Params, x: Tensor, y: Tensor,
             x_name: str = "x", y_name: str = "y", level: float = 0.95) -> Path:
    """Write a PNG with two panels sharing the first covariate's axis: the data with each
    expert's mean, the mixture mean and its ``level`` predictive interval (top), and the
    gate weights (bottom). With several covariates the curves hold the others at their
    means (the title says so) and the points are the data as they are."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .fit.inference import predict
    x = torch.as_tensor(x, dtype=torch.float64)
    grid = torch.linspace(float(x[:, 0].min()), float(x[:, 0].max()), 400, dtype=torch.float64)
    xg = x.mean(0).expand(400, x.shape[1]).clone()
    xg[:, 0] = grid
    pred = predict(model, params, xg, level)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.4]})
    top.scatter(x[:, 0], y, s=4, color="0.6", alpha=0.5, label="data")
    top.fill_between(grid, pred.low, pred.high, color="C0", alpha=0.12,
                     label=f"{level:.0%} predictive interval")
    for i in range(pred.expert_means.shape[1]):
        top.plot(grid, pred.expert_means[:, i], "--", color=f"C{i + 1}", lw=1.2, label=f"expert {i}")
        bottom.plot(grid, pred.weights[:, i], color=f"C{i + 1}", label=f"expert {i}")
    top.plot(grid, pred.mean, color="C0", lw=2, label="mixture mean")
    top.set_ylabel(y_name)
    top.legend(fontsize=7, ncol=2)
    bottom.set_ylabel("gate weight")
    bottom.set_xlabel(x_name)
    bottom.set_ylim(-0.02, 1.02)
    held = " (other covariates at their means)" if x.shape[1] > 1 else ""
    top.set_title(f"{type(model).__name__}, {model.n_experts} experts, gate "
                  f"{type(model.gate).__name__}{held}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
