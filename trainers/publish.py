"""Publishing a run's best checkpoint (``train/best``, ``tune/best``) for evaluation and prediction."""
from __future__ import annotations

import shutil
from pathlib import Path

from pipelines.atomic import staged_dir
from trainers.checkpoint import INFO_FILE, MODEL_FILE


def publish_best(source: Path, best_dir: Path) -> Path:
    """Copy the data-contract files of the checkpoint folder ``source`` to ``best_dir``, swapped in
    whole: an evaluation never reads a model next to another model's ``model.json``."""
    with staged_dir(best_dir) as staging:
        for name in (MODEL_FILE, INFO_FILE):
            shutil.copy2(Path(source) / name, staging / name)
    return best_dir
