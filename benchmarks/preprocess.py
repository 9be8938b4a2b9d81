"""Ray Data preprocessing vs two baselines doing the same work on the same files, in one run:
a plain single-process PIL loop, and a ``multiprocessing.Pool`` over all cores running that loop on
chunks (each worker writes its chunk's Parquet file): the practical ceiling of one machine.

All three decode the real 1024x1024 NIH originals, convert to 8-bit grayscale, resize, and write
Parquet. The originals are copied once to a temporary folder and hard-linked ``--repeat`` times under
new names (preprocessing refuses symbolic links that resolve outside the image root), so the run is
long enough that Ray's fixed start-up cost does not dominate; Ray's workers and the Pool's processes
are started and warmed before the clock starts. ``--trials`` repeats the three in alternating order;
each trial's ratios pair runs seconds apart. Besides wall time, the CPU seconds per image of every
process involved (for Ray: the driver, the workers, the raylet, GCS, dashboard) compare the work
done where other jobs share the machine. Peak memory (driver + Ray workers, sampled) is measured in
an untimed run at two collection sizes to show it does not grow with the number of images.

    .venv/bin/python benchmarks/preprocess.py --repeat 4 --image-size 224
"""
from __future__ import annotations

import argparse
import multiprocessing
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


def local_copies(files: list[Path], pool: Path) -> list[Path]:
    """Each file copied once into ``pool`` (kept when already there), to hard-link from: a hard link
    is a file of its own inside the image root, and the shared originals are never touched."""
    pool.mkdir(parents=True, exist_ok=True)
    out = []
    for src in files:
        dst = pool / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


def linked_collection(files: list[Path], repeat: int, folder: Path) -> pd.DataFrame:
    """A manifest over ``repeat`` hard-linked copies of each file, split 70/15/15 by row."""
    copies = local_copies(files, folder.parent / "pool")
    rows = []
    for r in range(repeat):
        for i, f in enumerate(copies):
            name = f"{r:02d}{i:06d}_000.png"
            os.link(f, folder / name)
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


def plain_loop(manifest: pd.DataFrame, folder: Path, out: Path, size: int, name: str = "plain.parquet") -> int:
    """The baseline: one process, one file after another, then one Parquet write. Returns the rows written."""
    records = []
    for row in manifest.itertuples():
        d = decode_file(folder / row.path, size)
        records.append({"image_id": row.image_id, "split": row.split, "image": d.pixels.tobytes(), "pixel_mean": float(d.pixels.mean()), "pixel_std": float(d.pixels.std())})
    pd.DataFrame(records).to_parquet(out / name)
    return len(records)


def _pool_chunk(job: tuple[pd.DataFrame, Path, Path, int, str]) -> int:
    return plain_loop(*job)


def pool_loop(pool, manifest: pd.DataFrame, folder: Path, out: Path, size: int, chunks: int) -> int:
    """The second baseline: the plain loop on ``chunks`` slices of the manifest, in the Pool's
    processes, each writing its own Parquet file (as each Ray task writes its own)."""
    parts = [manifest.iloc[i] for i in np.array_split(np.arange(len(manifest)), chunks) if len(i)]
    return sum(pool.imap_unordered(_pool_chunk, [(part, folder, out, size, f"pool-{k:04d}.parquet") for k, part in enumerate(parts)]))


def ray_pipeline(manifest: pd.DataFrame, folder: Path, out: Path, size: int, blocks: int | None) -> int:
    """``cxr preprocess``'s pipeline; every image must be written (a quarantined one would make Ray look fast)."""
    result = preprocess(manifest.drop(columns="split"), manifest[["image_id", "patient_id", "split"]], folder, out / "shards", image_size=size, num_blocks=blocks)
    if len(result.quarantine):
        raise RuntimeError(f"preprocess quarantined {len(result.quarantine)} image(s), e.g. {result.quarantine.iloc[0]['reason']}")
    return sum(result.written.values())


def _cpu_seconds(counted) -> dict[tuple[int, float], float]:
    """CPU seconds (user + system) so far of each process of this tree that ``counted`` accepts."""
    out = {}
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            if counted(p):
                out[(p.pid, p.create_time())] = sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return out


def timed(work, n: int, counted) -> tuple[float, float]:
    """Wall seconds of ``work()`` (which must return ``n``, the images written) and the CPU seconds the
    processes ``counted`` accepts spent meanwhile: on a shared machine the wall time depends on the
    other jobs, the CPU time much less, so CPU per image is the steadier comparison of the work done."""
    before = _cpu_seconds(counted)
    t0 = time.perf_counter()
    assert work() == n
    seconds = time.perf_counter() - t0
    after = _cpu_seconds(counted)
    return seconds, sum(v - before.get(k, 0.0) for k, v in after.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=4, help="linked copies of each original")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N originals")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--blocks", type=int, default=None, help="Ray Data blocks (default: the pipeline's)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray and processes of the Pool")
    parser.add_argument("--chunks-per-process", type=int, default=4, help="the Pool's work split: chunks per process")
    parser.add_argument("--trials", type=int, default=1, help="measure each size this many times (Ray, loop, Pool in turn)")
    args = parser.parse_args()
    if not NIH_IMAGES.is_dir():
        raise SystemExit(f"real NIH images not found at {NIH_IMAGES}")
    import ray

    init_local_ray(args.cpus)
    files = originals(args.limit)
    rows = []
    # spawn: the parent runs Ray's threads, which a forked child must not inherit
    with tempfile.TemporaryDirectory() as tmp, multiprocessing.get_context("spawn").Pool(args.cpus) as pool:
        for repeat in sorted({max(1, args.repeat // 4), args.repeat}):
            folder = Path(tmp) / f"in{repeat}"
            folder.mkdir()
            manifest = linked_collection(files, repeat, folder)
            n = len(manifest)
            ray_pipeline(manifest.head(32), folder, Path(tmp) / "warm", args.image_size, None)  # warm workers
            pool_loop(pool, manifest.head(4 * args.cpus), folder, Path(tmp), args.image_size, args.cpus)  # warm the pool
            workers = {p.pid for p in multiprocessing.active_children()}  # the Pool's processes
            # Peak memory from a run of its own: sampling every process 20 times a second costs CPU
            # (psutil lists every process on the machine to find the children), which would slow
            # the timed run and count against Ray alone.
            with PeakMemory() as mem:
                ray_pipeline(manifest, folder, Path(tmp) / f"mem{repeat}", args.image_size, args.blocks)
            for trial in range(args.trials):
                out = Path(tmp) / f"out{repeat}-{trial}"
                out.mkdir()
                sides = {
                    "ray": lambda: timed(lambda: ray_pipeline(manifest, folder, out, args.image_size, args.blocks), n, lambda p: p.pid not in workers),
                    "loop": lambda: timed(lambda: plain_loop(manifest, folder, out, args.image_size), n, lambda p: p.pid == os.getpid()),
                    "pool": lambda: timed(lambda: pool_loop(pool, manifest, folder, out, args.image_size, args.chunks_per_process * args.cpus), n,
                                          lambda p: p.pid in workers or p.pid == os.getpid()),
                }
                order = list(sides) if trial % 2 == 0 else list(reversed(sides))  # alternate, so a trend in the machine's load favours neither
                measured = {side: sides[side]() for side in order}
                (ray_s, ray_cpu), (plain_s, plain_cpu), (pool_s, pool_cpu) = measured["ray"], measured["loop"], measured["pool"]
                rows.append({"images": n, "plain loop img/s": n / plain_s, f"Pool({args.cpus}) img/s": n / pool_s, "Ray Data img/s": n / ray_s,
                             "Ray / Pool": pool_s / ray_s, "Ray / loop": plain_s / ray_s,
                             "loop CPU ms/img": 1000 * plain_cpu / n, "Pool CPU ms/img": 1000 * pool_cpu / n, "Ray CPU ms/img": 1000 * ray_cpu / n,
                             "peak RSS (MiB)": mem.peak / 2**20, "load": os.getloadavg()[0]})
                print(rows[-1], flush=True)
                shutil.rmtree(out)
            shutil.rmtree(folder)
    ray.shutdown()
    table = pd.DataFrame(rows)
    print(f"\n{len(files)} NIH 1024x1024 originals, -> {args.image_size}x{args.image_size}, {args.cpus} CPUs for Ray and the Pool\n")
    print(table.to_markdown(index=False, floatfmt=".2f"))
    if args.trials > 1:
        print(f"\nmedian of {args.trials} trials (ratios: median of the per-trial ratios, and their range)\n")
        print(summary(table).to_markdown(index=False, floatfmt=".2f"))


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per size, the median over the trials of each figure, and each ratio's range: the trials'
    ratios pair measurements taken a few seconds apart, so their median resists the other jobs on
    a shared machine better than a ratio of separately chosen best rates."""
    figures = [c for c in table.columns if c not in ("images", "load")]
    grouped = table.groupby("images")
    out = grouped[figures].median().reset_index()
    for ratio in ("Ray / Pool", "Ray / loop"):
        out[f"{ratio} range"] = [f"{lo:.2f}-{hi:.2f}" for lo, hi in zip(grouped[ratio].min(), grouped[ratio].max())]
    return out


if __name__ == "__main__":
    main()
