"""The Distill tab's figures and tables: the jobs table, a job's progress, its live curves."""
from __future__ import annotations

import time
from typing import Any

import plotly.graph_objects as go

_MARGIN = {"l": 40, "r": 10, "t": 30, "b": 40}


JOB_COLUMNS = ["id", "name", "state", "progress", "teacher", "student", "method", "epoch", "test top-1 (%)",
               "message"]


def job_rows(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for job in jobs:
        spec = job["spec"]
        last = next((row["test_top1"] for row in reversed(job.get("metrics", [])) if row["test_top1"] is not None), None)
        rows.append([job["id"], job["name"], job["state"], f"{100 * job['progress']:.0f}%", spec["teacher"],
                     spec["student"], "+".join(name for name, weight in spec["weights"].items() if weight > 0),
                     f"{job['epoch']}/{job['epochs']}", job["test_top1"] if job["test_top1"] is not None else last,
                     job.get("error") or job["message"]])
    return rows


def progress_html(job: dict[str, Any] | None) -> str:
    if job is None:
        return "<p>No job selected.</p>"
    percent = 100 * job["progress"]
    colour = {"failed": "#dc2626", "cancelled": "#6b7280", "interrupted": "#d97706"}.get(job["state"], "#4f46e5")
    elapsed = ""
    if job.get("started"):
        elapsed = f", {((job.get('finished') or time.time()) - job['started']) / 60:.1f} min"
    detail = job.get("error") or job["message"]
    return (f"<div><b>job {job['id']} ({job['name']})</b>: {job['state']}, epoch {job['epoch']}/{job['epochs']}"
            f"{elapsed}. {detail}</div>"
            f"<div style='background:#e5e7eb;border-radius:6px;height:14px;margin-top:6px'>"
            f"<div id='job-progress' style='width:{percent:.1f}%;background:{colour};height:14px;border-radius:6px'>"
            f"</div></div>")


def job_curves(job: dict[str, Any] | None) -> tuple[go.Figure, go.Figure]:
    """Loss against epochs (per few steps) and train/test top-1 per epoch."""
    loss = go.Figure()
    accuracy = go.Figure()
    if job is not None:
        points = job.get("points", [])
        loss.add_trace(go.Scatter(x=[p["epoch"] for p in points], y=[p["loss"] for p in points], mode="lines",
                                  name="loss"))
        metrics = job.get("metrics", [])
        accuracy.add_trace(go.Scatter(x=[m["epoch"] for m in metrics], y=[m["train_top1"] for m in metrics],
                                      mode="lines+markers", name="train top-1"))
        tested = [m for m in metrics if m["test_top1"] is not None]
        accuracy.add_trace(go.Scatter(x=[m["epoch"] for m in tested], y=[m["test_top1"] for m in tested],
                                      mode="lines+markers", name="test top-1"))
    loss.update_layout(title="training loss", xaxis_title="epoch", height=300, margin=_MARGIN)
    accuracy.update_layout(title="accuracy (%)", xaxis_title="epoch", height=300, margin=_MARGIN)
    return loss, accuracy
