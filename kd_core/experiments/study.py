"""Studies: one recipe trained several ways, summarised as one table.

``python -m kd_core study KIND --recipe NAME`` runs

- ``ablation``: the CAM-KD paper's table for a distillation recipe: cross-entropy only, KD, CAM
  alignment, KD + CAM, KD + feature matching; same recipe, data order and seed;
- ``temperature``: the recipe's KD objective at each temperature given;
- ``seeds``: the recipe unchanged, once per seed;
- ``gain``: the recipe and its cross-entropy twin (the same run with the teacher's terms removed,
  and optionally the best cross-entropy settings: ``twin_overrides``), once per seed, and what
  distillation gains: their difference per seed with a 95% confidence interval.

With ``--validation N`` every run is scored on N training images held out of its training set,
for choosing a method; without it, on the test split. Each row records which.

Every variant x seed is one ordinary run (:func:`kd_core.run.run`) writing its checkpoint into the
study folder; finished runs are recorded in ``results.json`` there and skipped when the command is
run again, so a study interrupted at any point resumes. Checkpoints given as ``reuse`` (the shipped
ones, say) whose recorded settings equal a variant's are recorded as that run instead of retraining
it. The summary is a Markdown table (mean and sample standard deviation over seeds) printed and
saved as ``results.md``.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ..checkpoint import CheckpointError, load_checkpoint, read_metadata, weights_sha256
from ..files import write_atomically
from ..training import Callback, TrainConfig
from ..training.config import changed_settings, with_overrides
from .recipes import Recipe, saved_config, trained_architecture

KINDS = ("ablation", "temperature", "seeds", "gain")


@dataclass(frozen=True)
class Variant:
    label: str
    config: TrainConfig

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "").replace("+", "-").replace("=", "").lower()


class StudyStopped(Exception):
    """A run of the study was asked to stop before it finished (the epochs it finished are kept for a rerun)."""


def ablation_variants(config: TrainConfig, feature_weight: float = 1.0) -> list[Variant]:
    """CE only, KD, CAM, KD + CAM, KD + feature, with the recipe's own weights.

    KD variants use the recipe's (ce, kd) mix; the CAM term uses the recipe's CAM weight (1 when the
    recipe has none) beside plain cross-entropy when there is no KD. Every variant keeps the
    recipe's teacher views (the feature variant's bank also stores the teacher's feature maps).
    """
    weights = config.loss_weights
    kd = weights.get("kd", 0.0) or 0.5
    ce_with_kd = weights.get("ce", 1.0 - kd) if "kd" in weights else 1.0 - kd
    cam = weights.get("cam", 0.0) or 1.0
    mixes = [
        ("CE only", {"ce": 1.0}),
        ("KD", {"ce": ce_with_kd, "kd": kd}),
        ("CAM", {"ce": 1.0, "cam": cam}),
        ("KD + CAM", {"ce": ce_with_kd, "kd": kd, "cam": cam}),
        ("KD + feature", {"ce": ce_with_kd, "kd": kd, "feature": feature_weight}),
    ]
    return [Variant(label, replace(config, loss_weights={k: v for k, v in mix.items() if v > 0})) for label, mix in mixes]


def temperature_variants(config: TrainConfig, temperatures: Iterable[float]) -> list[Variant]:
    if config.loss_weights.get("kd", 0) <= 0:
        raise ValueError("a temperature sweep needs a recipe whose objective has a KD term")
    return [Variant(f"T={t:g}", replace(config, temperature=float(t))) for t in temperatures]


def variants_for(kind: str, config: TrainConfig, temperatures: Iterable[float] = (1, 2, 3, 4, 6, 8),
                 feature_weight: float = 1.0, twin_overrides: Mapping[str, Any] | None = None) -> list[Variant]:
    """``twin_overrides``: settings of a gain study's cross-entropy twin that differ from the recipe's
    (the best cross-entropy settings for the architecture, say a higher learning rate)."""
    if kind == "ablation":
        return ablation_variants(config, feature_weight)
    if kind == "temperature":
        return temperature_variants(config, temperatures)
    if kind == "seeds":
        return [Variant("recipe", config)]
    if kind == "gain":
        if not set(config.loss_weights) - {"ce"}:
            raise ValueError("a gain study needs a recipe that distils (an objective beyond cross-entropy)")
        twin = with_overrides(replace(config, loss_weights={"ce": 1.0}), twin_overrides or {}).validate()
        return [Variant("CE twin", twin), Variant("KD", config)]
    raise ValueError(f"unknown study {kind!r}; choose from {', '.join(KINDS)}")


# -- results -------------------------------------------------------------------------------------

def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); move it away to start the study afresh") from None


def save_results(path: Path, rows: list[dict]) -> None:
    write_atomically(path, json.dumps(rows, indent=1).encode())


def summarize(rows: list[dict], title: str) -> str:
    """Markdown: one line per variant, in first-run order, with mean +- sample std over seeds."""
    order: list[str] = []
    for row in rows:
        if row["variant"] not in order:
            order.append(row["variant"])
    splits = sorted({row.get("split", "test") for row in rows}) or ["test"]
    lines = [f"**{title}**", "", f"| variant | objective | T | seeds | {' / '.join(splits)} top-1 (%) | runs | "
             "training min/run | CAM corr. with teacher |", "|---|---|---|---|---|---|---|---|"]
    for label in order:
        group = [row for row in rows if row["variant"] == label]
        accuracies = [top1(row) for row in group]
        mean = statistics.fmean(accuracies)
        spread = f" ± {statistics.stdev(accuracies):.2f}" if len(accuracies) > 1 else ""
        standardized = group[0].get("config", {}).get("kd_standardize", False)  # z-scored logits
        objective = " + ".join(f"{weight:g}·{term}{' (z-scored)' if term == 'kd' and standardized else ''}"
                               for term, weight in group[0]["loss_weights"].items())
        uses_kd = "kd" in group[0]["loss_weights"]
        minutes = statistics.fmean(row["train_seconds"] for row in group) / 60
        lines.append(f"| {label} | {objective} | {group[0]['temperature']:g} |" if uses_kd else
                     f"| {label} | {objective} | - |")
        lines[-1] += (f" {', '.join(str(row['seed']) for row in group)} | **{mean:.2f}**{spread}"
                      f"{_single_view_text(group)} | {', '.join(f'{a:.2f}' for a in accuracies)} | {minutes:.1f} | "
                      f"{_cam_text(group)} |")
    return "\n".join(lines)


def _single_view_text(group: list[dict]) -> str:
    """`` (single view 86.50 ± 0.20)`` when every run of a variant predicts with test-time augmentation
    and recorded its one-pass top-1 too, else nothing."""
    values = [row.get("top1_single_view") for row in group]
    if not values or None in values:
        return ""
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f" (single view {statistics.fmean(values):.2f}{spread})"


def _cam_text(group: list[dict]) -> str:
    """Mean over a variant's runs of their mean CAM correlation with the teacher (``-`` unmeasured)."""
    values = [row["cam_correlation"] for row in group if row.get("cam_correlation") is not None]
    return f"{statistics.fmean(values):.3f}" if values else "-"


def top1(row: dict) -> float:
    """A results row's top-1 on its split (rows written before splits were recorded say test_top1)."""
    return row["top1"] if "top1" in row else row["test_top1"]


# Student's t, two-sided 95%, by degrees of freedom (beyond 30: the normal's 1.96)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def gain_summary(rows: list[dict], title: str) -> str:
    """Markdown: CE twin and KD (mean ± sd over seeds), and KD - CE paired by seed with its 95%
    confidence interval (Student's t over the per-seed differences)."""
    ce = {row["seed"]: row for row in rows if row["variant"] == "CE twin"}
    kd = {row["seed"]: row for row in rows if row["variant"] == "KD"}
    seeds = sorted(set(ce) & set(kd))
    splits = sorted({row.get("split", "test") for row in rows}) or ["test"]

    def spread(values: list[float]) -> str:
        mean = statistics.fmean(values)
        return f"{mean:.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else f"{mean:.2f}"

    lines = [f"**{title}**", "", f"| seeds | CE twin top-1 (%) | KD top-1 (%) | KD - CE (points) | 95% CI | "
             f"CE / KD min/run | CAM corr. with teacher (CE / KD) | split |", "|---|---|---|---|---|---|---|---|"]
    if not seeds:
        return "\n".join(lines + ["| - | - | - | - | - | - | - | - |"])
    differences = [top1(kd[seed]) - top1(ce[seed]) for seed in seeds]
    mean = statistics.fmean(differences)
    if len(differences) > 1:
        half = _T95[min(len(differences) - 1, len(_T95)) - 1] * statistics.stdev(differences) / len(differences) ** 0.5
        interval = f"[{mean - half:+.2f}, {mean + half:+.2f}]"
    else:
        interval = "n/a (one seed)"
    minutes = "/".join(f"{statistics.fmean(group[seed]['train_seconds'] for seed in seeds) / 60:.1f}" for group in (ce, kd))
    lines.append(f"| {', '.join(map(str, seeds))} | {spread([top1(ce[s]) for s in seeds])} | "
                 f"{spread([top1(kd[s]) for s in seeds])} | **{mean:+.2f}** | {interval} | {minutes} | "
                 f"{_cam_text([ce[s] for s in seeds])} / {_cam_text([kd[s] for s in seeds])} | {' / '.join(splits)} |")
    return "\n".join(lines)


# -- running -------------------------------------------------------------------------------------

def matching_checkpoint(candidates: Iterable[tuple[Path, dict]], recipe: Recipe, config: dict, data: str,
                        teacher: Path | None, teacher_sha256: str | None = None) -> tuple[Path, dict] | None:
    """The first of ``candidates`` (path, metadata) that a run of ``recipe`` with ``config`` on ``data``
    from ``teacher`` would have written: same architecture (as trained), arguments, data, teacher file
    (and, given ``teacher_sha256``, its very weights), settings and stored weights dtype."""
    wanted = (recipe.arch, json.loads(json.dumps(recipe.arch_args)))
    for path, meta in candidates:
        recorded = meta.get("teacher") or {}
        if (trained_architecture(meta) == wanted and meta["data"]["source"] == data
                and not changed_settings(saved_config(meta), config)  # where it ran (device) is no setting
                and recorded.get("file") == (Path(teacher).name if teacher else None)
                and (teacher_sha256 is None or recorded.get("weights_sha256") == teacher_sha256)
                and meta.get("weights_dtype", "float32") == recipe.weights_dtype):
            return path, meta
    return None


def _teacher_weights(teacher: Path) -> str:
    return weights_sha256(load_checkpoint(teacher).model)


def run_study(kind: str, recipe: Recipe, config: TrainConfig, folder: Path, seeds: Iterable[int],
              teacher: Path | None, data: str, cache_dir: Path | None = None,
              temperatures: Iterable[float] = (1, 2, 3, 4, 6, 8), feature_weight: float = 1.0,
              callbacks: Callable[[str], list[Callback]] = lambda name: [], log: Callable[[str], None] = print,
              reuse: Iterable[Path] = (), twin_overrides: Mapping[str, Any] | None = None,
              stop_hook: Callable | None = None) -> str:
    """Run every variant x seed not yet in ``folder/results.json``; return the Markdown summary.
    ``callbacks(run_name)`` gives each run's callbacks; ``stop_hook(trainer)`` is called as each run's
    trainer starts (see ``run``). A run stopped early raises ``StudyStopped``; its state stays in the
    folder and the same call resumes it.

    The runs go seed by seed (every variant of seed 0, then of seed 1, ...), and ``folder/results.md``
    is rewritten after every finished run, its title naming the runs still to come, so a study
    stopped halfway leaves a table of what it has, its gains paired.

    Under torchrun every process calls this and trains each run's share; the first process alone
    writes the results and measures CAM agreement (the others return an empty string)."""
    from .. import distributed
    from ..run import check_held_out, run

    main_process = distributed.is_main()

    seeds = list(seeds)
    reuse = [Path(path) for path in reuse]
    for path in reuse:
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path} to reuse")
    reusable = [(path, read_metadata(path)) for path in reuse]  # read once, matched per variant

    variants = variants_for(kind, config, temperatures, feature_weight, twin_overrides)
    needs_teacher = any(set(v.config.loss_weights) - {"ce"} for v in variants)
    if needs_teacher and (teacher is None or not Path(teacher).exists()):
        raise FileNotFoundError(f"the study distils, so it needs a teacher checkpoint; {teacher} does not exist")
    if needs_teacher:  # before any run trains: a teacher that saw the held-out images biases the KD runs
        check_held_out(read_metadata(Path(teacher)), Path(teacher).stem, data, config.validation)
    folder.mkdir(parents=True, exist_ok=True)
    results_path = folder / "results.json"
    rows = load_results(results_path)
    teacher_sha256 = _teacher_weights(Path(teacher)) if needs_teacher else None
    title = (f"{kind} study of recipe {recipe.name} ({recipe.arch}, {config.epochs} epochs"
             + (f", teacher {Path(teacher).stem}" if needs_teacher else "") + f"), data {data}"
             + (f", scored on {config.validation:,} training images held out" if config.validation else "")
             + (f"; CE twin with {', '.join(f'{k}={v}' for k, v in twin_overrides.items())}"
                if kind == "gain" and twin_overrides else ""))

    labels = {variant.label for variant in variants}
    architecture = {"arch": recipe.arch, "arch_args": json.loads(json.dumps(recipe.arch_args))}

    def write_summary() -> str:
        if not main_process:
            return ""
        chosen = [row for row in rows if row["variant"] in labels and row["seed"] in seeds]
        recorded = {(row["variant"], row["seed"]) for row in chosen}
        pending = [f"{v.label} (seed {seed})" for seed in seeds for v in variants if (v.label, seed) not in recorded]
        full_title = title + (f"; not yet run: {', '.join(pending)}" if pending else "")
        summary = summarize(chosen, full_title)
        if kind == "gain":
            summary = gain_summary(chosen, full_title) + "\n\n" + summary
        write_atomically(folder / "results.md", (summary + "\n").encode())
        return summary

    for seed in seeds:  # seed by seed: a study stopped halfway leaves whole pairs (or ablations) behind
        for variant in variants:
            run_config = replace(variant.config, seed=seed)
            distils = bool(set(run_config.loss_weights) - {"ce"})
            run_teacher = teacher_sha256 if distils else None
            wanted = run_config.to_json()
            done = [row for row in rows if row["variant"] == variant.label and row["seed"] == seed]
            if done and changed_settings(saved_config(done[0]), wanted):
                raise ValueError(f"{results_path} holds a {variant.label} run (seed {seed}) with other settings; "
                                 "give the study another --output folder")
            if done and done[0].get("teacher_sha256", run_teacher) != run_teacher:
                raise ValueError(f"{results_path} holds a {variant.label} run (seed {seed}) distilled from other "
                                 f"weights of {Path(teacher).name}; give the study another --output folder")
            stored = _recorded(folder, done[0], "weights_dtype", _weights_dtype) if done else None
            if stored not in (None, recipe.weights_dtype):
                raise ValueError(f"{results_path} holds a {variant.label} run (seed {seed}) scored with {stored} "
                                 f"weights, and the recipe now stores {recipe.weights_dtype}; give the study another "
                                 "--output folder")
            built = _recorded(folder, done[0], "architecture", _architecture) if done else None
            if built not in (None, architecture):
                raise ValueError(f"{results_path} holds a {variant.label} run (seed {seed}) of {_describe(built)}, "
                                 f"and the recipe now builds {_describe(architecture)}; give the study another "
                                 "--output folder")
            if done:
                continue
            name = f"{recipe.name}-{variant.slug}-s{seed}"
            found = matching_checkpoint(reusable, recipe, wanted, data, teacher if distils else None, run_teacher)
            if found:
                path, meta = found
                split = meta["metrics"].get("evaluated_on", "test")
                cam = (_teacher_cam_agreement(path, teacher, data, run_config, cache_dir)
                       if teacher and main_process else None)  # measured as for a run trained here
                rows.append(_row(variant.label, run_config, meta["metrics"][f"{split}_top1"], meta["train_seconds"],
                                 path, run_teacher, split, cam, meta["metrics"].get(f"{split}_top1_single_view"),
                                 recipe.weights_dtype, architecture))
                if main_process:
                    save_results(results_path, rows)
                write_summary()
                log(f"{kind}: {variant.label}, seed {seed}: {path} has these settings, test top-1 "
                    f"{meta['metrics'][f'{split}_top1']:.2f}%")
                continue
            spec = recipe.run_spec({**changed_settings(wanted, recipe.config.to_json()), "device": run_config.device},
                                   teacher=Path(teacher) if distils else None, data=data, name=name,
                                   output=folder / f"{name}.safetensors",
                                   state_path=folder / name / "resume.safetensors", cache_dir=cache_dir)
            log(f"{kind}: {variant.label}, seed {seed}")
            result, path = run(spec, callbacks=callbacks(name), stop_hook=stop_hook)
            if path is None:
                raise StudyStopped(f"stopped {name} after {result.epochs_done} epoch(s), its state kept in "
                                   f"{spec.state_path.parent}" if result.epochs_done else
                                   f"stopped {name} before it finished an epoch")
            # every process records the run (so that all agree on what is done); the first measures and saves
            cam = None
            if teacher and main_process:
                cam = _teacher_cam_agreement(path, teacher, data, run_config, cache_dir)
            written = read_metadata(path)
            single = written["metrics"].get(f"{result.evaluated_on}_top1_single_view")
            rows.append(_row(variant.label, run_config, result.test_top1, result.train_seconds, path, run_teacher,
                             result.evaluated_on, cam, single, written["weights_dtype"], _architecture(written)))
            if main_process:
                save_results(results_path, rows)
            write_summary()
            log(f"  {variant.label}, seed {seed}: {result.evaluated_on} top-1 {result.test_top1:.2f}%")
    return write_summary()


def _recorded(folder: Path, row: dict, field: str, read: Callable[[dict], Any]) -> Any:
    """What a results row records in ``field`` about the checkpoint it scored; for a row written
    before rows recorded it, ``read`` from that checkpoint's metadata in the study folder; None when
    neither says (a reused checkpoint lives elsewhere)."""
    if field in row:
        return row[field]
    path = folder / row["checkpoint"]
    try:
        return read(read_metadata(path)) if path.is_file() else None
    except CheckpointError:
        return None


def _weights_dtype(meta: dict) -> str:
    return meta.get("weights_dtype", "float32")


def _architecture(meta: dict) -> dict:
    """The architecture a checkpoint was trained as and its arguments (test-time augmentation
    included), as a results row records it."""
    arch, arch_args = trained_architecture(meta)
    return {"arch": arch, "arch_args": arch_args}


def _describe(architecture: dict) -> str:
    args = ", ".join(f"{key}={value}" for key, value in sorted(architecture["arch_args"].items()))
    return f"{architecture['arch']}({args})"


def _teacher_cam_agreement(checkpoint: Path, teacher: Path, data: str, config: TrainConfig,
                           cache_dir: Path | None) -> float | None:
    """Mean correlation of a run's CAMs with the study's teacher's, on the split it was scored on
    (also for runs that did not distil: that is what CAM alignment is measured against)."""
    from ..data import load_data
    from ..evaluation import cam_agreement

    if not Path(teacher).exists():
        return None
    bundle = load_data(data, cache_dir=cache_dir)
    if config.validation:
        bundle = bundle.with_validation(config.validation)
    student, master = load_checkpoint(checkpoint), load_checkpoint(teacher)
    agreement = cam_agreement(student.model, master.model, bundle.test.images, (student.mean, student.std),
                              (master.mean, master.std))
    return None if agreement is None else agreement["cam_correlation_mean"]


def _row(label: str, config: TrainConfig, accuracy: float, train_seconds: float, checkpoint: Path,
         teacher_sha256: str | None, split: str, cam_correlation: float | None,
         single_view: float | None, weights_dtype: str, architecture: dict) -> dict:
    """One results.json row; ``teacher_sha256`` (None for CE-only runs) is the teacher's weights, so
    rows distilled from a retrained teacher are never mixed into the same table; ``split`` says
    what ``top1`` was measured on (test, or a validation split held out of train/); ``weights_dtype``
    how the scored checkpoint stores its weights, ``architecture`` what it is (:func:`_architecture`)."""
    return {"variant": label, "seed": config.seed, "loss_weights": config.loss_weights,
            "temperature": config.temperature, "top1": round(accuracy, 2), "split": split,
            "train_seconds": round(train_seconds, 1), "epochs": config.epochs, "limit": config.limit,
            "checkpoint": checkpoint.name, "config": config.to_dict(), "teacher_sha256": teacher_sha256,
            "cam_correlation": cam_correlation, "weights_dtype": weights_dtype,
            "architecture": architecture,
            **({"top1_single_view": round(single_view, 2)} if single_view is not None else {})}  # a TTA net's one pass
