"""``python -m kd_core benchmark``: the distill probe (both ways of distilling, the cost of a run),
the benchmark's parts on tiny data (peak, work accounting, the reference loop and its objective),
and the whole quick benchmark on the real CIFAR-10 copy."""
from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import REAL_CIFAR, write_image_folder
from kd_core import models
from kd_core.bench import bench_distill, main, peak
from kd_core.bench.reference import distillation_loss, image_folder, reference_distill
from kd_core.losses import ModelOutput, StepOutputs, build_objective
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


# --- python -m kd_core benchmark: its parts on tiny data, the whole on the real copy --------------

def test_matmul_peak_and_the_work_accounting():
    assert peak.matmul_gflops(torch.float32, size=64, repeats=2) > 0
    assert peak.conv_gflops(torch.float32, channels=8, side=4, batch=2, repeats=2) > 0
    with pytest.raises(ValueError, match="at least 1"):
        peak.conv_gflops(channels=0)
    with pytest.raises(ValueError, match="at least 1"):
        peak.matmul_gflops(size=0)
    assert peak.training_macs(10, 5) == 3 * 10 + 5 and peak.training_macs(10) == 30
    assert peak.achieved_gflops(1_000_000_000, 2.0) == pytest.approx(4.0)  # 2 FLOPs per MAC


def test_training_work_is_counted_without_test_time_augmentation():
    from kd_core.profile import count_macs
    model = models.create("airnet", num_classes=10, widths=(8, 16, 16), flip_tta=True, translate_tta=True)
    single = count_macs(model, (3, 32, 32), tta=False)
    assert count_macs(model, (3, 32, 32)) == 6 * single > 0   # level-2 TTA: six passes
    assert (model.flip_tta, model.translate_tta, model.training) == (True, True, True)  # all restored


def test_reference_objective_equals_the_engines():
    """The yardstick optimizes exactly what the engine does: CE + KD (T^2) + CAM, same weights."""
    torch.manual_seed(0)
    student, teacher = models.create("camnet"), models.create("resnet8").eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    weights = {"ce": 0.25, "kd": 0.75, "cam": 1.0}
    objective = build_objective(weights, student, teacher, (3, 32, 32),
                                {"kd": {"temperature": 4.0}, "cam": {"target": "teacher", "distance": "l1"}})
    s_features = student.forward_features(images)
    s_logits = student.forward_head(s_features)
    with torch.no_grad():
        t_features = teacher.forward_features(images)
        t_logits = teacher.forward_head(t_features)
    engine = objective(StepOutputs(ModelOutput(s_features, s_logits, student), ModelOutput(t_features, t_logits, teacher),
                                   labels))["loss"]
    ours = distillation_loss(s_logits, t_logits, labels, weights, 4.0, student, s_features, teacher, t_features)
    assert ours.item() == pytest.approx(engine.item(), rel=1e-5)


def test_reference_loop_trains_from_an_image_folder(tmp_path):
    write_image_folder(tmp_path / "data", ["a", "b"], {"train": 8}, size=32)
    torch.manual_seed(0)
    student, teacher = models.create("lightnn", num_classes=2), models.create("resnet8", num_classes=2)
    before = [p.detach().clone() for p in student.parameters()]
    result = reference_distill(teacher, student, tmp_path / "data", [0.5] * 3, [0.25] * 3, {"ce": 0.25, "kd": 0.75},
                               steps=2, warmup=1, batch_size=4, workers=0)
    assert result["images_per_second"] > 0 and result["step_seconds"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))  # it trained
    with pytest.raises(ValueError, match="fewer than the 9 steps"):
        reference_distill(teacher, student, tmp_path / "data", [0.5] * 3, [0.25] * 3, {"ce": 1.0},
                          steps=8, warmup=1, batch_size=4, workers=0)


def test_image_folder_unpacks_an_archive_once(tmp_path):
    write_image_folder(tmp_path / "tree" / "cifar", ["a", "b"], {"train": 2, "test": 1})
    archive = tmp_path / "cifar.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "tree" / "cifar", arcname="cifar")
    first = image_folder(f"folder:{archive}", tmp_path / "cache")
    assert sorted(p.name for p in (first / "train").iterdir()) == ["a", "b"]
    stamp = first.stat().st_mtime_ns
    assert image_folder(f"folder:{archive}", tmp_path / "cache") == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no scratch folder left behind
    assert image_folder(f"folder:{tmp_path / 'tree' / 'cifar'}") == tmp_path / "tree" / "cifar"
    with pytest.raises(ValueError, match="not a folder"):
        image_folder("cifar10")


SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.mark.slow
def test_quick_benchmark_prints_every_figure(tmp_path, capsys, real_cifar, real_cache_dir):
    """CI runs ``benchmark --quick`` on the real copy and the shipped checkpoints: every figure is
    there and positive (their values are for a full run on an idle machine)."""
    report_path = tmp_path / "bench.json"
    assert main(["--quick", "--json", str(report_path), "--checkpoints", str(SHIPPED), "--data",
                 f"folder:{REAL_CIFAR}", "--cache-dir", str(real_cache_dir)]) == 0
    out = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert report["peak_gflops"]["float32"] > 0 and report["peak_gflops"]["bfloat16"] > 0
    assert len(report["training"]) == 8
    for row in report["training"]:
        assert row["images_per_second"] > 0 and row["run_minutes"] > 0 and 0 < row["peak_fraction"]
        assert f"| {row['pair']} | {row['way']} |" in out
    assert [row["speedup"] for row in report["training"][::4]] == [1.0, 1.0]  # each pair's reference row
    assert report["explain"]["median_ms"] > 0 and report["explain"]["p95_ms"] >= report["explain"]["median_ms"]
    assert "p95" in out
    teacher = report["teacher_training"]
    assert teacher["recipe"] == "airnet" and teacher["images_per_second"] > 0 and 0 < teacher["peak_fraction"]
    assert "training the airnet teacher (airnet, cross-entropy, batch 512):" in out
    shipped = sorted(path.stem for path in SHIPPED.glob("*.safetensors"))
    assert sorted(row["name"] for row in report["checkpoints"]) == shipped
    for row in report["checkpoints"]:
        assert row["images_per_second"] > 0 and row["batch1_ms"] > 0 and row["macs_per_image"] > 0
        assert f"| {row['name']} |" in out


def test_benchmark_names_a_missing_checkpoint(tmp_path, capsys):
    assert main(["--quick", "--checkpoints", str(tmp_path)]) == 2
    assert "the benchmark needs" in capsys.readouterr().err


def test_scaling_runs_the_same_command_under_torchrun_and_tabulates_the_ratio(tmp_path):
    from kd_core.bench.scaling import format_scaling, measure_scaling, scaling_command
    one = scaling_command("lightnn-kd", "folder:d", 100, 2, tmp_path / "p1.safetensors", None, 1)
    two = scaling_command("lightnn-kd", "folder:d", 100, 2, tmp_path / "p2.safetensors", None, 2)
    assert one[1:4] == ["-m", "kd_core", "distill"] and "--teacher-views" in one
    assert two[1:8] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kd_core"]
    assert two[8:] == [part.replace("p1", "p2") for part in one[3:]]  # the same run otherwise
    rows = [{"way": "1 process x 2 threads", "train_seconds": 10.0, "images_per_second": 20.0},
            {"way": "2 processes x 1 thread", "train_seconds": 8.0, "images_per_second": 25.0, "speedup": 1.25}]
    table = format_scaling(rows, "lightnn-kd", 100, 2)
    assert "| 2 processes x 1 thread | 8.0 | 25 | 1.25x |" in table and "| 1 process x 2 threads | 10.0 | 20 | 1.00x |" in table
    with pytest.raises(ValueError, match="compares one process with several"):
        measure_scaling("lightnn-kd", "folder:d", processes=1)


def test_time_to_accuracy_trains_both_ways_until_the_target(tmp_path, teacher):
    import shutil

    from kd_core.bench.accuracy import format_time_to_accuracy, time_to_accuracy
    write_image_folder(tmp_path / "data", ["a", "b"], {"train": 16, "test": 4}, size=32)
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(teacher, tmp_path / "checkpoints" / "deepnn.safetensors")  # lightnn-kd's teacher, on a and b
    lines = []
    result = time_to_accuracy("lightnn-kd", f"folder:{tmp_path / 'data'}", tmp_path / "checkpoints", 0.001,
                              epochs=2, views=1, cache_dir=tmp_path / "cache", log=lines.append)
    for way in ("reference", "engine"):  # any correct test image reaches 0.001%: one epoch each
        assert result[way]["epochs"] == 1 and 0 < result[way]["top1"] <= 100 and result[way]["seconds"] > 0
    assert result["speedup"] == pytest.approx(result["reference"]["seconds"] / result["engine"]["seconds"])
    assert not result["speedup_is_lower_bound"] and (result["max_epochs"], result["views"]) == (2, 1)
    assert lines[0] == "reference loop to 0.001% (at most 2 epochs)" and "reference loop epoch 1" in lines[1]
    assert lines[-1] == "engine to 0.001% (recipe lightnn-kd over 2 epochs, a 1-view teacher bank built afresh)"
    table = format_time_to_accuracy(result)
    assert "| reference loop | 1 |" in table and "| engine, 2-epoch schedule (1-view bank built afresh) | 1 |" in table
    assert f"reaches it {result['speedup']:.1f}x sooner" in table and "at least" not in table
    # only the engine got there: the reference's time, and the speedup, are lower bounds
    slow = {**result, "reference": {"epochs": None, "top1": 61.5, "seconds": 600.0},
            "engine": {"epochs": 2, "top1": 72.3, "seconds": 60.0}, "speedup": 10.0, "speedup_is_lower_bound": True}
    table = format_time_to_accuracy(slow)
    assert "| reference loop | not reached in 2 | 61.50% | 10.0 |" in table and "at least 10.0x sooner" in table
    with pytest.raises(ValueError, match="a percentage in"):
        time_to_accuracy("lightnn-kd", "cifar10", tmp_path, 120)
    with pytest.raises(ValueError, match="views must be at least 1"):
        time_to_accuracy("lightnn-kd", "cifar10", tmp_path, 72, views=0)
    with pytest.raises(ValueError, match="does not distil"):
        time_to_accuracy("lightnn-ce", "cifar10", tmp_path, 72)


def test_cost_puts_a_student_beside_its_teacher_with_the_ratios(teacher, tmp_path, capsys):
    from kd_core.bench.cost import ratios

    student = tmp_path / "student.safetensors"
    run(RunSpec(arch="mlp", data=f"folder:{teacher.parent / 'data'}", arch_args={"hidden": (8,)},
                config=TrainConfig(epochs=1, batch_size=8), output=student, role="student",
                cache_dir=teacher.parent / "cache"))
    out_json = tmp_path / "cost.json"
    assert main(["cost", str(teacher), str(student), "--repeats", "3", "--threads", "1", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    big, small = report["rows"]
    assert (big["name"], small["name"]) == ("teacher", "student") and report["threads"] == 1
    assert big["params"] == models.count_parameters(models.create("resnet8", num_classes=2))
    assert small["params"] == 3 * 32 * 32 * 8 + 8 + 8 * 2 + 2  # one hidden layer of 8, two classes
    assert small["macs"] == 3 * 32 * 32 * 8 + 8 * 2 and big["file_bytes"] == teacher.stat().st_size
    assert all(row[key] > 0 for row in report["rows"] for key in ("latency_ms_batch1", "latency_ms_batch256"))
    ratio = report["ratios"][0]
    assert ratio["student"] == "student" and ratio["params"] == pytest.approx(big["params"] / small["params"])
    assert "| teacher / student |" in out and f"| {small['params']:,} |" in out
    assert ratios({"params": 10, "macs": 0}, {"params": 4, "macs": 2})["params"] == 2.5
    assert ratios({"params": 10, "macs": 0}, {"params": 4, "macs": 2})["macs"] is None


def test_cost_refuses_a_missing_checkpoint_or_another_data_set_before_timing_anything(teacher, tmp_path, capsys):
    digits = Path(__file__).resolve().parents[1] / "checkpoints" / "digits-mlp-kd.safetensors"
    for student, message in ((tmp_path / "gone.safetensors", "no checkpoint file at .*gone.safetensors"),
                             (digits, "digits-mlp-kd.safetensors was trained on other data .* than teacher")):
        assert main(["cost", str(teacher), str(student), "--threads", "1", "--repeats", "1"]) == 2
        captured = capsys.readouterr()
        assert re.search(message, captured.err) and captured.out == ""
