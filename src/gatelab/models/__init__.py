"""Statistical MoE models: sampling, densities, identifiable parameters."""

from .base import (
                   ConditionalDensity,
                   DensityModel,
                   FrozenDensity,
                   MixingMeasure,
                   Model,
                   Sample,
                   normal_cdf,
                   normal_log_prob,
                   sample_categorical,
)
from .contaminated import ContaminatedMoE, DeviatedGaussianMoE
from .moe import GatedExperts, GaussianMoE, HierarchicalGaussianMoE, MoERegression, Regression
from .prefix import PrefixMoERegression

__all__ = ["ConditionalDensity", "DensityModel", "FrozenDensity", "MixingMeasure", "Model", "Sample",
           "normal_cdf", "normal_log_prob", "sample_categorical", "ContaminatedMoE",
           "DeviatedGaussianMoE", "GatedExperts", "GaussianMoE", "HierarchicalGaussianMoE",
           "MoERegression", "PrefixMoERegression", "Regression"]
