"""``python -m kd_core.bench distill``: times both ways of distilling and costs a run."""
from __future__ import annotations

import re

import pytest

from helpers import write_image_folder
from kd_core.bench import bench_distill, main
from kd_core.run import RunSpec, run
from kd_core.training import TrainConfig


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    write_image_folder(root / "data", ["a", "b"], {"train": 8, "test": 4}, size=32)
    path = root / "teacher.safetensors"
    run(RunSpec(arch="resnet8", data=f"folder:{root / 'data'}", config=TrainConfig(epochs=1, batch_size=8),
                output=path, role="teacher", cache_dir=root / "cache"))
    return path


def test_bench_distill_times_both_ways(teacher):
    result = bench_distill(teacher, "camnet", {"ce": 0.25, "kd": 0.75, "cam": 1.0}, batch_size=8, steps=3, views=2,
                           warmup=1)
    assert set(result) == {"live_step_ms", "banked_step_ms", "bank_ms_per_image_view"}
    assert all(value > 0 for value in result.values())


def test_bench_distill_prints_the_cost_of_a_run(teacher, capsys):
    assert main(["distill", "--teacher", str(teacher), "--student", "lightnn", "--batch-size", "8", "--steps", "3",
                 "--views", "2", "--epochs", "10", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"1 thread\(s\), malloc (reusing freed memory|system): live teacher \d+ ms/step, "
                     r"banked \d+ ms/step, bank build [\d.]+ ms per image-view", out)
    live, build, train, total, ratio = map(float, re.search(
        r"live ([\d.]+) min; 2-view bank ([\d.]+) min to build \+ ([\d.]+) min to train = ([\d.]+) min \(([\d.]+)x\)",
        out).groups())
    assert total == pytest.approx(build + train, abs=0.11) and ratio == pytest.approx(live / total, rel=0.2, abs=0.1)


def test_bench_without_teacher_terms_times_one_way(teacher, capsys):
    result = bench_distill(teacher, "lightnn", {"ce": 1.0}, batch_size=8, steps=3, views=2, warmup=1)
    assert set(result) == {"live_step_ms"} and result["live_step_ms"] > 0
    assert main(["distill", "--teacher", str(teacher), "--student", "lightnn", "--ce", "1", "--kd", "0",
                 "--batch-size", "8", "--steps", "3", "--epochs", "10", "--threads", "1", "--system-malloc"]) == 0
    out = capsys.readouterr().out
    step = float(re.search(r"train lightnn \(ce, no teacher term\), batch 8, 1 thread\(s\), malloc system: "
                           r"(\d+) ms/step", out).group(1))
    minutes = float(re.search(r"10 epochs of 50,000 images: ([\d.]+) min", out).group(1))
    per_ms = 10 * 50_000 / 8 / 60_000  # minutes per ms of step; the step is printed rounded to 1 ms
    assert (step - 0.5) * per_ms - 0.05 <= minutes <= (step + 0.5) * per_ms + 0.05
    assert "bank" not in out


def test_bench_distill_refuses_nonsense(teacher, capsys):
    assert main(["distill", "--teacher", str(teacher), "--student", "camnet", "--steps", "0"]) == 2
    assert "error: steps, views and batch size must be at least 1" in capsys.readouterr().err
