"""medprune's search sweeper, where Hydra looks for plugins (a sweeper's class must live in the `hydra_plugins`
namespace package): `hydra/sweeper=search` (conf/hydra/sweeper/search.yaml). The search itself is
pipeline/search.py; this module only names it, and imports nothing of medprune until a search starts, since Hydra
imports every plugin module at start-up."""
from __future__ import annotations

from typing import Any, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class SearchSweeper(Sweeper):
    """Optuna multi-objective search over a pruning recipe: validation Dice up, latency or FLOPs down."""

    def __init__(self, sampler: Any, cost: str, n_trials: int, n_jobs: int, study_name: str, storage: str,
                 reference: Optional[DictConfig] = None, params: Optional[DictConfig] = None) -> None:
        from pipeline.search import Search

        self.search = Search(sampler, cost, n_trials, n_jobs, study_name, storage, reference, params)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> None:
        return self.search.sweep(arguments)
