"""Training over several processes (kd_core.distributed), on CPUs with Gloo: torchrun's two
processes end with the same weights as each other and as one process on the same global batch; a
process killed mid-run fails the run quickly with a clear message and leaves a state that resumes on
one process or two; and each process's share of a batch is its own, the shares together the batch."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import ROOT, free_port, write_image_folder
from kd_core import distributed, models
from kd_core.checkpoint import read_metadata
from kd_core.cli import main
from kd_core.data import AugmentConfig, BatchLoader, Split, load_data
from kd_core.data.loader import shard
from kd_core.run import RunSpec, run
from kd_core.training import TrainConfig, Trainer
from kd_core.training.state import read_state_info
from kd_core.training.teacher_bank import BankLoader, TeacherBank, load_or_build_bank

pytestmark = pytest.mark.usefixtures("keep_signal_handlers")

LAUNCH_TIMEOUT = 180  # seconds for a launch of two processes: each imports torch on a busy 2-core machine
DIST_TIMEOUT_S = 20   # the process group's timeout in the runs a test kills

# The CLI under torchrun, keeping each process's final student weights as OUT/rank<N>.safetensors.
KEEP_WEIGHTS = '''
import sys

from safetensors.torch import save_file

import kd_core.run
from kd_core import distributed
from kd_core.cli import main

out, argv = sys.argv[1], sys.argv[2:]
run = kd_core.run.run


def run_and_keep(spec, **kwargs):
    result, path = run(spec, **kwargs)
    weights = {name: value.detach().cpu().contiguous() for name, value in result.model.state_dict().items()}
    save_file(weights, f"{out}/rank{distributed.rank()}.safetensors")
    return result, path


kd_core.run.run = run_and_keep
sys.exit(main(argv))
'''


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """A two-class 16x16 image folder (32 training images: 4 steps of 8) and a lightnn teacher."""
    root = tmp_path_factory.mktemp("distributed")
    write_image_folder(root / "data", ["cat", "dog"], {"train": 16, "test": 8}, size=16)
    run(RunSpec(arch="lightnn", data=f"folder:{root / 'data'}", config=TrainConfig(epochs=1, batch_size=8, amp=False),
                output=root / "teacher.safetensors", role="teacher", cache_dir=root / "cache"))
    return root


def environment(**extra: str) -> dict[str, str]:
    inherited = {key: value for key, value in os.environ.items()
                 if key not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**inherited, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def torchrun(*argv, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ARGV``: the launcher users run."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *map(str, argv)]
    done = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {name: value.float() for name, value in load_file(path).items()}


def epoch_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("epoch ")]


# ---------------------------------------------------------------------------------------------
# two processes train as one


def test_two_processes_end_equal_to_each_other_and_to_one(bench, tmp_path, capsys):
    """Distillation from a teacher bank (built by rank 0, read by rank 1) with crop and flip
    augmentation: both processes hold the very same weights, and they match one process's run on
    the same global batch of 8 (camnet has no batch norm, so only float rounding differs)."""
    argv = ["distill", "--student", "camnet", "--teacher", bench / "teacher.safetensors", "--ce", 0.5, "--kd", 0.5,
            "--teacher-views", 2, "--crop-padding", 2, "--data", f"folder:{bench / 'data'}", "--epochs", 2,
            "--batch-size", 8, "--lr", 0.02, "--no-amp"]
    script = tmp_path / "keep_weights.py"
    script.write_text(KEEP_WEIGHTS)
    two = torchrun(script, tmp_path, *argv, "--output", tmp_path / "two.safetensors", "--run-dir", tmp_path / "runs-two",
                   "--cache-dir", tmp_path / "cache-two", cwd=tmp_path)
    assert main([str(arg) for arg in argv + ["--output", tmp_path / "one.safetensors", "--run-dir",
                                             tmp_path / "runs-one", "--cache-dir", tmp_path / "cache-one"]]) == 0
    capsys.readouterr()

    assert two.stdout.count("wrote ") == 1 and len(epoch_lines(two.stdout)) == 2  # rank 0 alone reports
    rank0, rank1 = weights(tmp_path / "rank0.safetensors"), weights(tmp_path / "rank1.safetensors")
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    checkpoint, single = weights(tmp_path / "two.safetensors"), weights(tmp_path / "one.safetensors")
    assert all(torch.equal(checkpoint[name], rank0[name]) for name in checkpoint)
    for name in single:
        torch.testing.assert_close(checkpoint[name], single[name], rtol=1e-4, atol=1e-5)

    meta_two, meta_one = read_metadata(tmp_path / "two.safetensors"), read_metadata(tmp_path / "one.safetensors")
    assert meta_two["processes"] == 2 and "processes" not in meta_one
    for epoch_two, epoch_one in zip(meta_two["history"], meta_one["history"], strict=True):  # global numbers
        assert epoch_two["train_top1"] == epoch_one["train_top1"]
        assert epoch_two["loss"] == pytest.approx(epoch_one["loss"], abs=2e-4)
    assert meta_two["metrics"]["test_top1"] == meta_one["metrics"]["test_top1"]
    banks = sorted((tmp_path / "cache-two" / "teacher-banks").iterdir())
    assert len(banks) == 1 and banks[0].suffix == ".safetensors"  # one file, by rank 0, nothing half-written


def test_a_study_under_torchrun_trains_each_run_on_both_and_records_it_once(bench, tmp_path, capsys):
    """A gain study (the KD recipe and its cross-entropy twin) on two processes: the first writes
    results.json, results.md and each checkpoint once, prints the table once, and every run scores
    what the same study scores in one process."""
    argv = ["study", "gain", "--recipe", "lightnn-kd", "--teacher", bench / "teacher.safetensors", "--data",
            f"folder:{bench / 'data'}", "--epochs", 2, "--seeds", 0, "--set", "batch_size=8", "--set", "amp=false",
            "--set", "teacher_views=2"]
    two = torchrun("-m", "kd_core", *argv, "--output", tmp_path / "two", "--cache-dir", tmp_path / "cache-two",
                   cwd=tmp_path)
    assert main([str(arg) for arg in argv + ["--output", tmp_path / "one", "--cache-dir", tmp_path / "cache-one"]]) == 0
    one_table = capsys.readouterr().out

    assert two.stdout.strip() == (tmp_path / "two" / "results.md").read_text().strip()  # printed by rank 0 alone
    assert two.stderr.count("gain: KD, seed 0") == 1  # so is the progress log
    rows_two = json.loads((tmp_path / "two" / "results.json").read_text())
    rows_one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert [row["variant"] for row in rows_two] == [row["variant"] for row in rows_one] and len(rows_two) == 2
    for row_two, row_one in zip(rows_two, rows_one):
        assert row_two["top1"] == row_one["top1"] and row_two["split"] == "test"
        assert read_metadata(tmp_path / "two" / row_two["checkpoint"])["processes"] == 2
    assert (tmp_path / "one" / "results.md").read_text().strip() in one_table


# ---------------------------------------------------------------------------------------------
# a process dies


def start_process(rank: int, argv: list, port: int, cwd: Path) -> subprocess.Popen:
    """``python -m kd_core ARGV`` as process ``rank`` of two, with the variables torchrun would set;
    output to files (a full pipe would stall it)."""
    env = environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KD_DIST_TIMEOUT_S=str(DIST_TIMEOUT_S))
    with open(cwd / f"rank{rank}.out", "wb") as out, open(cwd / f"rank{rank}.err", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "kd_core", *map(str, argv)], cwd=cwd, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)


def wait_for_epoch(state: Path, epoch: int, processes: list[subprocess.Popen], cwd: Path) -> None:
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not (state.exists() and read_state_info(state)["epoch"] >= epoch):
        exited = [process.returncode for process in processes if process.poll() is not None]
        if exited or time.monotonic() > deadline:
            logs = "".join((cwd / f"rank{rank}.err").read_text()[-2000:] for rank in (0, 1))
            pytest.fail(f"the run ended ({exited}) or stalled before epoch {epoch + 1} was saved:\n{logs}")
        time.sleep(0.02)


def test_a_killed_process_fails_the_run_and_its_state_resumes_on_one_or_two(bench, tmp_path, capsys):
    epochs = 40
    data = f"folder:{bench / 'data'}"

    def argv(name: str) -> list:
        return ["train", "--model", "camnet", "--data", data, "--epochs", epochs, "--batch-size", 8, "--lr", 0.02,
                "--eval-every", 0, "--no-amp", "--output", tmp_path / f"{name}.safetensors",
                "--run-dir", tmp_path / name, "--cache-dir", tmp_path / "cache"]

    port = free_port()
    processes = [start_process(rank, argv("run"), port, tmp_path) for rank in (0, 1)]
    try:
        state = tmp_path / "run" / "resume.safetensors"
        wait_for_epoch(state, 1, processes, tmp_path)
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert processes[0].wait(timeout=DIST_TIMEOUT_S + 30) == 2
        assert time.monotonic() - killed < DIST_TIMEOUT_S
    finally:
        for process in processes:
            process.kill()
            process.wait()
    error = (tmp_path / "rank0.err").read_text()
    assert "error: " in error and "another process of this run died or stopped answering" in error

    info = read_state_info(state)  # the last finished epoch, complete: a trainer resumes from it
    assert 1 <= info["epoch"] < epochs - 1 and len(info["history"]) == info["epoch"] + 1
    assert not (tmp_path / "run.safetensors").exists() and sorted(os.listdir(tmp_path / "run")) == ["resume.safetensors"]
    trainer = Trainer(models.create("camnet", num_classes=2), load_data(data, tmp_path / "cache"),
                      TrainConfig.from_dict(info["config"]), state_path=state)
    assert trainer.resume() and trainer.start_epoch == info["epoch"] + 1
    shutil.copytree(tmp_path / "run", tmp_path / "run-two")

    resumed_from = f"epoch {info['epoch'] + 2}/{epochs}:"
    assert main([str(arg) for arg in argv("run")]) == 0  # one process
    assert epoch_lines(capsys.readouterr().out)[0].startswith(resumed_from)
    two = torchrun("-m", "kd_core", *argv("run-two"), cwd=tmp_path)  # two processes
    assert epoch_lines(two.stdout)[0].startswith(resumed_from) and two.stdout.count("wrote ") == 1
    one, both = weights(tmp_path / "run.safetensors"), weights(tmp_path / "run-two.safetensors")
    for name in one:
        torch.testing.assert_close(both[name], one[name], rtol=1e-4, atol=1e-5)


# The CLI, process 1 sending itself SIGTERM in the second epoch's first step (4 steps an epoch).
SIGTERM_ON_RANK_1 = '''
import os
import signal
import sys

from kd_core import distributed
from kd_core.cli import main
from kd_core.training import engine

train_step = engine.Trainer._train_step


def step_then_signal(self, *args):
    out = train_step(self, *args)
    if distributed.rank() == 1 and self.global_step == 4:
        os.kill(os.getpid(), signal.SIGTERM)
    return out


engine.Trainer._train_step = step_then_signal
sys.exit(main(sys.argv[1:]))
'''


def test_a_signal_to_one_process_stops_both_after_the_same_step_and_the_run_resumes(bench, tmp_path, capsys):
    (tmp_path / "signal_rank1.py").write_text(SIGTERM_ON_RANK_1)
    argv = ["train", "--model", "camnet", "--data", f"folder:{bench / 'data'}", "--epochs", 3, "--batch-size", 8,
            "--eval-every", 0, "--no-amp", "--output", tmp_path / "run.safetensors", "--run-dir", tmp_path / "run",
            "--cache-dir", tmp_path / "cache"]
    port, processes = free_port(), []
    try:
        for rank in (0, 1):
            env = environment(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                              MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KD_DIST_TIMEOUT_S=str(DIST_TIMEOUT_S))
            with open(tmp_path / f"rank{rank}.out", "wb") as out, open(tmp_path / f"rank{rank}.err", "wb") as err:
                processes.append(subprocess.Popen([sys.executable, str(tmp_path / "signal_rank1.py"), *map(str, argv)],
                                                  cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                                  stderr=err))
        codes = [process.wait(timeout=LAUNCH_TIMEOUT) for process in processes]
    finally:
        for process in processes:
            process.kill()
            process.wait()
    logs = "".join((tmp_path / f"rank{rank}.err").read_text()[-2000:] for rank in (0, 1))
    assert codes == [130, 130], logs  # both stopped; neither waited for the other or timed out
    assert f"stopped after 1 epoch(s); state kept in {tmp_path / 'run'}" in (tmp_path / "rank0.out").read_text()
    assert "stopping after this step (signal 15" in (tmp_path / "rank1.err").read_text()
    assert read_state_info(tmp_path / "run" / "resume.safetensors")["epoch"] == 0
    assert not (tmp_path / "run.safetensors").exists()

    assert main([str(arg) for arg in argv]) == 0  # one process resumes it
    assert epoch_lines(capsys.readouterr().out)[0].startswith("epoch 2/3:")


@pytest.fixture
def two_process_env(monkeypatch):
    """This test process as rank 0 of two, with a 3-second timeout; its process group removed after."""
    port = free_port()
    for name, value in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                            KD_DIST_TIMEOUT_S="3").items():
        monkeypatch.setenv(name, value)
    yield port
    distributed.shutdown()


def test_a_process_that_stops_answering_fails_the_others_within_the_timeout(two_process_env):
    """Rank 1 joins, then hangs: rank 0's next collective gives up after KD_DIST_TIMEOUT_S."""
    hang = "import time, torch.distributed as dist; print('ready', flush=True); dist.init_process_group('gloo'); time.sleep(120)"
    env = environment(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(two_process_env))
    peer = subprocess.Popen([sys.executable, "-c", hang], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert peer.stdout.readline() == "ready\n"  # torch imported: it joins at once, well within 3 s
        assert distributed.init_from_env() and distributed.world_size() == 2
        started = time.monotonic()
        with pytest.raises(distributed.DistributedError,
                           match="an all-reduce failed in process 0 of 2: another process of this run died or stopped "
                                 "answering \\(each waits at most 3 s, KD_DIST_TIMEOUT_S\\)"):
            distributed.sum_numbers([1.0])
        assert time.monotonic() - started < 15
    finally:
        peer.kill()
        peer.wait()


def test_a_process_that_never_joins_fails_the_start_within_the_timeout(two_process_env, monkeypatch):
    # after a failed start torch's count of process groups stays advanced in this process, so a
    # process group made here later would not meet its peers: this test comes after the one above
    monkeypatch.setenv("KD_DIST_TIMEOUT_S", "1")
    started = time.monotonic()
    with pytest.raises(distributed.DistributedError, match=r"process 0 of 2 could not join the run at 127\.0\.0\.1:"):
        distributed.init_from_env()
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------------------------------------
# shares of a batch, and a single process


@pytest.mark.parametrize("count", [0, 1, 7, 8, 13])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_batch(count, world_size):
    rows = [set(range(count)[shard(count, rank, world_size, even=False)]) for rank in range(world_size)]
    assert sum(len(share) for share in rows) == count and set().union(*rows) == set(range(count))
    even = [range(count)[shard(count, rank, world_size)] for rank in range(world_size)]
    assert {len(share) for share in even} == {count // world_size}
    assert [row for share in even for row in share] == list(range(count // world_size * world_size))


def loaders(make, world_size: int) -> list:
    return [make(rank=rank, world_size=world_size) for rank in range(world_size)]


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_process_gets_its_rows_of_every_global_batch_augmented_as_one_process_would(world_size):
    """20 images, batches of 8: 8, 8, then a partial 4 cut to a multiple of the processes."""
    generator = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (20, 3, 8, 8), generator=generator, dtype=torch.uint8), torch.arange(20))
    augment = AugmentConfig(crop_padding=2, flip=True, rotation=15, color_jitter=0.3, cutout=3)

    def make(**shares):
        return BatchLoader(split, 8, (0.5,) * 3, (0.25,) * 3, shuffle=True, augment=augment, seed=3, **shares)

    single, shares = make(), loaders(make, world_size)
    assert len(single) == 3 and {len(loader) for loader in shares} == {3}
    for epoch in range(2):  # the order and the draws stay in step across epochs
        for whole, parts in zip(single, zip(*shares), strict=True):
            labels = torch.cat([labels for _, labels in parts])
            assert len(set(labels.tolist())) == len(labels)  # disjoint
            assert torch.equal(labels, whole[1][:len(labels)])  # their union: the batch, in order
            assert torch.equal(torch.cat([images for images, _ in parts]), whole[0][:len(labels)])


def test_bank_loader_shares_show_the_views_and_targets_one_process_would():
    count, views = 16, 3
    generator = torch.Generator().manual_seed(1)
    split = Split(torch.randint(0, 256, (count, 3, 8, 8), generator=generator, dtype=torch.uint8), torch.arange(count))
    bank = TeacherBank(2, torch.randint(0, 5, (views, 2, count), generator=generator, dtype=torch.uint8),
                       torch.rand(views, count, generator=generator) < 0.5, torch.randn(views, count, 4, generator=generator),
                       torch.randn(views, count, 2, 2, generator=generator))

    def make(**shares):
        return BankLoader(split, bank, 8, (0.5,) * 3, (0.25,) * 3, seed=5, mirror=True, **shares)

    for whole, parts in zip(make(), zip(*loaders(make, 2)), strict=True):
        assert torch.equal(torch.cat([part[0] for part in parts]), whole[0])
        assert torch.equal(torch.cat([part[1] for part in parts]), whole[1])
        assert torch.equal(torch.cat([part[2].logits for part in parts]), whole[2].logits)
        assert torch.equal(torch.cat([part[2].cams for part in parts]), whole[2].cams)


def test_a_process_other_than_rank_0_never_writes_the_bank_cache(tmp_path):
    bank = TeacherBank(0, torch.zeros(1, 2, 4, dtype=torch.uint8), torch.zeros(1, 4, dtype=torch.bool),
                       torch.randn(1, 4, 3), None)
    assert load_or_build_bank(tmp_path, "key", lambda: bank, 0, save=False) is bank
    assert not (tmp_path / "teacher-banks" / "key.safetensors").exists()
    load_or_build_bank(tmp_path, "key", lambda: bank, 0)  # rank 0's; the others then read it
    read = load_or_build_bank(tmp_path, "key", lambda: pytest.fail("built again"), 0, save=False)
    assert read.reused and torch.equal(read.logits, bank.logits)


def test_a_batch_that_does_not_split_evenly_is_refused():
    split = Split(torch.zeros(8, 1, 4, 4, dtype=torch.uint8), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch size 10 does not split over 4 processes: it is the global batch"):
        BatchLoader(split, 10, (0.5,), (0.5,), world_size=4)


def test_one_process_creates_no_process_group(monkeypatch):
    for world in (None, "1"):
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", world)
        assert distributed.init_from_env() is False and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.sum_numbers([2.5, 3]) == [2.5, 3] and distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.all_true(torch.tensor(True)) and not distributed.any_true(False)
    distributed.barrier()
    distributed.shutdown()


@pytest.mark.parametrize("value", ["soon", "0", "-5"])
def test_a_bad_timeout_is_refused(monkeypatch, value):
    monkeypatch.setenv("KD_DIST_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="KD_DIST_TIMEOUT_S must be"):
        distributed.timeout_seconds()


