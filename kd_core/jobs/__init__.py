"""Background distillation jobs: an SQLite job store, one worker process per running job, and the
manager the dashboard calls (submit, list, cancel, resume, and a scheduler tick)."""
from .manager import JobManager
from .spec import JobSpec
from .store import STATES, JobStore

__all__ = ["JobManager", "JobSpec", "JobStore", "STATES"]
