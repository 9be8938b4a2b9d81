"""The robustness study streams: perturbed pixels exist one chunk at a time, each chunk's noise comes
from its own generator, and the table does not depend on the chunk size for the deterministic
perturbations. Loading a split writes each Parquet batch into one preallocated array. No model, no Ray."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from evaluation import inference
from evaluation.inference import load_split
from evaluation.robustness import CHUNK, PERTURBATIONS, chunk_rng, perturb, perturbed_chunks, robustness_table
from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from tests.helpers import chest_like

LEVELS = sum(len(p.strengths) for p in PERTURBATIONS)  # perturbed levels (level 0 is the clean score)


def _data(n: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    images = np.stack([chest_like(size, seed) for seed in range(n)])
    labels = np.random.default_rng(1).integers(0, 2, (n, 2)).astype(np.int8)
    return images, labels


class Recorder:
    """A predict callable that scores brightness and keeps every batch it was given."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(x.copy())
        return np.stack([x.mean(axis=(1, 2)) / 255, x[:, 0, 0] / 255], axis=1)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_predict_never_sees_more_than_a_chunk_and_sees_every_image_once_per_level(chunk):
    images, labels = _data(23)
    seen = Recorder()
    robustness_table(seen, images, labels, ["A", "B"], chunk=chunk, clean_probs=seen(images))
    batches = seen.batches[1:]  # the first is the clean scoring above
    assert max(len(b) for b in batches) <= chunk
    assert sum(len(b) for b in batches) == len(images) * LEVELS
    assert len(batches) == LEVELS * -(-len(images) // chunk)  # ceil: the last chunk may be short

    seen = Recorder()  # without clean_probs: the clean scoring is chunked too
    robustness_table(seen, images, labels, ["A", "B"], chunk=chunk)
    assert max(len(b) for b in seen.batches) <= chunk
    assert sum(len(b) for b in seen.batches) == len(images) * (LEVELS + 1)


def test_default_chunk_bounds_what_predict_receives():
    images, labels = _data(CHUNK + 5, size=8)
    seen = Recorder()
    robustness_table(seen, images, labels, ["A", "B"])
    assert {len(b) for b in seen.batches} == {CHUNK, 5}


def test_each_chunk_is_perturbed_with_its_own_generator():
    images, _ = _data(10)
    chunks = list(perturbed_chunks(images, "noise", 3, seed=5, chunk=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    for k, got in enumerate(chunks):
        part = images[4 * k:4 * k + 4]
        want = perturb(part, "noise", 3, rng=chunk_rng(5, "noise", 3, k))
        np.testing.assert_array_equal(got, want)
    # identical pixels in two chunks still get different noise: the generator is the chunk's, not reused
    twice = np.concatenate([images[:4], images[:4]])
    first, second = perturbed_chunks(twice, "noise", 3, seed=5, chunk=4)
    assert not np.array_equal(first, second)


def test_a_chunk_does_not_depend_on_the_images_after_it():
    images, _ = _data(12)
    whole = list(perturbed_chunks(images, "noise", 4, chunk=4))
    shorter = list(perturbed_chunks(images[:8], "noise", 4, chunk=4))
    for a, b in zip(shorter, whole):
        np.testing.assert_array_equal(a, b)


def test_generators_differ_by_seed_perturbation_level_and_chunk():
    draws = {key: chunk_rng(*key).integers(0, 2**31, 4).tolist()
             for key in [(0, "noise", 1, 0), (1, "noise", 1, 0), (0, "blur", 1, 0), (0, "noise", 2, 0), (0, "noise", 1, 1)]}
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert chunk_rng(0, "noise", 1, 0).integers(0, 2**31, 4).tolist() == draws[(0, "noise", 1, 0)]  # reproducible


def test_table_does_not_depend_on_chunk_size_for_deterministic_perturbations():
    images, labels = _data(30)
    one = robustness_table(Recorder(), images, labels, ["A", "B"], chunk=len(images))
    many = robustness_table(Recorder(), images, labels, ["A", "B"], chunk=7)
    assert list(one.columns) == list(many.columns)
    same = one["perturbation"] != "noise"  # the noise of an image depends on its chunk by design
    pd.testing.assert_frame_equal(one[same].reset_index(drop=True), many[same].reset_index(drop=True))
    noise = many[many["perturbation"] == "noise"]
    assert noise["mean_auroc"].notna().all()


# --------------------------------------------------------------------------- loading a split


def _write_shards(root, rows: list[tuple[str, int]], size: int) -> RunDir:
    """Two Parquet files for the test split, rows deliberately out of id order."""
    run = RunDir(root)
    folder = run.shards / "split=test"
    folder.mkdir(parents=True)
    for part, chunk in enumerate((rows[: len(rows) // 2], rows[len(rows) // 2:])):
        table = {"image_id": [i for i, _ in chunk], "patient_id": [f"p{v % 3}" for _, v in chunk],
                 "image": [np.full((size, size), v, np.uint8).tobytes() for _, v in chunk],
                 **{f: np.array([v % 2 for _, v in chunk], np.int8) for f in FINDINGS}}
        pq.write_table(pa.table(table), folder / f"part-{part}.parquet")
    return run


def test_load_split_fills_one_array_batch_by_batch_in_id_order(tmp_path, monkeypatch):
    monkeypatch.setattr(inference, "BATCH_ROWS", 2)  # several Parquet batches per file
    rows = [(f"img{v:03d}.png", v) for v in (7, 3, 11, 0, 5, 9, 1)]
    data = load_split(_write_shards(tmp_path / "run", rows, 4), "test", 4)
    ids = sorted(i for i, _ in rows)
    assert data.frame["image_id"].tolist() == ids
    assert data.images.dtype == np.uint8 and data.images.shape == (len(rows), 4, 4) and data.images.flags.writeable
    value = dict(rows)
    assert [int(im[0, 0]) for im in data.images] == [value[i] for i in ids]  # each image in its own row
    assert (data.images == data.images[:, :1, :1]).all()
    assert data.labels(["Atelectasis"]).ravel().tolist() == [value[i] % 2 for i in ids]


def test_load_split_names_a_size_mismatch(tmp_path):
    run = _write_shards(tmp_path / "run", [("a.png", 1), ("b.png", 2)], 8)
    with pytest.raises(UserInputError, match="8x8 images but the checkpoint expects 4x4"):
        load_split(run, "test", 4)
