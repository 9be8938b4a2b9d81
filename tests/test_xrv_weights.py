"""--weights xrv:NAME: torchxrayvision's chest X-ray models as the starting point.

No download here: the weight files are built with torchxrayvision's own model classes (random
init, weights=None) and saved in the published format under the published file name (a DenseNet is
a whole pickled module, in torch's legacy format as the 2020 release files and in the zip format;
the ResNet50 a state_dict), so the real locating, safe loading and mapping code runs on them.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

xrv = pytest.importorskip("torchxrayvision")

from PIL import Image

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS
from pipelines.rundir import RunDir
from tests.train_fixtures import write_run
from trainers.checkpoint import load_checkpoint, model_info, prepare_input
from trainers.config import TrainConfig
from trainers.models import build_model, load_initial_weights
from trainers.weights import WeightsUnavailableError, initial_state_dict
from trainers.xrv import XRV_WEIGHTS, file_name, read_xrv_file, xrv_initial_state

# Where the real published files may lie on this machine (read before the tests point HOME elsewhere).
REAL_DIRS = [Path(d).expanduser() for d in (os.environ.get("CXR_WEIGHTS_DIR"), "~/.torchxrayvision/models_data") if d]
LEGACY, ZIP = "densenet121-res224-nih", "densenet121-res224-chex"  # two DenseNet files, one per torch format
RESNET = "resnet50-res512-all"


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No download, and torchxrayvision's cache is an empty folder under tmp (HOME), not the user's."""
    monkeypatch.setenv("CXR_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CXR_WEIGHTS_DIR", raising=False)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> Path:
    """A --weights-dir holding three published-format files, made from torchxrayvision's classes."""
    folder = tmp_path_factory.mktemp("xrv_weights")
    torch.manual_seed(1)
    torch.save(xrv.models.DenseNet(weights=None), folder / file_name(LEGACY), _use_new_zipfile_serialization=False)
    torch.save(xrv.models.DenseNet(weights=None), folder / file_name(ZIP))
    import torchvision

    resnet = torchvision.models.resnet50(num_classes=18, weights=None)  # what xrv.models.ResNet builds and loads
    resnet.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    torch.save(resnet.state_dict(), folder / file_name(RESNET))
    return folder


def _published_state(weights_dir: Path, name: str) -> dict[str, torch.Tensor]:
    """The file's tensors read with torchxrayvision's own (unsafe) loader: the reference."""
    obj = torch.load(weights_dir / file_name(name), map_location="cpu", weights_only=False)
    return obj.state_dict() if isinstance(obj, torch.nn.Module) else obj


def test_the_names_are_torchxrayvision_published_ones_for_our_backbones():
    published = {k for k in xrv.models.model_urls if k.startswith(("densenet121-res224-", "resnet50-res512-"))}
    assert set(XRV_WEIGHTS) == published
    assert all(name.split("-")[0] == backbone for name, backbone in XRV_WEIGHTS.items())


def test_unknown_names_and_wrong_backbones_are_refused_listing_the_valid_ones():
    with pytest.raises(UserInputError, match="unknown torchxrayvision weights xrv:densenet121-res224-nhi: choose one of .*xrv:densenet121-res224-nih.*xrv:resnet50-res512-all"):
        TrainConfig(weights="xrv:densenet121-res224-nhi")
    with pytest.raises(UserInputError, match="xrv:resnet50-res512-all is a resnet50: pass --backbone resnet50"):
        TrainConfig(weights="xrv:resnet50-res512-all")


def test_freeze_auto_trains_the_last_block_on_xrv_weights():
    assert TrainConfig(weights="xrv:densenet121-res224-all").effective_freeze == "partial"
    assert TrainConfig(weights="none").effective_freeze == "none"
    assert TrainConfig(weights="xrv:densenet121-res224-all", freeze="none").effective_freeze == "none"


@pytest.mark.parametrize("name", [LEGACY, ZIP, RESNET])
def test_every_feature_tensor_loads_and_the_head_reuses_the_shared_findings(weights_dir, name):
    backbone, head = XRV_WEIGHTS[name], ("classifier" if name.startswith("densenet") else "fc")
    reference = _published_state(weights_dir, name)
    features = [k for k in reference if not k.startswith(head + ".")]
    start = xrv_initial_state(name, backbone, str(weights_dir), seed=3)
    assert start.features == start.features_loaded == len(features) == (725 if backbone == "densenet121" else 318)

    model = build_model(backbone)
    assert load_initial_weights(model, backbone, start.state) == []  # nothing skipped, nothing missing
    own = model.state_dict()
    assert all(torch.equal(own[k], reference[k]) for k in features)

    labels = xrv.models.model_urls[name]["labels"]
    assert start.head_reused == [f for f in FINDINGS if f in labels]
    torch.manual_seed(3)  # a from-scratch start with the same seed: its rows are the fresh ones
    scratch = build_model(backbone).state_dict()
    for j, finding in enumerate(FINDINGS):
        row, bias = own[f"{head}.weight"][j], own[f"{head}.bias"][j]
        if finding in labels:
            assert torch.equal(row, reference[f"{head}.weight"][labels.index(finding)])
            assert torch.equal(bias, reference[f"{head}.bias"][labels.index(finding)])
        else:
            assert torch.equal(row, scratch[f"{head}.weight"][j]) and torch.equal(bias, scratch[f"{head}.bias"][j])
    if name == ZIP:  # CheXpert's model: 7 of our findings, the other 7 rows are new
        assert len(start.head_reused) == 7 and "Hernia" in start.head_fresh


def test_the_mapped_densenet_computes_what_torchxrayvision_computes(weights_dir):
    """Our model with the mapped weights gives torchxrayvision's raw outputs for the shared findings."""
    reference = torch.load(weights_dir / file_name(ZIP), map_location="cpu", weights_only=False).eval()
    model = build_model("densenet121")
    start = xrv_initial_state(ZIP, "densenet121", str(weights_dir))
    load_initial_weights(model, "densenet121", start.state)
    x = torch.from_numpy(xrv.utils.normalize(np.random.default_rng(0).integers(0, 256, (2, 64, 64)).astype(np.float32), 255))[:, None]
    labels = xrv.models.model_urls[ZIP]["labels"]
    with torch.no_grad():
        ours, theirs = model.eval()(x), reference(x)
    for finding in start.head_reused:
        torch.testing.assert_close(ours[:, FINDINGS.index(finding)], theirs[:, labels.index(finding)], rtol=1e-4, atol=1e-4)
    assert len(start.head_reused) == 7


def test_pickled_code_in_a_weights_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for legacy in (True, False):
        module = xrv.models.DenseNet(weights=None)
        module.payload = Payload()
        path = tmp_path / f"evil-{legacy}.pt"
        torch.save(module, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(UserInputError, match=r"refused .*(posix|os)\.system"):
            read_xrv_file(path)
    assert not marker.exists()


def test_offline_and_missing_the_driver_says_which_file_goes_where_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    from cxr import cli, runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the missing weights were reported")

    monkeypatch.setattr(runtime, "ray_session", no_ray)
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(tmp_path / "env_dir"))
    run = write_run(tmp_path / "run", n_train=8, n_val=4, n_test=4, image_size=32)
    code = cli.main(["train", "--run", str(run), "--weights", "xrv:densenet121-res224-all", "--weights-dir", str(tmp_path / "mine")])
    err = capsys.readouterr().err
    assert code == 1 and not ray.is_initialized()
    expected = "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
    assert f"place the file {expected} in one of: {tmp_path / 'mine'}, {tmp_path / 'env_dir'}, {tmp_path / 'home' / '.torchxrayvision' / 'models_data'}" in err
    assert "CXR_OFFLINE is set" in err
    with pytest.raises(WeightsUnavailableError, match=expected):  # the library raises the same on the driver
        initial_state_dict("xrv:densenet121-res224-all", "densenet121")


def test_a_config_keeps_the_name_and_resolves_the_folder_and_cxr_run_fails_before_ray(tmp_path, monkeypatch):
    from cxr import pipeline, runtime
    from cxr.config import from_raw

    config = from_raw({"run": {"dir": "run"}, "data": {"source": "phantoms"},
                       "train": {"weights": "xrv:densenet121-res224-pc", "weights_dir": "weights"}}, base_dir=tmp_path)
    assert config.train.config.weights == "xrv:densenet121-res224-pc"
    assert config.train.config.weights_dir == str(tmp_path / "weights")

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the missing weights were reported")

    monkeypatch.setattr(runtime, "ray_session", no_ray)
    with pytest.raises(WeightsUnavailableError, match=f"place the file {file_name('densenet121-res224-pc')} in one of: {tmp_path / 'weights'}, "):
        pipeline.run_pipeline(config, echo=lambda text: None)


def test_the_env_folder_and_the_cache_are_searched(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_WEIGHTS_DIR", str(weights_dir))
    assert xrv_initial_state(ZIP, "densenet121").features == 725
    monkeypatch.delenv("CXR_WEIGHTS_DIR")
    cache = tmp_path / "home" / ".torchxrayvision" / "models_data"
    cache.mkdir(parents=True)
    (cache / file_name(RESNET)).symlink_to(weights_dir / file_name(RESNET))
    assert xrv_initial_state(RESNET, "resnet50").features == 318


def test_the_scaling_is_recorded_and_existing_checkpoints_keep_theirs():
    info = model_info(TrainConfig(weights="xrv:densenet121-res224-all").to_dict(), 32, 0.4, 0.2, 1, {})
    assert info["normalization"]["scheme"] == "xrv" and (info["normalization"]["mean"], info["normalization"]["std"]) == (0.5, 1 / 2048)
    images = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    expected = torch.from_numpy(xrv.utils.normalize(images.numpy(), 255))[:, None]  # torchxrayvision's [-1024, 1024]
    assert torch.equal(prepare_input(images, info), expected)
    old = {"image_size": 32, "normalization": {"mean": 0.4, "std": 0.2, "formula": "(pixel / 255 - mean) / std"}}  # no scheme
    torch.testing.assert_close(prepare_input(images, old), (images[:, None].float() / 255 - 0.4) / 0.2)


@pytest.mark.ray
def test_a_checkpoint_from_xrv_weights_predicts_the_same_through_training_evaluation_and_predict(ray_local, weights_dir, tmp_path):
    from cxr import cli
    from evaluation.inference import load_split, predict_arrays
    from trainers import fit
    from trainers.loop import predict

    run = RunDir(write_run(tmp_path / "run", n_train=16, n_val=8, n_test=6, image_size=32))
    cfg = TrainConfig(weights=f"xrv:{LEGACY}", weights_dir=str(weights_dir), epochs=1, workers=1, batch_size=8, shuffle_buffer=0)
    lines: list[str] = []
    result = fit(run, cfg, echo=lines.append)
    assert f"start: xrv:{LEGACY}: 725/725 feature tensors loaded; head rows reused for 14 finding(s)" in lines[0]
    model, info = load_checkpoint(result.best_checkpoint_dir)
    assert info["normalization"]["scheme"] == "xrv" and info["train_config"]["effective_freeze"] == "partial"

    test = load_split(run, "test", 32)
    evaluated = predict_arrays(model, info, test.images)  # evaluate's (and external sets', robustness') path
    logits, _ = predict(model, [{"image": torch.from_numpy(test.images), "labels": torch.zeros(len(test.images), 14)}],
                        info["normalization"], amp=False)  # the training loop's validation path
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), evaluated, atol=1e-5)

    paths = []
    for image_id, pixels in zip(test.frame["image_id"], test.images):
        paths.append(tmp_path / image_id)
        Image.fromarray(pixels).save(paths[-1])
    csv = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(result.best_checkpoint_dir), *map(str, paths), "--csv", str(csv)]) == 0
    predicted = pd.read_csv(csv)[[f"prob_{f}" for f in FINDINGS]].to_numpy()
    np.testing.assert_allclose(predicted, evaluated, atol=1e-5)


@pytest.mark.parametrize("name", list(XRV_WEIGHTS))
def test_the_real_published_files_map_onto_our_backbones(name):
    """With the real files (README: "How to check with the real files"), loaded safely and mapped,
    our model computes torchxrayvision's raw outputs for every shared finding. Skips without them."""
    folder = next((d for d in REAL_DIRS if (d / file_name(name)).is_file()), None)
    if folder is None:
        pytest.skip(f"{file_name(name)} not in {', '.join(map(str, REAL_DIRS))}")
    backbone = XRV_WEIGHTS[name]
    start = xrv_initial_state(name, backbone, str(folder))
    model = build_model(backbone)
    load_initial_weights(model, backbone, start.state)
    reference = xrv.models.get_model(name, cache_dir=str(folder))  # torchxrayvision's own (unrestricted) loader
    size = start.input_resolution
    x = torch.from_numpy(xrv.utils.normalize(np.random.default_rng(0).integers(0, 256, (1, size, size)).astype(np.float32), 255))[:, None]
    with torch.no_grad():
        theirs = reference.classifier(reference.features2(x)) if backbone == "densenet121" else reference.model(x)
        ours = model.eval()(x)
    labels = xrv.models.model_urls[name]["labels"]
    for j, finding in enumerate(start.head_reused):
        torch.testing.assert_close(ours[:, FINDINGS.index(finding)], theirs[:, labels.index(finding)], rtol=1e-4, atol=1e-4)
