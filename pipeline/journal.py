"""Resume after a kill: the job journal.

A job's identity is its resolved configuration (`job_key`): rerunning the same command gives the same
key. While a job runs it holds the lock `outputs/jobs/<key>.lock` (the kernel drops it when the process
dies, SIGKILL included) and its entry `outputs/jobs/<key>.json` names its MLflow run and run folder.
The entry is removed when the job ends normally (finished, or failed with an error); it stays when the
job is killed (SIGKILL, SIGTERM, Ctrl-C). The next job with the same key that gets the lock finds the
entry and continues that job: same run folder (`state.json` says which stages are done), same MLflow
run, and training continues from its last checkpoint (pipeline/checkpoint.py).

A second identical job started while the first still runs does not get the lock: it runs on its own,
as a new job, and does not touch the first one's entry.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from data.files import atomic_write, try_lock

log = logging.getLogger(__name__)


def job_key(cfg: DictConfig) -> str:
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()[:20]


class Journal:
    def __init__(self, outputs: Path, key: str):
        self.entry = Path(outputs) / "jobs" / f"{key}.json"
        self._lock = None

    def claim(self) -> bool:
        """Takes this key's lock; False when an identical job is running right now."""
        self._lock = try_lock(self.entry.with_suffix(".lock"))
        if self._lock is None:
            log.info("An identical job (same configuration) is running now: this one runs on its own, without resuming")
        return self._lock is not None

    def interrupted(self) -> Optional[dict]:
        """The entry of an interrupted job with this key whose run folder still exists, else None."""
        if self._lock is None or not self.entry.exists():
            return None
        try:
            entry = json.loads(self.entry.read_text())
            run_dir = Path(entry["run_dir"])
            str(entry["run_id"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("Ignoring the unreadable job entry %s (%s)", self.entry, err)
            return None
        if not (run_dir / "state.json").is_file():
            log.warning("The interrupted job's run folder %s is gone: starting afresh", run_dir)
            return None
        return entry

    def record(self, run_id: str, run_dir: Path) -> None:
        if self._lock is not None:
            atomic_write(self.entry, json.dumps({"run_id": run_id, "run_dir": str(run_dir)}) + "\n")

    def close(self, finished: bool) -> None:
        """Releases the lock; `finished` removes the entry (nothing left to resume)."""
        if self._lock is None:
            return
        if finished:
            self.entry.unlink(missing_ok=True)
        self._lock.release()
        self._lock = None
