"""The phantom collection: NIH-shaped, deterministic, and its findings are where its boxes say."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.ingest import ingest
from pipelines.labels import FINDINGS, parse_nih_labels
from pipelines.phantoms import (
    NIH_HEADER,
    PLANTED,
    Finding,
    make_collection,
    render_phantom,
    sample_anatomy,
    sample_finding,
)
from pipelines.sources.nih import parse_nih, read_boxes

NIH_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp("phantoms"), n_patients=40, image_size=128, seed=0)


@pytest.fixture(scope="module")
def entries(collection) -> pd.DataFrame:
    """Data_Entry rows with the spacing column that NIH's split header names ``y]``."""
    return pd.read_csv(collection.labels_csv, dtype={"Patient ID": str}, keep_default_na=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    first = make_collection(tmp_path / "a", n_patients=6, image_size=64, seed=3)
    again = make_collection(tmp_path / "b", n_patients=6, image_size=64, seed=3)
    other = make_collection(tmp_path / "c", n_patients=6, image_size=64, seed=4)
    assert _files(first.root) == _files(again.root)
    assert first.labels_csv.read_bytes() != other.labels_csv.read_bytes()
    shared = set(_files(first.images)) & set(_files(other.images))
    assert any((first.images / n).read_bytes() != (other.images / n).read_bytes() for n in shared)


def test_nih_parser_and_ingest_keep_every_image(collection):
    assert collection.labels_csv.read_text().splitlines()[0] == NIH_HEADER
    parsed = parse_nih(collection.labels_csv)
    assert parsed.rejects == []
    assert len(parsed.rows) == parsed.rows_in == collection.n_images
    result = ingest("nih", collection.labels_csv, collection.images)
    assert len(result.quarantine) == 0
    assert len(result.manifest) == collection.n_images
    assert result.manifest["patient_id"].nunique() == collection.n_patients


def test_names_patients_and_labels_look_like_nih(collection, entries):
    assert len(entries) == collection.n_images
    assert entries["Image Index"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert (entries["Image Index"].str[:8] == entries["Patient ID"].str.zfill(8)).all()
    assert entries["Patient ID"].str.fullmatch(r"[1-9]\d*").all()  # bare integer, as NIH writes it
    assert (entries["Image Index"].str[9:12].astype(int) == entries["Follow-up #"]).all()
    assert sorted(p.name for p in collection.images.iterdir()) == sorted(entries["Image Index"])
    assert (entries.groupby("Patient ID").size() > 1).sum() >= 5
    assert entries["Patient Age"].between(18, 90).all()
    assert set(entries["Patient Gender"]) == {"M", "F"} and set(entries["View Position"]) == {"PA", "AP"}

    labels = pd.DataFrame([parse_nih_labels(t) for t in entries["Finding Labels"]])
    for finding in PLANTED:
        assert labels[finding].sum() >= 3, finding
    assert (labels[[f for f in FINDINGS if f not in PLANTED]] == 0).all().all()
    assert 0.3 < (labels.sum(axis=1) == 0).mean() < 0.75  # "No Finding" is common, not universal
    # labels are written in FINDINGS order, as NIH does
    for text in entries["Finding Labels"]:
        parts = text.split("|")
        assert parts == sorted(parts, key=lambda p: FINDINGS.index(p) if p in FINDINGS else -1)


def test_chronic_findings_persist_across_follow_ups(entries):
    entries = entries.assign(cardio=entries["Finding Labels"].str.contains("Cardiomegaly"))
    followed = entries.groupby("Patient ID").filter(lambda g: len(g) > 1 and g["cardio"].any())
    assert len(followed) > 0
    assert followed["cardio"].mean() > 0.6  # mostly present once a patient has it


def test_boxes_match_labels_and_sizes_in_mm(collection, entries):
    boxes = read_boxes(collection.boxes_csv)
    assert list(boxes.columns) == ["image_id", "finding", "x", "y", "w", "h"]
    positives = {
        (row["Image Index"], f)
        for _, row in entries.iterrows()
        for f in row["Finding Labels"].split("|")
        if f in PLANTED
    }
    assert set(zip(boxes["image_id"], boxes["finding"])) == positives
    assert len(boxes) == len(positives)  # one box per planted finding

    spacing = entries.set_index("Image Index")["OriginalImagePixelSpacing[x"].astype(float)
    size = entries.set_index("Image Index")["OriginalImage[Width"].astype(int)
    boxes = boxes.assign(mm=boxes["image_id"].map(spacing), side=boxes["image_id"].map(size))
    assert ((boxes["x"] >= 0) & (boxes["y"] >= 0)).all()
    assert ((boxes["x"] + boxes["w"] <= boxes["side"] + 1e-6) & (boxes["y"] + boxes["h"] <= boxes["side"] + 1e-6)).all()
    field_mm = boxes["side"] * boxes["mm"]
    assert field_mm.between(350, 430).all()
    mass = boxes[boxes["finding"] == "Mass"]
    nodule = boxes[boxes["finding"] == "Nodule"]
    assert ((mass["w"] * mass["mm"] > 30) & (mass["h"] * mass["mm"] > 30)).all()
    assert ((nodule["w"] * nodule["mm"] < 30) & (nodule["h"] * nodule["mm"] < 30)).all()


def _box_mean(image: np.ndarray, box, scale: float = 1.0) -> float:
    x0, y0 = int(box.x * scale), int(box.y * scale)
    x1, y1 = int(np.ceil((box.x + box.w) * scale)), int(np.ceil((box.y + box.h) * scale))
    return float(image[y0:y1, x0:x1].astype(float).mean())


def _to_64(image: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BOX))


BRIGHTER = {"Cardiomegaly": 1, "Effusion": 1, "Mass": 1, "Nodule": 1, "Pneumothorax": -1}


@pytest.mark.parametrize("kind", PLANTED)
def test_finding_changes_its_box_also_at_64px(kind):
    for seed in range(6):
        rng = np.random.default_rng(seed)
        anatomy = sample_anatomy(rng, view="AP" if seed % 2 else "PA")
        finding = sample_finding(rng, kind, anatomy)
        with_finding, (box,) = render_phantom(anatomy, [finding], 256)
        without, no_boxes = render_phantom(anatomy, [], 256)
        assert no_boxes == [] and box.finding == kind
        change = BRIGHTER[kind] * (_box_mean(with_finding, box) - _box_mean(without, box))
        small_with, small_without = _to_64(with_finding), _to_64(without)
        small_change = BRIGHTER[kind] * (_box_mean(small_with, box, 0.25) - _box_mean(small_without, box, 0.25))
        assert change > 6, (kind, seed, change)
        assert small_change > 5, (kind, seed, small_change)
        inside = np.zeros(with_finding.shape, bool)
        inside[int(box.y) : int(np.ceil(box.y + box.h)), int(box.x) : int(np.ceil(box.x + box.w))] = True
        difference = np.abs(with_finding.astype(int) - without)
        assert difference[inside].sum() > 0.9 * difference.sum(), (kind, seed)  # the box holds the finding

def test_cardiothoracic_ratio():
    rng = np.random.default_rng(1)
    anatomy = sample_anatomy(rng)
    enlarged = sample_finding(rng, "Cardiomegaly", anatomy)
    spacing = anatomy.field_mm / 256
    ratios = {}
    for name, ctr in (("normal", anatomy.heart_ctr), ("enlarged", enlarged.size)):
        _, (box,) = render_phantom(anatomy, [Finding("Cardiomegaly", size=ctr)], 256)
        ratios[name] = box.w * spacing / anatomy.thorax_width
    assert 0.36 < ratios["normal"] < 0.48
    assert ratios["enlarged"] > 0.52


def test_render_rejects_unknown_findings_and_make_collection_bad_arguments(tmp_path):
    anatomy = sample_anatomy(np.random.default_rng(0))
    with pytest.raises(ValueError, match="Atelectasis"):
        render_phantom(anatomy, [Finding("Atelectasis")])
    with pytest.raises(ValueError, match="n_patients"):
        make_collection(tmp_path, n_patients=0)
    with pytest.raises(ValueError, match="image_size"):
        make_collection(tmp_path, image_size=16)


def test_tiny_collection_still_has_every_finding(tmp_path):
    small = make_collection(tmp_path, n_patients=2, image_size=32, seed=5)
    labels = pd.read_csv(small.labels_csv)["Finding Labels"].str.split("|").explode()
    assert set(PLANTED) <= set(labels)


def test_read_boxes_rejects_a_file_that_is_not_a_box_list(tmp_path):
    bad = tmp_path / "boxes.csv"
    bad.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,1,2,three,4\n")
    with pytest.raises(ValueError, match="row 1"):
        read_boxes(bad)
    bad.write_text("image,label\n")
    with pytest.raises(ValueError, match="not an NIH box list"):
        read_boxes(bad)


@pytest.mark.realdata
def test_read_boxes_parses_nih_box_list():
    path = NIH_DATA / "BBox_List_2017.csv.gz"
    if not path.exists():
        pytest.skip(f"NIH box list not found at {path}")
    boxes = read_boxes(path)
    assert len(boxes) == 984
    assert set(boxes["finding"]) <= set(FINDINGS)
    assert "Infiltration" in set(boxes["finding"])  # NIH's box file spells it "Infiltrate"
    assert boxes["image_id"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert (boxes[["w", "h"]] > 0).all().all()
