"""Convergence-rate studies: specifications, the built-in catalogue, the runner, the
results store and the rates."""

from .rates import Rate, rate, rate_table, verdict
from .runner import RunStats, StaleResults, plan, reproduce, run_unit, seed_for, setting_hash
from .spec import Setting, SpecError, Study, TruthSpec, load_study
from .store import FitRow, Store, records, results

__all__ = ["Rate", "rate", "rate_table", "verdict", "RunStats", "plan", "reproduce", "run_unit",
           "seed_for", "setting_hash", "StaleResults", "Setting", "SpecError", "Study", "TruthSpec",
           "load_study", "FitRow",
           "Store", "records", "results"]
