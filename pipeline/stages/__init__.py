"""The stages, in order. Each is one module with one entry function `run(ctx, state) -> state`."""
from __future__ import annotations

from typing import Callable

from pipeline.stages import evaluate, finetune, prune, quantize, score, sensitivity, sparsify, train
from pipeline.state import Context, RunState

StageFn = Callable[[Context, RunState], RunState]

STAGES: dict[str, StageFn] = {
    "train": train.run,
    "sparsify": sparsify.run,
    "sensitivity": sensitivity.run,
    "score": score.run,
    "prune": prune.run,
    "finetune": finetune.run,
    "quantize": quantize.run,
    "evaluate": evaluate.run,
}
