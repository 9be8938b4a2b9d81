"""Every stage's settings, declared once: default, help text, choices and cross-field rules.

Each section is the settings of one stage. ``cxr VERB`` generates its options from its sections
(``cxr/options.py``), ``cxr run CONFIG`` reads the same sections from YAML (``cxr/config.py``), and
the stage function takes its section (``split_stage(run, cfg.split)``): one mapping from settings to
a stage, used by both paths. Training settings are ``trainers.config.TrainConfig`` (the workers get
them), declared the same way. See docs/architecture.md ("Settings") for how to add an option.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cxr.runtime import LOOPBACK
from evaluation.batch_score import DECODE_PLACES
from evaluation.serving import ServeApp
from pipelines.external import check_name
from pipelines.imaging import MAX_IMAGE_SIZE
from pipelines.errors import UserInputError
from pipelines.options import SettingError, Settings, option, require
from pipelines.reject_guard import DEFAULT_MAX_REJECT_FRAC
from trainers.config import FREEZE_CHOICES, LOSS_CHOICES, SAMPLING_CHOICES, SEARCHED_FREEZES, TrainConfig

SOURCES = ("nih", "chexpert", "manifest", "phantoms")
# The stages that start (or join) Ray, under `cxr run` and as single verbs alike (--address).
RAY_STAGES = frozenset({"preprocess", "train", "tune", "cv", "evaluate", "external", "explain", "score", "serve"})
LABEL_SOURCES = SOURCES[:3]  # the formats of a label file; phantoms make their own collection
_SUBGROUPS_HELP = "manifest columns to break results down by (at most 20 values each; default: every one of sex, age_band, view, cohort present)"
_CHECKPOINT_HELP = "checkpoint directory (default: <run>/tune/best, else <run>/train/best)"
_REJECT_HELP = ("stop, writing nothing, when one reason would quarantine more than this fraction of the rows "
                "(rows whose image is absent on disk are not counted); 1 turns the guard off")


def _fraction_guard(value: float, name: str) -> None:
    require(0 <= value <= 1, f"{{{name}}} must be between 0 and 1 (1 turns the mass-rejection guard off), got {value}")


@dataclass
class RunSection(Settings):
    """Where the run lives and which Ray it uses (``cxr run`` only; the verbs take ``--run``/``--address``)."""

    dir: str = option(help="run directory: a local path, file:// URI, or any URI pyarrow filesystems read (s3://, gs://)")
    address: str | None = option(None, "Ray address; unset: RAY_ADDRESS if set, else an embedded local Ray")
    num_cpus: int | None = option(None, "CPUs of the embedded local Ray (unset: all)")
    scratch: str | None = option(None, "where the stages work when run.dir is mirrored: always for a remote URI "
                                       "(unset: a folder under the temp folder); given for a local run.dir, that folder is mirrored too")

    def check(self) -> None:
        require(bool(self.dir.strip()), "{dir} must not be empty")


@dataclass
class DataSection(Settings):
    """The collection ``cxr ingest`` reads (``data:`` in a config)."""

    source: str = option(help="the label file's format (phantoms: make a synthetic NIH-style collection, as cxr demo does)", choices=SOURCES)
    csv: str | None = option(None, "the label file (NIH Data_Entry_2017*.csv[.gz], CheXpert train.csv, or a manifest .csv/.parquet)")
    images: str | None = option(None, "the image root; label-file paths are relative to it")
    patients: int = option(120, "phantoms only: synthetic patients (about 2.5 images each)")
    phantom_size: int = option(256, "phantoms only: side of the rendered PNGs")
    seed: int = option(0, "phantoms only: random seed of the collection")
    warn_only: bool = option(False, "report table-level validation failures but continue (default: stop with exit code 1)")
    max_reject_frac: float = option(DEFAULT_MAX_REJECT_FRAC, _REJECT_HELP, metavar="FRAC")
    cohort: str | None = option(None, "the cohort (collection, site) of every image: the manifest's cohort column", metavar="NAME")
    cohorts: str | None = option(None, "a CSV of image id, cohort (NIH's 'Image Index' header accepted): each image's cohort", metavar="CSV")

    def check(self) -> None:
        _fraction_guard(self.max_reject_frac, "max_reject_frac")
        require(self.cohort is None or self.cohorts is None,
                "{cohort} and {cohorts} exclude each other: name one cohort for all, or a file")
        if self.source == "phantoms":
            for name in ("csv", "images", "cohort", "cohorts"):
                require(getattr(self, name) is None, f"{{{name}}} is not used with {{source}} phantoms (it makes its own collection): remove it")
            require(self.patients >= 1 and self.phantom_size >= 32,
                    f"{{patients}} must be >= 1 and {{phantom_size}} >= 32, got {self.patients} and {self.phantom_size}")
        else:
            for name in ("csv", "images"):
                require(bool(getattr(self, name)), f"{{{name}}} is required with {{source}} {self.source}")


@dataclass
class ValidateSection(Settings):
    enabled: bool = option(True, cli=False)
    warn_only: bool = option(False, "report table-level validation failures but continue (default: stop with exit code 1)")
    max_reject_frac: float = option(DEFAULT_MAX_REJECT_FRAC, _REJECT_HELP, metavar="FRAC")

    def check(self) -> None:
        _fraction_guard(self.max_reject_frac, "max_reject_frac")


@dataclass
class SplitSection(Settings):
    test_frac: float = option(0.15, "fraction of images for the test split (drawn first)")
    val_frac: float = option(0.15, "fraction of images for the validation split (drawn second)")
    min_positives: int = option(10, "positive images of each finding that test and val should hold, where the data allows")
    seed: int = option(0, "random seed: same seed, same split")
    warn_only: bool = option(False, "report table-level validation failures but continue (default: stop with exit code 1)")

    def check(self) -> None:
        for name in ("test_frac", "val_frac"):
            require(0 < getattr(self, name) < 1, f"{{{name}}} must be between 0 and 1, got {getattr(self, name)}")
        require(self.test_frac + self.val_frac < 1,
                f"{{test_frac}} + {{val_frac}} must leave images for training, got {self.test_frac} + {self.val_frac}")
        require(self.min_positives >= 0, f"{{min_positives}} must be >= 0, got {self.min_positives}")


@dataclass
class PreprocessSection(Settings):
    enabled: bool = option(True, cli=False)
    image_size: int = option(224, "side of the square output images in pixels")
    blocks: int | None = option(None, "split into N equal Ray Data blocks (default: largest first, each 1/CPUs of the images left, at most 32 MiB of output)", metavar="N")

    def check(self) -> None:
        require(8 <= self.image_size <= MAX_IMAGE_SIZE, f"{{image_size}} must be between 8 and {MAX_IMAGE_SIZE}, got {self.image_size}")
        require(self.blocks is None or self.blocks >= 1, f"{{blocks}} must be >= 1, got {self.blocks}")


@dataclass
class EdaSection(Settings):
    enabled: bool = option(True, cli=False)
    sample_size: int = option(64, "images sampled for the pixel-intensity histograms")
    seed: int = option(0, "random seed for the image samples")

    def check(self) -> None:
        require(self.sample_size >= 1, f"{{sample_size}} must be >= 1, got {self.sample_size}")


@dataclass
class TrainSection:
    """``enabled`` plus any TrainConfig field, flat: ``train: {backbone: resnet18, epochs: 3}``.
    These are also what every tune trial and every cross-validation fold starts from."""

    enabled: bool = True
    config: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class TuneSection(Settings):
    """The strategy search. The grid (sampling x loss x freeze, lr log-uniform) is the default space;
    ``space`` replaces it with a YAML file. Searched TrainConfig fields are not options of ``cxr tune``."""

    enabled: bool = option(False, cli=False)  # with train enabled too, both run (like `cxr demo`); evaluate takes tune/best
    base: dict[str, Any] = option({}, cli=False)  # TrainConfig fields that differ for trials, e.g. {workers: 1}
    num_samples: int = option(1, "samples of the continuous axes (lr) per grid point")
    asha: bool = option(True, "ASHA early stopping of weak trials (--no-asha: run every trial to the end)")
    grace_period: int = option(1, "epochs every trial runs before ASHA may stop it")
    space: str | None = option(None, "YAML search space replacing the default grid (see tuning/space.py)")
    sampling: list[str] = option(list(SAMPLING_CHOICES), "sampling strategies searched (default grid)", choices=SAMPLING_CHOICES, flag="--sampling-grid")
    loss: list[str] = option(["bce", "weighted"], "losses searched (default grid)", choices=LOSS_CHOICES, flag="--loss-grid")
    freeze: list[str] = option(list(SEARCHED_FREEZES), "freeze strategies searched (default grid)", choices=FREEZE_CHOICES, flag="--freeze-grid")
    lr: list[float] = option([1e-4, 3e-3], "log-uniform learning-rate range searched: low,high", flag="--lr-range")
    resume: bool = option(False, "resume an interrupted search in <run>/tune", config=False)
    verbose: bool = option(False, "also one line per epoch of every trial (default: one line per finished trial)")

    def check(self) -> None:
        require(self.num_samples >= 1 and self.grace_period >= 1,
                f"{{num_samples}} and {{grace_period}} must be >= 1, got {self.num_samples} and {self.grace_period}")
        require(len(self.lr) == 2 and 0 < self.lr[0] < self.lr[1], f"{{lr}} must be [low, high] with 0 < low < high, got {self.lr}")

    def search_space(self) -> dict[str, Any]:
        """The Ray Tune space: the YAML file when given, else the grid these settings describe."""
        from pathlib import Path

        from tuning.space import default_space, load_space  # imports Ray: only when a search runs

        if self.space:
            return load_space(Path(self.space))
        return default_space(lr=(self.lr[0], self.lr[1]), sampling=self.sampling, loss=self.loss, freeze=self.freeze)


@dataclass
class CvSection(Settings):
    """Patient-grouped k-fold cross-validation of the training recipe (``cxr cv``)."""

    enabled: bool = option(False, cli=False)
    folds: int = option(5, "folds, formed by patient and stratified by finding (>= 2, at most one per patient)")
    val_frac: float = option(0.15, "fraction of each fold's training patients held out as its inner validation split (checkpoint selection)")
    bootstrap: int = option(1000, "bootstrap replicates (patients resampled) for the pooled out-of-fold intervals")
    subgroups: list[str] | None = option(None, _SUBGROUPS_HELP, metavar="COL[,COL...]")
    resume: bool = option(False, "continue an interrupted cross-validation in <run>/cv (finished folds are kept)", config=False)
    verbose: bool = option(False, "also one line per epoch of every fold (default: one line per finished fold)")

    def check(self) -> None:
        require(self.folds >= 2, f"{{folds}} must be at least 2 (one fold would leave nothing to train on), got {self.folds}")
        require(0 < self.val_frac < 1, f"{{val_frac}} must be between 0 and 1, got {self.val_frac}")
        require(self.bootstrap >= 1, f"{{bootstrap}} must be >= 1, got {self.bootstrap}")


@dataclass
class EvaluateSection(Settings):
    enabled: bool = option(True, cli=False)
    checkpoint: str | None = option(None, _CHECKPOINT_HELP)
    subgroups: list[str] | None = option(None, _SUBGROUPS_HELP, metavar="COL[,COL...]")
    bootstrap: int = option(1000, "bootstrap replicates (patients resampled)")
    robustness: bool = option(True, "the perturbation sweep (--no-robustness: skip it)")

    def check(self) -> None:
        require(self.bootstrap >= 1, f"{{bootstrap}} must be >= 1, got {self.bootstrap}")


@dataclass
class ExternalSet(Settings):
    """One external validation set (``cxr external``; each item of ``external:`` in a config)."""

    name: str = option(help="the external set's name: its folder under <run>/external/")
    source: str = option(help="the label file's format", choices=LABEL_SOURCES)
    csv: str = option(help="the label file (NIH Data_Entry_2017*.csv[.gz], CheXpert train.csv, or a manifest .csv/.parquet)")
    images: str = option(help="the image root; label-file paths are relative to it")
    cohort: str | None = option(None, "the cohort (collection, site) of every image: the manifest's cohort column", metavar="NAME")
    cohorts: str | None = option(None, "a CSV of image id, cohort (NIH's 'Image Index' header accepted): each image's cohort", metavar="CSV")
    drop_overlap: bool = option(False, "quarantine images whose patient or image id is in the run's train/val split (default: refuse the set)")
    checkpoint: str | None = option(None, _CHECKPOINT_HELP + "; in a config: evaluate.checkpoint when unset")
    bootstrap: int = option(1000, "bootstrap replicates (patients resampled)")
    subgroups: list[str] | None = option(None, "manifest columns to break results down by (default as cxr evaluate)", metavar="COL[,COL...]")
    max_reject_frac: float = option(DEFAULT_MAX_REJECT_FRAC, _REJECT_HELP, metavar="FRAC")

    def check(self) -> None:
        require(self.cohort is None or self.cohorts is None, "{cohort} and {cohorts} exclude each other")
        _fraction_guard(self.max_reject_frac, "max_reject_frac")
        try:
            check_name(self.name)
        except UserInputError as err:
            raise SettingError(f"{{name}}: {err}") from None


@dataclass
class ExplainSection(Settings):
    enabled: bool = option(True, cli=False)
    checkpoint: str | None = option(None, "checkpoint directory (default for a run: tune/best, else train/best)")
    max_images: int = option(24, "images in a run's gallery")


@dataclass
class TrackingSection(Settings):
    """MLflow experiment tracking of train, tune, cv and evaluate (``trainers/tracking.py``)."""

    enabled: bool = option(True, "log settings, data fingerprint, per-epoch metrics and the best checkpoint to MLflow "
                                 "(--no-tracking: off)", flag="--no-tracking")
    uri: str | None = option(None, "MLflow tracking server or store; unset: MLFLOW_TRACKING_URI, else the embedded "
                                   "local store sqlite:///<run>/mlflow.db", flag="--tracking-uri", metavar="URI")
    experiment: str = option("cxr", "MLflow experiment the runs are logged to", metavar="NAME")
    register: str | None = option(None, "register the best checkpoint as a new version of this MLflow registered model "
                                        "(cxr evaluate later tags it with the test metrics)", metavar="NAME")

    def check(self) -> None:
        require(bool(self.experiment.strip()), "{experiment} must not be empty")


@dataclass
class CardSection(Settings):
    """The model card (``cxr card``): the thresholds its limitations are derived by."""

    enabled: bool = option(True, cli=False)
    min_positives: int = option(10, "a finding with fewer positive test images than this is named a limitation (its AUROC is too uncertain)", metavar="N")
    max_drop: float = option(0.05, "a perturbation costing more mean AUROC than this is named a limitation", metavar="AUROC")

    def check(self) -> None:
        require(self.min_positives >= 1, f"{{min_positives}} must be >= 1, got {self.min_positives}")
        require(0 < self.max_drop < 1, f"{{max_drop}} must be between 0 and 1, got {self.max_drop}")


@dataclass
class ReportSection(Settings):
    enabled: bool = option(True, cli=False)


@dataclass
class Config:
    """A whole run (``cxr run CONFIG``): one section per stage."""

    run: RunSection
    data: DataSection
    validate: ValidateSection = field(default_factory=ValidateSection)
    split: SplitSection = field(default_factory=SplitSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    eda: EdaSection = field(default_factory=EdaSection)
    train: TrainSection = field(default_factory=TrainSection)
    tune: TuneSection = field(default_factory=TuneSection)
    cv: CvSection = field(default_factory=CvSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    explain: ExplainSection = field(default_factory=ExplainSection)
    card: CardSection = field(default_factory=CardSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    report: ReportSection = field(default_factory=ReportSection)
    external: list[ExternalSet] = field(default_factory=list)

    def tune_base(self) -> TrainConfig:
        """What every trial starts from: the train section with ``tune.base`` on top."""
        return TrainConfig(**{**self.train.config.to_dict(), **self.tune.base})


@dataclass
class ExplainImages(Settings):
    """``cxr explain --images``: explain image files with a checkpoint, outside any run."""

    images: list[str] | None = option(None, "explain these image files instead of a run (needs --checkpoint and --out)", metavar="IMAGE", nargs="+")
    out: str | None = option(None, "output folder for --images")
    boxes: str | None = option(None, "an NIH-style BBox_List csv for --images (pointing game)")


@dataclass
class PredictSettings(Settings):
    """``cxr predict``: the finding probabilities of image files from a checkpoint alone."""

    checkpoint: str = option(help="checkpoint directory (model.pt + model.json)", positional=True)
    images: list[str] = option(help="PNG/JPEG/DICOM files", positional=True)
    csv: str | None = option(None, "also write the probabilities to this CSV")


SCORE_SPLITS = ("test", "val", "train", "all")


@dataclass
class ScoreSettings(Settings):
    """``cxr score``: a whole collection through a Ray Data actor pool (``evaluation/batch_score.py``)."""

    out: str = option(help="output folder: scores/ (Parquet), quarantine.parquet, summary.json, thresholds.json (when the run has an evaluation)", metavar="DIR")
    checkpoint: str | None = option(None, "checkpoint directory (model.pt + model.json, ood.npz when recorded); with --run default tune/best, else train/best")
    images: str | None = option(None, "score every file under this folder (image_id: its path relative to the folder)", metavar="DIR")
    manifest: str | None = option(None, "score the files a .csv/.parquet table lists: 'path' (absolute or relative to the table) and optional 'image_id'", metavar="CSV|PARQUET")
    split: str = option("test", "with --run: the split to score", choices=SCORE_SPLITS)
    batch_size: int = option(32, "images per model call in each actor", metavar="N")
    actors: int | None = option(None, "scoring actors, each loading the model once and taking 1 CPU (None: on CPUs one per CPU of the cluster, each reading, decoding and scoring its own files; with GPUs or --decode tasks 1)", metavar="N")
    gpus_per_actor: float = option(0.0, "GPUs each actor reserves (0: score on the CPU)", metavar="G")
    decode: str = option("auto", "where files are read and decoded: in the scoring actors, or in separate Ray tasks feeding them (auto: actors on CPUs, tasks with GPUs)",
                         choices=DECODE_PLACES)
    threads_per_actor: int | None = option(None, "torch threads of each actor on the CPU (default: the smallest node's CPUs shared among the actors; 1 with GPUs)", metavar="T")

    def check(self) -> None:
        require(self.threads_per_actor is None or self.threads_per_actor >= 1, f"{{threads_per_actor}} must be >= 1, got {self.threads_per_actor}")
        require(self.images is None or self.manifest is None, "{images} and {manifest} exclude each other: name one input")
        require(self.batch_size >= 1 and (self.actors is None or self.actors >= 1),
                f"{{batch_size}} and {{actors}} must be >= 1, got {self.batch_size} and {self.actors}")
        require(self.gpus_per_actor >= 0, f"{{gpus_per_actor}} must be >= 0, got {self.gpus_per_actor}")


@dataclass
class ServeSettings(Settings):
    """``cxr serve``: where Serve's HTTP proxy listens. The application's own settings (model,
    replicas, batching, body limit) are ``ServeApp`` (``evaluation/serving.py``): a Serve config
    file's ``args`` name the same fields."""

    host: str = option(LOOPBACK, "address the HTTP proxy listens on; 0.0.0.0 listens on every interface (the server has no "
                                 "authentication: put a TLS-terminating proxy with authentication in front, see README)")
    port: int = option(8000, "HTTP port", metavar="PORT")

    def check(self) -> None:
        require(bool(self.host.strip()), "{host} must not be empty")
        require(1 <= self.port <= 65535, f"{{port}} must be between 1 and 65535, got {self.port}")


@dataclass
class DemoSettings(Settings):
    """``cxr demo``: a synthetic collection through every stage (``configs/demo.yaml`` with these defaults)."""

    patients: int = option(120, "synthetic patients (about 2.5 images each)")
    image_size: int = option(112, "preprocessed image side in pixels (Grad-CAM needs >= 112 for a 4x4 feature map)")
    seed: int = option(0, "random seed for the collection and the split")
    tune: bool = option(True, "the strategy search (--no-tune: skip it, faster)")
