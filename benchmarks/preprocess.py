"""Ray Data preprocessing vs a plain single-process PIL loop doing the same work on the same files.

Both decode the real 1024x1024 NIH originals, convert to 8-bit grayscale, resize, and write Parquet.
The files are linked ``--repeat`` times under new names so the run is long enough that Ray's fixed
start-up cost does not dominate. Peak memory (driver + Ray workers, sampled) is measured at two
collection sizes to show it does not grow with the number of images.

    .venv/bin/python benchmarks/preprocess.py --repeat 4 --image-size 224
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pandas as pd
import psutil
from PIL import Image

from cxr.runtime import init_local_ray
from pipelines.imaging import decode_file
from pipelines.labels import FINDINGS
from pipelines.preprocess import preprocess

NIH_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nih" / "images"


def originals(limit: int | None) -> list[Path]:
    files = [p for p in sorted(NIH_IMAGES.glob("*.png")) if Image.open(p).size == (1024, 1024)]
    return files[:limit] if limit else files


def linked_collection(files: list[Path], repeat: int, folder: Path) -> pd.DataFrame:
    """A manifest over ``repeat`` linked copies of each file, split 70/15/15 by row."""
    rows = []
    for r in range(repeat):
        for i, f in enumerate(files):
            name = f"{r:02d}{i:06d}_000.png"
            (folder / name).symlink_to(f)
            rows.append({"image_id": name, "path": name, "patient_id": name[:8], **{k: 0 for k in FINDINGS}})
    manifest = pd.DataFrame(rows)
    split = np.where(np.arange(len(rows)) % 20 < 14, "train", np.where(np.arange(len(rows)) % 20 < 17, "val", "test"))
    manifest["split"] = split
    return manifest


def _children(process: psutil.Process, recursive: bool = True) -> list[psutil.Process]:
    """``process``'s children (descendants), or none when one being listed ended meanwhile: psutil
    raises then, and an exception would end the sampling thread silently, its peaks frozen (that
    sample alone misses them)."""
    try:
        return process.children(recursive=recursive)
    except psutil.Error:
        return []


class PeakMemory:
    """Samples the summed RSS of this process and its children (Ray's raylet, workers, store);
    ``include_self=False`` counts the children alone (a benchmark that runs the CLI as a subprocess).

    RSS counts a page shared by several processes (libraries, the object store's shared memory) once
    per process. ``uss=True`` also samples the summed unique memory (``peak_uss``: what the processes
    hold that no other does, so nothing counts twice) and ``peak_top``, the RSS of the top process
    alone (the driver: this process, or with ``include_self=False`` its direct children)."""

    def __init__(self, interval: float = 0.05, include_self: bool = True, uss: bool = False) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self.include_self, self.uss = include_self, uss
        self.peak_uss = self.peak_top = 0

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = unique = top = 0
            tops = [me] if self.include_self else _children(me, recursive=False)
            for p in [*tops, *(c for t in tops for c in _children(t))]:
                try:
                    info = p.memory_full_info() if self.uss else p.memory_info()
                except psutil.Error:
                    continue
                total += info.rss
                unique += getattr(info, "uss", 0)
                top += info.rss if p in tops else 0
            self.peak, self.peak_uss, self.peak_top = max(self.peak, total), max(self.peak_uss, unique), max(self.peak_top, top)
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def plain_loop(manifest: pd.DataFrame, folder: Path, out: Path, size: int) -> None:
    """The baseline: one process, one file after another, then one Parquet write."""
    records = []
    for row in manifest.itertuples():
        d = decode_file(folder / row.path, size)
        records.append({"image_id": row.image_id, "split": row.split, "image": d.pixels.tobytes(), "pixel_mean": float(d.pixels.mean()), "pixel_std": float(d.pixels.std())})
    pd.DataFrame(records).to_parquet(out / "plain.parquet")


def ray_pipeline(manifest: pd.DataFrame, folder: Path, out: Path, size: int, blocks: int | None) -> None:
    preprocess(manifest.drop(columns="split"), manifest[["image_id", "patient_id", "split"]], folder, out / "shards", image_size=size, num_blocks=blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="linked copies of each original")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N originals")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--blocks", type=int, default=None, help="Ray Data read blocks (default: the pipeline's)")
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    if not NIH_IMAGES.is_dir():
        raise SystemExit(f"real NIH images not found at {NIH_IMAGES}")
    import ray

    init_local_ray(args.cpus)
    files = originals(args.limit)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in sorted({max(1, args.repeat // 4), args.repeat}):
            folder, out = Path(tmp) / f"in{repeat}", Path(tmp) / f"out{repeat}"
            folder.mkdir()
            out.mkdir()
            manifest = linked_collection(files, repeat, folder)
            ray_pipeline(manifest.head(32), folder, Path(tmp) / "warm", args.image_size, None)  # warm workers
            with PeakMemory() as mem:
                t0 = time.perf_counter()
                ray_pipeline(manifest, folder, out, args.image_size, args.blocks)
                ray_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            plain_loop(manifest, folder, out, args.image_size)
            plain_s = time.perf_counter() - t0
            n = len(manifest)
            rows.append({"images": n, "plain loop img/s": n / plain_s, "Ray Data img/s": n / ray_s, "ratio": plain_s / ray_s, "peak RSS (MiB)": mem.peak / 2**20})
            shutil.rmtree(folder)
    ray.shutdown()
    table = pd.DataFrame(rows)
    print(f"\n{len(files)} NIH 1024x1024 originals, -> {args.image_size}x{args.image_size}, {args.cpus} CPUs for Ray\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))


if __name__ == "__main__":
    main()
