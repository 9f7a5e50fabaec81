"""Export a pretrained encoder for the user's own pipeline: ``medssl export CHECKPOINT --to monai -o DIR``.

In Python::

    from medssl.export import export_encoder, load_exported
    exported = export_encoder("runs/demo/isimed/checkpoints/last.pt", "isimed_encoder")
    net = load_exported("isimed_encoder")                  # the MONAI (or medssl) network, weights loaded

The folder gets two files:

- ``encoder.pt``: the weights as a plain ``state_dict`` (a dict of tensors, nothing else:
  ``torch.load(..., weights_only=True)`` reads it), **in the key layout of the network named
  in the JSON**;
- ``encoder.json``: that network's class and constructor arguments, how to load the weights
  (strict, or the encoder part of a larger network), what the input must be, and the
  checkpoint's preprocessing record (:mod:`medssl.train.preprocessing`), so new scans are
  prepared as the training volumes were.

Which network:

- **DenseNet121** -> ``monai.networks.nets.DenseNet121(spatial_dims, in_channels,
  out_channels=embed_dim)``: every key loads strictly. Its ``features`` are the convolutional
  trunk; its ``class_layers`` (ReLU, global average pooling, flatten, the linear ``out``) are
  the embedding head that pretraining trained: ``out`` maps the 1024 pooled features to the
  embedding (1024-d by default, the ISImed paper's representation). For a classifier replace
  ``class_layers.out``; for segmentation take ``features``.
- **Swin** (``swin``, ``swin-tiny``) -> ``monai.networks.nets.SwinUNETR`` with the encoder's
  sizes; ``out_channels`` (your number of classes) is yours to give. The weights are the
  ``swinViT.*`` encoder: ``load_state_dict(..., strict=False)`` loads every one of them (no
  unexpected keys; the missing keys are the decoder's, which fine-tuning trains).
- **No MONAI network matches** SmallCNN, the context-prediction networks (the three 2D
  D2D-CNNs of Reg2D/Heatmap/Xavier, the D3D-CNN of Doersch) or GVDiff's fixed pattern: the
  export is a plain ``state_dict`` of medssl's own module, the JSON names the medssl class and
  says so, and :func:`load_exported` rebuilds it (medssl must be installed).

Every export checks itself before it is written: the weights are loaded into a freshly built
target network, and an export whose keys or shapes do not fit is refused.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # torch is imported when an export runs, so `medssl --help` stays quick
    import torch
    from torch import nn

__all__ = ["EXPORT_FORMAT", "ExportedEncoder", "export_encoder", "load_exported", "TARGETS"]

EXPORT_FORMAT = "medssl-encoder-export-v1"
TARGETS = ("monai", "medssl")
WEIGHTS_FILE, INFO_FILE = "encoder.pt", "encoder.json"


@dataclass(frozen=True)
class ExportedEncoder:
    """What :func:`export_encoder` wrote.

    Attributes:
        weights_path, info_path: ``encoder.pt`` and ``encoder.json``.
        network: the class the weights are laid out for (``monai.networks.nets.DenseNet121``,
            ``monai.networks.nets.SwinUNETR`` or a medssl class).
        monai: whether that is a MONAI network.
        info: the JSON's content.
    """

    weights_path: Path
    info_path: Path
    network: str
    monai: bool
    info: dict[str, Any]


@dataclass(frozen=True)
class _Target:
    network: str  # importable "module.Class"
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    strict: bool
    notes: list[str]
    user_kwargs: dict[str, str]  # constructor arguments the user must add, with what they mean
    left_out: list[str]  # backbone keys not exported (e.g. an SSL projection the target has no place for)


# ----------------------------------------------------------------------------- per backbone


def _tensors(sd: "dict[str, torch.Tensor]", prefix: str = "", new_prefix: str = "") -> "dict[str, torch.Tensor]":
    return {new_prefix + k[len(prefix):]: v.detach().cpu().clone().contiguous() for k, v in sd.items()
            if k.startswith(prefix)}


def _densenet121(backbone: nn.Module) -> _Target | None:
    from medssl.models.backbones import DenseNet121Backbone

    if not isinstance(backbone, DenseNet121Backbone):
        return None
    net = backbone.net
    first = net.features.conv0
    kwargs = {"spatial_dims": int(backbone.spatial_dims), "in_channels": int(first.in_channels),
              "out_channels": int(backbone.embed_dim)}
    notes = [
        "Every key loads strictly into DenseNet121(**kwargs); its output is the embedding medssl trained.",
        "features: the convolutional trunk (take net.features for a segmentation encoder).",
        f"class_layers: the embedding head pretraining trained (ReLU, global average pooling, flatten, and the linear "
        f"'out' mapping {net.class_layers.out.in_features} pooled features to the {kwargs['out_channels']}-d "
        "embedding). For a classifier replace it: net.class_layers.out = torch.nn.Linear("
        f"{net.class_layers.out.in_features}, n_classes).",
    ]
    return _Target("monai.networks.nets.DenseNet121", kwargs, _tensors(net.state_dict()), True, notes, {}, [])


def _swin(backbone: nn.Module) -> _Target | None:
    from medssl.models.swin import SwinEncoder

    if not isinstance(backbone, SwinEncoder):
        return None
    kwargs = backbone.swinunetr_kwargs()
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    left_out = [k for k in backbone.state_dict() if k.startswith("fc.")]
    notes = [
        "The weights are SwinUNETR's encoder (swinViT.*): load with strict=False; no key is unexpected and the "
        "missing ones are the decoder's (encoder1..10, decoder1..5, out), which fine-tuning trains.",
        "SwinUNETR's decoder needs inputs whose sides are multiples of 32 voxels.",
    ]
    if left_out:
        notes.append(f"Left out: {left_out}, the linear layer medssl put after the pooled encoder output "
                     "(an SSL embedding projection SwinUNETR has no place for).")
    return _Target("monai.networks.nets.SwinUNETR", kwargs, _tensors(backbone.swinunetr_state_dict()), False, notes,
                   {"out_channels": "your number of output classes (background included)"}, left_out)


# Backbones with a matching MONAI network, tried in order.
_MONAI_ADAPTERS: "list[Callable[[nn.Module], _Target | None]]" = [_densenet121, _swin]


def _medssl_target(backbone: nn.Module, method: Any, why: str) -> _Target:
    from medssl.train.checkpoint import config_to_json

    cls = type(backbone)
    kwargs = {"method": method.name, "method_config": json.loads(config_to_json(method.config))}
    notes = [why, f"A plain state_dict of medssl's {cls.__module__}.{cls.__qualname__} (the method's backbone); "
             "medssl.export.load_exported(DIR) rebuilds it from the method config in 'kwargs' and loads it strictly."]
    return _Target(f"{cls.__module__}.{cls.__qualname__}", kwargs, _tensors(backbone.state_dict()), True, notes, {}, [])


def _input_spec(method: Any) -> dict[str, Any]:
    from medssl.methods.base import cuts_cubes

    size = [int(s) for s in method.input_size_vox]
    spec: dict[str, Any] = {"input_size_vox": size, "in_channels": int(method.config.in_channels),
                            "cube": cuts_cubes(method)}
    if cuts_cubes(method):
        spec["shape"] = f"(B, {method.config.in_channels}, X, Y, Z); pretrained on {size} voxel patches"
    else:
        spec["shape"] = (f"the method's own input (medssl {type(method).__name__}.cut_inputs at each point, e.g. three "
                         f"orthogonal planar patches bounded by a {size} voxel cube)")
    return spec


# ----------------------------------------------------------------------------- export and load back


def export_encoder(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, to: str = "monai",
                   overwrite: bool = False) -> ExportedEncoder:
    """Write the checkpoint's encoder as ``out_dir/encoder.pt`` + ``out_dir/encoder.json`` (module docstring).

    Args:
        checkpoint: a medssl checkpoint (``runs/<run>/<method>/checkpoints/last.pt``).
        out_dir: the folder to write (created).
        to: ``"monai"``: the matching MONAI network's layout where one exists, else medssl's
            own (said in the JSON); ``"medssl"``: medssl's own module for every backbone.
        overwrite: replace an earlier export in ``out_dir`` (otherwise it is an error).

    Raises:
        CheckpointError: the checkpoint cannot be read or rebuilt.
        FileExistsError: ``out_dir`` already holds an export and ``overwrite`` is False.
        ValueError: an unknown ``to``; an export that does not load into its target (a bug: nothing is written).
    """
    from medssl._files import atomic_write_bytes, atomic_write_text, file_sha256
    from medssl.train.checkpoint import load_checkpoint, load_method

    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    weights_path, info_path = out_dir / WEIGHTS_FILE, out_dir / INFO_FILE
    if not overwrite and (weights_path.exists() or info_path.exists()):
        raise FileExistsError(f"{out_dir}: already holds an export ({WEIGHTS_FILE}/{INFO_FILE}); choose another "
                              "folder or pass overwrite=True (medssl export --overwrite)")
    state = load_checkpoint(checkpoint)
    method = load_method(checkpoint)
    backbone = method.backbone
    target = None
    if to == "monai":
        target = next((t for adapter in _MONAI_ADAPTERS if (t := adapter(backbone)) is not None), None)
    if target is None:
        why = (f"No MONAI network matches medssl's {type(backbone).__name__}." if to == "monai"
               else "Exported in medssl's own layout (--to medssl).")
        target = _medssl_target(backbone, method, why)
    _check_loads(target, checkpoint)
    info = {
        "format": EXPORT_FORMAT,
        "network": target.network,
        "monai": target.network.startswith("monai."),
        "kwargs": target.kwargs,
        "user_kwargs": target.user_kwargs,
        "weights": WEIGHTS_FILE,
        "load_strict": target.strict,
        "n_tensors": len(target.state_dict),
        "left_out": target.left_out,
        "notes": target.notes,
        "embed_dim": int(method.embed_dim),
        "input": _input_spec(method),
        "preprocessing": method.preprocessing,
        "source": {"checkpoint": str(checkpoint), "sha256": file_sha256(checkpoint), "method": method.name,
                   "registry_name": method.registry_name, "backbone": str(method.config.backbone),
                   "step": int(state["step"]), "torch_version": str(state.get("torch_version", ""))},
    }
    if method.preprocessing is None or method.preprocessing.get("config") is None:
        info["notes"].append("The checkpoint carries no usable preprocessing record: prepare inputs as its training "
                             "volumes were (medssl map warns with what it assumes).")
    out_dir.mkdir(parents=True, exist_ok=True)
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(target.state_dict, buffer)
    atomic_write_bytes(weights_path, buffer.getbuffer(), fsync=True)
    atomic_write_text(info_path, json.dumps(info, indent=1))
    return ExportedEncoder(weights_path, info_path, target.network, bool(info["monai"]), info)


def _import(path: str) -> type:
    module, _, name = path.rpartition(".")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _build(network: str, kwargs: dict[str, Any]) -> nn.Module:
    if network.startswith("monai."):
        return _import(network)(**kwargs)
    from medssl.methods.base import create_method, get_method_class
    from medssl.train.checkpoint import config_from_json

    cls = get_method_class(kwargs["method"])
    method = create_method(kwargs["method"], config=config_from_json(cls.Config, json.dumps(kwargs["method_config"])))
    return method.backbone


def _load_into(net: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool, where: object) -> None:
    result = net.load_state_dict(state_dict, strict=strict)
    if not strict and result.unexpected_keys:
        raise ValueError(f"{where}: keys {result.unexpected_keys[:5]} have no place in {type(net).__name__}")


def _check_loads(target: _Target, where: object) -> None:
    """Load the export into a freshly built target (SwinUNETR with a 2-class head): refuse what does not fit."""
    kwargs = {**target.kwargs, **{k: 2 for k in target.user_kwargs}}
    try:
        net = _build(target.network, kwargs)
        _load_into(net, target.state_dict, target.strict, where)
    except (RuntimeError, TypeError, KeyError) as e:
        raise ValueError(f"{where}: the export does not load into {target.network} ({e}); nothing was written") from e
    if not target.strict:
        missing = [k for k in net.state_dict() if k not in target.state_dict]
        if any(k.startswith("swinViT.") for k in missing):
            raise ValueError(f"{where}: encoder keys missing from the export: {missing[:5]}; nothing was written")


def load_exported(path: str | os.PathLike, **user_kwargs: Any) -> nn.Module:
    """Build the network an export names and load its weights (eval mode).

    Args:
        path: the export folder or its ``encoder.json``.
        user_kwargs: the constructor arguments the JSON leaves to the user (SwinUNETR's
            ``out_channels``).

    Returns:
        The MONAI network (DenseNet121 with every weight; SwinUNETR with its encoder loaded and
        a fresh decoder) or medssl's own module.
    """
    path = Path(path)
    info_path = path / INFO_FILE if path.is_dir() else path
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{info_path}: cannot read the export description ({e})") from None
    if info.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{info_path}: not a medssl encoder export (format {info.get('format')!r})")
    missing = sorted(set(info.get("user_kwargs", {})) - set(user_kwargs))
    if missing:
        raise TypeError(f"{info_path}: {info['network']} needs {missing}: "
                        + "; ".join(f"{k} = {info['user_kwargs'][k]}" for k in missing))
    weights = info_path.parent / info["weights"]
    import torch

    try:
        state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise ValueError(f"{weights}: cannot be loaded with weights_only=True ({type(e).__name__}: {e})") from None
    net = _build(info["network"], {**info["kwargs"], **user_kwargs})
    _load_into(net, state_dict, bool(info["load_strict"]), weights)
    return net.eval()


# --------------------------------------------------------------------------- medssl export ...


def add_cli_parser(sub: "argparse._SubParsersAction") -> None:
    """Add ``medssl export`` to the ``medssl`` command's subparsers (:mod:`medssl.cli`)."""
    p = sub.add_parser(
        "export",
        help="export a pretrained encoder's weights for MONAI (DenseNet121, SwinUNETR) or as a plain state_dict",
        description="Write the checkpoint's encoder as DIR/encoder.pt (a state_dict of tensors in the layout of the "
        "matching MONAI network) and DIR/encoder.json (the network class, its constructor arguments, how to load "
        "the weights and the preprocessing the encoder was trained with). Backbones no MONAI network matches "
        "(SmallCNN, the context-prediction networks) are written as a plain state_dict of medssl's module.",
    )
    p.add_argument("checkpoint", type=Path, help="runs/<run>/<method>/checkpoints/last.pt")
    p.add_argument("--to", default="monai", choices=TARGETS, help="target layout (default monai)")
    p.add_argument("-o", "--out", type=Path, default=None,
                   help="output folder (default <method>_encoder in the current folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in the folder")
    p.set_defaults(func=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    ckpt = args.checkpoint
    out = args.out
    if out is None:
        from medssl.rundir import method_dir_of

        name = method_dir_of(ckpt).name if method_dir_of(ckpt) is not None else ckpt.stem
        out = Path.cwd() / f"{name}_encoder"
    res = export_encoder(ckpt, out, to=args.to, overwrite=args.overwrite)
    info = res.info
    kind = "MONAI network" if res.monai else "NOT a MONAI network (no MONAI network matches this backbone)"
    print(f"network: {res.network}  [{kind}]")
    args_text = ", ".join(f"{k}={v!r}" for k, v in info["kwargs"].items()) if res.monai else "see encoder.json"
    extra = "".join(f", {k}=<{v}>" for k, v in info["user_kwargs"].items())
    print(f"build:   {res.network.rsplit('.', 1)[-1]}({args_text}{extra})")
    print(f"weights: {res.weights_path}  ({info['n_tensors']} tensors, load_state_dict(strict={info['load_strict']}))")
    print(f"info:    {res.info_path}")
    for note in info["notes"]:
        print(f"  - {note}")
    pre = info["preprocessing"]
    if pre and pre.get("config"):
        from medssl.train.preprocessing import config_from_record, describe_config

        print(f"preprocessing of the training volumes: {describe_config(config_from_record(pre))}")
    return 0
