"""One Tune trial = one full Ray Train run of ``trainers`` (the Tune-drives-Train pattern of Ray 2.5x+:
the trial function builds and fits a TorchTrainer; metrics reach Tune through TuneReportCallback)."""
from __future__ import annotations

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.rundir import RunDir
from trainers import TrainConfig, build_trainer


def trial_config(config: dict) -> TrainConfig:
    """The trial's TrainConfig: the base settings overridden by the searched values."""
    searched = {k: v for k, v in config.items() if k not in ("base", "run_dir", "train_storage")}
    return TrainConfig.from_dict({**config["base"], **searched})


def run_trial(config: dict) -> None:
    # The param space carries the run directory as a string (Tune records it in each trial's
    # params.json); the trial wraps it back into the contract object once, here.
    cfg = trial_config(config)
    name = ray.tune.get_context().get_trial_id()
    trainer = build_trainer(RunDir(config["run_dir"]), cfg, storage_path=config["train_storage"], name=name, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:
        raise result.error
