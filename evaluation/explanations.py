"""``cxr explain``: Grad-CAM overlays and the pointing game, on image files or on a run.

``explain`` works from a checkpoint and image files alone. ``explain_run`` picks the run's test
images for a gallery (true positives, false positives, false negatives at the thresholds
``cxr evaluate`` chose on validation) and plays the pointing game on every held-out (val + test)
image that has a radiologist box.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from evaluation import figures
from evaluation.inference import predict_arrays
from evaluation.overlay import Panel, render
from evaluation.pointing import NIH_BOX_FRAME, TOLERANCE, box_to_model, play, summarize
from evaluation.predict import decode_all, decode_images
from pipelines.atomic import staged_dir
from pipelines.imaging import decode_file
from pipelines.rundir import RunDir
from pipelines.sources.nih import BOX_FILES, read_boxes

DEFAULT_THRESHOLD = 0.5  # only where no threshold was chosen on validation
CATEGORIES = {"TP": "true positive", "FP": "false positive", "FN": "false negative"}


@dataclass
class ExplainResult:
    out_dir: Path
    images: list[Path]  # the PNG overlays written
    predictions: pd.DataFrame  # image, prob_<finding> per explained (boxed, for a run) image
    pointing: pd.DataFrame  # one row per boxed finding: hit, baseline, box, peak (empty without boxes)
    summary: dict  # pointing-game figures (see pointing.summarize), empty without boxes
    gallery: pd.DataFrame | None = None  # explain_run: image_id, finding, category, prob, threshold, png

    def format(self) -> str:
        lines = [f"explain: {len(self.images)} overlay image(s) in {self.out_dir}"]
        if self.summary:
            s = self.summary
            lines.append(f"  pointing game: heatmap peak inside the box for {s['hits']} of {s['n']} boxed findings "
                         f"({s['hit_rate']:.0%}; a random point: {s['baseline']:.0%}); within the "
                         f"{s['tolerance']:.1%}-of-side tolerance: {s['hit_rate_tolerant']:.0%} "
                         f"(random {s['baseline_tolerant']:.0%})")
            for name, f in s["per_finding"].items():
                lines.append(f"    {name:<19} {f['hits']:>3}/{f['n']:<3} {f['hit_rate']:>5.0%}   random {f['baseline']:.0%}")
        return "\n".join(lines)


def _threshold(thresholds: dict | None, name: str) -> float:
    value = (thresholds or {}).get(name)
    return DEFAULT_THRESHOLD if value is None else float(value)


def _caption(prob: float, threshold: float, category: str | None = None) -> str:
    text = f"p {prob:.3f} (threshold {threshold:.3f})"
    return f"{CATEGORIES[category]}: {text}" if category else text


def explain(checkpoint: Path, images: list[Path], out_dir: Path, boxes: pd.DataFrame | None = None,
            thresholds: dict | None = None, box_frame: int | None = None, tolerance: float = TOLERANCE,
            predicted: bool = True) -> ExplainResult:
    """One overlay PNG per image, for every finding predicted at or above its threshold (0.5 where
    none is given; ``predicted=False`` skips these) and every finding with a box; the pointing game
    on the boxed ones.

    ``boxes``: ``image_id`` (the file name), ``finding``, ``x``, ``y``, ``w``, ``h``, in pixels of
    the image file, or of a ``box_frame`` x ``box_frame`` frame (NIH: 1024, whatever the file size);
    by default the frame is inferred from the list (see ``box_frame_for``).
    ``tolerance``: the pointing game's margin around a box, as a fraction of the image side.
    """
    from trainers.checkpoint import load_checkpoint
    from evaluation.gradcam import HeatmapMaker  # pytorch-grad-cam and torch only here

    model, info = load_checkpoint(Path(checkpoint))
    findings, size = list(info["findings"]), int(info["image_size"])
    paths = [Path(p) for p in images]
    decoded = decode_all(paths, size)
    pixels = np.stack([d.pixels for d in decoded]) if decoded else np.zeros((0, size, size), np.uint8)
    probs = predict_arrays(model, info, pixels)
    boxes = boxes if boxes is not None else pd.DataFrame(columns=["image_id", "finding", "x", "y", "w", "h"])
    box_frame = box_frame or box_frame_for(boxes, [d.orig_width for d in decoded])

    pairs, pair_boxes = [], []  # (image index, finding index), box in model pixels or None
    for i, path in enumerate(paths):
        boxed = boxes[boxes["image_id"] == path.name]
        frame = (box_frame, box_frame) if box_frame else (decoded[i].orig_width, decoded[i].orig_height)
        by_finding = {r.finding: box_to_model(r.x, r.y, r.w, r.h, *frame, size) for r in boxed.itertuples()
                      if r.finding in findings}
        for j, name in enumerate(findings):
            if (predicted and probs[i, j] >= _threshold(thresholds, name)) or name in by_finding:
                pairs.append((i, j))
                pair_boxes.append(by_finding.get(name))
    with HeatmapMaker(model, info) as maker:
        maps = maker.heatmaps(pixels[[i for i, _ in pairs]], [j for _, j in pairs])

    out_dir = Path(out_dir)
    panels: dict[int, list[Panel]] = {i: [] for i in range(len(paths))}
    rows = []
    for (i, j), box, heatmap in zip(pairs, pair_boxes, maps):
        name, threshold = findings[j], _threshold(thresholds, findings[j])
        game = play(heatmap, box, tolerance) if box is not None else None
        point = (game["peak_x"], game["peak_y"]) if game else None
        panels[i].append(Panel(name, heatmap, _caption(float(probs[i, j]), threshold), box, point))
        if game:
            rows.append({"image_id": paths[i].name, "finding": name, "prob": float(probs[i, j]),
                         "predicted": bool(probs[i, j] >= threshold), "x0": box[0], "y0": box[1], "x1": box[2],
                         "y1": box[3], **game})
    written = [render(pixels[i], panels[i], f"{paths[i].name}: {len(panels[i])} finding(s) explained",
                      out_dir / f"{paths[i].stem}.png") for i in range(len(paths))]
    predictions = pd.DataFrame({"image": [str(p) for p in paths]})
    for j, name in enumerate(findings):
        predictions[f"prob_{name}"] = probs[:, j]
    pointing = pd.DataFrame(rows)
    summary = summarize(pointing) if len(pointing) else {}
    if summary:
        summary["tolerance"] = tolerance
        _write_pointing(out_dir, pointing, summary)
    return ExplainResult(out_dir, written, predictions, pointing, summary)


def _write_pointing(out_dir: Path, pointing: pd.DataFrame, summary: dict) -> None:
    """The pointing game's table, summary and figure in ``out_dir``."""
    pointing.to_csv(out_dir / "pointing.csv", index=False)
    (out_dir / "pointing.json").write_text(json.dumps(summary, indent=2) + "\n")
    figures.pointing_plot(summary, out_dir / "pointing.png")


def find_box_file(run: RunDir) -> Path | None:
    """NIH's box list beside the run's label file (phantoms write one there too), if any."""
    info = json.loads(run.source_json.read_text())
    folder = Path(info["label_file"]).parent
    return next((folder / name for name in BOX_FILES if (folder / name).is_file()), None)


def box_frame_for(boxes: pd.DataFrame, widths: list[int]) -> int | None:
    """The frame a box list is drawn in: the files' own pixels if the list's boxes reach no
    further than the smallest file is wide, else NIH's 1024-pixel frame (NIH's boxes are in 1024
    units while many of its files are 512 wide). The whole list is judged, not the boxes of a few
    images, which may all happen to lie in a file's top-left quarter."""
    if boxes.empty or not widths:
        return None
    extent = float(max((boxes["x"] + boxes["w"]).max(), (boxes["y"] + boxes["h"]).max()))
    return NIH_BOX_FRAME if extent > min(widths) + 1 else None


def gallery_items(predictions: pd.DataFrame, per_finding: dict, max_images: int) -> pd.DataFrame:
    """Up to ``max_images`` (image, finding, category) items, about a third each of true positives
    (most confident first), false positives (most confident first) and false negatives (most
    confidently missed first), taking findings in turn so one finding does not fill the gallery."""
    picked = []
    per_category = max(1, max_images // len(CATEGORIES))
    for category in CATEGORIES:
        queues = []
        for name, m in per_finding.items():
            threshold = m.get("threshold")
            if threshold is None or f"prob_{name}" not in predictions:
                continue
            y, p = predictions[name].to_numpy(), predictions[f"prob_{name}"].to_numpy()
            called = p >= threshold
            mask = {"TP": (y == 1) & called, "FP": (y == 0) & called, "FN": (y == 1) & ~called}[category]
            order = np.argsort(p[mask] if category == "FN" else -p[mask], kind="mergesort")
            rows = predictions[mask].iloc[order]
            queues.append([(r.image_id, name, category, float(getattr(r, f"prob_{name}")), threshold)
                           for r in rows.itertuples()])
        taken = 0
        while taken < per_category and any(queues):
            for queue in queues:
                if queue and taken < per_category:
                    picked.append(queue.pop(0))
                    taken += 1
    return pd.DataFrame(picked, columns=["image_id", "finding", "category", "prob", "threshold"])


def explain_run(run: RunDir, checkpoint: Path | None = None, max_images: int = 24, max_boxed: int = 200,
                tolerance: float = TOLERANCE) -> ExplainResult:
    """The gallery in ``<run>/explain/gallery/`` (``gallery.csv`` lists it) and the pointing game
    on boxed held-out images in ``<run>/explain/boxed/`` (their boxed findings only: the gallery
    shows what the model predicts). Needs ``cxr evaluate`` first."""
    from trainers.checkpoint import load_checkpoint
    from evaluation.gradcam import HeatmapMaker

    metrics_path = run.eval_metrics
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: run `cxr evaluate --run {run.root}` first "
                                "(explain uses its thresholds and test predictions)")
    metrics = json.loads(metrics_path.read_text())
    checkpoint = run.best_checkpoint(checkpoint or metrics["checkpoint"])
    per_finding = metrics["per_finding"]
    thresholds = {name: m.get("threshold") for name, m in per_finding.items()}
    predictions = pd.read_parquet(run.eval_predictions)
    manifest = pd.read_parquet(run.manifest, columns=["image_id", "path"])
    image_root = Path(json.loads(run.source_json.read_text())["images"])
    path_of = dict(zip(manifest["image_id"].astype(str), manifest["path"].astype(str)))
    items = gallery_items(predictions, per_finding, max_images)
    model, info = load_checkpoint(checkpoint)
    findings = list(info["findings"])
    files = [image_root / path_of[i] for i in items["image_id"]]
    pixels = decode_images(files, int(info["image_size"]))
    with HeatmapMaker(model, info) as maker:
        maps = maker.heatmaps(pixels, [findings.index(f) for f in items["finding"]])
    # Built in a staging folder and swapped in whole: a re-run never mixes its images with the
    # last run's, and an interrupted one leaves the last complete explain/.
    final = run.explain
    with staged_dir(final) as out:
        written = []
        for k, (item, heatmap) in enumerate(zip(items.itertuples(), maps)):
            panel = Panel(item.finding, heatmap, _caption(item.prob, item.threshold, item.category))
            name = f"{k:02d}_{item.category}_{item.finding}_{Path(item.image_id).stem}.png"
            title = f"{item.image_id}: {CATEGORIES[item.category]}, {item.finding.replace('_', ' ')}"
            written.append(render(pixels[k], [panel], title, out / "gallery" / name))
        items["png"] = [str(p.relative_to(out)) for p in written]
        (out / "gallery").mkdir(parents=True, exist_ok=True)
        items.to_csv(out / "gallery.csv", index=False)

        pointing, summary, boxed_written, boxed_predictions = pd.DataFrame(), {}, [], pd.DataFrame()
        box_file = find_box_file(run)
        if box_file is not None:
            boxes = read_boxes(box_file)
            held_out = set(pd.read_parquet(run.splits).query("split != 'train'")["image_id"].astype(str)) \
                if run.splits.exists() else set(predictions["image_id"])
            boxed_ids = sorted(set(boxes["image_id"]) & held_out & set(path_of))[:max_boxed]
            if boxed_ids:
                boxed_files = [image_root / path_of[i] for i in boxed_ids]
                widths = [decode_file(p, 8).orig_width for p in boxed_files]  # the whole list decides the frame
                result = explain(checkpoint, boxed_files, out / "boxed", boxes[boxes["image_id"].isin(boxed_ids)],
                                 thresholds, box_frame_for(boxes, widths), tolerance, predicted=False)
                pointing, summary, boxed_written = result.pointing, result.summary, result.images
                boxed_predictions = result.predictions
                if summary:
                    summary["box_file"] = str(box_file)
                    summary["splits"] = "val+test" if run.splits.exists() else "test"
                    _write_pointing(out, pointing, summary)
    images = [final / p.relative_to(out) for p in written + boxed_written]
    return ExplainResult(final, images, boxed_predictions, pointing, summary, gallery=items)
