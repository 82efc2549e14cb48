"""Latency you can trust on a shared machine: the interleaved timing pass and its stability rule (against
a fake clock), the evaluate stage's unsettled flags, and the thread count of training."""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from helpers import TINY, mlflow_runs, run_pipeline
from mlflow.tracking import MlflowClient

from pipeline.tracking import Tracker
from pipeline.measure import profiling
from pipeline.measure.profiling import round_order, time_interleaved


class FakeClock:
    """A clock that only moves when a scripted callable runs: each call advances it by its next duration."""

    def __init__(self):
        self.now = 0.0
        self.calls: list[str] = []

    def __call__(self) -> float:
        return self.now

    def fn(self, name: str, durations_ms):
        """A callable taking the scripted durations (ms) in turn, the last one repeated forever."""
        durations = list(durations_ms)
        steps = itertools.chain(durations, itertools.repeat(durations[-1]))

        def call():
            self.calls.append(name)
            self.now += next(steps) / 1e3

        return call


RULE = dict(warmup=0, runs=5, max_runs=50, target_cv=0.1, max_seconds=1e9)


def test_a_steady_callable_settles_after_one_window():
    clock = FakeClock()
    result = time_interleaved({"steady": clock.fn("steady", [10.0])}, clock=clock, **RULE)
    t = result.timings["steady"]
    assert (t.runs, t.settled, result.stopped_by) == (5, True, "settled")
    assert t.median_ms == pytest.approx(10.0) and t.cv == pytest.approx(0.0)


def test_a_noisy_callable_that_calms_down_settles_later_on_its_calm_window():
    clock = FakeClock()
    noisy = [10.0, 40.0] * 4 + [20.0]  # 8 noisy runs, then steady at 20 ms
    result = time_interleaved({"calming": clock.fn("calming", noisy), "steady": clock.fn("steady", [10.0])},
                              clock=clock, **RULE)
    calming, steady = result.timings["calming"], result.timings["steady"]
    assert calming.runs == 8 + 5 and calming.settled and calming.median_ms == pytest.approx(20.0)
    # the pass waits for the slowest to settle; the steady one goes on being timed alongside and stays settled
    assert steady.runs == 13 and steady.settled and result.rounds == 13


def test_one_that_never_calms_is_reported_unsettled_at_max_runs():
    clock = FakeClock()
    result = time_interleaved({"noisy": clock.fn("noisy", [10.0, 40.0] * 100), "steady": clock.fn("steady", [10.0])},
                              clock=clock, **{**RULE, "max_runs": 20})
    noisy = result.timings["noisy"]
    assert (noisy.runs, noisy.settled, result.stopped_by) == (20, False, "max_runs")
    assert noisy.cv > 0.5 and result.unsettled() == ["noisy"]
    assert result.timings["steady"].settled


def test_the_time_budget_stops_the_pass_but_keeps_three_runs_each():
    clock = FakeClock()
    fns = {"a": clock.fn("a", [1000.0, 3000.0]), "b": clock.fn("b", [1000.0])}  # 2-4 s per round
    result = time_interleaved(fns, clock=clock, **{**RULE, "max_seconds": 2.5})
    assert result.stopped_by == "max_seconds" and result.rounds == 3  # 6 s after round 2, but 3 runs each first
    assert result.timings["b"].runs == 3
    assert not result.timings["b"].settled  # steady, but its window of 5 never filled: no trusted figure
    assert result.seconds == pytest.approx(10.0)


def test_warm_up_rounds_are_untimed_and_every_round_calls_every_callable_once():
    clock = FakeClock()
    fns = {"a": clock.fn("a", [500.0, 10.0]), "b": clock.fn("b", [500.0, 20.0])}  # the slow first call: warm-up
    result = time_interleaved(fns, clock=clock, **{**RULE, "warmup": 1})
    assert result.timings["a"].median_ms == pytest.approx(10.0) and result.timings["b"].median_ms == pytest.approx(20.0)
    assert result.timings["a"].settled and result.timings["b"].settled
    rounds = [clock.calls[i:i + 2] for i in range(0, len(clock.calls), 2)]
    assert all(sorted(r) == ["a", "b"] for r in rounds) and len(rounds) == 1 + 5
    assert result.load_before is None or result.load_before >= 0  # the machine's load is recorded too


def test_no_callable_always_follows_the_same_other():
    names = ["a", "b", "c"]
    orders = [round_order(names, r) for r in range(12)]
    assert all(sorted(o) == names for o in orders)
    calls = [n for o in orders for n in o]
    predecessors = {n: {p for p, q in zip(calls, calls[1:]) if q == n} for n in names}
    assert all(len(p - {n}) == 2 for n, p in predecessors.items())  # each follows both others at some point
    assert len({tuple(o) for o in orders}) == 6  # every order of three is used
    assert {tuple(round_order(["a", "b"], r)) for r in range(4)} == {("a", "b"), ("b", "a")}


def test_a_window_shorter_than_two_runs_is_refused():
    with pytest.raises(ValueError, match="window"):
        time_interleaved({"a": lambda: None}, **{**RULE, "runs": 1})


def test_forward_call_runs_the_model_on_a_fixed_input():
    model = torch.nn.Conv2d(3, 2, 3).to(memory_format=torch.channels_last)
    call = profiling.forward_call(model, (1, 3, 8, 8), channels_last=True)
    assert torch.equal(call(), call()) and call().shape == (1, 2, 6, 6)


# -- training threads ------------------------------------------------------------------------------


def test_fit_trains_with_the_configured_thread_count_on_cpu_and_restores_it(monkeypatch):
    from torch.utils.data import TensorDataset

    from helpers import compose_config
    from models.unet import UNet
    from pipeline import training

    seen = []
    real_split_metrics = training.split_metrics

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_split_metrics(*args, **kwargs)

    monkeypatch.setattr(training, "split_metrics", spy)
    cfg = compose_config("train.epochs=1", "train.batch_size=4", "train.threads=2")
    data = TensorDataset(torch.randn(4, 3, 16, 16), (torch.rand(4, 1, 16, 16) > 0.5).float())
    before = torch.get_num_threads()
    training.fit(UNet(3, 1, width=4, depth=2), data, data, cfg.train, training.Recipe.from_config(cfg),
                 torch.device("cpu"), seed=0)
    assert seen and set(seen) == {2}
    assert torch.get_num_threads() == before


# -- the evaluate stage ----------------------------------------------------------------------------


@pytest.mark.integration
def test_unsettled_latency_is_logged_tagged_and_starred_and_a_shared_network_is_timed_once(tmp_path: Path, monkeypatch):
    """target_cv=0 cannot be met by a real clock: every form is unsettled. finetune.epochs=0 makes the final
    network the pruned one, which must be timed once."""
    from pipeline.measure import cost

    timed = []
    real = cost.time_interleaved

    def spy(fns, **kwargs):
        timed.append(sorted(fns))
        return real(fns, **kwargs)

    monkeypatch.setattr(cost, "time_interleaved", spy)
    out = run_pipeline(tmp_path, *TINY, "finetune.epochs=0", "evaluate.latency_target_cv=0.0",
                       "evaluate.latency_max_runs=4", "evaluate.latency_max_seconds=60", "evaluate.mask_examples=0")
    assert timed == [["baseline/latency", "baseline/latency_eager", "pruned/latency", "pruned/latency_eager"],
                     ["baseline/onnx_latency", "pruned/onnx_latency"]]  # one pass per runtime, each network once
    (run,) = mlflow_runs(tmp_path, results=False)
    params, tags = run.data.params, run.data.tags
    m = Tracker.read_results(MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}"), run.info.run_id)  # diagnostics: results.json
    for row in ("baseline", "pruned", "final"):
        for form in ("latency", "latency_eager", "onnx_latency"):
            assert m[f"{row}/{form}_settled"] == 0 and m[f"{row}/{form}_runs"] == 4 and m[f"{row}/{form}_cv"] > 0
            assert f"{row}/{form}_cv" not in run.data.metrics and f"{row}.{form}_settled" not in params
    assert m["final/latency_ms"] == m["pruned/latency_ms"] == run.data.metrics["final/latency_ms"]
    assert "evaluate/load_average_before" in m and "evaluate/load_average_after" in m
    unsettled = tags["medprune.latency_unsettled"].split(",")
    assert "baseline/latency_ms" in unsettled and "final/onnx_latency_ms" in unsettled and len(unsettled) == 9
    assert tags["medprune.train_threads"] == "1" and params["final.latency_threads"] == "1"
    assert "Latency did NOT settle" in out and "pruned/latency_ms (CV" in out
    table = out[out.index("| Network |"):]
    assert "* latency did not settle" in table
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table.splitlines()
            if line.startswith(("| baseline", "| pruned"))]
    assert rows and all(row[header.index("Latency (ms)")].endswith("*") for row in rows)
    assert not any(row[header.index("Dice")].endswith("*") for row in rows)  # only timed cells are starred


@pytest.mark.parametrize("override, key", [
    ("evaluate.latency_runs=1", "evaluate.latency_runs"),
    ("evaluate.latency_max_runs=10", "evaluate.latency_max_runs"),  # below the window of 30
    ("evaluate.latency_target_cv=-0.1", "evaluate.latency_target_cv"),
    ("evaluate.latency_max_seconds=0", "evaluate.latency_max_seconds"),
    ("train.threads=0", "train.threads"),
    ("evaluate.threads=0", "evaluate.threads"),
])
def test_timing_and_thread_settings_out_of_range_are_refused_naming_the_key(override, key):
    from helpers import compose_config
    from pipeline.config import ConfigError, validate

    with pytest.raises(ConfigError, match=key):
        validate(compose_config(override))


def test_null_threads_mean_all_cores_and_pass_validation():
    from helpers import compose_config
    from pipeline.config import validate

    cfg = compose_config("train.threads=null", "evaluate.threads=null")
    validate(cfg)
    assert cfg.finetune.threads is None and profiling.thread_count(None) >= 1
