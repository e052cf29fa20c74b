"""Background distillation jobs end to end: real worker processes on a 40-image data set."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import write_image_folder
from kd_core.checkpoint import load_checkpoint
from kd_core.jobs import JobManager
from kd_core.jobs.worker import JobReporter, build_run_spec
from kd_core.run import RunSpec, run
from kd_core.training import Callback, TrainConfig

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A data set, a 1-epoch lightnn teacher in ``checkpoints/teacher.safetensors``, and the
    environment for the workers."""
    root = tmp_path_factory.mktemp("jobs")
    write_image_folder(root / "data", ["a", "b"], {"train": 15, "test": 5}, size=32)
    source = f"folder:{root / 'data'}"
    cache = root / "cache"
    checkpoints = root / "checkpoints"
    run(RunSpec(arch="lightnn", data=source, config=TrainConfig(epochs=1, batch_size=8, lr=0.05),
                output=checkpoints / "teacher.safetensors", role="teacher", cache_dir=cache))
    return SimpleNamespace(source=source, checkpoints=checkpoints,
                           env={"KD_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"})


@pytest.fixture
def manager(bench, tmp_path):
    manager = JobManager(tmp_path / "runs", bench.checkpoints, env=bench.env)
    yield manager
    for job in manager.list_jobs():
        if job["state"] in ("queued", "running"):
            manager.cancel(job["id"])


def job_spec(bench, **overrides) -> dict:
    spec = {"teacher": "teacher", "student": "camnet", "data": bench.source, "weights": {"ce": 0.5, "kd": 0.5},
            "epochs": 2, "batch_size": 8, "lr": 0.05}
    return {**spec, **overrides}


def wait_until(manager: JobManager, job_id: int, condition, timeout: float = TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manager.tick()
        job = manager.get_job(job_id)
        if condition(job):
            return job
        if job["state"] == "failed":
            raise AssertionError(f"job {job_id} failed: {job['error']}")
        time.sleep(0.05)
    log = manager.store.run_dir(job_id) / "worker.log"
    raise AssertionError(f"job {job_id} stuck in {job['state']} ({job['message']}); log:\n"
                         f"{log.read_text() if log.exists() else '(none)'}")


def reaped(manager: JobManager, pid: int, timeout: float = 10.0) -> bool:
    """Whether the process ``pid`` has exited and a tick has collected it (a zombie keeps its
    /proc entry)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        manager.tick()
        time.sleep(0.05)
    return not Path(f"/proc/{pid}").exists()


def group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_job_runs_to_a_checkpoint_that_records_its_teacher(bench, manager):
    job = manager.submit(job_spec(bench, weights={"ce": 0.5, "kd": 0.5, "cam": 1.0}))
    assert job["state"] == "running" and job["name"] == "camnet-ce-kd-cam"
    job = wait_until(manager, job["id"], lambda job: job["state"] == "completed")

    assert job["progress"] == 1.0 and job["epoch"] == 2
    assert [row["epoch"] for row in job["metrics"]] == [1, 2]
    assert all(math.isfinite(row["train_loss"]) and row["test_top1"] is not None for row in job["metrics"])
    steps = [point["step"] for point in job["points"]]
    assert steps == sorted(steps) and steps[-1] == 2 * 3  # 30 images in batches of 8, last one dropped
    assert set(job["points"][0]["terms"]) >= {"ce", "kd", "cam"}

    checkpoint = load_checkpoint(job["checkpoint"])
    assert Path(job["checkpoint"]) == bench.checkpoints / "camnet-ce-kd-cam.safetensors"
    assert checkpoint.meta["teacher"]["name"] == "teacher" and checkpoint.meta["method"] == "ce+kd+cam"
    assert job["test_top1"] == checkpoint.meta["metrics"]["test_top1"]

    assert reaped(manager, job["pid"])
    again = manager.submit(job_spec(bench, weights={"ce": 0.5, "kd": 0.5, "cam": 1.0}, epochs=1))
    assert again["name"] == "camnet-ce-kd-cam-2"  # never overwrites a checkpoint
    manager.cancel(again["id"])
    with pytest.raises(ValueError, match="completed"):
        manager.resume(job["id"])


def test_a_job_can_distil_from_a_teacher_bank(bench, manager):
    job = manager.submit(job_spec(bench, weights={"ce": 0.5, "kd": 0.5, "cam": 1.0}, teacher_views=2, name="banked"))
    job = wait_until(manager, job["id"], lambda job: job["state"] == "completed")
    checkpoint = load_checkpoint(job["checkpoint"])
    assert checkpoint.meta["config"]["teacher_views"] == 2 and checkpoint.meta["method"] == "ce+kd+cam"
    assert [row["epoch"] for row in job["metrics"]] == [1, 2]
    assert all(point["terms"]["kd"] > 0 and point["terms"]["cam"] > 0 for point in job["points"])
    assert len(list((Path(bench.env["KD_CACHE_DIR"]) / "teacher-banks").glob("*.safetensors"))) == 1


def test_a_job_says_what_its_teacher_bank_holds_and_one_too_large_is_refused(bench, manager, monkeypatch):
    from kd_core.checkpoint import load_checkpoint
    from kd_core.jobs import spec as job_specs
    from kd_core.losses import feature_shape

    teacher = load_checkpoint(bench.checkpoints / "teacher.safetensors")
    channels, height, width = feature_shape(teacher.model, (3, 32, 32))
    train_size = teacher.meta["data"]["train_size"]
    job = manager.submit(job_spec(bench, weights={"ce": 0.5, "kd": 0.5, "cam": 1.0}, teacher_views=3, epochs=300))
    per_view = 2 + 1 + 4 * len(teacher.classes) + 4 * height * width  # offsets, flip, logits, CAM: no term reads the features
    assert job["bank"] == f"its teacher bank will hold {3 * train_size * per_view / 2**20:,.2f} MB (3 views)"
    manager.cancel(job["id"])
    with_features = 3 * train_size * (per_view + 2 * channels * height * width)
    monkeypatch.setattr(job_specs, "MAX_BANK_BYTES", with_features - 1)
    with pytest.raises(ValueError, match=r"^teacher_views: a bank of 3 views would hold .* GB, more than this server"):
        manager.submit(job_spec(bench, weights={"ce": 0.5, "feature": 1.0}, teacher_views=3))
    assert manager.submit(job_spec(bench, weights={"ce": 0.5, "kd": 0.5}, teacher_views=0, epochs=300))["bank"] == ""


def test_a_job_trains_in_several_processes_under_torchrun_when_told(bench, tmp_path):
    from kd_core.jobs.manager import job_processes

    assert job_processes("auto") == max(1, torch.cuda.device_count()) and job_processes("3") == 3
    with pytest.raises(ValueError, match="KD_JOB_PROCESSES must be 'auto' or a whole number >= 1, got '0'"):
        JobManager(tmp_path / "bad", bench.checkpoints, env={"KD_JOB_PROCESSES": "0"})
    manager = JobManager(tmp_path / "runs", bench.checkpoints, env={**bench.env, "KD_JOB_PROCESSES": "2",
                                                                     "KD_DIST_TIMEOUT_S": "120"})
    command = manager.worker_command(7, 2)
    assert command[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=0"]
    assert command[6:8] == ["-m", "kd_core.jobs.worker"] and manager.worker_command(7)[1:3] == ["-m", "kd_core.jobs.worker"]
    job = manager.submit(job_spec(bench, epochs=2, name="two-processes"))
    job = wait_until(manager, job["id"], lambda job: job["state"] in ("completed", "failed"))
    assert job["state"] == "completed", job["error"]
    assert [row["epoch"] for row in job["metrics"]] == [1, 2]
    assert load_checkpoint(job["checkpoint"]).meta["processes"] == 2


def test_one_job_at_a_time_and_cancel_stops_the_process_group_within_2_s(bench, manager):
    first = manager.submit(job_spec(bench, epochs=300))
    second = manager.submit(job_spec(bench))
    assert first["state"] == "running" and second["state"] == "queued"
    first = wait_until(manager, first["id"], lambda job: job["progress"] > 0)
    assert manager.get_job(second["id"])["state"] == "queued"

    assert manager.cancel(second["id"])["state"] == "cancelled"
    started = time.monotonic()
    cancelled = manager.cancel(first["id"])
    assert time.monotonic() - started < 2.0
    assert cancelled["state"] == "cancelled" and cancelled["cancel_requested"]
    assert not group_exists(first["pgid"])
    assert manager.tick() == []  # the cancelled queued job does not start


def test_a_worker_killed_from_outside_is_noticed_by_the_next_tick(bench, manager):
    job = manager.submit(job_spec(bench, epochs=300))
    job = wait_until(manager, job["id"], lambda job: job["progress"] > 0)
    os.killpg(job["pgid"], signal.SIGKILL)  # the out-of-memory killer, say
    job = wait_until(manager, job["id"], lambda job: job["state"] == "interrupted", timeout=5)
    assert "without reporting" in job["message"]
    assert reaped(manager, job["pid"])


class StopAfterEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, info) -> None:
        if info.epoch + 1 == self.epoch:
            trainer.request_stop()


def test_recover_marks_a_dead_worker_interrupted_and_resume_continues_its_history(bench, manager, tmp_path,
                                                                                 monkeypatch):
    # a job that ran 2 of its 4 epochs in a worker that then died without a word
    store = manager.store
    job = store.get(store.create(job_spec(bench, epochs=4), "crashed"))
    assert store.claim_next(1)["id"] == job["id"]
    monkeypatch.setenv("KD_CACHE_DIR", bench.env["KD_CACHE_DIR"])
    _, path = run(build_run_spec(job, store, bench.checkpoints), [JobReporter(store, job["id"]), StopAfterEpoch(2)])
    dead = subprocess.Popen(["true"])
    dead.wait()
    store.update(job["id"], pid=dead.pid, pgid=dead.pid)
    before = store.metrics(job["id"])
    assert path is None and [row["epoch"] for row in before] == [1, 2]

    restarted = JobManager(tmp_path / "runs", bench.checkpoints, env=bench.env)
    assert restarted.recover() == [job["id"]]
    assert restarted.get_job(job["id"])["state"] == "interrupted"
    assert restarted.resume(job["id"])["state"] == "running"
    job = wait_until(restarted, job["id"], lambda job: job["state"] == "completed")

    assert [row["epoch"] for row in job["metrics"]] == [1, 2, 3, 4]
    assert job["metrics"][:2] == before  # the finished epochs were kept, not redone
    assert [point["step"] for point in job["points"]] == list(range(1, 13))
    assert len(load_checkpoint(job["checkpoint"]).meta["history"]) == 4


def test_recover_trusts_only_live_workers_of_their_own_job(bench, manager):
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        ids = [manager.store.create(job_spec(bench), "probe") for _ in range(3)]
        for job_id in ids:
            manager.store.update(job_id, state="running", heartbeat=time.time())
        manager.store.update(ids[0], pid=stranger.pid, pgid=stranger.pid)  # a live pid, but not a worker
        manager.store.update(ids[1], heartbeat=time.time() - 3600)         # its launcher died an hour ago
        assert sorted(manager.recover()) == ids[:2]                         # ids[2] is being launched now
        assert [manager.get_job(job_id)["state"] for job_id in ids] == ["interrupted", "interrupted", "running"]
        assert stranger.poll() is None  # and nobody else's process was signalled
    finally:
        stranger.kill()
        stranger.wait()


BAD_SPECS = [
    ({"epochs": 0}, "epochs"), ({"epochs": 2.5}, "epochs"), ({"temperature": 0}, "temperature"),
    ({"temperature": -1.0}, "temperature"), ({"weights": {"ce": 1, "kd": -0.5}}, "weights"),
    ({"weights": {"ce": 0, "kd": 0}}, "weights"), ({"weights": {"hint": 1}}, "weights"),
    ({"student": "resnet9000"}, "student"), ({"teacher": "nobody"}, "teacher"), ({"data": "imagenet"}, "data"),
    ({"data": "folder:/no/such/folder"}, "data"), ({"limit": 0}, "limit"), ({"lr": 0}, "lr"),
    ({"lr": float("nan")}, "lr"), ({"batch_size": 0}, "batch_size"), ({"seed": -1}, "seed"),
    ({"name": "../evil"}, "name"), ({"teacher": None}, "teacher"), ({"colour": "red"}, "colour"),
    ({"teacher_views": -1}, "teacher_views"),
]


@pytest.mark.parametrize("change, field", BAD_SPECS, ids=[field for _, field in BAD_SPECS])
def test_a_bad_setting_is_refused_naming_the_field(bench, manager, change, field):
    with pytest.raises(ValueError, match=field):
        manager.submit(job_spec(bench, **change))
    assert manager.list_jobs() == []


@pytest.mark.parametrize("name", ["../teacher", "/etc/passwd", "../checkpoints/teacher", "sub/teacher", ".teacher",
                                  "escape", "garbage"])
def test_teacher_names_cannot_leave_the_checkpoints_folder(bench, tmp_path, name):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (tmp_path / "outside.safetensors").write_bytes((bench.checkpoints / "teacher.safetensors").read_bytes())
    (checkpoints / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (checkpoints / "garbage.safetensors").write_bytes(b"not a checkpoint")
    manager = JobManager(tmp_path / "runs", checkpoints)
    with pytest.raises(ValueError, match="teacher"):
        manager.submit(job_spec(bench, teacher=name))
    assert manager.list_jobs() == []


def test_only_offered_data_sources_are_accepted(bench, tmp_path):
    manager = JobManager(tmp_path / "runs", bench.checkpoints, data_sources=["cifar10"])
    with pytest.raises(ValueError, match="data: .* not one of the offered"):
        manager.submit(job_spec(bench))


def test_a_recipe_job_refuses_a_recipe_that_does_not_distil():
    from kd_core.jobs.spec import JobSpec, base_recipe

    with pytest.raises(ValueError, match=r"^recipe: 'airnet' is not a distillation recipe; choose one of"):
        base_recipe(JobSpec(recipe="airnet", data="cifar10"))
