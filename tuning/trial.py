"""One Tune trial = one full Ray Train run of ``trainers`` (the Tune-drives-Train pattern of Ray 2.5x+:
the trial function builds and fits a TorchTrainer; metrics reach Tune through TuneReportCallback)."""
from __future__ import annotations

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from pipelines.rundir import RunDir
from trainers import Selection, TrainConfig, build_trainer

# Keys of a trial's config that say where and what to train, not how: the rest are TrainConfig fields.
CONTEXT_KEYS = ("base", "run_dir", "train_storage", "fold", "cv_dir")


def trial_config(config: dict) -> TrainConfig:
    """The trial's TrainConfig: the base settings overridden by the searched values."""
    searched = {k: v for k, v in config.items() if k not in CONTEXT_KEYS}
    return TrainConfig.from_dict({**config["base"], **searched})


def fit_trial(config: dict, selection: Selection | None = None, name: str | None = None):
    """Build and fit the trial's TorchTrainer, named ``name`` or after the trial, so a restored trial
    resumes its own Ray Train run and never another's; returns the ``ray.train.Result``, or raises
    the run's error. A run shared by two trials would let one resume the other's model: with the same
    settings (CV folds differ only in their images) the settings-derived default name is the same."""
    cfg = trial_config(config)
    name = name or ray.tune.get_context().get_trial_id()
    if not name:
        raise RuntimeError("a trial needs its own Ray Train run name: no name given and no Tune trial id")
    # The param space carries the run directory as a string (Tune records it in each trial's
    # params.json); the trial wraps it back into the contract object once, here.
    trainer = build_trainer(RunDir(config["run_dir"]), cfg, storage_path=config["train_storage"], name=name,
                            callbacks=[TuneReportCallback()], selection=selection)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result


def run_trial(config: dict) -> None:
    fit_trial(config)
