"""Memory of the robustness study: streamed (``CHUNK`` images perturbed and scored at a time) against
perturbing the whole test array at once (what it did before: ``chunk`` = the split's size), in one run.

For each perturbation at its strongest level, the peak of Python-tracked allocations (``tracemalloc``:
numpy's arrays are tracked, PIL's internal buffers are not) while ``predict_perturbed`` runs over
``--images`` synthetic chest-like images of ``--size`` pixels, beyond the clean images themselves.
The predict callable is cheap (mean grey level) so the figure is the perturbation's, not a model's.

    nice -n 10 .venv/bin/python benchmarks/robustness_memory.py --images 18000 --size 64
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from evaluation.robustness import CHUNK, PERTURBATIONS, predict_perturbed  # noqa: E402
from tests.helpers import chest_like  # noqa: E402


def brightness_score(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).mean(axis=1, keepdims=True) / 255.0


def peak_mib(images: np.ndarray, name: str, level: int, chunk: int) -> tuple[float, float]:
    """(peak MiB allocated beyond what was live before, seconds) of one perturbation level."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    predict_perturbed(brightness_score, images, name, level, seed=0, chunk=chunk)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return peak / 2**20, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=18000)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    tiles = np.stack([chest_like(args.size, s) for s in range(64)])
    images = tiles[np.arange(args.images) % len(tiles)]  # one contiguous uint8 array, like a loaded split
    clean = images.nbytes / 2**20
    print(f"{args.images} images of {args.size}x{args.size}: the clean copy is {clean:.1f} MiB", flush=True)
    rows = []
    for spec in PERTURBATIONS:
        level = len(spec.strengths)
        for label, chunk in (("whole array", len(images)), (f"streamed ({CHUNK})", CHUNK)):
            mib, seconds = peak_mib(images, spec.name, level, chunk)
            rows.append({"perturbation": spec.name, "level": level, "mode": label, "peak MiB beyond the clean copy": mib,
                         "x the clean copy": mib / clean, "seconds": seconds})
            print(f"  {spec.name} level {level}, {label}: {mib:.1f} MiB ({mib / clean:.2f}x), {seconds:.1f} s", flush=True)
    table = pd.DataFrame(rows)
    wide = table.pivot(index="perturbation", columns="mode", values="peak MiB beyond the clean copy").loc[[p.name for p in PERTURBATIONS]]
    wide["whole / streamed"] = wide["whole array"] / wide[f"streamed ({CHUNK})"]
    print("\n" + wide.to_markdown(floatfmt=".1f"))


if __name__ == "__main__":
    main()
