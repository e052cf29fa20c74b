"""Export a checkpoint to ONNX, optionally int8, and measure what each file gives.

The ONNX contract: one input ``pixels``, float32 RGB (or grayscale) pixels in [0, 1] ``(N, C, H, W)``,
that is uint8 images divided by 255, with a dynamic batch axis; one output ``logits`` ``(N, K)``.
The checkpoint's normalization ``(x - mean) / std`` is inside the graph (:class:`PixelClassifier`),
and so is the model's eval-mode test-time augmentation. ``metadata_props`` record ``classes``,
``mean``, ``std`` and ``input_size`` (JSON), the ``input`` contract in words, the source
``checkpoint`` and the ``kd_core_version``; an int8 file adds ``quantization``.

The exporter is torch's dynamo one: ``torch.export.export(..., strict=True)`` with a dynamic batch
dimension, then ``torch.onnx.export(program)``. Strict, because the non-strict tracer (what
``torch.onnx.export(module)`` uses) turns ``len(x)`` in ``Classifier.forward``, which picks the
test-time-augmentation path, into a constant batch size. The export raises ``BATCHED_TTA_MAX`` so
that forward takes its batched path (every view in one pass) for any batch up to
:data:`MAX_BATCH`: the graph holds the network once rather than two or six times, and computes the
logits the per-view path computes.

int8 is ONNX Runtime's static quantization after ``quant_pre_process``: QDQ format, int8 weights
per output channel in a 7-bit range (``reduce_range``), int8 activations, MinMax ranges over
``--calibration`` training images (how these were chosen: docs/experiments.md, "ONNX and int8
export"). The 7-bit range is what keeps the model right on CPUs without VNNI (AVX2 only, such as
AMD's Zen 3): there ONNX Runtime's uint8 x int8 kernels add pairs of products in saturating 16-bit
sums, and full-range weights overflow them (airnet-micro-kd: 40.5% top-1 instead of 87%).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from . import __version__
from .checkpoint import LoadedCheckpoint, load_checkpoint, update_metadata
from .data import load_data
from .evaluation import predict
from .files import write_atomically
from .models import base as model_base
from .profile import measure_latency

FORMATS = ("onnx",)
OPSET = 20  # the first with a Gelu operator
MAX_BATCH = 2**20  # the largest batch the exported graph is traced for
INPUT_NAME, OUTPUT_NAME = "pixels", "logits"
INPUT_CONTRACT = "float32 pixels in [0, 1] (uint8 / 255), (N, C, H, W), any N; normalization is inside the graph"
CALIBRATION_BATCH = 64
MEASURE_BATCH = 256
COLUMNS = ("format", "file size (KB)", "test top-1 (%)", "agreement (%)", "max |logit diff|",
           "batch-1 (ms)", "batch-256 (ms)")


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or a missing exporter; the message says why."""


def _onnx_modules():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ExportError("ONNX export needs `pip install -r requirements-extras.txt`") from None
    return onnx, onnxruntime


class PixelClassifier(nn.Module):
    """A classifier taking [0, 1] pixels ``(N, C, H, W)``: its normalization folded in front."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels - self.mean) / self.std)


@contextlib.contextmanager
def _batched_tta():
    """Classifier.forward takes the batched TTA path for every batch up to MAX_BATCH (six views at most)."""
    saved = model_base.BATCHED_TTA_MAX
    model_base.BATCHED_TTA_MAX = 6 * MAX_BATCH
    try:
        yield
    finally:
        model_base.BATCHED_TTA_MAX = saved


def _reason(error: Exception) -> str:
    """The line of a torch.export / ONNX translation error that says what failed."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # the exporter colours its messages
    summary = "## Exception summary" in text
    if summary:  # the ONNX translation's own report: the first line after this names the operator
        text = text.split("## Exception summary", 1)[1]
    lines = [line.strip(" -") for line in text.splitlines() if line.strip(" -")]
    return re.sub(r"<class '[\w.]+'>: ", "", " ".join(lines[:1 if summary else 2]))


def _without_trace(model_proto):
    """Drop the exporter's notes on every node and value (source paths, stack traces): a tenth of the file."""
    graph = model_proto.graph
    for entry in (*graph.node, *graph.input, *graph.output, *graph.initializer, *graph.value_info):
        del entry.metadata_props[:]
    return model_proto


def _with_metadata(model_proto, props: dict[str, str]):
    del model_proto.metadata_props[:]
    for key, value in props.items():
        entry = model_proto.metadata_props.add()
        entry.key, entry.value = key, value
    return model_proto


def metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` as a dict."""
    onnx, _ = _onnx_modules()
    return {entry.key: entry.value for entry in onnx.load(str(path)).metadata_props}


def export_onnx(checkpoint: LoadedCheckpoint, path: str | os.PathLike, opset: int = OPSET) -> Path:
    """Write ``checkpoint``'s eval-mode model as a float32 ONNX file at ``path`` (atomically) under
    the module's input contract; :class:`ExportError` says which step and operator failed."""
    onnx, _ = _onnx_modules()
    where = f"{checkpoint.name} ({checkpoint.meta['arch']})"
    input_size = list(checkpoint.meta["data"]["input_size"])
    wrapper = PixelClassifier(checkpoint.model, checkpoint.mean, checkpoint.std).eval()
    example = torch.rand(2, *input_size)  # (2, C, H, W): a batch of one would be specialized
    try:
        with _batched_tta():
            program = torch.export.export(wrapper, (example,), strict=True,
                                          dynamic_shapes=({0: torch.export.Dim("batch", max=MAX_BATCH)},))
    except Exception as error:
        raise ExportError(f"{where}: torch.export cannot trace it with a dynamic batch: {_reason(error)}") from error
    try:
        exported = torch.onnx.export(program, dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
                                     output_names=[OUTPUT_NAME], verbose=False)
    except Exception as error:
        raise ExportError(f"{where}: not expressible in ONNX opset {opset}: {_reason(error)}") from error
    model_proto = _with_metadata(_without_trace(exported.model_proto), {
        "classes": json.dumps(checkpoint.classes), "mean": json.dumps(checkpoint.mean),
        "std": json.dumps(checkpoint.std), "input_size": json.dumps(input_size), "input": INPUT_CONTRACT,
        "checkpoint": checkpoint.name, "kd_core_version": __version__})
    write_atomically(path, model_proto.SerializeToString())
    return Path(path)


def pixels(images: torch.Tensor) -> np.ndarray:
    """uint8 images ``(N, C, H, W)`` -> the ONNX input: float32 in [0, 1]."""
    return images.float().div_(255).numpy()


def _calibration_reader(images: torch.Tensor, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(images.split(batch_size))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {INPUT_NAME: pixels(batch)}

    return Reader()


def quantize_int8(float_path: str | os.PathLike, int8_path: str | os.PathLike, calibration_images: torch.Tensor,
                  batch_size: int = CALIBRATION_BATCH) -> Path:
    """Quantize a float ONNX file (the module's contract) to int8 as the module docstring says,
    calibrated on uint8 ``calibration_images`` ``(N, C, H, W)``; writes ``int8_path`` atomically
    with the float file's metadata and ``quantization`` (the settings)."""
    onnx, _ = _onnx_modules()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    if not len(calibration_images):
        raise ExportError("int8 calibration needs at least one training image")
    settings = {"format": "QDQ", "weights": "int8 per channel, 7-bit range", "activations": "int8",
                "calibration": "MinMax", "calibration_images": len(calibration_images)}
    with tempfile.TemporaryDirectory(prefix="kd_export_") as scratch:
        prepared, quantized = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
        # symbolic shape inference is for transformers, and fails on this graph's MatMul
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(quantized), _calibration_reader(calibration_images, batch_size),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                        # a batch norm's scale is 1-D: its channel axis is 0, not ONNX Runtime's default 1
                        extra_options={"QDQOpTypePerChannelSupportToAxis": {"BatchNormalization": 0}})
        model_proto = _with_metadata(onnx.load(str(quantized)),
                                     {**metadata(float_path), "quantization": json.dumps(settings)})
    write_atomically(int8_path, model_proto.SerializeToString())
    return Path(int8_path)


def session(onnx_path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (default: torch's)."""
    _, onnxruntime = _onnx_modules()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def run_onnx(onnx_session, images: torch.Tensor, batch_size: int = MEASURE_BATCH) -> torch.Tensor:
    """Logits ``(N, K)`` of uint8 ``images`` ``(N, C, H, W)``."""
    return torch.cat([torch.from_numpy(onnx_session.run([OUTPUT_NAME], {INPUT_NAME: pixels(chunk)})[0])
                      for chunk in images.split(batch_size)])


def _median_ms(call, repeats: int, warmup: int) -> float:
    timings = []
    for index in range(warmup + repeats):
        started = time.perf_counter()
        call()
        if index >= warmup:
            timings.append(time.perf_counter() - started)
    return 1000 * sorted(timings)[len(timings) // 2]


def _scores(logits: torch.Tensor, labels: torch.Tensor, reference_logits: torch.Tensor) -> dict[str, float]:
    predicted = logits.argmax(1)
    return {"top1": 100.0 * (predicted == labels).float().mean().item(),
            "agreement": 100.0 * (predicted == reference_logits.argmax(1)).float().mean().item(),
            "max_abs_logit_diff": (logits - reference_logits).abs().max().item()}


def measure(onnx_path: str | os.PathLike, images: torch.Tensor, labels: torch.Tensor,
            reference_logits: torch.Tensor, threads: int | None = None) -> dict[str, Any]:
    """An ONNX file on uint8 ``images`` ``(N, C, H, W)``: ``file_size`` (bytes), ``top1`` (%) on
    ``labels``, ``agreement`` (% with the same top-1 as ``reference_logits``), ``max_abs_logit_diff``
    from them, and ``latency_ms_batch1`` / ``latency_ms_batch256``: the median wall time of 30 / 5
    runs on random pixels, in ONNX Runtime with ``threads`` intra-op threads (default: torch's)."""
    onnx_session = session(onnx_path, threads)
    shape = onnx_session.get_inputs()[0].shape[1:]
    generator = np.random.default_rng(0)
    single = generator.random((1, *shape), dtype=np.float32)
    full = generator.random((MEASURE_BATCH, *shape), dtype=np.float32)
    return {"file_size": Path(onnx_path).stat().st_size,
            **_scores(run_onnx(onnx_session, images), labels, reference_logits),
            "latency_ms_batch1": _median_ms(lambda: onnx_session.run(None, {INPUT_NAME: single}), 30, 3),
            "latency_ms_batch256": _median_ms(lambda: onnx_session.run(None, {INPUT_NAME: full}), 5, 1)}


def measure_pytorch(checkpoint: LoadedCheckpoint, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """:func:`measure`'s figures for the checkpoint in torch, the reference the others are compared
    with: ``logits`` are its :func:`kd_core.evaluation.predict` output, ``file_size`` the checkpoint
    file's (metadata included), latency :func:`kd_core.profile.measure_latency`'s."""
    shape = tuple(checkpoint.meta["data"]["input_size"])
    return {"file_size": checkpoint.path.stat().st_size, **_scores(logits, labels, logits),
            "latency_ms_batch1": measure_latency(checkpoint.model, shape, 1),
            "latency_ms_batch256": measure_latency(checkpoint.model, shape, MEASURE_BATCH, repeats=5, warmup=1)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text, one line per row: its ``name``, ``format`` and :func:`measure`'s figures."""
    cells = [[row["name"], row["format"], f"{row['file_size'] / 1000:.1f}", f"{row['top1']:.2f}",
              f"{row['agreement']:.2f}", f"{row['max_abs_logit_diff']:.2g}", f"{row['latency_ms_batch1']:.2f}",
              f"{row['latency_ms_batch256']:.1f}"] for row in rows]
    table = [["", *COLUMNS], *cells]
    widths = [max(len(line[index]) for line in table) for index in range(len(table[0]))]
    return "\n".join("  ".join(cell.ljust(width) if index == 0 else cell.rjust(width)
                               for index, (cell, width) in enumerate(zip(line, widths))).rstrip() for line in table)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", type=Path, help="checkpoint file (.safetensors)")
    parser.add_argument("--format", default="onnx", metavar="{" + ",".join(FORMATS) + "}",
                        help="export format (default onnx)")
    parser.add_argument("--int8", action="store_true",
                        help="also write an int8 model (ONNX Runtime static quantization, calibrated on training images)")
    parser.add_argument("--output", "-o", type=Path, metavar="PATH", help="the float model's file (default: beside "
                        "the checkpoint, <stem>.onnx); the int8 model goes beside it as <its stem>.int8.onnx")
    parser.add_argument("--data", metavar="SOURCE", help="data source to calibrate and measure on (default: the "
                        "one recorded in the checkpoint)")
    parser.add_argument("--calibration", type=int, default=512, metavar="N",
                        help="training images for int8 calibration (default 512)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N test images (quick runs)")
    parser.add_argument("--cache-dir", type=Path, help="where decoded data sets are cached")
    parser.add_argument("--record", action="store_true",
                        help="write the table into the checkpoint's metadata under \"export\" (tensors unchanged)")


def output_paths(checkpoint_path: Path, output: Path | None) -> tuple[Path, Path]:
    """``(float file, int8 file)``: ``output`` or ``<checkpoint stem>.onnx``, and ``<its stem>.int8.onnx``."""
    float_path = output or checkpoint_path.with_suffix(".onnx")
    return float_path, float_path.with_name(f"{float_path.stem}.int8.onnx")


def main(args: argparse.Namespace) -> int:
    """Export, measure on the test split, print the table; with ``args.record`` store it in the checkpoint."""
    if args.format not in FORMATS:
        raise ExportError(f"unknown export format {args.format!r}; this kd_core exports: {', '.join(FORMATS)}")
    for option in ("calibration", "limit"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ExportError(f"--{option} must be at least 1, got {getattr(args, option)}")
    _, onnxruntime = _onnx_modules()
    checkpoint = load_checkpoint(args.checkpoint)
    source = args.data or checkpoint.meta["data"]["source"]
    data = load_data(source, cache_dir=args.cache_dir)
    if data.classes != checkpoint.classes:
        raise ExportError(f"{checkpoint.path.name} was trained on other classes than {source} has")
    images, labels = data.test.images[:args.limit], data.test.labels[:args.limit]
    reference_logits = predict(checkpoint.model, images, checkpoint.mean, checkpoint.std)
    float_path, int8_path = output_paths(checkpoint.path, args.output)
    rows = [{"name": "pytorch float32", "format": "safetensors", "file": checkpoint.path.name,
             **measure_pytorch(checkpoint, reference_logits, labels)}]
    export_onnx(checkpoint, float_path)
    rows.append({"name": "onnx float32", "format": "onnx", "file": float_path.name,
                 **measure(float_path, images, labels, reference_logits)})
    if args.int8:
        quantize_int8(float_path, int8_path, data.train.subset(args.calibration).images)
        rows.append({"name": "onnx int8", "format": "onnx", "file": int8_path.name,
                     **measure(int8_path, images, labels, reference_logits)})
    threads = torch.get_num_threads()
    print(f"{checkpoint.path.name} on {source}, {len(labels):,} test images; ONNX Runtime "
          f"{onnxruntime.__version__}, {threads} thread{'s' if threads != 1 else ''}")
    print(format_table(rows))
    if args.record:
        settings = {"format": args.format, "int8": args.int8, "calibration": args.calibration if args.int8 else None,
                    "data": source, "test_images": len(labels), "limit": args.limit, "threads": threads}
        update_metadata(checkpoint.path, {"export": {
            "rows": rows, "settings": settings, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}})
    return 0
