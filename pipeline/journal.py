"""Resume after a kill: the journal of jobs and of sweeps.

A job's identity is its resolved configuration (`job_key`): rerunning the same command gives the same
key. While a job runs it holds the lock `outputs/jobs/<key>.lock` (the kernel drops it when the process
dies, SIGKILL included) and its entry `outputs/jobs/<key>.json` names its MLflow run and run folder.
The entry is removed when the job ends normally (finished, or failed with an error); it stays when the
job is killed (SIGKILL, SIGTERM, Ctrl-C). The next job with the same key that gets the lock finds the
entry and continues that job: same run folder (`state.json` says which stages are done), same MLflow
run, and training continues from its last checkpoint (pipeline/checkpoint.py).

A multirun (sweep) is journalled the same way under `outputs/sweeps/` by its own key (`sweep_key`: the
command's overrides, the sweeper's parameters and the composed config): the entry names its parent MLflow
run, so the same command after a kill continues that sweep (pipeline/sweep.py): the same parent run, the
jobs that finished skipped (each job run is tagged with its job key), the killed job resumed by its own entry.

A second identical job (or sweep) started while the first still runs does not get the lock: it runs on its
own, as a new one, and does not touch the first one's entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from data.files import atomic_write, try_lock

log = logging.getLogger(__name__)

JOB_KEY_TAG = "medprune.job_key"  # on every job's MLflow run: a resumed sweep skips the keys that finished


def _digest(value: Any, length: int = 20) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:length]


def job_key(cfg: DictConfig) -> str:
    return _digest(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))


def sweep_key(config: DictConfig) -> str:
    """A multirun's identity: the overrides typed, the sweeper's parameters and the composed config (Hydra's own
    settings, such as the timestamped sweep folder, left out), so the same command gives the same key."""
    composed = {k: OmegaConf.to_container(config[k], resolve=True, enum_to_str=True) if OmegaConf.is_config(config[k])
                else config[k] for k in config if k != "hydra"}
    params = config.hydra.sweeper.get("params")
    sweeper = OmegaConf.to_container(params, resolve=True) if isinstance(params, DictConfig) else params
    return _digest({"task": list(config.hydra.overrides.task), "sweeper": sweeper, "config": composed})


class Journal:
    """The entry and lock of one key under `outputs/<kind>/` (kind: "jobs" or "sweeps")."""

    def __init__(self, outputs: Path, key: str, kind: str = "jobs"):
        self.entry = Path(outputs) / kind / f"{key}.json"
        self._lock = None

    def claim(self) -> bool:
        """Takes this key's lock; False when an identical job is running right now."""
        self._lock = try_lock(self.entry.with_suffix(".lock"))
        if self._lock is None:
            log.info("An identical %s (same configuration) is running now: this one runs on its own, without resuming",
                     "sweep" if self.entry.parent.name == "sweeps" else "job")
        return self._lock is not None

    def read(self) -> Optional[dict]:
        """The entry left by an interrupted job or sweep with this key, when this process holds the lock."""
        if self._lock is None or not self.entry.exists():
            return None
        try:
            entry = json.loads(self.entry.read_text())
            if not isinstance(entry, dict) or not isinstance(entry.get("run_id"), str):
                raise ValueError("expected an object naming run_id")
        except (OSError, ValueError) as err:
            log.warning("Ignoring the unreadable journal entry %s (%s)", self.entry, err)
            return None
        return entry

    def interrupted(self) -> Optional[dict]:
        """The entry of an interrupted job with this key whose run folder still exists, else None."""
        entry = self.read()
        if entry is None:
            return None
        run_dir = Path(str(entry.get("run_dir", "")))
        if not str(entry.get("run_dir", "")) or not (run_dir / "state.json").is_file():
            log.warning("The interrupted job's run folder %s is gone: starting afresh", run_dir)
            return None
        return entry

    def write(self, entry: Mapping[str, Any]) -> None:
        if self._lock is not None:
            atomic_write(self.entry, json.dumps(dict(entry)) + "\n")

    def record(self, run_id: str, run_dir: Path) -> None:
        self.write({"run_id": run_id, "run_dir": str(run_dir)})

    def close(self, finished: bool) -> None:
        """Releases the lock; `finished` removes the entry (nothing left to resume)."""
        if self._lock is None:
            return
        if finished:
            self.entry.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
