"""gatelab.nn: sparse mixture-of-experts layers whose routers use the shared gate
catalogue, auxiliary losses, Hugging Face interoperability and expert parallelism."""

from .experts import DenseMLP, FusedExperts, grouped_linear
from .hf import HFRouter, from_hf, load_swapped, swap_router
from .layer import MoELayer, MoEOutput, dispatch
from .losses import cv_squared, entropy_loss, importance_loss, load_balancing_loss, load_loss, z_loss
from .parallel import ExpertParallelMoE
from .routers import ExpertChoiceRouter, Router, Routing

__all__ = [
    "DenseMLP", "FusedExperts", "grouped_linear", "HFRouter", "from_hf", "load_swapped",
    "swap_router", "MoELayer", "MoEOutput", "dispatch", "ExpertParallelMoE",
    "cv_squared", "entropy_loss", "importance_loss", "load_balancing_loss", "load_loss",
    "z_loss", "ExpertChoiceRouter", "Router", "Routing",
]
