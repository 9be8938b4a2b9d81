"""``cxr score`` (Ray Data: scoring actors that read, decode and score) vs the ``cxr predict`` loop, same files.

Both decode the real 1024x1024 NIH originals at the checkpoint's size and score them with the same
model, OOD statistics included (``evaluation.scoring.Scorer``). The files are linked ``--repeat``
times under new names so the run is long enough for Ray's fixed start-up cost not to dominate; the
Ray side runs at 1/4 and at the full size (1x and 4x the files) to show that peak memory (the
summed RSS of the driver and every Ray process, sampled) does not grow with the collection. The
checkpoint has random weights (speed does not depend on what a model learned) and OOD statistics
fit on 96 of the images.

    .venv/bin/python benchmarks/score.py --limit 200 --repeat 4 --image-size 224
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import numpy as np
import pandas as pd
import torch

from benchmarks.preprocess import PeakMemory, originals
from cxr.runtime import init_local_ray
from evaluation.batch_score import score_collection
from evaluation.predict import decode_images, predict_images
from pipelines.rundir import MODEL_FILE, OOD_FILE
from trainers.checkpoint import load_checkpoint, model_info, save_checkpoint
from trainers.features import penultimate
from trainers.models import build_model
from pipelines.lineage import file_sha256
from trainers.ood import fit_ood, intensity_summary, write_ood


def make_checkpoint(folder: Path, backbone: str, size: int, files: list[Path]) -> Path:
    """A random-weight checkpoint with OOD statistics (fit on 64 images, threshold on 32 more)."""
    torch.manual_seed(0)
    save_checkpoint(folder, build_model(backbone), model_info({"backbone": backbone}, size, 0.5, 0.25, 1, {}))
    model, info = load_checkpoint(folder)
    sets = []
    for chunk in (files[:64], files[64:96]):
        images = decode_images(chunk, size)
        sets.append((intensity_summary(images), penultimate(model, info, images)[1]))
    write_ood(folder / OOD_FILE, fit_ood(sets[0], sets[1], file_sha256(folder / MODEL_FILE), "head input"))
    return folder


def linked(files: list[Path], repeat: int, folder: Path) -> list[Path]:
    folder.mkdir()
    out = []
    for r in range(repeat):
        for i, f in enumerate(files):
            link = folder / f"{r:02d}{i:06d}.png"
            link.symlink_to(f)
            out.append(link)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=200, help="use the first N 1024x1024 originals")
    parser.add_argument("--repeat", type=int, default=4, help="linked copies of each original (the large run)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--decode", nargs="+", default=["actors"], choices=("actors", "tasks"),
                        help="where cxr score decodes (one Ray run each, with its default actors): actors (the default on CPUs) or tasks")
    args = parser.parse_args()
    import ray

    files = originals(args.limit)
    if len(files) < 96:
        raise SystemExit(f"need at least 96 NIH 1024x1024 originals, found {len(files)}")
    torch.set_num_threads(args.cpus)  # the loop gets the same cores Ray gets
    rows, times = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = make_checkpoint(tmp / "ckpt", args.backbone, args.image_size, files)
        init_local_ray(args.cpus)
        for repeat in sorted({max(1, args.repeat // 4), args.repeat}):
            paths = linked(files, repeat, tmp / f"in{repeat}")
            inputs = pd.DataFrame({"image_id": [p.name for p in paths], "path": [str(p) for p in paths]})
            score_collection(inputs.head(32), checkpoint, tmp / "warm", batch_size=args.batch_size)  # warm workers
            t0 = time.perf_counter()
            frame = predict_images(checkpoint, paths)  # decodes every file into memory first, then scores
            loop_s = time.perf_counter() - t0
            n = len(paths)
            for decode in args.decode:
                out = tmp / f"out{repeat}-{decode}"
                with PeakMemory(interval=0.5) as mem:  # sampling every 50 ms took CPU from the run it measured
                    t0 = time.perf_counter()
                    result = score_collection(inputs, checkpoint, out, batch_size=args.batch_size, decode=decode)
                    ray_s = time.perf_counter() - t0
                scores = pd.read_parquet(out / "scores").set_index("image_id").loc[[p.name for p in paths]]
                worst = float(np.abs(scores.filter(like="prob_").to_numpy() - frame.filter(like="prob_").to_numpy()).max())
                times.setdefault(decode, []).append((n, loop_s, ray_s))
                rows.append({"images": n, "decoding in": decode, "actors x threads": f"{result.summary['actors']} x {result.summary['threads_per_actor']}", "predict loop img/s": n / loop_s, "cxr score img/s": n / ray_s,
                             "ratio": loop_s / ray_s, "score peak RSS, all processes (MiB)": mem.peak / 2**20,
                             "max |prob diff|": worst, "scored": result.scored, "ood flagged": result.flagged})
        ray.shutdown()
    print(f"\n{len(files)} NIH 1024x1024 originals; {args.backbone} at {args.image_size}x{args.image_size}, batch {args.batch_size}; "
          f"{args.cpus} CPUs (loop: {args.cpus} torch threads); load average {os.getloadavg()[0]:.1f}\n")
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"))
    for decode, runs in times.items():
        if len(runs) == 2:  # time = fixed + n / rate on each side: the rate from the two sizes, without the fixed start
            (n1, loop1, ray1), (n4, loop4, ray4) = runs
            loop_rate, ray_rate = (n4 - n1) / (loop4 - loop1), (n4 - n1) / (ray4 - ray1)
            print(f"\nmarginal ({n4 - n1} images more, decoding in {decode}): loop {loop_rate:.1f} img/s, cxr score {ray_rate:.1f} img/s, "
                  f"ratio {ray_rate / loop_rate:.2f}; cxr score's fixed cost {ray1 - n1 / ray_rate:.1f} s, the loop's {loop1 - n1 / loop_rate:.1f} s")


if __name__ == "__main__":
    main()
