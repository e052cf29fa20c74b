"""KD Workbench dashboard: explain, compare and distill in the browser.

The interface only; the work is in kd_core. ``demo`` is built at import and nothing starts until
``python app.py`` (or ``demo.launch()``). Settings from the environment:

- ``KD_CHECKPOINTS`` (default ``checkpoints``), ``KD_RUNS`` (default ``runs``): the only folders
  a request may read models from or write jobs to;
- ``KD_DATA_SOURCES``: comma-separated data sources the Distill tab offers, each ``SOURCE`` or
  ``NAME=SOURCE`` (default: the CIFAR-10 copy in ``../shared/data`` when present, ``cifar10`` and
  ``digits``); the page and the API name them (``cifar10-jpeg``), never by a server path;
- ``KD_MAX_JOBS``: distillation jobs running at once (default 1; further launches queue);
- ``KD_MAX_QUEUED_JOBS`` (default 8) / ``KD_MAX_JOBS_PER_CLIENT`` (default 2): jobs queued or running
  in all and per browser or API session; a job is cancelled or resumed only by the session that
  launched it, unless ``KD_SHARED_JOBS=1`` (a private server: everyone may, no per-client cap);
- ``KD_JOB_RETENTION_HOURS`` (default 72; 0 keeps everything): finished jobs older than this lose
  their checkpoint and files, and teacher banks unused for as long are deleted;
- ``KD_TENSORBOARD_DIR``: when set, every job also writes TensorBoard curves to ``DIR/job-<id>-<name>``;
- ``KD_APP_THREADS``: torch and BLAS threads for explaining (default 1: lowest latency beside a job);
  each event answers two calls at a time. Explain's overlays come back inside the result as
  ``data:image/jpeg;base64,...`` URLs (an API client finds the picture in the value's ``url``);
- ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``: where to serve (default 127.0.0.1:7860).
"""
from __future__ import annotations

import base64
import functools
import io
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TQDM_DISABLE", "1")  # tqdm reads it once, when imported (below, by grad-cam)

import gradio as gr
from gradio.components.gallery import GalleryData, GalleryImage
from gradio.data_classes import ImageData
from PIL import Image

from kd_core import models
from kd_core.dashboard import distill_tab, explain_tab, models_tab
from kd_core.checkpoint import NAME, CheckpointError, list_checkpoints
from kd_core.data.sources import source_name
from kd_core.explain import ModelCache, cam_methods, explain
from kd_core.experiments import recipes
from kd_core.explain.images import MAX_UPLOAD_BYTES, ImageError, uploaded_source
from kd_core.jobs import JobManager
from kd_core.jobs.spec import distillation_recipes, form_values

ROOT = Path(__file__).resolve().parent
CHECKPOINTS = Path(os.environ.get("KD_CHECKPOINTS", ROOT / "checkpoints")).resolve()
RUNS = Path(os.environ.get("KD_RUNS", ROOT / "runs")).resolve()
ASSETS = ROOT / "assets"
SAMPLE = ASSETS / "cifar10-test-sample.safetensors"  # the Models tab's mistakes come from these images
SHARED_CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
MAX_STUDENTS = 3
SCHEDULER_SECONDS = 2.0
# CIFAR images are 32 x 32: draw the upload and the maps enlarged, pixel for pixel, not at their own size
ENLARGE_IMAGES_CSS = """
.upload-panel .image-frame img, .cam-panel .image-container img {
    width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated;
}
"""
PREDICTED = "each model's own prediction"
NO_RECIPE = "none: the settings below"
FORM = form_values(None)  # the Distill form's defaults: the base of a distillation that names no recipe
TEACHERS_PREDICTION = "the teacher's prediction"


def _data_sources() -> dict[str, str]:
    """The data sets the Distill tab offers: name -> source. ``KD_DATA_SOURCES`` entries are
    ``SOURCE`` or ``NAME=SOURCE``; people and API clients see the names only, never a server path."""
    if os.environ.get("KD_DATA_SOURCES"):
        entries = [entry.strip() for entry in os.environ["KD_DATA_SOURCES"].split(",") if entry.strip()]
    else:
        entries = ([f"folder:{SHARED_CIFAR}"] if SHARED_CIFAR.exists() else []) + ["cifar10", "digits"]
    offered: dict[str, str] = {}
    for entry in entries:
        label, sep, source = entry.partition("=")
        if not sep or entry.startswith("folder:") or not NAME.fullmatch(label):
            label, source = source_name(entry), entry
        unique, number = label, 2
        while unique in offered:
            unique, number = f"{label}-{number}", number + 1
        offered[unique] = source
    return offered


DATA_SOURCES = _data_sources()
# KD_SHARED_JOBS=1: a private server whose users all may cancel and resume every job, with no per-client cap
SHARED_JOBS = os.environ.get("KD_SHARED_JOBS", "") == "1"
model_cache = ModelCache(CHECKPOINTS)


@functools.cache
def job_manager() -> JobManager:
    """Made on first use, so importing this module creates no folder and starts no process."""
    retention = float(os.environ.get("KD_JOB_RETENTION_HOURS", "72"))
    return JobManager(RUNS, CHECKPOINTS, max_concurrent=int(os.environ.get("KD_MAX_JOBS", "1")),
                      data_sources=list(DATA_SOURCES.values()), max_active=int(os.environ.get("KD_MAX_QUEUED_JOBS", "8")),
                      max_active_per_owner=None if SHARED_JOBS else int(os.environ.get("KD_MAX_JOBS_PER_CLIENT", "2")),
                      retention_seconds=retention * 3600 if retention > 0 else None)


def _usable_checkpoints() -> list[dict]:
    return [row for row in list_checkpoints(CHECKPOINTS) if "error" not in row] if CHECKPOINTS.is_dir() else []


def checkpoint_names(role: str | None = None) -> list[str]:
    return [row["name"] for row in _usable_checkpoints() if role is None or row["meta"].get("role") == role]


def _data_key(meta: dict) -> tuple:
    """What a teacher and its students must share: classes and input size."""
    data = meta.get("data") or {}
    return tuple(data.get("classes") or ()), tuple(data.get("input_size") or ())


def same_data_names(teacher: str | None) -> list[str]:
    """The checkpoints of ``teacher``'s data set (same classes and input size) but itself, so that the
    Students list stays short when checkpoints of several data sets ship; every checkpoint for a
    teacher not (or no longer) in the folder."""
    rows = {row["name"]: row["meta"] for row in _usable_checkpoints()}
    if teacher not in rows:
        return [name for name in rows if name != teacher]
    wanted = _data_key(rows[teacher])
    return [name for name, meta in rows.items() if name != teacher and _data_key(meta) == wanted]


def student_choices(teacher: str | None, students: list[str] | None):
    """The Students dropdown for ``teacher`` (:func:`same_data_names`); picks of another data set are dropped."""
    names = same_data_names(teacher)
    return gr.update(choices=names, value=[name for name in students or [] if name in names])


def offered_recipes() -> list[str]:
    """The Distill tab's recipes: those whose teacher is in the checkpoints folder (a teacher too
    large to ship is offered once a user has trained it), after the no-recipe choice."""
    present = set(checkpoint_names())
    return [NO_RECIPE, *(name for name in distillation_recipes() if recipes.get(name).teacher in present)]


def recipe_choices(recipe: str | None):
    """The Recipe dropdown redrawn for the folder as it is now; a choice no longer offered falls back to none."""
    names = offered_recipes()
    return gr.update(choices=names, value=recipe if recipe in names else NO_RECIPE)


def _default_teacher() -> str | None:
    teachers = checkpoint_names("teacher") or checkpoint_names()
    return "airnet" if "airnet" in teachers else (teachers[0] if teachers else None)


def _default_students() -> list[str]:
    """Two students of the default teacher's data set (camnet-kd-cam and camnet-ce when shipped)."""
    teacher = _default_teacher()
    offered = same_data_names(teacher)
    students = [name for name in checkpoint_names("student") if name in offered]
    preferred = [name for name in ("camnet-kd-cam", "camnet-ce") if name in students]
    return (preferred + [name for name in students if name not in preferred])[:2]


# -- Explain -------------------------------------------------------------------------------------


def unopened_upload(image: gr.Image) -> gr.Image:
    """Make ``image`` hand the handler what was uploaded, unopened: the path of a file in Gradio's
    upload folder, or the bytes of a ``data:`` URL. Gradio checks a payload's path against its
    upload folder only when the payload carries its ``meta`` marker, and decodes ``data:`` URLs
    itself with Pillow's defaults; :func:`kd_core.explain.images.uploaded_source` checks every payload,
    and :func:`kd_core.explain.images.load_image` decodes it and says what is wrong.
    (Set on the instance: Gradio writes an ``app.pyi`` stub for any component subclass defined here.)"""

    def preprocess(payload):
        if payload is None:
            return None
        try:
            return uploaded_source(payload.path, payload.url, image.GRADIO_CACHE, max_bytes=MAX_UPLOAD_BYTES)
        except ImageError as error:
            raise gr.Error(str(error)) from None

    image.preprocess = preprocess
    return image


def inline_output(image: gr.Image) -> gr.Image:
    """Make an output ``image`` travel inside the result as a ``data:`` URL of its JPEG, as Gradio
    sends SVGs, instead of as a file in Gradio's cache for the page to fetch. Fewer requests per
    call (a 512-pixel overlay is 20-40 KB), nothing written to disk, and no shared file: Gradio names
    an output by a hash of its bytes and rewrites that file in place on every call, so when two calls
    drew the same picture (two visitors explaining one example) one visitor's download could meet
    the file truncated by the other's write."""

    def postprocess(value):
        return None if value is None else _inline_image(value, image.format, "cam")

    image.postprocess = postprocess
    return image


def inline_gallery(gallery: gr.Gallery) -> gr.Gallery:
    """A gallery of ``(picture, caption)`` that travels inline as PNG ``data:`` URLs (see
    :func:`inline_output`): the same sample images shown to every visitor of one model would
    otherwise be the same cache files, rewritten in place on every call."""

    def postprocess(value):
        return GalleryData(root=[GalleryImage(image=_inline_image(picture, "png", f"sample-{index}"), caption=caption)
                                 for index, (picture, caption) in enumerate(value or [])])

    gallery.postprocess = postprocess
    return gallery


def _inline_image(picture, image_format: str, stem: str) -> ImageData:
    with io.BytesIO() as encoded:
        (picture if isinstance(picture, Image.Image) else Image.fromarray(picture)).save(encoded, format=image_format)
        payload = base64.b64encode(encoded.getvalue()).decode("ascii")
    return ImageData(url=f"data:image/{image_format};base64,{payload}", orig_name=f"{stem}.{image_format}")


def run_explain(image, teacher, students, method, target, top_k, opacity):
    if not teacher:
        raise gr.Error("Choose a teacher checkpoint.")
    students = list(dict.fromkeys(name for name in students or [] if name != teacher))[:MAX_STUDENTS]
    if target == TEACHERS_PREDICTION:
        target = "teacher"
    elif target in (PREDICTED, None, ""):
        target = "predicted"
    try:
        checkpoints = [model_cache.get(name) for name in [teacher, *students]]
        result = explain(image, checkpoints, method=method, target=target, top_k=int(top_k), opacity=float(opacity))
    except (ImageError, CheckpointError, ValueError) as error:
        raise gr.Error(str(error)) from None
    panels = []
    for slot in range(1 + MAX_STUDENTS):
        if slot < len(result.models):
            model = result.models[slot]
            role = "teacher" if slot == 0 else f"student {slot}"
            panels += [gr.update(visible=True), explain_tab.model_caption(model, role), explain_tab.topk_chart(model),
                       model.overlay if model.overlay is not None else result.image]
        else:
            panels += [gr.update(visible=False), "", None, None]
    return [*panels, explain_tab.agreement_rows(result), explain_tab.explanation_summary(result)]


def target_choices(teacher: str | None):
    classes = []
    if teacher:
        try:
            classes = model_cache.get(teacher).classes
        except CheckpointError:
            classes = []
    return gr.update(choices=[PREDICTED, TEACHERS_PREDICTION, *classes], value=PREDICTED)


# -- Models --------------------------------------------------------------------------------------


def models_overview():
    rows = models_tab.checkpoint_rows(CHECKPOINTS) if CHECKPOINTS.is_dir() else []
    names = [row["name"] for row in rows]
    return (models_tab.table(rows), models_tab.accuracy_chart(rows, "params"), models_tab.accuracy_chart(rows, "latency"),
            gr.update(choices=names, value=names[0] if names else None))


def model_details(name):
    if not name:
        return None, None, [], "Choose a model."
    try:
        return models_tab.details(model_cache.get(name), model_cache.get, SAMPLE)
    except CheckpointError as error:
        raise gr.Error(str(error)) from None


# -- Distill -------------------------------------------------------------------------------------


def job_request(teacher, student, data, ce, kd, feature, cam, temperature, epochs, lr, batch_size, seed, limit,
                teacher_views, name, recipe=NO_RECIPE) -> dict:
    """The job the Distill form asks for (a :class:`kd_core.jobs.JobSpec` as a dict)."""
    if data not in DATA_SOURCES:
        raise ValueError(f"data: {data!r} is not one of the offered data sets ({', '.join(DATA_SOURCES)})")
    return {"recipe": None if recipe in (None, "", NO_RECIPE) else recipe, "teacher": teacher, "student": student,
            "data": DATA_SOURCES[data], "weights": {"ce": ce, "kd": kd, "feature": feature, "cam": cam}, "temperature": temperature,
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
            "limit": int(limit) if limit else None, "teacher_views": teacher_views, "name": name or None}


def client_token(token) -> str:
    """Who launched a job: a random token kept in the browser (or the API client's session)."""
    return token if isinstance(token, str) and len(token) >= 16 else secrets.token_urlsafe(16)


def _owner(token) -> str | None:
    """The owner a request acts as; ``None`` (any job) when the operator shares all jobs."""
    return None if SHARED_JOBS else client_token(token)


def launch_job(*form_and_token):
    *form, token = form_and_token
    token = client_token(token)
    try:
        job = job_manager().submit(job_request(*form), owner=None if SHARED_JOBS else token)
    except (ValueError, TypeError) as error:
        raise gr.Error(str(error)) from None
    bank = f"; {job['bank']}" if job["bank"] else ""
    return f"Job {job['id']} ({job['name']}) is {job['state']}{bank}.", gr.update(value=job["id"]), token


def _offered(source: str) -> str:
    """The name of the offered data set that is ``source`` (a recipe names the shared CIFAR-10 copy
    by a relative path), else the first one offered."""
    for name, offered in DATA_SOURCES.items():
        same_folder = offered.startswith("folder:") and source.startswith("folder:") and \
            Path(offered[7:]).resolve() == (ROOT / source[7:]).resolve()
        if offered == source or same_folder:
            return name
    return next(iter(DATA_SOURCES))


def recipe_form(recipe):
    """The Distill form's values for a recipe (or none): what `distill --recipe` would train with."""
    try:
        values = form_values(None if recipe in (None, "", NO_RECIPE) else recipe)
    except ValueError as error:
        raise gr.Error(str(error)) from None
    weights = values["weights"]
    teacher = values["teacher"]
    if teacher not in checkpoint_names():  # a teacher too large to ship, or not trained yet
        raise gr.Error(f"{recipes.absent_teacher(recipes.get(recipe), 'the checkpoints folder')}, "
                       "or choose no recipe and another teacher.")
    return (gr.update(value=teacher), gr.update(value=values["student"]), gr.update(value=_offered(values["data"])),
            *(weights.get(term, 0) for term in ("ce", "kd", "feature", "cam")), values["temperature"], values["epochs"],
            values["lr"], values["batch_size"], values["seed"], values["limit"] or 0, values["teacher_views"])


def _job_id(value, action: str) -> int:
    if value in (None, ""):
        raise gr.Error(f"Choose a job to {action}.")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{value!r} is not a job id; choose a job to {action}.") from None


def _selected_job(job_id):
    try:
        return job_manager().get_job(_job_id(job_id, "show"))
    except ValueError:  # gr.Error is one too
        return None


def refresh_jobs(job_id, known_checkpoints):
    manager = job_manager()
    manager.tick()
    jobs = manager.list_jobs()
    if job_id in (None, "") and jobs:
        job_id = jobs[0]["id"]
    job = _selected_job(job_id)
    loss, accuracy = distill_tab.job_curves(job)
    names = checkpoint_names()
    changed = names != known_checkpoints
    choice_update = gr.update(choices=names) if changed else gr.update()
    job_update = gr.update(choices=[row["id"] for row in jobs], value=job["id"] if job else None)
    # the Students list follows the teacher's data set: known_checkpoints' change event redraws it
    return (distill_tab.job_rows(jobs), job_update, distill_tab.progress_html(job), loss, accuracy, names,
            choice_update, gr.update(), choice_update)


def _job_action(job_id, action: str, token) -> str:
    job_id = _job_id(job_id, action)
    try:
        job = getattr(job_manager(), action)(job_id, owner=_owner(token))
    except ValueError as error:
        raise gr.Error(str(error)) from None
    return f"Job {job['id']} is {job['state']}."


def cancel_job(job_id, token=None):
    return _job_action(job_id, "cancel", token)


def resume_job(job_id, token=None):
    return _job_action(job_id, "resume", token)


# -- Layout --------------------------------------------------------------------------------------

# delete_cache: every hour, Gradio removes uploads and outputs older than two hours
with gr.Blocks(title="KD Workbench", delete_cache=(3600, 7200)) as demo:
    gr.Markdown("# KD Workbench\nDistil a teacher into a small student and see where each one looks.")
    with gr.Tab("Explain"):
        with gr.Row():
            with gr.Column(scale=1):
                image = unopened_upload(gr.Image(
                    type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"], label="Image",
                    height=280, elem_classes=["upload-panel"]))
                gr.Examples(sorted(str(path) for path in (ASSETS / "examples").glob("*.jpg")), inputs=image,
                            examples_per_page=20, label="CIFAR-10 test images")
            with gr.Column(scale=1):
                # custom values: API clients may name a checkpoint made after the page was built;
                # ModelCache refuses anything that is not a file in the checkpoints folder
                teacher = gr.Dropdown(checkpoint_names(), value=_default_teacher(), label="Teacher",
                                      allow_custom_value=True)
                students = gr.Dropdown(same_data_names(_default_teacher()), value=_default_students(), multiselect=True,
                                       allow_custom_value=True,
                                       max_choices=MAX_STUDENTS, label="Students (up to 3)")
                method = gr.Radio(cam_methods(), value="gradcam", label="CAM method",
                                  info="scorecam runs the model once per channel: slower")
                # custom values: a class name chosen over the API before the teacher's classes are filled in
                target = gr.Dropdown([PREDICTED, TEACHERS_PREDICTION], value=PREDICTED, label="Explain the class",
                                     allow_custom_value=True)
                with gr.Row():
                    top_k = gr.Slider(1, 10, value=5, step=1, label="top-k")
                    opacity = gr.Slider(0, 1, value=0.5, step=0.05, label="heatmap opacity")
                explain_button = gr.Button("Explain", variant="primary")
        panel_outputs = []
        with gr.Row():
            for slot in range(1 + MAX_STUDENTS):
                with gr.Column(visible=slot < 3, elem_classes=["model-panel"]) as column:
                    caption = gr.Markdown()
                    chart = gr.Plot(label="top-k")
                    # JPEG, sent inline: a 512-pixel overlay encodes in ~10 ms, WebP (Gradio's default) in ~250
                    overlay = inline_output(gr.Image(label="CAM", type="numpy", interactive=False, height=260,
                                                     format="jpeg", elem_classes=["cam-panel"]))
                panel_outputs += [column, caption, chart, overlay]
        agreement = gr.Dataframe(headers=explain_tab.AGREEMENT_COLUMNS, label="How far each student agrees with the teacher",
                                 interactive=False)
        with gr.Accordion("Raw numbers", open=False):
            numbers = gr.JSON()
        explain_inputs = [image, teacher, students, method, target, top_k, opacity]
        explain_button.click(run_explain, explain_inputs, [*panel_outputs, agreement, numbers], api_name="explain")
        teacher.change(target_choices, teacher, target, api_name=False)
        teacher.change(student_choices, [teacher, students], students, api_name=False)

    with gr.Tab("Models") as models_page:
        models_table = gr.Dataframe(headers=models_tab.TABLE_COLUMNS, interactive=False, label="Checkpoints")
        with gr.Row():
            by_params = gr.Plot(label="accuracy vs parameters")
            by_latency = gr.Plot(label="accuracy vs CPU latency")
        chosen_model = gr.Dropdown(checkpoint_names(), value=None, label="Model", allow_custom_value=True)
        with gr.Row():
            per_class = gr.Plot(label="per-class accuracy")
            confusion = gr.Plot(label="confusion matrix")
        mistakes_note = gr.Markdown()
        mistakes = inline_gallery(gr.Gallery(label="the student is wrong, its teacher right", columns=8, height=320))
        overview_outputs = [models_table, by_params, by_latency, chosen_model]
        models_page.select(models_overview, None, overview_outputs, api_name="models")
        chosen_model.change(model_details, chosen_model, [per_class, confusion, mistakes, mistakes_note],
                            api_name="model_details")

    with gr.Tab("Distill"):
        with gr.Row():
            with gr.Column():
                job_recipe = gr.Dropdown(offered_recipes(), value=NO_RECIPE, label="Recipe",
                                         info="start from a named recipe (python -m kd_core recipes); "
                                              "the values below override it")
                job_teacher = gr.Dropdown(checkpoint_names(), value=_default_teacher(), label="Teacher")
                job_student = gr.Dropdown(models.list_models(), value=FORM["student"], label="Student architecture")
                job_data = gr.Dropdown(list(DATA_SOURCES), value=next(iter(DATA_SOURCES)), label="Data set")
                job_name = gr.Textbox(label="Checkpoint name (optional)", placeholder="e.g. camnet-kd-cam-mine")
            with gr.Column():
                with gr.Row():
                    ce = gr.Number(FORM["weights"].get("ce", 0), label="CE weight", minimum=0)
                    kd = gr.Number(FORM["weights"].get("kd", 0), label="KD weight", minimum=0)
                    feature = gr.Number(FORM["weights"].get("feature", 0), label="feature weight", minimum=0)
                    cam = gr.Number(FORM["weights"].get("cam", 0), label="CAM weight", minimum=0)
                with gr.Row():
                    temperature = gr.Number(FORM["temperature"], label="temperature T")
                    epochs = gr.Number(FORM["epochs"], label="epochs", precision=0)
                    lr = gr.Number(FORM["lr"], label="learning rate")
                with gr.Row():
                    batch_size = gr.Number(FORM["batch_size"], label="batch size", precision=0)
                    seed = gr.Number(FORM["seed"], label="seed", precision=0)
                    limit = gr.Number(FORM["limit"] or 0, label="subset size (0: all)", precision=0)
                    teacher_views = gr.Number(FORM["teacher_views"], label="teacher views (0: teacher every step)",
                                              precision=0,
                                              info="N: run the teacher once on N augmented views of each image "
                                                   "and reuse its outputs; much faster with a large teacher")
                launch = gr.Button("Launch", variant="primary")
                launch_message = gr.Markdown()
        jobs_table = gr.Dataframe(headers=distill_tab.JOB_COLUMNS, interactive=False, label="Jobs")
        with gr.Row():
            job_choice = gr.Dropdown(label="Job", choices=[], allow_custom_value=True)
            cancel = gr.Button("Cancel job", variant="stop")
            resume = gr.Button("Resume job")
        progress = gr.HTML()
        with gr.Row():
            loss_plot = gr.Plot(label="loss")
            accuracy_plot = gr.Plot(label="accuracy")
        known_checkpoints = gr.State(checkpoint_names())
        owner_token = gr.BrowserState("", storage_key="kd-workbench-jobs")  # who launched this browser's jobs
        timer = gr.Timer(2.0)

    launch.click(launch_job, [job_teacher, job_student, job_data, ce, kd, feature, cam, temperature, epochs, lr,
                              batch_size, seed, limit, teacher_views, job_name, job_recipe, owner_token],
                 [launch_message, job_choice, owner_token], api_name="launch_job")
    job_recipe.change(recipe_form, job_recipe, [job_teacher, job_student, job_data, ce, kd, feature, cam, temperature,
                                                epochs, lr, batch_size, seed, limit, teacher_views],
                      api_name="recipe_form")
    refresh_outputs = [jobs_table, job_choice, progress, loss_plot, accuracy_plot, known_checkpoints,
                       teacher, students, job_teacher]
    timer.tick(refresh_jobs, [job_choice, known_checkpoints], refresh_outputs, api_name="jobs",
               show_progress="hidden")
    cancel.click(cancel_job, [job_choice, owner_token], launch_message, api_name="cancel_job")
    resume.click(resume_job, [job_choice, owner_token], launch_message, api_name="resume_job")
    demo.load(models_overview, None, overview_outputs, api_name=False)
    demo.load(target_choices, teacher, target, api_name=False)
    demo.load(student_choices, [teacher, students], students, api_name=False)
    known_checkpoints.change(student_choices, [teacher, students], students, api_name=False)
    demo.load(recipe_choices, job_recipe, job_recipe, api_name=False)
    known_checkpoints.change(recipe_choices, job_recipe, job_recipe, api_name=False)


def schedule_jobs(manager: JobManager) -> None:
    """Start queued jobs and reap finished workers also while no page is open to poll."""
    while True:
        try:
            manager.tick()
        except sqlite3.Error:
            pass  # the store stayed busy past its timeout: try again next round
        time.sleep(SCHEDULER_SECONDS)


def main() -> None:
    import torch
    from threadpoolctl import threadpool_limits

    from kd_core.runtime import limit_malloc_arenas

    limit_malloc_arenas()  # request threads share freed memory (16 clients, two rounds: +20 MB, not +130)
    threads = int(os.environ.get("KD_APP_THREADS", "1"))
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    job_manager().recover()
    threading.Thread(target=schedule_jobs, args=(job_manager(),), name="job-scheduler", daemon=True).start()
    # each event: two calls at a time, one per core (16 clients: 10 explains a second, not 8, and ~20 MB, not ~50)
    demo.queue(default_concurrency_limit=2).launch(
        max_file_size=MAX_UPLOAD_BYTES, blocked_paths=[str(RUNS), str(CHECKPOINTS)], allowed_paths=[str(ASSETS)],
        theme=gr.themes.Soft(primary_hue="indigo"), css=ENLARGE_IMAGES_CSS)


if __name__ == "__main__":
    main()
