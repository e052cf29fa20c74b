"""The job store: one SQLite file, ``<runs>/jobs.sqlite3``, shared by the web server and the
worker processes.

WAL mode lets readers (the page polling) run beside one writer (a worker reporting); every
read-modify-write runs in ``BEGIN IMMEDIATE`` so two processes never both decide from a stale
read. Each operation opens its own short-lived connection, so a store object can be used from any
thread. Times are Unix seconds.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

STATES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
BUSY_TIMEOUT_SECONDS = 15.0   # how long a connection waits for another's write lock

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,           -- the checkpoint is <checkpoints>/<name>.safetensors
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    state TEXT NOT NULL CHECK (state IN ({", ".join(f"'{state}'" for state in STATES)})),
    spec TEXT NOT NULL,                  -- JobSpec as JSON
    pid INTEGER,
    pgid INTEGER,
    progress REAL NOT NULL DEFAULT 0,    -- 0..1 over all epochs
    epoch INTEGER NOT NULL DEFAULT 0,    -- 1-based epoch in progress (0: not started)
    epochs INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,     -- 1-based step within the epoch
    steps_per_epoch INTEGER NOT NULL DEFAULT 0,
    message TEXT NOT NULL DEFAULT '',    -- what the job is doing, for people
    error TEXT,                          -- one line, when failed
    checkpoint TEXT,
    test_top1 REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    heartbeat REAL,
    owner TEXT                           -- who launched it: only they (or an operator) may cancel or resume it
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    epoch INTEGER NOT NULL,              -- 1-based
    train_loss REAL NOT NULL,
    train_top1 REAL NOT NULL,
    test_top1 REAL,                      -- NULL when the epoch was not evaluated
    seconds REAL NOT NULL,               -- the epoch's duration
    time REAL NOT NULL,                  -- when it was recorded
    PRIMARY KEY (job_id, epoch)
);
CREATE TABLE IF NOT EXISTS points (      -- the loss curve, one point per few steps
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    step INTEGER NOT NULL,               -- global step at the end of the window
    epoch REAL NOT NULL,                 -- fractional epochs done
    loss REAL NOT NULL,                  -- mean total loss over the window
    lr REAL NOT NULL,
    terms TEXT NOT NULL,                 -- JSON: mean of each loss term over the window
    PRIMARY KEY (job_id, step)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id);
"""


# what a job's life changes; the rest is fixed when it is created
_MUTABLE = {"started", "finished", "state", "pid", "pgid", "progress", "epoch", "step", "steps_per_epoch", "message",
            "error", "checkpoint", "test_top1", "cancel_requested", "heartbeat"}


def _assignments(fields: dict[str, Any]) -> str:
    unknown = set(fields) - _MUTABLE
    if unknown:
        raise ValueError(f"jobs have no changeable fields {', '.join(sorted(unknown))}")
    return ", ".join(f"{name} = ?" for name in fields)


class JobStore:
    def __init__(self, runs_dir: str | Path = "runs"):
        self.runs_dir = Path(runs_dir).resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.runs_dir / "jobs.sqlite3"
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(_SCHEMA)
            columns = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:  # a store made before jobs had owners
                connection.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")

    def run_dir(self, job_id: int) -> Path:
        """Resumable state and the worker's log of one job."""
        return self.runs_dir / str(job_id)

    # -- connections ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: no implicit transactions, each one is begun explicitly
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None)
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA synchronous=NORMAL")  # with WAL: durable except for a power cut
            connection.execute("PRAGMA foreign_keys=ON")
            yield connection
        finally:
            connection.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: the write lock is taken before the first read."""
        with self._connect() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    # -- reads ------------------------------------------------------------------------------------

    @staticmethod
    def _job(row: sqlite3.Row | None) -> dict[str, Any] | None:
        if row is None:
            return None
        job = dict(row)
        job["spec"] = json.loads(job["spec"])
        job["cancel_requested"] = bool(job["cancel_requested"])
        return job

    def get(self, job_id: int) -> dict[str, Any] | None:
        with self._connect() as connection:
            return self._job(connection.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def list_jobs(self, states: tuple[str, ...] = STATES) -> list[dict[str, Any]]:
        """Jobs in the given states, newest first."""
        marks = ", ".join("?" * len(states))
        with self._connect() as connection:
            rows = connection.execute(f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id DESC", states)
            return [self._job(row) for row in rows]

    def metrics(self, job_id: int | None = None) -> list[dict[str, Any]]:
        """Per-epoch metrics of one job, or of every job (each row has its ``job_id``)."""
        where, arguments = ("WHERE job_id = ?", (job_id,)) if job_id is not None else ("", ())
        with self._connect() as connection:
            rows = connection.execute("SELECT job_id, epoch, train_loss, train_top1, test_top1, seconds, time "
                                      f"FROM metrics {where} ORDER BY job_id, epoch", arguments)
            return [dict(row) for row in rows]

    def points(self, job_id: int, after_step: int = 0) -> list[dict[str, Any]]:
        """Loss-curve points after ``after_step`` (a page polling for new points passes its last step)."""
        with self._connect() as connection:
            rows = connection.execute("SELECT step, epoch, loss, lr, terms FROM points WHERE job_id = ? AND step > ? "
                                      "ORDER BY step", (job_id, after_step))
            return [{**dict(row), "terms": json.loads(row["terms"])} for row in rows]

    # -- writes -----------------------------------------------------------------------------------

    def create(self, spec: dict[str, Any], base_name: str, taken: Iterable[str] = (), owner: str | None = None,
               max_active: int | None = None, max_active_per_owner: int | None = None) -> int:
        """Queue a job under ``base_name``, or ``base_name-2``, ``-3``... when that name is used by
        another job or listed in ``taken`` (existing checkpoints). Refused (``ValueError``) when
        ``max_active`` jobs, or ``max_active_per_owner`` of this owner's, are already queued or
        running: counted and inserted in one transaction, so two launches cannot both slip in."""
        with self.transaction() as connection:
            active = "state IN ('queued', 'running')"
            if max_active is not None and connection.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE {active}").fetchone()[0] >= max_active:
                raise ValueError(f"the server already has {max_active} jobs queued or running; "
                                 "launch again when one has finished")
            if max_active_per_owner is not None and connection.execute(
                    f"SELECT COUNT(*) FROM jobs WHERE {active} AND owner IS ?", (owner,)).fetchone()[0] \
                    >= max_active_per_owner:
                raise ValueError(f"you already have {max_active_per_owner} jobs queued or running; "
                                 "wait for one to finish or cancel one")
            used = {row[0] for row in connection.execute("SELECT name FROM jobs WHERE name = ? OR name LIKE ?",
                                                         (base_name, base_name + "-%"))}
            used |= set(taken)
            name, number = base_name, 1
            while name in used:
                number += 1
                name = f"{base_name}-{number}"
            cursor = connection.execute(
                "INSERT INTO jobs (name, created, state, spec, epochs, message, owner) "
                "VALUES (?, ?, 'queued', ?, ?, 'queued', ?)",
                (name, time.time(), json.dumps(spec), spec["epochs"], owner))
            return cursor.lastrowid

    def delete(self, job_id: int, only_if: tuple[str, ...]) -> bool:
        """Remove a job with its metrics and loss curve if it is in one of the states ``only_if``."""
        marks = ", ".join("?" * len(only_if))
        with self.transaction() as connection:
            return connection.execute(f"DELETE FROM jobs WHERE id = ? AND state IN ({marks})",
                                      (job_id, *only_if)).rowcount == 1

    def update(self, job_id: int, only_if: tuple[str, ...] = STATES, **fields: Any) -> bool:
        """Set ``fields`` if the job is in one of the states ``only_if``; returns whether it was."""
        marks = ", ".join("?" * len(only_if))
        with self.transaction() as connection:
            cursor = connection.execute(f"UPDATE jobs SET {_assignments(fields)} WHERE id = ? AND state IN ({marks})",
                                        (*fields.values(), job_id, *only_if))
            return cursor.rowcount == 1

    def claim_next(self, max_running: int) -> dict[str, Any] | None:
        """Mark the oldest queued job running, if fewer than ``max_running`` jobs run; return it."""
        with self._connect() as connection:  # the timer ticks often; take the write lock only when needed
            if connection.execute("SELECT 1 FROM jobs WHERE state = 'queued' LIMIT 1").fetchone() is None:
                return None
        with self.transaction() as connection:
            running = connection.execute("SELECT COUNT(*) FROM jobs WHERE state = 'running'").fetchone()[0]
            if running >= max_running:
                return None
            row = connection.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            now = time.time()
            connection.execute("UPDATE jobs SET state = 'running', started = COALESCE(started, ?), finished = NULL, "
                               "pid = NULL, pgid = NULL, heartbeat = ?, message = 'starting', error = NULL "
                               "WHERE id = ?", (now, now, row["id"]))
            return self._job(connection.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def report_steps(self, job_id: int, points: list[dict[str, Any]], **fields: Any) -> bool:
        """A running worker's progress: new loss points and job fields (heartbeat included).
        Returns whether cancellation was requested."""
        fields["heartbeat"] = time.time()
        with self.transaction() as connection:
            connection.executemany(
                "INSERT OR REPLACE INTO points (job_id, step, epoch, loss, lr, terms) VALUES (?, ?, ?, ?, ?, ?)",
                [(job_id, p["step"], p["epoch"], p["loss"], p["lr"], json.dumps(p["terms"])) for p in points])
            connection.execute(f"UPDATE jobs SET {_assignments(fields)} WHERE id = ?", (*fields.values(), job_id))
            return bool(connection.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()[0])

    def add_metrics(self, job_id: int, epoch: int, train_loss: float, train_top1: float, test_top1: float | None,
                    seconds: float) -> None:
        with self.transaction() as connection:
            connection.execute("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?, ?, ?)",
                               (job_id, epoch, train_loss, train_top1, test_top1, seconds, time.time()))

    def keep_history(self, job_id: int, epochs: int, steps: int) -> None:
        """Drop metrics after epoch ``epochs`` and points after global step ``steps``: what a
        resumed run will redo (the part of the epoch it was stopped in)."""
        with self.transaction() as connection:
            connection.execute("DELETE FROM metrics WHERE job_id = ? AND epoch > ?", (job_id, epochs))
            connection.execute("DELETE FROM points WHERE job_id = ? AND step > ?", (job_id, steps))
