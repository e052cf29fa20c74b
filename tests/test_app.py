"""The dashboard end to end: ``python app.py`` served by a real Gradio server in a subprocess and
driven through its API with gradio_client, on tiny checkpoints trained here on a synthetic image
folder that has the ten CIFAR-10 classes (so the bundled examples and test sample fit them)."""
from __future__ import annotations

import base64
import io
import json
import os
import re
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from helpers import CAT, CIFAR_CLASSES, build_bench, start_app, stop_app
from kd_core.checkpoint import load_checkpoint
from kd_core.dashboard.models_tab import load_sample
from kd_core.evaluation import predict
from kd_core.explain import explain
from kd_core.explain.images import DISPLAY_MAX_SIDE
from kd_core.jobs import JobStore

ROOT = Path(__file__).resolve().parents[1]
PREDICTED = "each model's own prediction"
JOB_TIMEOUT = 90.0
CANCEL_SECONDS = 2.0
JOB_SETTINGS = {"teacher": "teacher", "student": "camnet", "data": None, "ce": 0.5, "kd": 0.5, "feature": 0,
                "cam": 0, "temperature": 4, "epochs": 1, "lr": 0.05, "batch_size": 32, "seed": 0, "limit": 48,
                "teacher_views": 0, "name": "", "recipe": "none: the settings below"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    bench = build_bench(tmp_path_factory.mktemp("dashboard"))
    process, url = start_app(bench.env, bench.root / "app.log")
    yield SimpleNamespace(**vars(bench), process=process, url=url, log=bench.root / "app.log")
    stop_app(process, bench.runs)


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, verbose=False, download_files=str(server.root / "downloads"))


# -- helpers ---------------------------------------------------------------------------------------


def call_explain(client: Client, image, teacher="teacher", students=("student",), top_k=5,
                 method="gradcam") -> tuple[list, dict]:
    """The explain endpoint's outputs, and its "Raw numbers" JSON."""
    outputs = client.predict(None if image is None else handle_file(str(image)), teacher, list(students),
                             method, PREDICTED, top_k, 0.5, api_name="/explain")
    return outputs, outputs[-1]


def display_size(width: int, height: int, max_side: int = DISPLAY_MAX_SIDE) -> tuple[int, int]:
    """(height, width) of an image shown with its longest side capped at ``max_side``."""
    scale = min(1.0, max_side / max(width, height))
    return round(height * scale), round(width * scale)


def check_explanation(numbers: dict, names: list[str], top_k: int, image_shape: tuple[int, int]) -> None:
    assert [model["name"] for model in numbers["models"]] == names
    for model in numbers["models"]:
        probabilities = np.array(model["probabilities"])
        assert probabilities.shape == (len(CIFAR_CLASSES),)
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)
        assert len(model["top_k"]) == top_k
        top_probabilities = [probability for _, probability in model["top_k"]]
        assert top_probabilities == sorted(top_probabilities, reverse=True)
        for name, probability in model["top_k"]:
            assert probability == pytest.approx(probabilities[CIFAR_CLASSES.index(name)], abs=1e-12)
        assert model["top_k"][0][0] == model["predicted"] == CIFAR_CLASSES[int(probabilities.argmax())]
        assert model["overlay_shape"] == [*image_shape, 3]
    assert [row["student"] for row in numbers["agreements"]] == names[1:]


def wait_for(condition, timeout: float, what: str, pause: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def token_of(client: Client) -> str:
    """The owner token an API client sends with its job calls (a browser keeps one in local storage)."""
    if not hasattr(client, "kd_token"):
        client.kd_token = f"test-client-token-{id(client):x}"
    return client.kd_token


def launch(client: Client, server, **settings) -> int:
    message, job_choice, token = client.predict(*{**JOB_SETTINGS, "data": server.data_name, **settings}.values(),
                                                token_of(client), api_name="/launch_job")
    assert message.startswith(f"Job {job_choice['value']} ") and token == token_of(client)
    return job_choice["value"]


def job_action(client: Client, job_id, action: str = "cancel") -> str:
    return client.predict(job_id, token_of(client), api_name=f"/{action}_job")


def job_row(client: Client, job_id: int) -> tuple[list, tuple]:
    """The job's row in the Jobs table, and the endpoint's outputs."""
    outputs = client.predict(job_id, api_name="/jobs")
    rows = {row[0]: row for row in outputs[0]["data"]}
    return rows[job_id], outputs


# -- tests -----------------------------------------------------------------------------------------


def test_importing_app_starts_nothing(tmp_path):
    script = ("import glob, json, os, gradio, app\n"
              "children = ''.join(open(path).read() for path in glob.glob(f'/proc/{os.getpid()}/task/*/children'))\n"
              "print(json.dumps({'blocks': isinstance(app.demo, gradio.Blocks), 'children': children.split(),"
              " 'runs': str(app.RUNS), 'data': app.DATA_SOURCES}))\n")
    env = {**os.environ, "KD_RUNS": str(tmp_path / "runs"), "KD_CHECKPOINTS": str(tmp_path / "checkpoints"),
           "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "KD_DATA_SOURCES": "photos=folder:/srv/a.tar.gz, folder:/srv/photos,cifar10,folder:/srv/x=1"}
    finished = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    report = json.loads(finished.stdout.strip().splitlines()[-1])
    assert report == {"blocks": True, "children": [], "runs": str(tmp_path / "runs"),
                      "data": {"photos": "folder:/srv/a.tar.gz", "photos-2": "folder:/srv/photos", "cifar10": "cifar10",
                               "x=1": "folder:/srv/x=1"}}  # offered by name (NAME=SOURCE, else the folder's name)
    assert list(tmp_path.iterdir()) == []  # no runs folder, no database, no checkpoints folder
    assert not (ROOT / "app.pyi").exists()  # what Gradio writes for a component subclass defined in app.py


def make_photo(path: Path, width: int, height: int) -> Path:
    """A smooth synthetic photo: colour gradients and a bright disc."""
    rows, columns = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * columns / width, 255 * rows / height, np.full((height, width), 90.0)], axis=-1)
    pixels[(rows - height / 2) ** 2 + (columns - width / 3) ** 2 < (height / 5) ** 2] = 240
    Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return path


@pytest.mark.parametrize("picture, top_k", [("cat", 5), ("photo", 3)])
def test_explain_returns_consistent_numbers_and_full_size_overlays(server, client, tmp_path, picture, top_k):
    path = CAT if picture == "cat" else make_photo(tmp_path / "photo.jpg", 1600, 1200)
    width, height = Image.open(path).size
    expected_shape = display_size(width, height)
    assert expected_shape == ((32, 32) if picture == "cat" else (384, 512))

    outputs, numbers = call_explain(client, path, students=["student", "teacher", "student"], top_k=top_k)

    check_explanation(numbers, ["teacher", "student"], top_k, expected_shape)
    # the server's numbers are kd_core's for the very file uploaded
    checkpoints = [load_checkpoint(server.checkpoints / f"{name}.safetensors") for name in ("teacher", "student")]
    local = explain(path, checkpoints, top_k=top_k)
    for served, computed in zip(numbers["models"], local.models):
        np.testing.assert_allclose(served["probabilities"], computed.probabilities, atol=1e-6)
    # per model: caption, chart, overlay (a JPEG inside the result, no file to fetch); the unused panels are empty
    teacher_caption, teacher_chart, teacher_overlay, student_caption, _, student_overlay = outputs[:6]
    assert teacher_caption.startswith("**teacher: teacher** (lightnn)")
    assert student_caption.startswith("**student 1: student** (camnet)")
    teacher_classes = [name for name, _ in numbers["models"][0]["top_k"]]
    assert json.loads(teacher_chart["plot"])["data"][0]["y"] == teacher_classes[::-1]  # best on top
    for overlay in (teacher_overlay, student_overlay):
        assert overlay["path"] is None and overlay["url"].startswith("data:image/jpeg;base64,")
        drawn = Image.open(io.BytesIO(base64.b64decode(overlay["url"].split(",", 1)[1])))
        assert drawn.format == "JPEG" and drawn.size == (expected_shape[1], expected_shape[0])
    assert list(outputs[6:12]) == ["", None, None, "", None, None]
    [agreement] = outputs[12]["data"]
    same_top1 = local.agreements[0].same_top1
    assert agreement[:3] == ["student", "yes" if same_top1 else "no", f"{local.agreements[0].kl_teacher_student:.4f}"]


def test_scorecam_works_and_draws_no_progress_bar_in_the_server_log(server, client):
    _, numbers = call_explain(client, CAT, top_k=2, method="scorecam")
    assert numbers["method"] == "scorecam"
    check_explanation(numbers, ["teacher", "student"], 2, (32, 32))
    assert "it/s]" not in server.log.read_text()  # TQDM_DISABLE is set before grad-cam imports tqdm


def write_unusual(kind: str, path: Path) -> Path:
    generator = np.random.default_rng(1)
    noise = generator.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    if kind == "grayscale":
        Image.fromarray(noise[:, :, 0]).save(path)
    elif kind == "rgba":
        Image.fromarray(generator.integers(0, 256, (40, 60, 4), dtype=np.uint8)).save(path)
    elif kind == "16-bit":
        Image.fromarray(generator.integers(1000, 3000, (40, 60)).astype(np.uint16)).save(path)
        assert Image.open(path).mode == "I;16"
    elif kind == "cmyk":
        Image.fromarray(noise).convert("CMYK").save(path)
        assert Image.open(path).mode == "CMYK"
    elif kind == "animated":
        frames = [Image.fromarray(np.roll(noise, shift, axis=1)) for shift in (0, 7, 14)]
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
        assert Image.open(path).n_frames == 3
    return path


UNUSUAL = {"grayscale": "gray.png", "rgba": "rgba.png", "16-bit": "deep.png", "cmyk": "cmyk.jpg",
           "animated": "animated.gif"}


@pytest.mark.parametrize("kind", UNUSUAL)
def test_unusual_images_are_explained(client, tmp_path, kind):
    path = write_unusual(kind, tmp_path / UNUSUAL[kind])
    _, numbers = call_explain(client, path, top_k=4)
    check_explanation(numbers, ["teacher", "student"], 4, (40, 60))


def write_bad(kind: str, folder: Path) -> Path | None:
    if kind == "text":
        path = folder / "notes.png"
        path.write_text("these are notes, not a picture\n" * 20)
    elif kind == "truncated":
        photo = make_photo(folder / "photo.jpg", 400, 300).read_bytes()
        path = folder / "cut.jpg"
        path.write_bytes(photo[: len(photo) // 2])
    elif kind == "bomb":
        path = folder / "bomb.png"
        path.write_bytes(bomb_png(30000, 30000))
    else:
        path = None
    return path


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of ``width`` x ``height``: ~110 KB on disk, 900 M pixels decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    compressor = zlib.compressobj(9)
    row = bytes(1 + width // 8)  # filter byte + packed bits
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind, message", [
    ("text", r"^notes\.png is not an image in a supported format \(PNG, JPEG"),
    ("truncated", r"^cut\.jpg is truncated or corrupt"),
    ("bomb", r"^bomb\.png declares too many pixels to decode safely"),
    ("none", r"^no image was given: upload a picture first$"),
], ids=["text-file", "truncated-jpeg", "decompression-bomb", "no-image"])
def test_bad_upload_gets_a_clear_message_and_the_server_keeps_serving(server, client, tmp_path, kind, message):
    path = write_bad(kind, tmp_path)
    if kind == "bomb":
        assert path.stat().st_size < 150_000
    with pytest.raises(AppError, match=message):
        call_explain(client, path)
    assert server.process.poll() is None
    _, numbers = call_explain(client, CAT, top_k=2)
    check_explanation(numbers, ["teacher", "student"], 2, (32, 32))


def test_checkpoint_deleted_while_selected_gets_a_clear_message(server, client):
    _, numbers = call_explain(client, CAT, students=["student-copy"])  # listed and loaded
    assert numbers["models"][1]["name"] == "student"  # the copy carries the original's name
    (server.checkpoints / "student-copy.safetensors").unlink()
    with pytest.raises(AppError, match=r"checkpoint 'student-copy' is not in .*\(deleted or renamed\?\); refresh"):
        call_explain(client, CAT, students=["student-copy"])
    _, numbers = call_explain(client, CAT, students=["student"], top_k=1)
    check_explanation(numbers, ["teacher", "student"], 1, (32, 32))


@pytest.mark.parametrize("teacher, students", [("../x", ["student"]), ("/etc/passwd", []),
                                               ("teacher", [".."]), ("teacher", ["../checkpoints/student"])])
def test_explain_refuses_names_outside_the_checkpoints_folder(client, teacher, students):
    refused = re.escape(next(name for name in [teacher, *students] if "/" in name or ".." in name))
    with pytest.raises(AppError, match=rf"'?{refused}'? is not a checkpoint name"):
        call_explain(client, CAT, teacher=teacher, students=students)


@pytest.mark.parametrize("settings, message", [
    pytest.param({"teacher": "../x"}, r"Value: \.\./x is not in the list of choices", id="teacher-dotdot"),
    pytest.param({"teacher": "/etc/passwd"}, r"Value: /etc/passwd is not in the list of choices", id="teacher-path"),
    pytest.param({"name": "../evil"}, r"^name: '\.\./evil' is not a checkpoint name", id="name-dotdot"),
    pytest.param({"name": ".."}, r"^name: '\.\.' is not a checkpoint name", id="name-parent"),
    pytest.param({"epochs": 0}, r"^epochs must be a whole number >= 1, got 0$", id="epochs-0"),
    pytest.param({"temperature": -2}, r"^temperature must be a number > 0, got -2", id="negative-T"),
    pytest.param({"batch_size": 0}, r"^batch_size must be a whole number >= 1, got 0$", id="batch-0"),
    pytest.param({"ce": 0, "kd": 0}, r"^weights: at least one loss weight must be positive$", id="no-loss"),
    pytest.param({"teacher_views": -1}, r"^teacher_views must be a whole number >= 0, got -1", id="views-negative"),
    pytest.param({"epochs": 301}, r"^epochs must be at most 300 on this server, got 301$", id="epochs-over-bound"),
    pytest.param({"teacher_views": 33}, r"^teacher_views must be at most 32 on this server", id="views-over-bound"),
    pytest.param({"batch_size": 5000}, r"^batch_size must be at most 4096 on this server", id="batch-over-bound"),
    pytest.param({"lr": 11}, r"^lr must be at most 10 on this server", id="lr-over-bound"),
    pytest.param({"recipe": "airnet"}, r"Value: airnet is not in the list of choices", id="teacher-recipe"),
    pytest.param({"data": "folder:/no/such/data"}, r"Value: folder:/no/such/data is not in the list of choices",
                 id="data-not-offered"),
    pytest.param({"data": "gone"}, r"^data: the data set 'gone' is not on this server \(its folder is gone\)$",
                 id="data-offered-but-gone"),
])
def test_job_settings_out_of_range_or_outside_the_folders_are_refused(server, client, settings, message):
    jobs_before = [row[0] for row in client.predict(None, api_name="/jobs")[0]["data"]]
    with pytest.raises(AppError, match=message):
        launch(client, server, **settings)
    assert [row[0] for row in client.predict(None, api_name="/jobs")[0]["data"]] == jobs_before
    assert list(server.root.rglob("*evil*")) == []


@pytest.mark.parametrize("job_id, message", [(None, r"^Choose a job to cancel\.$"),
                                             ("abc", r"^'abc' is not a job id"), (999, r"^no job 999$")],
                         ids=["none", "text", "unknown"])
def test_cancel_without_a_valid_job_gets_a_clear_message(client, job_id, message):
    with pytest.raises(AppError, match=message):
        job_action(client, job_id)


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_runs_and_checkpoint_files_are_not_served(server):
    database = server.runs / "jobs.sqlite3"
    assert database.is_file()  # made at start-up, so the refusal below is not for a missing file
    assert http_status(f"{server.url}gradio_api/file={CAT}") == 200  # what the route does serve
    for path in (database, server.checkpoints / "teacher.safetensors", ROOT / "app.py"):
        assert http_status(f"{server.url}gradio_api/file={path}") in (403, 404), path


def test_models_tab_lists_checkpoints_and_counts_student_mistakes(server, client):
    table, _, _, chosen = client.predict(api_name="/models")
    rows = {row[0]: dict(zip(table["headers"], row)) for row in table["data"]}
    student = load_checkpoint(server.checkpoints / "student.safetensors")
    teacher = load_checkpoint(server.checkpoints / "teacher.safetensors")
    assert rows["student"]["params"] == sum(parameter.numel() for parameter in student.model.parameters())
    assert (rows["student"]["role"], rows["student"]["teacher"]) == ("student", "teacher")
    assert rows["teacher"]["role"] == "teacher"
    assert "student" in [value for value, _ in chosen["choices"]]

    _, _, gallery, note = client.predict("student", api_name="/model_details")

    sample = load_sample(ROOT / "assets" / "cifar10-test-sample.safetensors")
    images, labels = sample.images, sample.labels
    teacher_right = predict(teacher.model, images, teacher.mean, teacher.std).argmax(1) == labels
    student_wrong = predict(student.model, images, student.mean, student.std).argmax(1) != labels
    count = int((teacher_right & student_wrong).sum())
    assert note == (f"{count} of {len(labels):,} sample test images that teacher classifies correctly and student "
                    f"does not (first {min(count, 24)} shown).")
    assert len(gallery) == min(count, 24)
    for item in gallery:  # each picture inside the result (a PNG data: URL), no shared cache file to fetch
        assert item["caption"].startswith("true ")
        url = item["image"]["url"] if isinstance(item["image"], dict) else item["image"]
        assert url.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (128, 128)  # 32 px x 4


def test_distillation_job_completes_and_its_checkpoint_is_listed(server, client):
    job_id = launch(client, server, name="tiny-kd", epochs=2)
    choices = []

    def finished():
        row, outputs = job_row(client, job_id)
        teacher_choices = outputs[5]
        if "choices" in teacher_choices:  # sent only when the list changed
            choices[:] = [value for value, _ in teacher_choices["choices"]]
        return row if row[2] not in ("queued", "running") else None

    row = wait_for(finished, JOB_TIMEOUT, f"job {job_id} to finish", pause=0.5)
    _, name, state, progress, teacher, student, method, epoch, test_top1, _ = row
    assert (name, state, progress, epoch) == ("tiny-kd", "completed", "100%", "2/2"), row
    assert (teacher, student, method) == ("teacher", "camnet", "ce+kd")
    assert 0 <= test_top1 <= 100
    assert "tiny-kd" in choices
    checkpoint = load_checkpoint(server.checkpoints / "tiny-kd.safetensors")
    assert (checkpoint.meta["role"], checkpoint.meta["teacher"]["name"], checkpoint.meta["method"]) == \
        ("student", "teacher", "ce+kd")
    assert [epoch["epoch"] for epoch in checkpoint.meta["history"]] == [1, 2]
    assert checkpoint.meta["metrics"]["test_top1"] == test_top1

    table, _, _, chosen = client.predict(api_name="/models")
    listed = {row[0]: row for row in table["data"]}
    assert listed["tiny-kd"][1:3] == ["camnet", "student"]
    assert "tiny-kd" in [value for value, _ in chosen["choices"]]
    _, numbers = call_explain(client, CAT, students=["tiny-kd"], top_k=3)  # usable right away
    check_explanation(numbers, ["teacher", "tiny-kd"], 3, (32, 32))


def test_cancel_stops_a_running_job_and_its_workers(server, client):
    store = JobStore(server.runs)
    long_job = launch(client, server, epochs=300, name="long")
    queued_job = launch(client, server, epochs=1, name="after-long")  # one job at a time: it waits
    assert store.get(queued_job)["state"] == "queued"

    def in_second_epoch():
        job = store.get(long_job)
        assert job["state"] in ("queued", "running"), job
        return job if job["state"] == "running" and job["epoch"] >= 2 else None

    running = wait_for(in_second_epoch, JOB_TIMEOUT, "the long job to run its second epoch")
    assert running["pgid"] and 0 < running["progress"] < 1

    started = time.monotonic()
    message = job_action(client, long_job)
    cancelled = store.get(long_job)
    elapsed = time.monotonic() - started

    assert message == f"Job {long_job} is cancelled."
    assert cancelled["state"] == "cancelled" and elapsed < CANCEL_SECONDS, (cancelled["state"], elapsed)
    assert 2 <= cancelled["epoch"] < 400
    with pytest.raises(ProcessLookupError):
        os.killpg(running["pgid"], 0)
    assert not (server.checkpoints / "long.safetensors").exists()

    # Nobody polls the jobs endpoint now: the server's own scheduler starts the queued job.
    def queued_job_finished():
        job = store.get(queued_job)
        return job if job["state"] not in ("queued", "running") else None

    finished = wait_for(queued_job_finished, JOB_TIMEOUT, "the queued job to run without a page polling")
    assert finished["state"] == "completed", finished
    assert (server.checkpoints / "after-long.safetensors").is_file()
    row, _ = job_row(client, long_job)
    assert row[2] == "cancelled"


def test_only_the_launching_client_can_cancel_its_job_and_each_client_has_a_cap(server, client):
    store = JobStore(server.runs)
    other = Client(server.url, verbose=False)  # another client: another owner token
    mine = launch(client, server, epochs=300, name="mine")
    with pytest.raises(AppError, match=rf"^job {mine} was launched by another session; only that session can cancel"):
        job_action(other, mine)
    with pytest.raises(AppError, match="only that session can resume"):
        job_action(other, mine, "resume")
    assert store.get(mine)["state"] in ("queued", "running")
    more = [launch(client, server, epochs=300, name=f"mine-{n}") for n in (2, 3)]  # the cap is 3 per client
    with pytest.raises(AppError, match=r"^you already have 3 jobs queued or running; wait for one"):
        launch(client, server, epochs=1, name="one-too-many")
    theirs = [launch(other, server, epochs=1, name=f"theirs-{n}") for n in (1, 2)]  # another client still may
    with pytest.raises(AppError, match=r"^the server already has 5 jobs queued or running"):  # ... up to 5 in all
        launch(other, server, epochs=1, name="server-full")
    with pytest.raises(AppError, match="launched by another session"):
        job_action(client, theirs[0])
    for job_id in [mine, *more]:
        assert job_action(client, job_id) == f"Job {job_id} is cancelled."
    for job_id in theirs:
        assert job_action(other, job_id) == f"Job {job_id} is cancelled."
    assert not (server.checkpoints / "one-too-many.safetensors").exists()


def test_api_clients_see_the_app_a_browser_sees(server):
    """Choices a browser gets filled in later are accepted from the first call: a class name as the
    explain target, and a model's details before the Models tab was ever opened."""
    fresh = Client(server.url, verbose=False)
    outputs = fresh.predict(handle_file(str(CAT)), "teacher", ["student"], "gradcam", "ship", 2, 0.5,
                            api_name="/explain")
    assert [model["explained_class"] for model in outputs[-1]["models"]] == ["ship", "ship"]
    with pytest.raises(AppError, match="unknown target 'no-such-class'"):
        fresh.predict(handle_file(str(CAT)), "teacher", [], "gradcam", "no-such-class", 2, 0.5, api_name="/explain")
    _, _, gallery, note = Client(server.url, verbose=False).predict("student", api_name="/model_details")
    assert note.endswith("does not (first %d shown)." % len(gallery))
    with pytest.raises(AppError, match="is not a checkpoint name"):
        fresh.predict("x" * 5000, api_name="/model_details")
    config = urllib.request.urlopen(f"{server.url}config", timeout=30).read().decode()
    [data_set] = [component["props"] for component in json.loads(config)["components"]
                  if component.get("props", {}).get("label") == "Data set"]
    assert [value for _, value in data_set["choices"]] == ["data", "gone", "digits"]
    assert str(server.root / "data") not in config and str(server.root / "gone") not in config  # names, not paths


def test_a_digits_job_finishes_and_its_mlp_student_explains_a_digit_with_saliency(server, client, tmp_path):
    job_id = launch(client, server, teacher="digits-teacher", student="mlp", data="digits", epochs=1,
                    batch_size=64, limit=256, name="digits-mlp")
    row = wait_for(lambda: (lambda r: r if r[2] not in ("queued", "running") else None)(job_row(client, job_id)[0]),
                   JOB_TIMEOUT, f"job {job_id} to finish", pause=0.5)
    assert row[2] == "completed", row
    student = load_checkpoint(server.checkpoints / "digits-mlp.safetensors")
    assert student.meta["data"]["input_size"] == [1, 8, 8] and student.meta["data"]["source"] == "digits"
    from kd_core.data import load_data
    digit = load_data("digits").test.images[0, 0].numpy()                      # (8, 8) uint8
    path = tmp_path / "digit.png"
    Image.fromarray(digit).resize((64, 64), Image.Resampling.NEAREST).save(path)  # as a person would upload it
    _, numbers = call_explain(client, path, teacher="digits-teacher", students=["digits-mlp"], top_k=3)
    teacher, mlp = numbers["models"]
    assert (teacher["map"], mlp["map"]) == ("cam", "saliency") and mlp["cam_shape"] == [8, 8]
    assert "input-gradient saliency, not a CAM" in mlp["note"] and mlp["overlay_shape"] == [64, 64, 3]
    assert numbers["agreements"][0]["CAM correlation"] == "n/a"  # a saliency map is not compared with a CAM


# -- what an upload may name ------------------------------------------------------------------------


def raw_explain(server, image_payload) -> tuple[str, object]:
    """POST the explain endpoint a hand-made image payload, as a hostile client would, and return
    the event stream's last event and its data."""
    body = json.dumps({"data": [image_payload, "teacher", ["student"], "gradcam", PREDICTED, 2, 0.5]}).encode()
    request = urllib.request.Request(f"{server.url}gradio_api/call/explain", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.loads(response.read())["event_id"]
    with urllib.request.urlopen(f"{server.url}gradio_api/call/explain/{event_id}", timeout=60) as response:
        stream = response.read().decode()
    events = re.findall(r"^event: (\w+)\ndata: (.*)$", stream, flags=re.MULTILINE)
    event, data = events[-1]
    return event, json.loads(data)


def data_url(path: Path, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(path.read_bytes()).decode()}"


NOT_UPLOADED = "the image must be uploaded through this page (or sent as a data: URL); no other file is read"


def test_an_upload_cannot_name_a_server_file(server, tmp_path):
    outside = make_photo(tmp_path / "private.png", 40, 30)
    upload_folder = Path(server.env["GRADIO_TEMP_DIR"])
    upload_folder.mkdir(parents=True, exist_ok=True)
    link = upload_folder / "link-to-private.png"
    link.symlink_to(outside)
    named = [outside, CAT, tmp_path / "no-such-file.png", server.checkpoints / "teacher.safetensors",
             server.runs / "jobs.sqlite3", server.runs, Path("/etc/passwd"), link, upload_folder / "missing.png",
             upload_folder / ".." / "dashboard" / "app.log", "https://example.com/cat.png"]
    outcomes = set()
    for path in named:
        for payload in ({"path": str(path)}, {"path": str(path), "meta": {"_type": "gradio.FileData"}}):
            event, data = raw_explain(server, payload)
            assert event == "error", (payload, data)
            outcomes.add((event, json.dumps(data)))
    # one message for every path, existing or not, so nothing about the server's files leaks
    assert len(outcomes) <= 2, outcomes  # ours, and Gradio's own refusal of a meta-marked path
    for _, data in outcomes:
        assert str(tmp_path) not in data and "passwd" not in data and "sqlite" not in data
    assert any(NOT_UPLOADED in data for _, data in outcomes)
    assert server.process.poll() is None
    event, data = raw_explain(server, {"path": str(CAT)})  # still refused: the examples folder is not an upload
    assert event == "error"


def test_a_data_url_goes_through_our_decoder_like_an_upload(server, client, tmp_path):
    deep = write_unusual("16-bit", tmp_path / "deep.png")
    event, data = raw_explain(server, {"path": None, "url": data_url(deep)})
    assert event == "complete", data
    _, uploaded = call_explain(client, deep, top_k=2)
    for served, expected in zip(data[-1]["models"], uploaded["models"]):
        np.testing.assert_allclose(served["probabilities"], expected["probabilities"], atol=1e-6)
    assert data[-1]["models"][0]["overlay_shape"] == [40, 60, 3]

    bomb = write_bad("bomb", tmp_path)
    event, data = raw_explain(server, {"path": None, "url": data_url(bomb)})
    assert event == "error" and "declares too many pixels to decode safely" in json.dumps(data), data
    with pytest.raises(AppError, match="declares too many pixels to decode safely"):
        call_explain(client, bomb)

    text = write_bad("text", tmp_path)
    event, data = raw_explain(server, {"path": None, "url": data_url(text)})
    assert event == "error" and "is not an image in a supported format" in json.dumps(data), data

    huge = f"data:image/png;base64,{'A' * (28 * 2**20)}"  # 21 MB once decoded
    event, data = raw_explain(server, {"path": None, "url": huge})
    assert event == "error" and "larger than the 20 MB upload limit" in json.dumps(data), data
    assert server.process.poll() is None


def test_the_load_benchmark_reports_every_figure(server):
    from kd_core.bench import bench_serve

    rows = bench_serve(server.url, CAT, "teacher", ["student"], clients=2, calls=2, rounds=2,
                       pid=server.process.pid)
    assert len(rows) == 2
    for row in rows:
        assert row["calls"] == 4 and row["errors"] == 0
        assert 0 < row["median_ms"] <= row["p95_ms"] and row["calls_per_second"] > 0
        assert isinstance(row["rss_growth_mb"], float)


def test_the_students_list_keeps_to_the_teachers_data_set(tmp_path, monkeypatch):
    """With CIFAR-10 and digits checkpoints in one folder, the Students dropdown offers the chosen
    teacher's data set only, and drops picks of another."""
    import shutil

    import app

    for name in ("airnet", "camnet-ce", "camnet-kd-cam", "digits-cnn", "digits-mlp-ce", "digits-mlp-kd"):
        shutil.copy(ROOT / "checkpoints" / f"{name}.safetensors", tmp_path)
    monkeypatch.setattr(app, "CHECKPOINTS", tmp_path)
    update = app.student_choices("digits-cnn", ["camnet-ce", "digits-mlp-kd"])
    assert update["choices"] == ["digits-mlp-ce", "digits-mlp-kd"] and update["value"] == ["digits-mlp-kd"]
    update = app.student_choices("airnet", ["camnet-ce", "digits-mlp-kd"])
    assert update["choices"] == ["camnet-ce", "camnet-kd-cam"] and update["value"] == ["camnet-ce"]
    assert app.same_data_names("gone") == app.checkpoint_names()  # an unknown teacher: everything


def test_the_students_list_is_redrawn_for_the_teacher_whenever_the_folder_changes(monkeypatch):
    """The jobs timer redraws the Teacher lists when a job adds a checkpoint, but leaves Students to
    student_choices (on the teacher's change, the page's load, and the folder's change), so a
    finished job does not bring back every data set's checkpoints."""
    import app

    wiring = {(app.demo.blocks.get(target, app.demo).__class__.__name__, event): (fn.inputs, fn.outputs)
              for fn in app.demo.fns.values() if fn.fn is app.student_choices for target, event in fn.targets}
    assert set(wiring) == {("Dropdown", "change"), ("Blocks", "load"), ("State", "change")}
    assert all(inputs == [app.teacher, app.students] and outputs == [app.students] for inputs, outputs in wiring.values())
    timer = next(fn for fn in app.demo.fns.values() if fn.fn is app.refresh_jobs)
    slot = timer.outputs.index(app.students)
    assert app.known_checkpoints in timer.outputs
    monkeypatch.setattr(app, "job_manager", lambda: SimpleNamespace(tick=lambda: None, list_jobs=lambda: [],
                                                                    get_job=lambda job_id: None))
    update = app.refresh_jobs(None, ["a checkpoint that is gone"])  # the folder changed
    assert update[timer.outputs.index(app.teacher)]["choices"] == app.checkpoint_names()
    assert "choices" not in update[slot]
