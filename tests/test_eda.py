"""EDA on a tiny hand-labelled collection (no Ray), plus the real NIH subset when it is present."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.eda import FIGURES, cooccurrence_matrix, run_eda
from pipelines.eda_pixels import read_gray8, read_shard_sample
from pipelines.labels import FINDINGS
from pipelines.manifest import conform_manifest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHARD_SIZE = 16

# image -> (patient, split, labels); hand counts below follow from this table.
ROWS = {
    "a.png": ("p1", "train", {"Effusion": 1, "Infiltration": 1}),
    "b.png": ("p1", "train", {}),
    "c.png": ("p2", "val", {"Effusion": 1}),  # RGBA on disk
    "d.png": ("p3", "test", {"Pneumonia": 1, "Effusion": 1}),  # 16-bit on disk
    "e.png": ("p3", "test", {"Edema": -1}),  # uncertain only: not "No Finding"
    "f.png": ("p3", "test", {}),
    "g.png": ("p4", "train", {"Infiltration": 1}),
    "h.png": ("p4", "train", {"Pneumonia": 1, "Infiltration": 1}),
}
POSITIVES = {"Effusion": 3, "Infiltration": 3, "Pneumonia": 2}  # every other finding: 0
NO_FINDING = 2  # b, f


def gray(seed: int, shape=(32, 32)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(20, 230, shape[1])[None, :] + rng.normal(0, 10, shape)
    return np.clip(ramp, 0, 255).astype(np.uint8)


def write_images(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(ROWS):
        pixels = gray(k)
        if name == "c.png":
            rgba = np.dstack([pixels, pixels, pixels, np.full_like(pixels, 255)])
            Image.fromarray(rgba, "RGBA").save(root / name)
        elif name == "d.png":
            Image.fromarray(pixels.astype(np.uint16) * 257).save(root / name)  # full 16-bit range
        else:
            Image.fromarray(pixels).save(root / name)


def make_manifest(names=None) -> pd.DataFrame:
    records = []
    for name in names or ROWS:
        patient, _, labels = ROWS[name]
        records.append({"image_id": name, "path": name, "patient_id": patient, "study": 0, "age": 50, "sex": "F",
                         "view": "PA", **{f: labels.get(f, 0) for f in FINDINGS}, "source": "test"})
    return conform_manifest(pd.DataFrame(records))


def make_splits() -> pd.DataFrame:
    return pd.DataFrame({"image_id": list(ROWS), "patient_id": [r[0] for r in ROWS.values()],
                         "split": [r[1] for r in ROWS.values()]})


def write_shards(shards: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Shards in pipelines/shards.py's format (two rows per row group, to exercise row-group reads)
    and stats.json's numbers computed on the train rows."""
    images = {name: gray(100 + k, (SHARD_SIZE, SHARD_SIZE)) for k, name in enumerate(ROWS)}
    for split in ("train", "val", "test"):
        names = [n for n, r in ROWS.items() if r[1] == split]
        table = pa.table({
            "image_id": names,
            "patient_id": [ROWS[n][0] for n in names],
            "image": [images[n].tobytes() for n in names],
            **{f: pa.array([ROWS[n][2].get(f, 0) for n in names], pa.int8()) for f in FINDINGS},
            "pixel_mean": pa.array([images[n].mean() for n in names], pa.float32()),
            "pixel_std": pa.array([images[n].std() for n in names], pa.float32()),
        })
        (shards / f"split={split}").mkdir(parents=True)
        pq.write_table(table, shards / f"split={split}" / "part-0.parquet", row_group_size=2)
    train = np.stack([images[n] for n, r in ROWS.items() if r[1] == "train"]) / 255.0
    return {"image_size": SHARD_SIZE, "mean": float(train.mean()), "std": float(train.std())}, images


@pytest.fixture
def collection(tmp_path):
    write_images(tmp_path / "images")
    stats, shard_images = write_shards(tmp_path / "shards")
    return {"root": tmp_path / "images", "shards": tmp_path / "shards", "stats": stats, "shard_images": shard_images,
            "out": tmp_path / "eda"}


def assert_png(path: Path) -> None:
    assert path.exists() and path.read_bytes()[:8] == PNG_SIGNATURE, path
    with Image.open(path) as image:
        image.verify()


def test_full_run_numbers_figures_and_summaries(collection):
    result = run_eda(make_manifest(), collection["root"], collection["out"], splits=make_splits(),
                     shards=collection["shards"], stats=collection["stats"], sample_size=100)

    assert set(result.figures) == set(FIGURES)
    for path in result.figures.values():
        assert_png(path)
    assert result.prevalence == {f: POSITIVES.get(f, 0) for f in FINDINGS}
    assert result.uncertain == {f: int(f == "Edema") for f in FINDINGS}
    assert result.no_finding == NO_FINDING
    assert (result.n_images, result.n_unique_ids, result.duplicates) == (8, 8, 0)
    assert (result.n_patients, result.patients_with_several_images) == (4, 3)

    counts = result.split_counts
    assert counts.loc["Infiltration"].to_dict() == {"train": 3, "val": 0, "test": 0}
    assert counts.loc["Effusion"].to_dict() == {"train": 1, "val": 1, "test": 1}
    assert counts.loc["No Finding"].to_dict() == {"train": 1, "val": 0, "test": 1}

    # The stats came from the train shards, and the sample covers every row: train is exactly standard.
    pixels = result.pixels
    assert (pixels.source, pixels.images, pixels.skipped) == ("shards", 8, [])
    mean, std, n = pixels.standardized["train"]
    assert n == 4 and mean == pytest.approx(0, abs=1e-9) and std == pytest.approx(1, abs=1e-9)
    assert "stats.json" in pixels.norm_source

    md, page = result.summary_md.read_text(), result.summary_html.read_text()
    for name in FIGURES.values():
        assert f"]({name})" in md and f'src="{name}"' in page
    assert "| Effusion | 3 | 0 |" in md and "| Edema | 0 | 1 |" in md  # positive, uncertain columns
    assert "<table" in page and "No Finding: 2 images" in page


def test_cooccurrence_is_symmetric_with_prevalence_on_the_diagonal():
    manifest = make_manifest()
    matrix = cooccurrence_matrix(manifest)
    assert matrix.shape == (14, 14)
    assert (matrix.to_numpy() == matrix.to_numpy().T).all()
    assert dict(zip(FINDINGS, np.diag(matrix))) == {f: POSITIVES.get(f, 0) for f in FINDINGS}
    assert matrix.loc["Effusion", "Infiltration"] == 1
    assert matrix.loc["Effusion", "Pneumonia"] == 1
    assert matrix.loc["Pneumonia", "Infiltration"] == 1
    assert matrix.loc["Edema"].sum() == 0  # uncertain is not positive


def test_without_splits_or_shards_reads_raw_images_and_says_so(collection):
    out = collection["out"]
    out.mkdir()
    (out / FIGURES["split_labels"]).write_bytes(b"stale")  # from an earlier run with splits

    result = run_eda(make_manifest(), collection["root"], out, sample_size=100)

    assert "split_labels" not in result.figures and not (out / FIGURES["split_labels"]).exists()
    for path in result.figures.values():
        assert_png(path)
    assert result.split_counts is None
    pixels = result.pixels
    assert (pixels.source, pixels.images) == ("disk", 8)
    assert "no train split" in pixels.norm_source
    mean, std, _ = pixels.standardized["all sampled"]
    assert mean == pytest.approx(0, abs=1e-9) and std == pytest.approx(1, abs=1e-9)
    md = result.summary_md.read_text()
    assert "No splits yet" in md and "not preprocessed" in md


def test_stats_from_sampled_train_images_when_not_preprocessed(collection):
    result = run_eda(make_manifest(), collection["root"], collection["out"], splits=make_splits(), sample_size=100)
    assert "4 sampled train images" in result.pixels.norm_source
    mean, std, _ = result.pixels.standardized["train"]
    assert mean == pytest.approx(0, abs=1e-9) and std == pytest.approx(1, abs=1e-9)


def test_one_patient_missing_files_and_findings_without_positives(collection):
    (collection["root"] / "a.png").unlink()
    manifest = make_manifest(["a.png", "b.png"])  # one patient; 12 findings with no positive

    result = run_eda(manifest, collection["root"], collection["out"], sample_size=10)

    assert (result.n_patients, result.patients_with_several_images) == (1, 1)
    assert result.pixels.skipped == [("a.png", "missing file")]
    assert result.pixels.images == 1
    for path in result.figures.values():
        assert_png(path)
    md = result.summary_md.read_text()
    assert "could not be read and were skipped: a.png (missing file)" in md
    assert "No positive image for: Atelectasis, Cardiomegaly" in md


def test_every_sampled_file_missing_still_writes_all_figures(tmp_path):
    (tmp_path / "images").mkdir()
    result = run_eda(make_manifest(), tmp_path / "images", tmp_path / "eda", sample_size=4)
    assert result.pixels.images == 0 and len(result.pixels.skipped) == 4
    assert result.pixels.norm_mean is None
    for path in result.figures.values():
        assert_png(path)


def test_disk_images_become_8bit_gray_without_clipping(collection):
    root = collection["root"]
    assert np.array_equal(read_gray8(root / "c.png"), gray(2))  # RGBA, opaque
    sixteen = read_gray8(root / "d.png")  # values v * 257 in 16 bits scale back to v
    assert sixteen.dtype == np.uint8 and np.array_equal(sixteen, gray(3))


def test_shard_sample_reads_the_drawn_rows_exactly(collection):
    sample = read_shard_sample(collection["shards"], n=5, seed=3)
    assert len(sample) == 5 and len(set(sample.image_ids)) == 5
    for image_id, split, hist in zip(sample.image_ids, sample.splits, sample.hists):
        assert split == ROWS[image_id][1]
        expected = np.bincount(collection["shard_images"][image_id].ravel(), minlength=256) / SHARD_SIZE**2
        assert np.array_equal(hist, expected)


def test_inputs_are_checked(collection, tmp_path):
    manifest = make_manifest()
    with pytest.raises(ValueError, match="missing column"):
        run_eda(manifest.drop(columns="Hernia"), collection["root"], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="shards folder not found"):
        run_eda(manifest, collection["root"], tmp_path / "x", shards=tmp_path / "nope")
    with pytest.raises(ValueError, match="positive 'std'"):
        run_eda(manifest, collection["root"], tmp_path / "x", stats={"mean": 0.5, "std": 0})


NIH = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih"


@pytest.mark.realdata
@pytest.mark.skipif(not (NIH / "images").is_dir(), reason=f"NIH subset not found at {NIH}")
def test_real_nih_subset(tmp_path):
    from pipelines.ingest import ingest

    csv = next(NIH.glob("Data_Entry_2017*.csv*"))
    manifest = ingest("nih", csv, NIH / "images").manifest
    result = run_eda(manifest, NIH / "images", tmp_path / "eda", sample_size=16)
    assert result.prevalence["Pneumonia"] == 504
    assert result.n_patients == 977
    assert result.duplicates == 0 and result.pixels.skipped == []
    for path in result.figures.values():
        assert_png(path)
