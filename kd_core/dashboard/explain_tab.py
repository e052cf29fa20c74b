"""The Explain tab's figures and tables: small pure functions from an explanation to plotly
figures and rows, so ``app.py`` stays a layout plus a few lines per handler."""
from __future__ import annotations

from typing import Any

import plotly.graph_objects as go

from ..explain import Explanation, ModelExplanation

_MARGIN = {"l": 40, "r": 10, "t": 30, "b": 40}


def topk_chart(model: ModelExplanation) -> go.Figure:
    """Horizontal bars of the top-k probabilities, best on top."""
    names = [name for name, _ in model.top_k][::-1]
    values = [100 * probability for _, probability in model.top_k][::-1]
    # one dict, validated once: a third of the time of go.Bar(...) then update_layout(...), same figure
    return go.Figure({
        "data": [{"type": "bar", "x": values, "y": names, "orientation": "h", "textposition": "auto",
                  "text": [f"{value:.1f}%" for value in values], "marker": {"color": "#4f46e5"}}],
        "layout": {"title": {"text": f"{model.name}: {model.predicted_class}"}, "height": 260, "margin": _MARGIN,
                   "xaxis": {"range": [0, 100], "title": {"text": "probability (%)"}}}})


def model_caption(model: ModelExplanation, role: str) -> str:
    note = f"\n\n*{model.note}*" if model.note else ""
    return f"**{role}: {model.name}** ({model.arch}) predicts **{model.predicted_class}**{note}"


def agreement_rows(explanation: Explanation) -> list[list[Any]]:
    rows = []
    for agreement in explanation.agreements:
        def fmt(value: float | None) -> str:
            return "n/a" if value is None or value != value else f"{value:.3f}"
        rows.append([agreement.student, "yes" if agreement.same_top1 else "no",
                     f"{agreement.kl_teacher_student:.4f}", fmt(agreement.cam_correlation),
                     fmt(agreement.cam_top_region_iou)])
    return rows


AGREEMENT_COLUMNS = ["student", "same top-1 as teacher", "KL(teacher || student)", "CAM correlation",
                     "CAM top-20% IoU"]


def explanation_summary(explanation: Explanation) -> dict[str, Any]:
    """The numbers behind the page, for API clients: per model probabilities and map shapes."""
    return {"method": explanation.method, "seconds": round(explanation.seconds, 4),
            "models": [{"name": model.name, "arch": model.arch, "predicted": model.predicted_class,
                        "probabilities": [float(p) for p in model.probabilities],
                        "top_k": [[name, float(p)] for name, p in model.top_k],
                        "explained_class": model.target_class,
                        "map": model.map_kind,
                        "cam_shape": list(model.cam.shape) if model.cam is not None else None,
                        "overlay_shape": list(model.overlay.shape) if model.overlay is not None else None,
                        "note": model.note}
                       for model in explanation.models],
            "agreements": [dict(zip(AGREEMENT_COLUMNS, row)) for row in agreement_rows(explanation)]}
