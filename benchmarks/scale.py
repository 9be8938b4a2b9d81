"""The data stages at NIH scale: ingest, validate, split, preprocess (224 and 64 px), eda through the CLI.

A full-size NIH-shaped collection is built on local disk without new pixels: the official label
file's rows (whole patients, in file order, up to ``--rows``), each ``Image Index`` a hard link to one
of the shared real images, chosen by a hash of the name. Hard links, not symbolic ones: ingest
resolves links and quarantines rows whose paths resolve to one file (a duplicate) or outside the
image root, which is what it should do for a real collection; a hard link is a file of its own. The
shared images are copied once into ``<out>/pool`` beside the collection and linked from there, so
the shared data is never touched.

Each stage runs as a user runs it (``python -m cxr.cli VERB``, a subprocess) at every ``--sizes``
value; for each: wall time, rows per second, seconds per 1,000 rows, peak memory (the summed RSS of
the CLI process and every process it starts: Ray's GCS, raylet, dashboard, workers; sampled every
50 ms; also their summed unique memory, USS, which counts shared pages once, and the CLI process's
own RSS) and the bytes the stage wrote into the run folder. Results: ``results.csv``, ``results.md``
and ``scale.png`` (seconds per 1,000 rows and peak memory against rows, one line per stage) in --out.

``--eval`` adds the model stages on the last image size's shards: one short ``cxr train`` (resnet18
from random weights, ``--epochs`` epochs, one worker), ``cxr evaluate`` on the test split (with the
robustness study) and ``cxr explain``. Their rows also give the test and val split's image counts
and the size of one copy of each split's pixels (images x side x side bytes), so evaluate's peak
memory can be read as that copy + the model + a fixed overhead. ``--test-frac``/``--val-frac`` go to
``cxr split``: a large test fraction gives a large test split without preprocessing the whole
collection (17,000+ test images from 24,000 rows at ``--test-frac 0.75``). NIH's box list is copied
beside the collection's label file, so explain plays the pointing game as on the real collection.

    nice -n 10 .venv/bin/python benchmarks/scale.py --sizes 2000 10000 --out runs/scale
    nice -n 10 .venv/bin/python benchmarks/scale.py --sizes 6000 24000 --image-sizes 64 --eval \
        --test-frac 0.75 --val-frac 0.1 --out runs/scale-eval
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmarks.preprocess import PeakMemory, local_copies

ROOT = Path(__file__).resolve().parents[1]
NIH = ROOT.parent / "shared" / "data" / "nih"
LABEL_FILE = NIH / "Data_Entry_2017_v2020.csv.gz"
STAGES = ("ingest", "validate", "split", "preprocess", "eda")
EVAL_STAGES = ("train", "evaluate", "explain")  # with --eval, on the last image size's shards
BOX_FILE = NIH / "BBox_List_2017.csv.gz"


@dataclass(frozen=True)
class Collection:
    label_file: Path
    images: Path
    rows: int
    patients: int


def pick_rows(table: pd.DataFrame, rows: int | None) -> pd.DataFrame:
    """Whole patients, in the label file's order, as many as fit in ``rows`` (all: None).
    Keeping patients whole keeps the patient-level split as it is on the full collection."""
    if rows is None or rows >= len(table):
        return table
    kept = table.iloc[:rows]
    cut = table["Patient ID"].iloc[rows]  # the first patient left out
    if kept["Patient ID"].iloc[-1] == cut:  # the last patient would be cut in two: drop it
        kept = kept[kept["Patient ID"] != cut]
    if kept.empty:
        raise SystemExit(f"--rows {rows} is smaller than the first patient's images")
    return kept


def _pool(images: Path, pool: Path, full_size_only: bool) -> list[Path]:
    """The shared images, copied once into ``pool`` (sorted by name: the hash picks the same file
    for a name on every machine with the same images)."""
    from PIL import Image

    sources = sorted(images.glob("*.png"))
    if full_size_only:
        sources = [p for p in sources if Image.open(p).size == (1024, 1024)]
    if not sources:
        raise SystemExit(f"no PNG images found in {images}")
    return local_copies(sources, pool)


def _pick(name: str, n: int) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") % n


def build_collection(out: Path, rows: int | None = None, label_file: Path = LABEL_FILE, images: Path = NIH / "images",
                     full_size_only: bool = False, box_file: Path | None = BOX_FILE) -> Collection:
    """Write ``out/Data_Entry.csv.gz`` (the label file's first ``rows`` rows of whole patients),
    ``out/images/`` (one hard link per row into ``out/pool``) and a copy of ``box_file`` (NIH's
    radiologist boxes, for explain's pointing game; skipped when absent); an existing
    ``out/images`` is rebuilt."""
    out = Path(out)
    table = pick_rows(pd.read_csv(label_file, dtype=str, keep_default_na=False), rows)
    pool = _pool(Path(images), out / "pool", full_size_only)
    folder = out / "images"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for name in table["Image Index"]:
        os.link(pool[_pick(name, len(pool))], folder / name)
    if box_file is not None and Path(box_file).is_file():
        shutil.copyfile(box_file, out / Path(box_file).name)
    labels = out / "Data_Entry.csv.gz"
    with gzip.open(labels, "wt", newline="") as fh:
        table.to_csv(fh, index=False)
    return Collection(labels, folder, len(table), table["Patient ID"].nunique())


@dataclass(frozen=True)
class Options:
    """What the stages are run with beyond the collection: ``split`` goes to ``cxr split``;
    ``epochs`` and ``backbone`` to the short training of ``--eval``."""
    split: tuple[str, ...] = ()
    epochs: int = 1
    backbone: str = "resnet18"


def stage_commands(run: Path, collection: Collection, image_sizes: list[int], stages: list[str],
                   options: Options = Options()) -> list[tuple[str, list[str]]]:
    """(label, cxr arguments) in order; preprocess once per image size (the last size's shards stay
    for eda and the model stages)."""
    commands = {
        "ingest": [["ingest", "--source", "nih", "--csv", str(collection.label_file), "--images", str(collection.images)]],
        "validate": [["validate"]],
        "split": [["split", *options.split]],
        "preprocess": [["preprocess", "--image-size", str(s)] for s in image_sizes],
        "eda": [["eda"]],
        "train": [["train", "--backbone", options.backbone, "--weights", "none", "--epochs", str(options.epochs),
                   "--workers", "1", "--cpus-per-worker", "1", "--no-tracking"]],
        "evaluate": [["evaluate", "--no-tracking"]],
        "explain": [["explain"]],
    }
    out = []
    for stage in (*STAGES, *EVAL_STAGES):
        if stage in stages:
            for args in commands[stage]:
                label = stage if stage != "preprocess" else f"preprocess {args[-1]}"
                out.append((label, [args[0], "--run", str(run), *args[1:]]))
    return out


def split_sizes(run: Path) -> dict:
    """The test and val splits' image counts (rows of their shards) and the MiB of one copy of
    each one's pixels at the shards' image size (what ``cxr evaluate`` holds in memory)."""
    import pyarrow.dataset as pads

    stats = run / "stats.json"  # cxr preprocess writes it beside the shards
    if not stats.exists():
        return {}
    side = int(json.loads(stats.read_text())["image_size"])
    out = {}
    for split in ("test", "val"):
        folder = run / "shards" / f"split={split}"
        n = pads.dataset(str(folder), format="parquet", partitioning=None).count_rows() if folder.is_dir() else 0
        out |= {f"{split} images": n, f"{split} pixels (MiB)": n * side * side / 2**20}
    return out


def _written_since(folder: Path, since: float) -> int:
    """Bytes of the files under ``folder`` modified since ``since`` (what a stage wrote or rewrote)."""
    total = 0
    for directory, _, names in os.walk(folder):
        for n in names:
            st = os.stat(os.path.join(directory, n))
            if st.st_mtime >= since:
                total += st.st_size
    return total


def run_cli(args: list[str], log: Path, limit: float | None = None) -> tuple[float, bool]:
    """Run ``cxr ARGS`` as a user would; the seconds it took and whether it finished. Output goes
    to ``log``; a failure raises with its tail. Past ``limit`` seconds the command is interrupted
    (Ctrl-C: the CLI shuts its Ray down), killed with its process group 60 s later if still there,
    and reported unfinished: on a shared machine a stage can take hours, and its peak memory so
    far is still worth having."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "GX_ANALYTICS_ENABLED": "false"}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "cxr.cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return time.perf_counter() - t0, False
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"cxr {' '.join(args[:1])} failed (exit {code}); the end of {log}:\n" + "".join(log.read_text().splitlines(True)[-30:]))
    return seconds, True


def run_stages(run: Path, collection: Collection, image_sizes: list[int], stages: list[str], logs: Path,
               options: Options = Options(), results: list[dict] | None = None, measured=None,
               limit: float | None = None) -> list[dict]:
    """Every stage through the CLI, one after another, measured; each stage's row is appended to
    ``results`` and ``measured(results)`` called as soon as it is known (a long run keeps what it
    measured when a later stage fails or is stopped). A stage stopped at ``limit`` seconds is
    recorded with ``finished`` false and the stages after it (which need its output) are skipped."""
    logs.mkdir(parents=True, exist_ok=True)
    results = [] if results is None else results
    for label, args in stage_commands(run, collection, image_sizes, stages, options):
        print(f"  {collection.rows} rows: cxr {label} ...", flush=True)
        start = time.time() - 1  # mtimes have 1 s resolution on some filesystems
        with PeakMemory(interval=0.5, include_self=False, uss=True) as mem:
            seconds, finished = run_cli(args, logs / f"{collection.rows}-{label.replace(' ', '-')}.log", limit)
        rows = collection.rows
        results.append({"stage": label, "rows": rows, "seconds": seconds, "rows/s": rows / seconds, "s per 1k rows": 1000 * seconds / rows,
                        "peak RSS (MiB)": mem.peak / 2**20, "peak USS (MiB)": mem.peak_uss / 2**20, "driver peak RSS (MiB)": mem.peak_top / 2**20,
                        "written (MiB)": _written_since(run, start) / 2**20,
                        "finished": finished, **(split_sizes(run) if label in ("evaluate", "explain") else {})})
        print(f"    {seconds:.1f} s{'' if finished else ' (stopped at the limit)'}, peak RSS {mem.peak / 2**20:.0f} MiB "
              f"(USS {mem.peak_uss / 2**20:.0f}, driver {mem.peak_top / 2**20:.0f})", flush=True)
        if measured is not None:
            measured(results)
        if not finished:
            break
    return results


def with_marginal_cost(table: pd.DataFrame) -> pd.DataFrame:
    """Add each stage's seconds per 1,000 more rows since the next smaller size: the fixed cost of a
    command (Python and library imports, Ray's start) drops out, so this is what must stay flat."""
    table = table.copy()
    table["marginal s per 1k rows"] = float("nan")
    for _, part in table.groupby("stage", sort=False):
        part = part.sort_values("rows")
        grown = part["rows"].diff()
        table.loc[part.index, "marginal s per 1k rows"] = (1000 * part["seconds"].diff() / grown).where(grown > 0)
    return table


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("s per 1k rows", "seconds per 1,000 rows", "time per 1,000 rows"),
              ("peak RSS (MiB)", "MiB", "peak RSS, all processes"),
              ("driver peak RSS (MiB)", "MiB", "peak RSS, the CLI process"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    for stage, part in table.groupby("stage", sort=False):
        part = part.sort_values("rows")
        for ax, (column, _, _) in zip(axes, panels):
            ax.plot(part["rows"], part[column], marker="o", label=stage)
    for ax, (_, ylabel, title) in zip(axes, panels):
        ax.set(xlabel="rows", ylabel=ylabel, title=title)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 30000, 112120], help="rows of the label file (whole patients, in file order)")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[224, 64], help="cxr preprocess --image-size, in this order (eda reads the last)")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--eval", action="store_true", help=f"also {', '.join(EVAL_STAGES)} (a short training, then the test split)")
    parser.add_argument("--epochs", type=int, default=1, help="with --eval: cxr train --epochs")
    parser.add_argument("--backbone", default="resnet18", help="with --eval: cxr train --backbone (from random weights)")
    parser.add_argument("--test-frac", type=float, help="cxr split --test-frac (default: the verb's)")
    parser.add_argument("--val-frac", type=float, help="cxr split --val-frac (default: the verb's)")
    parser.add_argument("--stage-limit", type=float, help="seconds after which a stage is stopped and reported unfinished (default: none)")
    parser.add_argument("--full-size-only", action="store_true", help="link only the 1024x1024 shared images (NIH's size; most shared ones are 512)")
    parser.add_argument("--out", type=Path, required=True, help="results, logs, and the collections and runs (work/)")
    parser.add_argument("--keep", action="store_true", help="keep each size's collection and run (default: removed after it is measured)")
    args = parser.parse_args()
    if not LABEL_FILE.exists():
        raise SystemExit(f"the NIH label file is not at {LABEL_FILE}")
    args.out.mkdir(parents=True, exist_ok=True)
    stages = [*args.stages, *(EVAL_STAGES if args.eval else ())]
    split = tuple(a for flag, v in (("--test-frac", args.test_frac), ("--val-frac", args.val_frac)) if v is not None for a in (flag, str(v)))
    options = Options(split, args.epochs, args.backbone)
    rows: list[dict] = []

    def save(done: list[dict]) -> None:  # after every stage: a long run keeps what it measured
        with_marginal_cost(pd.DataFrame(done)).to_csv(args.out / "results.csv", index=False)

    for size in args.sizes:
        work = args.out / "work" / str(size)
        if work.exists():
            shutil.rmtree(work)
        t0 = time.perf_counter()
        collection = build_collection(work, size, full_size_only=args.full_size_only)
        print(f"collection: {collection.rows} rows of {collection.patients} patients in {collection.images} ({time.perf_counter() - t0:.1f} s)", flush=True)
        run_stages(work / "run", collection, args.image_sizes, stages, args.out / "logs", options, rows, save, args.stage_limit)
        if not args.keep:
            shutil.rmtree(work / "run")
            shutil.rmtree(collection.images)
    table = with_marginal_cost(pd.DataFrame(rows))
    (args.out / "results.md").write_text(table.to_markdown(index=False, floatfmt=".2f") + "\n")
    plot(table, args.out / "scale.png")
    print("\n" + table.to_markdown(index=False, floatfmt=".2f"))
    print(f"\nwrote {args.out / 'results.csv'}, {args.out / 'results.md'}, {args.out / 'scale.png'}")


if __name__ == "__main__":
    main()
