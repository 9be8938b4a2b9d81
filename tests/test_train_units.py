"""Unit tests of trainers/ without Ray: config, losses, sampling, models and freezing, weights,
augmentation, metrics, checkpoints."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torchvision import models as tv

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS
from tests import train_fixtures  # also sets CXR_OFFLINE: no test downloads weights
from trainers.augment import Augment, augment_batch
from trainers.checkpoint import load_checkpoint, model_info, prepare_input, read_history, save_checkpoint
from trainers.config import TrainConfig
from trainers.data import apply_uncertain, row_keys, to_tensor_batch
from trainers.inputs import StartedIterator, memory_batches
from trainers.loop import initial_model
from trainers.losses import MultiLabelBCE, class_weights, make_criterion
from trainers.metrics import auroc_metrics, mean_auroc, per_finding_auroc
from trainers.models import apply_freeze, build_model, load_initial_weights, set_train_mode
from trainers.sampling import copies, make_plan, resample_rows
from trainers.weights import WeightsUnavailableError, imagenet_cache_file, initial_state_dict


# --- config -------------------------------------------------------------------------------------

def test_config_rejects_unknown_choices_and_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown backbone 'vgg'.*densenet121.*resnet18"):
        TrainConfig(backbone="vgg")
    with pytest.raises(ValueError, match="freeze"):
        TrainConfig(freeze="half")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown training option.*bacth_size"):
        TrainConfig.from_dict({"bacth_size": 3})


def test_auto_loss_is_weighted_unless_resampling():
    assert TrainConfig().effective_loss == "weighted"
    assert TrainConfig(sampling="over").effective_loss == "bce"
    assert TrainConfig(sampling="under", loss="weighted").effective_loss == "weighted"


def test_config_round_trips_and_fingerprint_tracks_changes():
    cfg = TrainConfig(backbone="resnet18", lr=1e-3)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.fingerprint() == TrainConfig(backbone="resnet18", lr=1e-3).fingerprint()
    assert cfg.fingerprint() != TrainConfig(backbone="resnet18", lr=2e-3).fingerprint()


# --- losses -------------------------------------------------------------------------------------

def _bce(p: float, y: int) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def test_plain_bce_by_hand_with_ignored_label():
    logits = torch.tensor([[0.0, 2.0], [-1.0, 0.5]])
    targets = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # the -1 is ignored
    sig = lambda z: 1 / (1 + math.exp(-z))
    expected = (_bce(sig(0.0), 1) + _bce(sig(2.0), 0) + _bce(sig(-1.0), 0)) / 3
    assert float(MultiLabelBCE()(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_weighted_bce_by_hand():
    train = np.array([[1, 0], [0, 0], [0, 1], [0, 0]], dtype=np.float32)  # f_pos = 1/4 and 1/4
    pos_w, neg_w = class_weights(train)
    np.testing.assert_allclose(pos_w, [0.75, 0.75])
    np.testing.assert_allclose(neg_w, [0.25, 0.25])
    logits = torch.tensor([[1.0, -1.0], [0.0, 0.3]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sig = lambda z: 1 / (1 + math.exp(-z))
    expected = (0.75 * _bce(sig(1.0), 1) + 0.25 * _bce(sig(-1.0), 0) + 0.25 * _bce(sig(0.0), 0) + 0.75 * _bce(sig(0.3), 1)) / 4
    assert float(make_criterion("weighted", train)(logits, targets)) == pytest.approx(expected, rel=1e-6)


def test_weighted_loss_balances_positive_and_negative_contributions_per_finding():
    labels = train_fixtures.synthetic_rows(200, 8, np.random.default_rng(1), "t", uncertain_frac=0.05)[list(FINDINGS)].to_numpy()
    labels = apply_uncertain(labels, "ignore")
    criterion = make_criterion("weighted", labels)
    logits = torch.zeros(labels.shape)  # the same prediction for every image: p = 0.5
    for j, name in enumerate(FINDINGS):
        y = torch.from_numpy(labels[:, j:j + 1])
        n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
        crit = MultiLabelBCE(criterion.pos_weight[j:j + 1], criterion.neg_weight[j:j + 1])
        # the mean over only-positive (only-negative) entries, times their count = their total contribution
        pos_total = float(crit(logits[:, :1], torch.where(y == 1, y, -1.0))) * n_pos
        neg_total = float(crit(logits[:, :1], torch.where(y == 0, y, -1.0))) * n_neg
        if n_pos and n_neg:
            assert pos_total == pytest.approx(neg_total, rel=1e-5), name


# --- sampling -----------------------------------------------------------------------------------

def _labels(n=400, seed=2):
    """NIH-like labels: about half the images have no finding, and findings differ in prevalence."""
    prevalence = np.linspace(0.01, 0.12, len(FINDINGS))
    return (np.random.default_rng(seed).random((n, len(FINDINGS))) < prevalence).astype(np.float32)


def test_sampling_is_deterministic_per_epoch_and_independent_of_blocks():
    labels = _labels()
    keys = row_keys([f"img{i}" for i in range(len(labels))])
    plan = make_plan(labels, "under", seed=7, under_ratio=0.5)
    whole = copies(plan, labels, keys, epoch=3)
    halves = np.concatenate([copies(plan, labels[:150], keys[:150], 3), copies(plan, labels[150:], keys[150:], 3)])
    np.testing.assert_array_equal(whole, halves)
    np.testing.assert_array_equal(whole, copies(make_plan(labels, "under", seed=7, under_ratio=0.5), labels, keys, 3))
    assert not np.array_equal(whole, copies(plan, labels, keys, epoch=4))


def test_oversampling_repeats_rare_findings_and_leaves_negatives_alone():
    labels = _labels()
    keys = row_keys(range(len(labels)))
    plan = make_plan(labels, "over", seed=0, max_repeat=4.0)
    counts = np.mean([copies(plan, labels, keys, e) for e in range(200)], axis=0)
    negatives = ~(labels == 1).any(axis=1)
    assert np.all(counts[negatives] == 1)
    before = (labels == 1).sum(axis=0)
    after = ((labels == 1) * counts[:, None]).sum(axis=0)
    present = before > 0
    ratio_before = before[present].max() / before[present].min()
    ratio_after = after[present].max() / after[present].min()
    assert ratio_after < ratio_before  # less imbalance between findings
    assert counts.max() <= 4.0


def test_undersampling_keeps_every_positive_and_thins_negatives():
    labels = _labels(n=600)
    keys = row_keys(range(len(labels)))
    any_pos = (labels == 1).any(axis=1)
    plan = make_plan(labels, "under", seed=0, under_ratio=0.5)
    c = copies(plan, labels, keys, epoch=0)
    assert np.all(c[any_pos] == 1)
    kept_neg = c[~any_pos].sum()
    assert kept_neg == pytest.approx(0.5 * any_pos.sum(), rel=0.35)
    batch = {"labels": labels, "key": keys, "image": np.zeros((len(keys), 2, 2), np.uint8)}
    assert len(resample_rows(batch, plan, 0)["key"]) == c.sum()


# --- models, grayscale, freezing ----------------------------------------------------------------

def test_summed_stem_equals_gray_repeated_to_three_channels():
    torch.manual_seed(0)
    reference = tv.resnet18(weights=None).eval()
    model = build_model("resnet18")
    skipped = load_initial_weights(model, "resnet18", reference.state_dict())
    assert skipped == ["fc.weight", "fc.bias"]  # ImageNet's 1000-way head is not ours
    model.fc = reference.fc = torch.nn.Identity()
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model.eval()(x), reference(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_the_seed_fixes_the_initial_weights():
    def weights(seed: int) -> list[torch.Tensor]:
        return list(initial_model(TrainConfig(backbone="resnet18", seed=seed)).state_dict().values())

    first, again, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_weights_for_another_architecture_are_refused():
    with pytest.raises(ValueError, match="do not fit a resnet18"):
        load_initial_weights(build_model("resnet18"), "resnet18", tv.resnet34(weights=None).state_dict())


@pytest.mark.parametrize("backbone,freeze", [("resnet18", "partial"), ("resnet18", "backbone"), ("densenet121", "partial")])
def test_frozen_parameters_do_not_change_after_a_step_and_trainable_ones_do(backbone, freeze):
    torch.manual_seed(0)
    model = build_model(backbone)
    apply_freeze(model, backbone, freeze)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    set_train_mode(model)
    loss = MultiLabelBCE()(model(torch.rand(4, 1, 32, 32)), torch.randint(0, 2, (4, len(FINDINGS))).float())
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    head = "fc" if backbone.startswith("resnet") else "classifier"
    assert any(n.startswith(head) for n in trainable)
    for name, param in model.named_parameters():
        if name in trainable:
            assert not torch.equal(before[name], after[name]), f"{name} should have trained"
        else:
            assert torch.equal(before[name], after[name]), f"{name} is frozen but changed"
    frozen_bn_stats = [k for k in after if k.endswith("running_mean") and k.rsplit(".", 1)[0] + ".weight" not in trainable]
    assert frozen_bn_stats and all(torch.equal(before[k], after[k]) for k in frozen_bn_stats)
    if freeze == "partial":
        stem = "conv1.weight" if backbone.startswith("resnet") else "features.conv0.weight"
        block = "layer4.1.conv2.weight" if backbone.startswith("resnet") else "features.denseblock4.denselayer16.conv2.weight"
        assert stem not in trainable and block in trainable


# --- initial weights ----------------------------------------------------------------------------

def test_imagenet_offline_without_cache_fails_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CXR_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError) as err:
        initial_state_dict("imagenet", "resnet18")
    text = str(err.value)
    assert "--weights PATH" in text and "--weights none" in text and str(imagenet_cache_file("resnet18")) in text


def test_imagenet_from_the_torch_hub_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("CXR_OFFLINE", "1")
    cached = imagenet_cache_file("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(tv.resnet18(weights=None).state_dict(), cached)
    state = initial_state_dict("imagenet", "resnet18")
    assert state["conv1.weight"].shape[1] == 3


def test_weights_path_loads_state_dicts_and_checkpoints_but_no_pickled_objects(tmp_path):
    good = tmp_path / "w.pt"
    torch.save(build_model("resnet18").state_dict(), good)
    assert "fc.weight" in initial_state_dict(str(good), "resnet18")
    evil = tmp_path / "evil.pt"
    torch.save({"x": Augment()}, evil)  # an arbitrary object: weights_only must refuse it
    with pytest.raises(ValueError, match="weights_only"):
        initial_state_dict(str(evil), "resnet18")
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        initial_state_dict(str(tmp_path / "missing.pt"), "resnet18")


# --- augmentation -------------------------------------------------------------------------------

def test_augmentation_is_reproducible_bounded_and_identity_when_off():
    x = torch.rand(3, 1, 16, 16)
    aug = Augment()
    a = augment_batch(x, aug, torch.Generator().manual_seed(1))
    b = augment_batch(x, aug, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, x)
    identity = augment_batch(x, Augment(0, 0, 0, 0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(identity, x, atol=1e-5, rtol=0)


# --- data, metrics ------------------------------------------------------------------------------

def test_uncertain_policies():
    labels = np.array([[1, 0, -1]], dtype=np.int8)
    assert apply_uncertain(labels, "zeros").tolist() == [[1, 0, 0]]
    assert apply_uncertain(labels, "ones").tolist() == [[1, 0, 1]]
    assert apply_uncertain(labels, "ignore").tolist() == [[1, 0, -1]]


def test_shard_rows_become_tensor_columns():
    df = train_fixtures.synthetic_rows(5, 8, np.random.default_rng(0), "x")
    batch = to_tensor_batch({c: df[c].to_numpy() for c in df.columns}, 8, "zeros")
    assert batch["image"].shape == (5, 8, 8) and batch["image"].dtype == np.uint8
    assert batch["labels"].shape == (5, len(FINDINGS)) and batch["labels"].dtype == np.float32
    np.testing.assert_array_equal(batch["key"], row_keys(df["image_id"]))


def test_memory_batches_give_each_rank_an_equal_disjoint_share():
    n = 23
    arrays = {"image": np.zeros((n, 2, 2), np.uint8), "labels": np.zeros((n, 14), np.float32), "key": np.arange(n)}
    plan = make_plan(arrays["labels"], "none", seed=0)
    seen = [torch.cat([b["key"] for b in memory_batches(arrays, plan, 0, r, 2, 5, torch.device("cpu"))]) for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 10  # 11 rows each, full batches of 5 only
    assert not set(seen[0].tolist()) & set(seen[1].tolist())


def test_started_iterator_yields_everything_once_and_reraises_in_the_consumer():
    assert list(StartedIterator(range(5))) == [0, 1, 2, 3, 4]
    assert list(StartedIterator([])) == []

    def broken():
        raise OSError("shard unreadable")
        yield

    with pytest.raises(OSError, match="shard unreadable"):
        list(StartedIterator(broken()))


def test_auroc_is_nan_for_a_single_class_and_left_out_of_the_mean():
    labels = np.zeros((6, len(FINDINGS)), np.float32)
    labels[:3, 0] = 1
    labels[0, 1] = -1  # ignored; finding 1 has only negatives left
    scores = np.tile(np.linspace(1, 0, 6)[:, None], (1, len(FINDINGS)))
    per = per_finding_auroc(labels, scores)
    assert per[FINDINGS[0]] == 1.0 and math.isnan(per[FINDINGS[1]])
    assert mean_auroc(per) == 1.0
    assert math.isnan(auroc_metrics(np.zeros((4, 14)), np.zeros((4, 14)))["val_mean_auroc"])


# --- checkpoint ---------------------------------------------------------------------------------

def test_checkpoint_round_trip_and_prediction_input(tmp_path):
    model = build_model("resnet18").eval()
    info = model_info(TrainConfig(backbone="resnet18").to_dict(), 32, 0.4, 0.2, 3, {"val_mean_auroc": float("nan")})
    save_checkpoint(tmp_path, model, info, history=[{"epoch": 1, "val_mean_auroc": float("nan")}])
    stored = json.loads((tmp_path / "model.json").read_text())  # strict JSON: NaN written as null
    assert stored["metrics"]["val_mean_auroc"] is None and stored["findings"] == list(FINDINGS)
    assert math.isnan(read_history(tmp_path)[0]["val_mean_auroc"])
    loaded, info2 = load_checkpoint(tmp_path)
    x = prepare_input(torch.randint(0, 256, (2, 32, 32), dtype=torch.uint8), info2)
    assert x.shape == (2, 1, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="expects 32x32"):
        prepare_input(torch.zeros(1, 16, 16, dtype=torch.uint8), info2)


def test_epochs_without_improvement_counts_from_the_best_validation_auroc():
    from trainers.loop import epochs_without_improvement

    nan = float("nan")
    assert epochs_without_improvement([{"val_mean_auroc": v} for v in (0.5, 0.6, 0.55, 0.58)]) == 2
    assert epochs_without_improvement([{"val_mean_auroc": 0.5}]) == 0
    assert epochs_without_improvement([{"val_mean_auroc": v} for v in (0.6, 0.6)]) == 1  # a tie is not an improvement
    assert epochs_without_improvement([{"val_mean_auroc": v} for v in (nan, nan)]) == 2
    assert epochs_without_improvement([{"val_mean_auroc": v} for v in (0.5, nan)]) == 1


def test_patience_must_be_a_positive_integer():
    assert TrainConfig(patience=3).patience == 3
    for bad in (0, -1, 1.5, True):
        with pytest.raises(UserInputError, match="patience must be an integer >= 1"):
            TrainConfig(patience=bad)


def test_an_epoch_line_marks_a_new_best_and_estimates_the_time_left():
    from trainers.progress import epoch_line

    m = {"epoch": 2, "train_loss": 0.25, "val_loss": 0.3, "val_mean_auroc": 0.71, "train_images_per_s": 140.2}
    line = epoch_line(m, epochs=10, best_before=0.70, elapsed=60.0, trained_here=2)
    assert line == "epoch 2/10  train loss 0.2500  val loss 0.3000  val mean AUROC 0.710 (best)  140 img/s  elapsed 1m00s  left ~4m00s"
    assert "(best)" not in epoch_line(m, epochs=10, best_before=0.72, elapsed=60.0, trained_here=2)
    assert "left" not in epoch_line({**m, "epoch": 10}, epochs=10, best_before=0.7, elapsed=60.0, trained_here=10)


def test_a_trial_line_shows_the_strategy_its_score_and_whether_asha_stopped_it():
    from tuning.progress import trial_line

    config = {"sampling": "over", "loss": "bce", "freeze": "none", "lr": 3.2e-4, "base": {}}
    line = trial_line(3, 12, config, 0.7123, 2, 4, 80.0)
    assert line == "trial 3/12  sampling=over  loss=bce  freeze=none  lr=3.2e-04  best val mean AUROC 0.712  2/4 epochs (stopped early)  1m20s"
    assert "failed: boom" in trial_line(1, 2, config, float("nan"), 0, 4, 5.0, error="boom")


def test_freeze_auto_fine_tunes_random_weights_and_keeps_pretrained_features():
    assert TrainConfig().freeze == "auto"
    assert TrainConfig(weights="none").effective_freeze == "none"
    assert TrainConfig(weights="imagenet").effective_freeze == "partial"
    assert TrainConfig(weights="/models/chest.pt").effective_freeze == "partial"
    assert TrainConfig(weights="none", freeze="backbone").effective_freeze == "backbone"  # an explicit choice stands


# --- small-data regularisers --------------------------------------------------------------------

def test_soft_targets_and_label_smoothing_by_hand():
    """Smoothing e moves y to y(1 - e) + e/2; the weighted form weighs the two parts by class."""
    logits = torch.tensor([[0.4, -1.2]])
    targets = torch.tensor([[1.0, 0.0]])
    sig = lambda z: 1 / (1 + math.exp(-z))
    soft = lambda p, y: -(y * math.log(p) + (1 - y) * math.log(1 - p))
    expected = (soft(sig(0.4), 0.95) + soft(sig(-1.2), 0.05)) / 2
    assert float(MultiLabelBCE(smoothing=0.1)(logits, targets)) == pytest.approx(expected, rel=1e-6)
    pos_w, neg_w = np.array([0.8, 0.7], np.float32), np.array([0.2, 0.3], np.float32)
    y = 0.95
    weighted = -(0.8 * y * math.log(sig(0.4)) + 0.2 * (1 - y) * math.log(1 - sig(0.4)))
    weighted += -(0.7 * 0.05 * math.log(sig(-1.2)) + 0.3 * 0.95 * math.log(1 - sig(-1.2)))
    assert float(MultiLabelBCE(pos_w, neg_w, smoothing=0.1)(logits, targets)) == pytest.approx(weighted / 2, rel=1e-6)
    with pytest.raises(ValueError, match="smoothing"):
        MultiLabelBCE(smoothing=1.0)


def test_mixup_blends_images_and_labels_by_hand_and_keeps_unknown_labels_unknown():
    from trainers.regularize import mix, mixup_batch

    x = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]])
    mixed_x, mixed_y = mix(x, y, 0.75, torch.tensor([1, 2, 0]))
    assert mixed_x.flatten().tolist() == [0.25, 1.25, 1.5]  # 0.75 * own + 0.25 * partner's
    assert mixed_y.tolist() == [[0.75, 0.25], [0.25, -1.0], [1.0, -1.0]]
    drawn = mixup_batch(x, y, 0.4, torch.Generator().manual_seed(3))
    again = mixup_batch(x, y, 0.4, torch.Generator().manual_seed(3))
    assert all(torch.equal(a, b) for a, b in zip(drawn, again))  # reproducible from the epoch's seed
    assert not torch.equal(drawn[0], x)


def test_head_dropout_acts_in_training_only_and_keeps_the_checkpoint_keys():
    from trainers.regularize import add_head_dropout

    torch.manual_seed(0)
    plain = build_model("resnet18")
    dropped = build_model("resnet18")
    dropped.load_state_dict(plain.state_dict())
    add_head_dropout(dropped, "resnet18", 0.5)
    assert list(dropped.state_dict()) == list(plain.state_dict())
    x = torch.rand(2, 1, 32, 32)
    plain.eval(), dropped.eval()
    assert torch.allclose(plain(x), dropped(x))
    plain.train(), dropped.train()
    torch.manual_seed(1)
    assert not torch.allclose(plain(x), dropped(x))


def test_weight_average_follows_the_ema_formula():
    from trainers.regularize import weight_average

    model = torch.nn.Linear(2, 1)
    average = weight_average(model, 0.9)
    first = model.weight.detach().clone()
    average.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update_parameters(model)
    assert torch.allclose(average.module.weight, 0.9 * first + 0.1 * (first + 1.0))
