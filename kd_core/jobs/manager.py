"""Background distillation jobs for the dashboard: submit, watch, cancel, resume.

Everything lives in the job store (SQLite in the runs folder), so jobs outlast page reloads and
every browser sees the same list. Each running job is one worker process
(``python -m kd_core.jobs.worker``) in a session of its own, so a cancel can stop its whole
process group. The app calls :meth:`JobManager.recover` once at start, then :meth:`JobManager.tick`
from a timer: it reaps finished workers, marks jobs whose worker vanished as interrupted, and
starts queued jobs while fewer than ``max_concurrent`` run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..data.sources import default_cache_dir
from .spec import JobSpec, check_bank, default_name, validate_spec
from .store import JobStore

TERM_GRACE_SECONDS = 1.5      # after SIGTERM, before SIGKILL
RESUMABLE = ("interrupted", "cancelled", "failed")
FINISHED = ("completed", "failed", "cancelled")  # what the retention setting may clean up
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding kd_core/, for the workers' imports


def worker_alive(pid: int, job_id: int, runs_dir: Path) -> bool:
    """Whether ``pid`` is a live worker of job ``job_id`` of this runs folder. A zombie or a process
    that reused the pid is not (read from ``/proc`` where there is one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # another user's process: not our worker
    if not Path("/proc/self").exists():
        return True   # no /proc (macOS): trust kill(); the heartbeat is the fallback
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False  # ended meanwhile
    return (b"\0kd_core.jobs.worker\0" in command and f"\0{runs_dir}\0".encode() in command
            and f"\0--job\0{job_id}\0".encode() in command)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    return True


def job_processes(setting: str) -> int:
    """How many processes a job trains in: ``KD_JOB_PROCESSES`` is a number, or ``auto`` (every
    local GPU when there is more than one, else one process)."""
    if setting in ("", "auto"):
        import torch

        return max(1, torch.cuda.device_count())
    try:
        count = int(setting)
    except ValueError:
        count = 0
    if count < 1:
        raise ValueError(f"KD_JOB_PROCESSES must be 'auto' or a whole number >= 1, got {setting!r}")
    return count


class JobManager:
    def __init__(self, runs_dir: str | Path = "runs", checkpoints_dir: str | Path = "checkpoints",
                 max_concurrent: int = 1, *, env: Mapping[str, str] | None = None,
                 data_sources: Sequence[str] | None = None, heartbeat_timeout: float = 60.0,
                 max_active: int | None = None, max_active_per_owner: int | None = None,
                 retention_seconds: float | None = None):
        """``env``: extra environment for the workers (``KD_CACHE_DIR``, ``OMP_NUM_THREADS``...).
        ``data_sources``: when given, the only data sources a job may use (a public server should
        offer a fixed list rather than any folder on its disk). ``heartbeat_timeout``: a running
        job whose worker has not written for this long counts as gone even if its pid lives.
        ``max_active`` / ``max_active_per_owner``: queued and running jobs allowed in all and per
        owner (None: no limit). ``retention_seconds``: finished jobs older than this lose their
        checkpoint and run folder, and teacher banks unused for as long are deleted (None: kept)."""
        if max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
        self.store = JobStore(runs_dir)
        self.checkpoints_dir = Path(checkpoints_dir).resolve()
        self.max_concurrent = max_concurrent
        self.env = dict(env or {})
        job_processes({**os.environ, **self.env}.get("KD_JOB_PROCESSES", "auto"))  # a bad setting fails here
        self.data_sources = list(data_sources) if data_sources is not None else None
        self.heartbeat_timeout = heartbeat_timeout
        self.max_active, self.max_active_per_owner = max_active, max_active_per_owner
        self.retention_seconds = retention_seconds
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.RLock()   # the app's timer and request handlers run in threads

    # -- reading ----------------------------------------------------------------------------------

    def list_jobs(self) -> list[dict[str, Any]]:
        """Every job, newest first, each with its per-epoch ``metrics``."""
        metrics: dict[int, list[dict[str, Any]]] = {}
        for row in self.store.metrics():
            metrics.setdefault(row["job_id"], []).append(row)
        return [{**job, "metrics": metrics.get(job["id"], [])} for job in self.store.list_jobs()]

    def get_job(self, job_id: int) -> dict[str, Any]:
        """One job with its ``metrics`` (per epoch) and ``points`` (the loss curve)."""
        job = self._require(job_id)
        return {**job, "metrics": self.store.metrics(job_id), "points": self.store.points(job_id)}

    def _require(self, job_id: int) -> dict[str, Any]:
        job = self.store.get(job_id)
        if job is None:
            raise ValueError(f"no job {job_id}")
        return job

    # -- changing ---------------------------------------------------------------------------------

    def submit(self, spec: JobSpec | Mapping[str, Any], owner: str | None = None) -> dict[str, Any]:
        """Check ``spec`` completely, queue it, start it if a slot is free; the new job.

        Raises ``ValueError`` whose message starts with the offending field (a teacher bank beyond
        :data:`~kd_core.jobs.spec.MAX_BANK_BYTES` included; ``bank`` in the job returned says what
        it will hold). The checkpoint name
        is the spec's ``name`` (default ``<student>-<terms>``), suffixed ``-2``, ``-3``... when a
        checkpoint or another job already has it.
        """
        spec = validate_spec(spec if isinstance(spec, JobSpec) else JobSpec.from_dict(spec), self.checkpoints_dir,
                             self.data_sources)
        bank = check_bank(spec, self.checkpoints_dir, self.env.get("KD_CACHE_DIR"))
        taken = {path.stem for path in self.checkpoints_dir.glob("*.safetensors")}
        job_id = self.store.create(spec.to_dict(), spec.name or default_name(spec), taken, owner=owner,
                                   max_active=self.max_active, max_active_per_owner=self.max_active_per_owner)
        self.tick()
        return {**self.get_job(job_id), "bank": bank}

    def _require_owner(self, job_id: int, owner: str | None, action: str) -> dict[str, Any]:
        """The job, when ``owner`` may change it: it launched it, or it is the operator (``None``)."""
        job = self._require(job_id)
        if owner is not None and job.get("owner") != owner:
            raise ValueError(f"job {job_id} was launched by another session; only that session can {action} it")
        return job

    def cancel(self, job_id: int, owner: str | None = None) -> dict[str, Any]:
        """Cancel a queued, running or interrupted job; a running worker's process group gets
        SIGTERM, then SIGKILL after 1.5 s. Returns the job (finished jobs are returned unchanged).
        ``owner``: who asks (None: the operator, who may cancel any job)."""
        with self._lock:
            self._require_owner(job_id, owner, "cancel")
            if self._mark_cancelled(job_id, ("queued", "interrupted")):
                return self.get_job(job_id)
            if self.store.update(job_id, only_if=("running",), cancel_requested=1, message="cancelling"):
                job = self.store.get(job_id)
                if job["pid"] is not None and worker_alive(job["pid"], job_id, self.store.runs_dir):
                    self._stop_group(job["pgid"], job["pid"])
                self._mark_cancelled(job_id, ("running",))  # unless the worker recorded its own end
            return self.get_job(job_id)

    def _mark_cancelled(self, job_id: int, states: tuple[str, ...]) -> bool:
        return self.store.update(job_id, only_if=states, state="cancelled", finished=time.time(), message="cancelled")

    def resume(self, job_id: int, owner: str | None = None) -> dict[str, Any]:
        """Queue an interrupted, cancelled or failed job again; it continues from its last finished
        epoch (same run folder, same settings). Returns the job. ``owner`` as for :meth:`cancel`."""
        with self._lock:
            job = self._require_owner(job_id, owner, "resume")
            if not self.store.update(job_id, only_if=RESUMABLE, state="queued", cancel_requested=0, error=None,
                                     finished=None, message="queued to resume"):
                raise ValueError(f"job {job_id} is {job['state']}; only {', '.join(RESUMABLE)} jobs can be resumed")
            self.tick()
            return self.get_job(job_id)

    def tick(self) -> list[int]:
        """One scheduler step: reap finished workers, mark jobs whose worker vanished as interrupted,
        start queued jobs while fewer than ``max_concurrent`` run. Returns the ids started."""
        with self._lock:
            self._reap()
            self._sweep("the worker process ended without reporting")
            if self.retention_seconds is not None:
                self._expire(time.time() - self.retention_seconds)
            started = []
            while (job := self.store.claim_next(self.max_concurrent)) is not None:
                self._launch(job)
                started.append(job["id"])
            return started

    def _expire(self, before: float) -> None:
        """Delete what finished jobs older than ``before`` left (their checkpoint, if still theirs,
        and run folder, then the job itself) and teacher banks unused since (a bank's file time is
        its last use); nothing of a queued, running or resumable job."""
        for job in self.store.list_jobs(FINISHED):
            if job["finished"] is None or job["finished"] >= before:
                continue
            checkpoint = self.checkpoints_dir / f"{job['name']}.safetensors"
            if job["state"] == "completed" and checkpoint.is_file():
                checkpoint.unlink(missing_ok=True)
            shutil.rmtree(self.store.run_dir(job["id"]), ignore_errors=True)
            self.store.delete(job["id"], only_if=FINISHED)
        banks = Path(self.env.get("KD_CACHE_DIR") or default_cache_dir()) / "teacher-banks"
        if banks.is_dir() and not self.store.list_jobs(("running",)):  # a running job may be reading one
            for bank in banks.glob("*.safetensors"):
                if bank.stat().st_mtime < before:
                    bank.unlink(missing_ok=True)

    def recover(self) -> list[int]:
        """At server start: jobs marked running whose worker is gone become interrupted (resumable).
        Workers that outlived the previous server keep running. Returns the ids interrupted."""
        with self._lock:
            self._reap()
            return self._sweep("the worker was gone when the server started")

    # -- processes --------------------------------------------------------------------------------

    def worker_command(self, job_id: int, processes: int = 1) -> list[str]:
        """The worker's command line: one process, or ``processes`` under torchrun (one per GPU)."""
        worker = ["-m", "kd_core.jobs.worker", "--runs", str(self.store.runs_dir),
                  "--checkpoints", str(self.checkpoints_dir), "--job", str(job_id)]
        if processes <= 1:
            return [sys.executable, *worker]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                "--max-restarts=0", *worker]

    def _launch(self, job: dict[str, Any]) -> None:
        run_dir = self.store.run_dir(job["id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        command = self.worker_command(job["id"], job_processes(environment.get("KD_JOB_PROCESSES", "auto")))
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), environment.get("PYTHONPATH")]))
        try:
            with open(run_dir / "worker.log", "ab") as log:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                           env=environment, start_new_session=True)
        except OSError as error:
            self.store.update(job["id"], only_if=("running",), state="failed", finished=time.time(),
                              error=f"could not start the worker: {error}", message="failed")
            return
        self._children[process.pid] = process
        self.store.update(job["id"], only_if=("running",), pid=process.pid, pgid=process.pid)

    def _reap(self, pid: int | None = None) -> None:
        """Collect exit statuses so finished workers do not linger as zombies; ``pid``: also a child
        this manager did not start (another manager in the same process did)."""
        for child_pid, process in list(self._children.items()):
            if process.poll() is not None:
                del self._children[child_pid]
        if pid is not None and pid not in self._children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    def _stop_group(self, pgid: int, pid: int | None) -> None:
        """SIGTERM the worker's process group; SIGKILL it if it outlives the grace period."""
        for sig, wait in ((signal.SIGTERM, TERM_GRACE_SECONDS), (signal.SIGKILL, 0.4)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self._reap(pid)
                if not _group_exists(pgid):
                    return
                time.sleep(0.02)

    def _alive(self, job: dict[str, Any], now: float) -> bool:
        fresh = job["heartbeat"] is not None and now - job["heartbeat"] < self.heartbeat_timeout
        if job["pid"] is None:
            return fresh  # claimed; its worker is being started
        return fresh and worker_alive(job["pid"], job["id"], self.store.runs_dir)

    def _sweep(self, reason: str) -> list[int]:
        """Mark running jobs whose worker is gone (or silent past the heartbeat timeout) as interrupted."""
        now = time.time()
        gone = []
        for job in self.store.list_jobs(("running",)):
            if self._alive(job, now):
                continue
            if job["pid"] is not None and worker_alive(job["pid"], job["id"], self.store.runs_dir):
                self._stop_group(job["pgid"], job["pid"])   # alive but silent: hung; one writer at a time
            elif job["pid"] is not None:
                self._reap(job["pid"])
            if self.store.update(job["id"], only_if=("running",), state="interrupted", finished=now, message=reason):
                gone.append(job["id"])
        return gone
