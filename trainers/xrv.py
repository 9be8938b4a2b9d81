"""Chest X-ray-pretrained starts: torchxrayvision's published models (``--weights xrv:NAME``).

Where the file comes from (resolved on the driver, before Ray starts, by ``locate``): ``--weights-dir``,
then ``$CXR_WEIGHTS_DIR``, then torchxrayvision's own cache (``~/.torchxrayvision/models_data``);
if none holds it and downloads are allowed (``CXR_OFFLINE`` unset), torchxrayvision's own download
puts it in its cache; otherwise a ``WeightsUnavailableError`` names the file and the folders.

How it is read (``read_xrv_file``). The published files come in two shapes: the DenseNet121 ones are
WHOLE PICKLED MODULES (torchxrayvision itself loads them with ``torch.load(weights_only=False)`` and
takes ``.state_dict()``), the ResNet50 one is a plain state_dict. We never run torch's unrestricted
unpickler on them. First ``torch.load(weights_only=True)`` with torch's safe-globals allowlist widened
by exactly the layer classes a DenseNet/ResNet is made of (torch.nn's, torchxrayvision's and
torchvision's DenseNet/ResNet classes): that reads plain state_dicts and modules saved in torch's zip
format. A module saved in torch's legacy (pre-1.6) format cannot be read by the weights_only
unpickler at all (it stores each class's source code beside it), so for that format only we unpickle
with Python's documented "restricting globals" recipe: the same allowlist plus torch's tensor
rebuild functions; any other global (``os.system``, ``builtins.eval``, ...) is refused before it is
called. What such a file can still make run is the ``__new__``/``__setstate__`` of those classes:
torch's and torchxrayvision's own code, which you installed. That is the trust decision
(README, "Chest X-ray-pretrained starts").

How it maps onto our model (``map_onto``): every feature tensor (all but the classifier) loads under
the same name into our ``densenet121`` / ``resnet50`` (their stems are one-channel like ours;
a count and a shape check make anything else an error). The head: torchxrayvision's 18 outputs
include NIH names, so for each of our 14 findings that the chosen model was trained to predict
its row (weight and bias) is reused, and the other rows keep the fresh initialisation a
from-scratch start with the same seed would have. Why reuse: with a few hundred local images, a head
that starts from the pretrained model's evidence for a finding fine-tunes from a useful model
instead of from chance, and nothing is lost for the findings it does not know (their rows are new).
"""
from __future__ import annotations

import inspect
import os
import pickle
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import UserInputError
from pipelines.labels import FINDINGS

PREFIX = "xrv:"
WEIGHTS_DIR_ENV = "CXR_WEIGHTS_DIR"
INSTALL_HINT = "pip install 'cxr[xrv]' (or pip install torchxrayvision)"

# torchxrayvision's published models that fit one of our backbones, and which one. The names are
# torchxrayvision's (its models.model_urls); tests/test_xrv_weights.py checks this table against the
# installed torchxrayvision, so a release that adds or drops a model is noticed.
XRV_WEIGHTS: dict[str, str] = {
    "densenet121-res224-all": "densenet121",
    "densenet121-res224-nih": "densenet121",
    "densenet121-res224-pc": "densenet121",
    "densenet121-res224-chex": "densenet121",
    "densenet121-res224-rsna": "densenet121",
    "densenet121-res224-mimic_nb": "densenet121",
    "densenet121-res224-mimic_ch": "densenet121",
    "resnet50-res512-all": "resnet50",
}
# Entries of a published state_dict that are neither features nor the head: torchxrayvision's
# per-finding operating points (a buffer used only by its own forward), dropped.
NOT_WEIGHTS = ("op_threshs",)


def xrv_name(weights: str) -> str | None:
    """``NAME`` of ``--weights xrv:NAME``, or None for any other ``--weights``."""
    return weights[len(PREFIX):] if isinstance(weights, str) and weights.startswith(PREFIX) else None


def check_name(name: str, backbone: str) -> None:
    """Refuse an unknown name (listing the valid ones) or weights made for another backbone.
    Pure Python: TrainConfig calls it everywhere, torchxrayvision need not be imported for it."""
    if name not in XRV_WEIGHTS:
        valid = ", ".join(PREFIX + n for n in XRV_WEIGHTS)
        raise UserInputError(f"unknown torchxrayvision weights {PREFIX}{name}: choose one of {valid}")
    if XRV_WEIGHTS[name] != backbone:
        raise UserInputError(f"{PREFIX}{name} is a {XRV_WEIGHTS[name]}: pass --backbone {XRV_WEIGHTS[name]} with it "
                             f"(the backbone is {backbone})")


def _xrv_models():
    try:
        import torchxrayvision
    except ImportError:
        raise UserInputError(f"--weights {PREFIX}NAME needs torchxrayvision, which is not installed: {INSTALL_HINT}") from None
    return torchxrayvision.models


def published(name: str) -> dict[str, Any]:
    """torchxrayvision's record of ``name`` (weights_url, labels, input_resolution, ...)."""
    urls = _xrv_models().model_urls
    if name not in urls:
        known = ", ".join(n for n in XRV_WEIGHTS if n in urls)
        raise UserInputError(f"the installed torchxrayvision does not publish {name!r}; it has {known}")
    return urls[name]


def file_name(name: str) -> str:
    """The published file's name (the last part of its URL): what to place in a folder offline."""
    return os.path.basename(published(name)["weights_url"])


def cache_dir() -> Path:
    """torchxrayvision's own download folder (``~/.torchxrayvision/models_data``)."""
    from torchxrayvision import utils

    return Path(utils.get_cache_dir()).expanduser()


def search_dirs(weights_dir: str | None) -> list[Path]:
    """Where ``locate`` looks, in order: the folder the user named (``--weights-dir``, then
    ``$CXR_WEIGHTS_DIR``) before the implicit cache, so an explicit choice always wins."""
    named = [weights_dir, os.environ.get(WEIGHTS_DIR_ENV)]
    return [*(Path(d).expanduser() for d in named if d), cache_dir()]


def locate(name: str, weights_dir: str | None = None) -> Path:
    """The local file of ``xrv:name``: found in ``search_dirs``, else downloaded by torchxrayvision
    into its cache, else a WeightsUnavailableError saying which file to put where."""
    from trainers.weights import OFFLINE_ENV, WeightsUnavailableError, offline

    record = published(name)
    filename = os.path.basename(record["weights_url"])
    folders = search_dirs(weights_dir)
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    how = (f"torchxrayvision weights {PREFIX}{name} not found {{why}}: download {record['weights_url']} on a machine "
           f"with internet and place the file {filename} in one of: {', '.join(map(str, folders))} "
           f"(--weights-dir DIR, ${WEIGHTS_DIR_ENV}, or torchxrayvision's cache)")
    if offline():
        raise WeightsUnavailableError(how.format(why=f"and not downloaded ({OFFLINE_ENV} is set)"))
    try:
        return Path(_xrv_models().get_weights(name))  # torchxrayvision's own download, into its cache
    except OSError as err:  # requests' errors and socket errors are OSErrors
        raise WeightsUnavailableError(how.format(why=f"and its download failed ({type(err).__name__}: {str(err)[:200]})")) from None


# -- reading the file safely --------------------------------------------------------------------

def _layer_classes() -> list[type]:
    """The module classes a published DenseNet121/ResNet50 file may name: torch.nn's layers and the
    DenseNet/ResNet classes of torchxrayvision and torchvision. Nothing that is not an nn.Module."""
    import torch.nn as nn
    import torchvision.models.densenet as tv_densenet
    import torchvision.models.resnet as tv_resnet

    xrv = _xrv_models()
    layers = [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Linear,
              nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Dropout, nn.Identity]
    for module in (xrv, tv_densenet, tv_resnet):
        layers += [c for _, c in inspect.getmembers(module, inspect.isclass)
                   if issubclass(c, nn.Module) and c.__module__ == module.__name__]
    return layers


def _legacy_pickle_module(allowed: dict[str, Any]) -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose unpickler resolves only ``allowed`` globals
    (Python's "restricting globals" recipe); torch's wrapper maps storage names before ours."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            key = f"{module}.{name}"
            if key not in allowed:
                raise pickle.UnpicklingError(f"refused global {key}: not a layer class or tensor of a published model")
            return allowed[key]

    restricted = types.ModuleType("cxr_restricted_pickle")
    restricted.Unpickler = RestrictedUnpickler
    restricted.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    return restricted


def _legacy_allowed(layers: list[type]) -> dict[str, Any]:
    import collections

    import torch._utils as tu

    allowed: dict[str, Any] = {f"{c.__module__}.{c.__name__}": c for c in layers}
    allowed.update({f"torch._utils.{f}": getattr(tu, f) for f in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter")})
    allowed.update({"collections.OrderedDict": collections.OrderedDict, "builtins.set": set, "__builtin__.set": set})
    return allowed


def _first_line(err: BaseException) -> str:
    """The informative line of a torch.load error (torch's weights_only errors put it after a
    paragraph of advice to load unsafely, which is not ours to give)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = next((line.split("error:", 1)[1].strip() for line in lines if "WeightsUnpickler error:" in line),
                  next((line for line in lines if "GLOBAL" in line), None))
    return (reason or (lines[0] if lines else type(err).__name__))[:300]


def read_xrv_file(path: Path) -> dict[str, Any]:
    """The state_dict in a published torchxrayvision file (a pickled module or a state_dict), read
    without torch's unrestricted unpickler (module docstring). A file that holds anything else, or
    names a global outside the allowlist, is a UserInputError naming the file."""
    import torch
    from torch import nn

    layers = _layer_classes()
    try:
        with torch.serialization.safe_globals(layers):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        # torch's words for "a module in the legacy format" (its class source is stored beside it) and
        # for the older .tar format: the only cases the restricted unpickler below is for
        if "persistent_load" not in str(err) and "legacy .tar format" not in str(err):
            if isinstance(err, pickle.UnpicklingError):
                raise UserInputError(f"{path}: refused by safe loading (weights_only=True): {_first_line(err)}") from None
            raise UserInputError(f"{path}: not a torchxrayvision weights file (RuntimeError: {_first_line(err)})") from None
        try:  # a module in torch's legacy format: the restricted unpickler (module docstring)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
                obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_legacy_pickle_module(_legacy_allowed(layers)))
        except pickle.UnpicklingError as inner:
            raise UserInputError(f"{path}: refused by the restricted unpickler: {_first_line(inner)}") from None
        except Exception as inner:  # torch raises several types for a foreign file
            raise UserInputError(f"{path}: not a torchxrayvision weights file ({type(inner).__name__}: {_first_line(inner)})") from None
    except Exception as err:  # torch raises RuntimeError, EOFError, zip errors ... for foreign files
        raise UserInputError(f"{path}: not a torchxrayvision weights file ({type(err).__name__}: {_first_line(err)})") from None
    if isinstance(obj, nn.Module):
        for module in obj.modules():  # modules pickled by torch < 1.6 lack this (torchxrayvision patches it the same way)
            if not hasattr(module, "_non_persistent_buffers_set"):
                module._non_persistent_buffers_set = set()
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserInputError(f"{path}: holds a {type(obj).__name__}, not a torchxrayvision model or state_dict")
    return dict(obj)


# -- mapping onto our backbone ------------------------------------------------------------------

@dataclass
class XrvStart:
    """A published model mapped onto our backbone: ``state`` is a complete state_dict of our model."""

    name: str
    state: dict[str, Any]
    features: int  # feature tensors in the published file
    features_loaded: int  # of them, loaded into our model (always == features: anything else is an error)
    head_reused: list[str]  # our findings whose head row comes from the published model
    head_fresh: list[str]  # our findings whose head row is freshly initialised
    input_resolution: int | None  # the image side the published model was trained at

    def describe(self) -> str:
        return (f"{PREFIX}{self.name}: {self.features_loaded}/{self.features} feature tensors loaded; head rows reused for "
                f"{len(self.head_reused)} finding(s) ({', '.join(self.head_reused) or 'none'}), fresh for {len(self.head_fresh)}")


def map_onto(name: str, published_state: dict[str, Any], backbone: str, seed: int = 0) -> XrvStart:
    """Map a published state_dict onto our ``backbone`` (module docstring). The published model's
    outputs are torchxrayvision's ``labels`` of ``name``, in order ('' where one was not trained)."""
    import torch

    from trainers.models import BACKBONES, build_model

    record = published(name)
    labels = list(record["labels"])
    head = BACKBONES[backbone].head
    with torch.random.fork_rng(devices=[]):  # the fresh rows a from-scratch start with this seed has
        torch.manual_seed(seed)
        own = build_model(backbone).state_dict()
    features = {k: v for k, v in published_state.items() if not k.startswith(head + ".") and k not in NOT_WEIGHTS}
    own_features = {k for k in own if not k.startswith(head + ".")}
    missing = sorted(own_features - set(features))
    counters = [k for k in missing if k.endswith("num_batches_tracked")]  # absent from files of old torch; not weights
    missing = [k for k in missing if k not in counters]
    unexpected = sorted(set(features) - own_features)
    wrong = [k for k in features if k in own and tuple(features[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise UserInputError(
            f"{PREFIX}{name} does not fit our {backbone}: {len(missing)} feature tensor(s) missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(wrong)} of another shape (e.g. {wrong[:2]})")
    state = {**own, **{k: v.detach().clone() for k, v in features.items()}}
    weight, bias = published_state.get(f"{head}.weight"), published_state.get(f"{head}.bias")
    if weight is None or bias is None or weight.shape != (len(labels), own[f"{head}.weight"].shape[1]):
        raise UserInputError(f"{PREFIX}{name}: its head is not a {len(labels)}-output linear layer on {backbone} features")
    reused = [f for f in FINDINGS if f in labels]
    for finding in reused:
        ours, theirs = FINDINGS.index(finding), labels.index(finding)
        state[f"{head}.weight"][ours] = weight[theirs]
        state[f"{head}.bias"][ours] = bias[theirs]
    return XrvStart(name, state, len(features), sum(k in own for k in features), reused,
                    [f for f in FINDINGS if f not in reused], record.get("input_resolution"))


def xrv_initial_state(name: str, backbone: str, weights_dir: str | None = None, seed: int = 0) -> XrvStart:
    """Locate, read and map ``xrv:name`` for ``backbone``: what ``--weights xrv:NAME`` starts from."""
    check_name(name, backbone)
    path = locate(name, weights_dir)
    return map_onto(name, read_xrv_file(path), backbone, seed)
