"""Training you can watch: one line per epoch, printed by the driver as each epoch ends.

Ray Train calls a ``UserCallback`` in its controller (an actor, whose output stays out of the
terminal like the workers'), so the callback puts each epoch's line and metrics on a Ray queue and a
thread of the driver prints it (and hands the metrics to the experiment tracker): lines a CI or job log keeps, not a redrawn bar, and no per-batch output.
"""
from __future__ import annotations

import contextlib
import math
import queue as stdlib_queue
import threading
import time
from typing import Callable, Iterator

from ray.train import UserCallback

from pipelines.formatting import duration


def epoch_line(metrics: dict, epochs: int, best_before: float, elapsed: float, trained_here: int) -> str:
    """``epoch 3/10  train loss 0.2311  val loss 0.2450  val mean AUROC 0.712 (best)  142 img/s  elapsed 1m32s  left ~3m05s``.

    ``best_before`` is the best validation mean AUROC of the earlier epochs; ``trained_here`` the
    epochs this process trained (after a resume, the earlier ones took no time here)."""
    epoch = int(metrics["epoch"])
    auroc = metrics.get("val_mean_auroc", math.nan)
    best = " (best)" if auroc == auroc and auroc > best_before else ""
    left = elapsed / trained_here * (epochs - epoch) if trained_here else math.nan
    speed = metrics.get("train_images_per_s", math.nan)
    return (f"epoch {epoch}/{epochs}  train loss {metrics.get('train_loss', math.nan):.4f}  val loss {metrics.get('val_loss', math.nan):.4f}  "
            f"val mean AUROC {auroc:.3f}{best}  {speed:.0f} img/s  elapsed {duration(elapsed)}"
            + (f"  left ~{duration(left)}" if epoch < epochs and left == left else ""))


class EpochLines(UserCallback):
    """Ray Train callback: after each epoch's report, that epoch's line onto ``lines`` (a Ray queue)."""

    def __init__(self, lines, epochs: int) -> None:
        self.lines, self.epochs = lines, epochs
        self.started = time.time()  # wall clock: the controller runs in another process
        self.best, self.first_epoch = -math.inf, None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        m = metrics[0]
        epoch = int(m.get("epoch", 0))
        if self.first_epoch is None:
            self.first_epoch = int(m.get("start_epoch", epoch - 1))
        line = epoch_line(m, self.epochs, self.best, time.time() - self.started, epoch - self.first_epoch)
        auroc = m.get("val_mean_auroc", math.nan)
        if auroc == auroc:
            self.best = max(self.best, auroc)
        self.lines.put((line, dict(m)))


@contextlib.contextmanager
def printed_epochs(epochs: int, echo: Callable[[str], None] = lambda line: print(line, flush=True),
                   on_metrics: Callable[[dict], None] | None = None) -> Iterator[EpochLines]:
    """The callback to hand Ray Train, and a driver thread echoing its lines until the block ends.
    ``on_metrics`` gets each epoch's reported metrics in the driver too (experiment tracking)."""
    from ray.util.queue import Empty, Queue

    lines = Queue()
    done = threading.Event()

    def pump() -> None:
        while True:
            try:
                line, metrics = lines.get(timeout=0.5)
            except (Empty, stdlib_queue.Empty):
                if done.is_set():
                    return
                continue
            echo(line)
            if on_metrics is not None:
                on_metrics(metrics)

    thread = threading.Thread(target=pump, name="cxr-epoch-lines", daemon=True)
    thread.start()
    try:
        yield EpochLines(lines, epochs)
    finally:
        done.set()
        thread.join(timeout=10)
        lines.shutdown()
