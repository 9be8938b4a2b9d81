"""Ray Data preprocessing on a real local Ray: shards, quarantine of bad images, train-only stats."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipelines.ingest import ingest
from pipelines.preprocess import preprocess
from pipelines.shards import images_from_column, split_dir
from tests.helpers import chest_like, nih_row, write_bad_files, write_nih_csv, write_png

pytestmark = pytest.mark.ray


@pytest.fixture
def collection(tmp_path):
    images = tmp_path / "images"
    rows = []
    for p in range(1, 13):
        name = f"{p:08d}_000.png"
        write_png(images / name, chest_like(48 + p, seed=p))
        rows.append(nih_row(name, "Mass" if p % 3 == 0 else "No Finding"))
    gray = chest_like(40, seed=99)
    write_png(images / "00000013_000.png", np.dstack([gray, gray, gray, np.full_like(gray, 255)]), "RGBA")
    Image.fromarray((chest_like(40, seed=98).astype(np.uint16) * 256)).save(images / "00000014_000.png")
    rows += [nih_row("00000013_000.png"), nih_row("00000014_000.png")]
    bad = write_bad_files(images)
    rows += [nih_row(name) for name in bad]
    csv = write_nih_csv(tmp_path / "Data_Entry.csv", rows)
    manifest = ingest("nih", csv, images).manifest
    split = np.where(manifest.index % 4 == 0, "test", np.where(manifest.index % 4 == 1, "val", "train"))
    splits = pd.DataFrame({"image_id": manifest["image_id"], "patient_id": manifest["patient_id"], "split": split})
    return manifest, splits, images, bad


def test_shards_quarantine_and_train_only_stats(tmp_path, collection, ray_local):
    manifest, splits, images, bad = collection
    shards = tmp_path / "run" / "shards"
    result = preprocess(manifest, splits, images, shards, image_size=16, num_blocks=4, batch_size=4)

    # every image is accounted for: written or quarantined with its reason
    assert sum(result.written.values()) + len(result.quarantine) == len(manifest)
    reasons = dict(zip(result.quarantine["image_id"], result.quarantine["reason"]))
    assert set(reasons) == set(bad)
    for name, why in bad.items():
        assert why in reasons[name]

    frames = {s: pd.read_parquet(split_dir(shards, s)) for s in ("train", "val", "test")}
    for s, frame in frames.items():
        expected = set(splits.loc[splits["split"] == s, "image_id"]) - set(bad)
        assert set(frame["image_id"]) == expected
        pixels = images_from_column(frame["image"], 16)
        assert pixels.shape == (len(frame), 16, 16)
    train = frames["train"]
    assert train.loc[train["image_id"] == "00000003_000.png", "Mass"].item() == 1

    # stats: the pooled moments equal numpy over the train pixels only
    train_pixels = images_from_column(train["image"], 16).astype(np.float64) / 255.0
    assert result.stats["mean"] == pytest.approx(train_pixels.mean(), abs=1e-6)
    assert result.stats["std"] == pytest.approx(train_pixels.std(), abs=1e-6)
    everything = np.concatenate([images_from_column(f["image"], 16) for f in frames.values()]).astype(np.float64) / 255.0
    assert result.stats["mean"] != pytest.approx(everything.mean(), abs=1e-9)

    modes = dict(zip(result.image_table["image_id"], result.image_table["orig_mode"]))
    assert modes["00000013_000.png"] == "RGBA" and modes["00000014_000.png"].startswith("I")
    assert not (shards / "split=_failed").exists()


def test_file_deleted_after_ingest_is_quarantined_not_fatal(tmp_path, collection, ray_local):
    manifest, splits, images, bad = collection
    (images / "00000005_000.png").unlink()
    result = preprocess(manifest, splits, images, tmp_path / "shards", image_size=16, num_blocks=2)
    reasons = dict(zip(result.quarantine["image_id"], result.quarantine["reason"]))
    assert reasons["00000005_000.png"].startswith("missing file")
    assert sum(result.written.values()) + len(result.quarantine) == len(manifest)


def test_a_file_swapped_for_an_outside_link_after_ingest_is_not_read(tmp_path, collection, ray_local):
    manifest, splits, images, bad = collection
    outside = write_png(tmp_path / "elsewhere" / "secret.png", chest_like(40, seed=7))
    swapped = images / "00000005_000.png"
    swapped.unlink()
    swapped.symlink_to(outside)
    result = preprocess(manifest, splits, images, tmp_path / "shards", image_size=16, num_blocks=2)
    reasons = dict(zip(result.quarantine["image_id"], result.quarantine["reason"]))
    assert reasons["00000005_000.png"].startswith("path escapes image root")
    written = pd.concat([pd.read_parquet(split_dir(tmp_path / "shards", s), columns=["image_id"]) for s in ("train", "val", "test")])
    assert "00000005_000.png" not in set(written["image_id"])
    assert sum(result.written.values()) + len(result.quarantine) == len(manifest)


def test_rows_naming_one_file_twice_are_quarantined_not_asserted(tmp_path, collection, ray_local):
    """A manifest from another tool can name one file under two ids (``x.png`` and ``./x.png``)."""
    manifest, splits, images, bad = collection
    twin = manifest.iloc[[0]].assign(image_id="twin", path="./" + manifest.iloc[0]["path"])
    manifest = pd.concat([manifest, twin], ignore_index=True)
    splits = pd.concat([splits, pd.DataFrame({"image_id": ["twin"], "patient_id": [twin.iloc[0]["patient_id"]], "split": [splits.iloc[0]["split"]]})], ignore_index=True)
    result = preprocess(manifest, splits, images, tmp_path / "shards", image_size=16, num_blocks=2)
    reasons = dict(zip(result.quarantine["image_id"], result.quarantine["reason"]))
    assert reasons["twin"].startswith("duplicate file: 2 rows") and reasons[manifest.iloc[0]["image_id"]].startswith("duplicate file")
    assert sum(result.written.values()) + len(result.quarantine) == len(manifest)
