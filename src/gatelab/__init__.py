"""gatelab: mixture-of-experts gating for convergence-rate studies and PyTorch layers."""

from ._runtime import collector_paused, short_openmp_waits

short_openmp_waits()  # before torch is imported: see gatelab._runtime
with collector_paused():  # a faster import of torch: see gatelab._runtime
    import torch  # noqa: F401

from .covariates import GaussianCovariates, Grid, UniformBox, make_covariates
from .experts import (ConstantExpert, Expert, FFNExpert, LinearExpert, PolynomialExpert,
                      make_expert)
from .gates import (GATES, CosineGate, Gate, GaussianGate, HierarchicalGate, InputFreeGate,
                    LaplaceGate, LinearGate, PerturbedCosineGate, QuadraticGate, make_gate,
                    top_k_mask)
from .models import (ContaminatedMoE, DeviatedGaussianMoE, FrozenDensity, GaussianMoE,
                     HierarchicalGaussianMoE, MoERegression, Sample)
from .params import Params

__version__ = "0.1.0"

__all__ = [
    "GaussianCovariates", "Grid", "UniformBox", "make_covariates",
    "ConstantExpert", "Expert", "FFNExpert", "LinearExpert", "PolynomialExpert", "make_expert",
    "GATES", "CosineGate", "Gate", "GaussianGate", "HierarchicalGate", "InputFreeGate",
    "LaplaceGate", "LinearGate", "PerturbedCosineGate", "QuadraticGate", "make_gate", "top_k_mask",
    "ContaminatedMoE", "DeviatedGaussianMoE", "FrozenDensity", "GaussianMoE",
    "HierarchicalGaussianMoE", "MoERegression", "Sample", "Params", "__version__",
]
