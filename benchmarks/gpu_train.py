"""DenseNet121 training images/s at 224x224 on one GPU (bf16 autocast, channels_last), fed by Ray
Data from shards and from in-memory tensors: benchmarks/train_ingest.py with GPU settings.

On a machine with a GPU (one prepared command; writes benchmarks/out/gpu_train.json):

    .venv/bin/python benchmarks/gpu_train.py

Anywhere else, ``--cpu`` runs the same path with tiny settings, so the script does not rot:

    .venv/bin/python benchmarks/gpu_train.py --cpu

Any train_ingest.py flag may follow and overrides the defaults (e.g. ``--images 16384``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_ingest import main as train_ingest

GPU_DEFAULTS = ["--backbone", "densenet121", "--image-size", "224", "--images", "8192", "--batch-size", "128",
                "--epochs", "3", "--workers", "1", "--gpus-per-worker", "1", "--cpus-per-worker", "2"]
CPU_DEFAULTS = ["--backbone", "densenet121", "--image-size", "32", "--images", "64", "--batch-size", "8",
                "--epochs", "2", "--workers", "1", "--min-ratio", "0"]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny CPU run of the same code path (no GPU needed)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "gpu_train.json")
    args, rest = p.parse_known_args(argv)
    import torch  # after argument parsing, so --help is instant

    if args.cpu:
        device = {"device": "cpu", "amp": "off (CPU)"}
        defaults = CPU_DEFAULTS
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA GPU visible: run on a GPU machine, or pass --cpu for the tiny CPU path")
        device = {"device": torch.cuda.get_device_name(0), "amp": "bf16 autocast + channels_last",
                  "bf16_supported": torch.cuda.is_bf16_supported(), "torch": torch.__version__}
        defaults = GPU_DEFAULTS
    report = train_ingest([*defaults, *rest, "--out", str(args.out)])
    report["benchmark"] = "gpu_train"
    report.update(device)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"device: {device['device']}; DenseNet121 images/s: Ray Data {report['ray_data']['images_per_s']:.1f}, "
          f"in memory {report['memory']['images_per_s']:.1f}")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
