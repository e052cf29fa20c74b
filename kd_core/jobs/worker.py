"""``python -m kd_core.jobs.worker --runs DIR --job ID [--checkpoints DIR]``: run one job.

The job manager starts one worker process per running job, in a session of its own (or, with
``KD_JOB_PROCESSES`` above 1, torchrun and that many workers: the first reports and saves). The worker
trains through :func:`kd_core.run.run`, reports progress, metrics and loss points to the job store,
and ends the job as completed, failed, cancelled or (stopped by a signal other than a cancel)
interrupted. SIGTERM or the store's cancel flag stop it after the current step; the last finished
epoch stays in ``<runs>/<id>/resume.safetensors``, so a resumed job continues from there.
"""
from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import sys
import threading
import time
import traceback
from pathlib import Path

from .. import distributed
from ..runtime import reuse_freed_memory
from ..run import RunSpec, run
from ..training import Callback, EpochInfo, StepInfo, Trainer
from .spec import JobSpec, run_spec
from .store import JobStore

POINTS_PER_EPOCH = 50     # loss-curve resolution
REPORT_SECONDS = 0.5      # progress writes (and cancel-flag reads) at most this often
HEARTBEAT_SECONDS = 2.0


class JobReporter(Callback):
    """Writes a job's progress, per-epoch metrics and a downsampled loss curve to the store, and
    stops the trainer when the job's cancel flag is set."""

    def __init__(self, store: JobStore, job_id: int):
        self.store, self.job_id = store, job_id
        self.window: list[dict[str, float]] = []   # losses of the steps since the last point
        self.points: list[dict] = []               # points not yet written
        self.last_report = 0.0

    def on_train_start(self, trainer: Trainer) -> None:
        done = trainer.start_epoch
        self.store.keep_history(self.job_id, done, trainer.global_step)
        recorded = {row["epoch"] for row in self.store.metrics(self.job_id)}
        for info in trainer.history:  # epochs saved in the state but killed before they were reported
            if info.epoch + 1 not in recorded:
                self._add_metrics(info)
        self._report(trainer, progress=done / trainer.config.epochs, epoch=done, step=0,
                     message=f"resumed after epoch {done}" if done else "training")

    def on_bank_progress(self, trainer: Trainer, done: int, total: int) -> None:
        if time.monotonic() - self.last_report >= REPORT_SECONDS or done == total:
            self._report(trainer, progress=0.0, epoch=0, step=0,
                         message=f"teacher on {trainer.config.teacher_views} views: {100 * done // total}%")

    def on_step_end(self, trainer: Trainer, info: StepInfo) -> None:
        self.window.append(info.losses)
        every = max(1, info.steps_per_epoch // POINTS_PER_EPOCH)
        if (info.step + 1) % every == 0 or info.step + 1 == info.steps_per_epoch:
            self.points.append(self._point(info))
        if time.monotonic() - self.last_report >= REPORT_SECONDS:
            epochs = trainer.config.epochs
            done = info.epoch + (info.step + 1) / info.steps_per_epoch
            self._report(trainer, progress=done / epochs, epoch=info.epoch + 1, step=info.step + 1,
                         steps_per_epoch=info.steps_per_epoch, message=f"epoch {info.epoch + 1}/{epochs}")

    def on_epoch_end(self, trainer: Trainer, info: EpochInfo) -> None:
        self._add_metrics(info)
        steps = len(trainer.train_loader)
        self._report(trainer, progress=(info.epoch + 1) / info.epochs, epoch=info.epoch + 1, step=steps,
                     steps_per_epoch=steps, message=f"finished epoch {info.epoch + 1}/{info.epochs}")

    def _add_metrics(self, info: EpochInfo) -> None:
        self.store.add_metrics(self.job_id, info.epoch + 1, info.train["loss"], info.train["train_top1"],
                               info.test.get("test_top1"), info.seconds)

    def _point(self, info: StepInfo) -> dict:
        means = {name: sum(losses[name] for losses in self.window) / len(self.window) for name in self.window[-1]}
        self.window = []
        return {"step": info.global_step, "epoch": info.epoch + (info.step + 1) / info.steps_per_epoch,
                "loss": means.pop("loss"), "lr": info.lr, "terms": means}

    def _report(self, trainer: Trainer, **fields) -> None:
        if self.store.report_steps(self.job_id, self.points, **fields):
            trainer.request_stop()
        self.points = []
        self.last_report = time.monotonic()


def build_run_spec(job: dict, store: JobStore, checkpoints_dir: Path) -> RunSpec:
    """What :func:`kd_core.run.run` needs for ``job``; the same every time, so a rerun resumes."""
    return run_spec(JobSpec.from_dict(job["spec"]), job["name"], checkpoints_dir,
                    store.run_dir(job["id"]) / "resume.safetensors")


def one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    text = (text.strip().splitlines() or [""])[0]
    return text if isinstance(error, ValueError | KeyError) and text else f"{type(error).__name__}: {text}"


def _heartbeat(store: JobStore, job_id: int, stopped: threading.Event) -> None:
    """Proves the process lives while no step reports (loading data, evaluating)."""
    while not stopped.wait(HEARTBEAT_SECONDS):
        try:
            store.update(job_id, only_if=("running",), heartbeat=time.time())
        except sqlite3.Error:
            pass  # a busy database costs one beat, not the job


def job_callbacks(store: JobStore, job_id: int, name: str | None) -> list[Callback]:
    """The job's progress reporter, and TensorBoard curves under ``$KD_TENSORBOARD_DIR/job-<id>-<name>``
    when the operator sets that folder."""
    callbacks: list[Callback] = [JobReporter(store, job_id)]
    if os.environ.get("KD_TENSORBOARD_DIR"):
        from ..training.tensorboard import TensorBoardLogger

        callbacks.append(TensorBoardLogger(Path(os.environ["KD_TENSORBOARD_DIR"]) / f"job-{job_id}-{name or 'run'}"))
    return callbacks


def _run_beside(store: JobStore, job_id: int, checkpoints_dir: Path) -> int:
    """A process other than the first of a job trained under torchrun: it trains its share and
    writes nothing (the first process reports, saves and ends the job)."""
    job = store.get(job_id)
    if job is None or job["state"] != "running" or job["cancel_requested"]:
        return 0
    try:
        run_spec = build_run_spec(job, store, checkpoints_dir)
        run(run_spec, stop_hook=lambda trainer: signal.signal(signal.SIGTERM, lambda *_: trainer.request_stop()))
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def run_job(store: JobStore, job_id: int, checkpoints_dir: Path) -> int:
    """Run job ``job_id`` (which the manager marked running) to its end; the exit status."""
    if not distributed.is_main():
        return _run_beside(store, job_id, checkpoints_dir)
    job = store.get(job_id)
    if job is None or job["state"] != "running":
        print(f"job {job_id} is {job['state'] if job else 'unknown'}, not running: nothing to do", file=sys.stderr)
        return 2
    store.update(job_id, only_if=("running",), pid=os.getpid(), pgid=os.getpgrp(), heartbeat=time.time(),
                 message="loading data and teacher")
    if job["cancel_requested"]:
        store.update(job_id, only_if=("running",), state="cancelled", finished=time.time(), message="cancelled")
        return 0

    def stop_on_sigterm(trainer: Trainer) -> None:
        signal.signal(signal.SIGTERM, lambda signum, frame: trainer.request_stop())

    stopped = threading.Event()
    threading.Thread(target=_heartbeat, args=(store, job_id, stopped), daemon=True).start()
    try:
        run_spec = build_run_spec(job, store, checkpoints_dir)
        result, path = run(run_spec, callbacks=job_callbacks(store, job_id, run_spec.name), stop_hook=stop_on_sigterm)
    except Exception as error:
        traceback.print_exc()
        store.update(job_id, only_if=("running",), state="failed", error=one_line(error), message="failed",
                     finished=time.time())
        return 1
    finally:
        stopped.set()
    now = time.time()
    if path is None:
        state = "cancelled" if store.get(job_id)["cancel_requested"] else "interrupted"
        store.update(job_id, only_if=("running",), state=state, finished=now,
                     message=f"stopped after epoch {result.epochs_done}; resumable")
        return 0
    store.update(job_id, only_if=("running",), state="completed", finished=now, progress=1.0, checkpoint=str(path),
                 test_top1=round(result.test_top1, 2), message=f"test top-1 {result.test_top1:.2f}%")
    run_spec.state_path.unlink(missing_ok=True)  # a finished job cannot resume; its state is dead weight
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd_core.jobs.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="folder of jobs.sqlite3 and the run folders")
    parser.add_argument("--job", type=int, required=True, help="job id")
    parser.add_argument("--checkpoints", type=Path, default=Path("checkpoints"),
                        help="folder of the teacher checkpoints and of the checkpoint to write")
    args = parser.parse_args(argv)
    reuse_freed_memory()
    distributed.init_from_env()  # started by torchrun when the job trains on several GPUs (KD_JOB_PROCESSES)
    try:
        return run_job(JobStore(args.runs), args.job, args.checkpoints)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is committed by now; skipping the interpreter's teardown (1-2 s with torch
    # loaded) lets a cancelled worker leave well within the manager's SIGTERM grace period.
    os._exit(status)
