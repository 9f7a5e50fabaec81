"""The Method contract and the method registry.

A Method is backbone + heads + loss + the sampler/view recipe it needs. A new method is
**one file** in ``medssl/methods/`` (found and imported automatically) with a
``@register_method("name")`` class; its loss and any new sampler or network live in their
own files under ``losses/``, ``sampling/`` and ``models/``. Nothing else needs an edit:
the shared tests (``tests/methods/test_shared_method_contract.py``), the pipeline's method
list, the notebooks and the report all read the registry and the class attributes below.

The trainer only calls ``configure_optimizers``, ``sample``, ``training_step`` and
``embed``; the evaluators call ``embed`` and ``metric_latent``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, is_dataclass, replace
from typing import Any, Callable, ClassVar, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from medssl._config import check_overrides
from medssl.data.volume import Volume
from medssl.geometry import as_size
from medssl.models.backbones import build_backbone
from medssl.sampling.base import PatchBatch
from medssl.sampling.patches import extract_patches
from medssl.sampling.uniform import UniformPatchSampler

__all__ = [
    "FAMILIES",
    "cuts_cubes",
    "Method",
    "MethodConfig",
    "OptimizerSettings",
    "StepOutput",
    "backbone_from_config",
    "create_method",
    "get_method_class",
    "list_methods",
    "make_config",
    "method_info",
    "register_method",
    "register_variant",
    "uniform_sampler_from_config",
]

# Report order of the families (a family not listed here sorts after them, by name).
FAMILIES = (
    "distance regression",
    "joint embedding",
    "positive-pair selection",
    "context prediction",
    "untrained baseline",
)


@dataclass(frozen=True)
class MethodConfig:
    """Fields every method's Config has (the trainer, presets and evaluators rely on them).

    Defaults are the ISImed paper's: DenseNet121, 32^3 patches, 16 patches from each of 64 volumes.
    """

    backbone: str = "densenet121"
    patch_size_vox: int = 32
    volumes_per_batch: int = 64
    patches_per_volume: int = 16
    in_channels: int = 1
    foreground_only: bool = False  # patch centres on the body (the intensity body mask, medssl.data.body)
    embed_dim: int | None = None  # None = the backbone's default width (1024 for DenseNet121)


class OptimizerSettings(Protocol):
    """What ``configure_optimizers`` may read of the training configuration (:class:`medssl.train.config.TrainConfig`
    has these fields). Methods sit below ``train`` and never import it: the trainer passes its config in."""

    lr: float
    weight_decay: float
    lr_decay_per_epoch: float
    epochs: int


@dataclass
class StepOutput:
    """What ``training_step`` returns: the loss to minimise and scalar logs."""

    loss: torch.Tensor
    logs: dict[str, float]


class Method(nn.Module):
    """Base class for every SSL method.

    Subclasses set ``Config`` (a frozen dataclass with the paper's defaults), build
    ``self.backbone`` and whatever heads/losses they need in ``__init__(config)``, and
    implement:

    - ``sample(volumes, rng) -> PatchBatch``: draw one training batch on the CPU, views
      included (so the trainer can prefetch it). Default: ``self.sampler(volumes, rng)``.
    - ``training_step(batch) -> StepOutput``: batch already on the model's device.
    - ``embed(x) -> (B, D)``: the representation used for transfer/evaluation, from patches
      ``(B, C, *input_size_vox)`` cut around the points to describe.

    Class attributes the rest of medssl reads (so nothing else lists methods by name):

    - ``family``: one of :data:`FAMILIES` (report grouping and order).
    - ``paper``: one-line citation.
    - ``trains``: False for baselines that are never optimised (e.g. untrained networks,
      handcrafted descriptors); ``fit`` then only writes their initial state.
    - ``views_per_patch``: forward passes per distinct patch in a training step (2 for
      two-view methods): the compute cost stated next to equal-patch budgets.
    - ``presets``: per-preset overrides, ``{"demo": {"method": {...}, "train": {...}}}``,
      applied on top of the shared preset (:mod:`medssl.presets`).
    - ``in_demo``: run by ``make demo``.
    - ``in_finetune_demo``: also fine-tuned by the demo's short segmentation protocol
      (``finetune_methods="demo"`` in :mod:`medssl.evaluate.finetune`), when it is in the demo.
    - ``val_measure``: ``(key of the validation record, "min" | "max")``: the pretext measure
      early stopping watches (:class:`medssl.train.config.EarlyStopping`); the record holds
      ``loss``, ``effective_rank`` and the mean of every ``training_step`` log on the fixed
      validation patches. The contract tests check that the key is there.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    family: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    trains: ClassVar[bool] = True
    views_per_patch: ClassVar[int] = 1
    presets: ClassVar[dict[str, dict[str, Any]]] = {}
    in_demo: ClassVar[bool] = True
    in_finetune_demo: ClassVar[bool] = False
    val_measure: ClassVar[tuple[str, str]] = ("loss", "min")

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.registry_name = self.name  # the registry entry it was built from (a variant's own name)

    # ------------------------------------------------------------------ geometry of the input

    @property
    def embed_dim(self) -> int:
        return int(self.backbone.embed_dim)  # type: ignore[attr-defined]

    @property
    def patch_size_vox(self) -> tuple[int, int, int]:
        return as_size(self.config.patch_size_vox)  # type: ignore[return-value]

    @property
    def input_size_vox(self) -> tuple[int, int, int]:
        """The cube around a point that ``embed`` needs (its patch size unless a method says otherwise)."""
        return self.patch_size_vox

    def cut_inputs(self, data: np.ndarray, centres_vox: np.ndarray) -> np.ndarray:
        """What ``embed`` takes for the points ``centres_vox`` ``(N, 3)`` (int) of a volume ``data (C, X, Y, Z)``.

        Default: cubes of ``input_size_vox`` around each centre voxel (the centre-voxel rule),
        padded with the per-channel minimum outside the image. A method with another input
        (e.g. three orthogonal planar patches) overrides this and ``input_size_vox`` (the cube
        that bounds its input); evaluations then cut inputs through it
        (:meth:`medssl.evaluate.patchsets.PatchSet.inputs_for`, dense grids).
        """
        return extract_patches(data, centres_vox, self.input_size_vox)

    @property
    def patches_per_step(self) -> int:
        """Distinct patches per training step (per rank): the data budget compared across methods."""
        return int(self.config.volumes_per_batch) * int(self.config.patches_per_volume)

    # ------------------------------------------------------------------ training

    def configure_optimizers(self, config: OptimizerSettings) -> tuple[torch.optim.Optimizer, Any]:
        """``(optimizer, scheduler)``; the scheduler's ``step()`` is called once after every epoch.

        Default (the ISImed paper): AdamW over every trainable parameter with ``config.lr``
        and ``config.weight_decay`` (norms and biases included, plain AdamW), and
        ``lr = config.lr * config.lr_decay_per_epoch ** epoch``.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        return optimizer, torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_decay_per_epoch)

    def sample(self, volumes: Sequence[Volume], rng: np.random.Generator) -> PatchBatch:
        return self.sampler(volumes, rng)  # type: ignore[attr-defined]

    def training_step(self, batch: PatchBatch) -> StepOutput:
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (B, C, *S)`` -> ``(B, D)``. Callers put the module in eval mode."""
        return self.backbone(x)  # type: ignore[attr-defined]

    @torch.no_grad()
    def metric_latent(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """The latent whose Euclidean distances are meant to be physical, and its mm per unit.

        ``None`` (default): the method has no metric latent (joint-embedding methods);
        distance fidelity then reports correlations and an affine fit only. Methods
        trained to make distances physical (ISImed) return ``(latent (B, D'), scale_mm)``
        computed from ``embed``'s output.
        """
        return None

    def config_dict(self) -> dict[str, Any]:
        return {"method": self.name, **asdict(self.config)}


def cuts_cubes(model: Any) -> bool:
    """True when ``model``'s input at a point is the plain cube of its ``input_size_vox`` (no own ``cut_inputs``)."""
    own = getattr(type(model), "cut_inputs", None)
    return own is None or own is Method.cut_inputs


def backbone_from_config(config: Any, spatial_dims: int = 3) -> nn.Module:
    """The backbone named by ``config.backbone`` (``in_channels``, ``embed_dim`` from the config)."""
    return build_backbone(config.backbone, in_channels=config.in_channels, spatial_dims=spatial_dims,
                          embed_dim=config.embed_dim)


def uniform_sampler_from_config(config: Any) -> UniformPatchSampler:
    """Uniform patches: ``patches_per_volume`` from each of ``volumes_per_batch`` volumes."""
    return UniformPatchSampler(
        config.patch_size_vox,
        volumes_per_batch=config.volumes_per_batch,
        patches_per_volume=config.patches_per_volume,
        foreground_only=config.foreground_only,
    )


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class _Entry:
    cls: type[Method]
    overrides: dict[str, Any]
    description: str
    in_demo: bool


_REGISTRY: dict[str, _Entry] = {}


def register_method(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: ``@register_method("isimed")``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY and _REGISTRY[name].cls is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].cls.__qualname__}")
        if not is_dataclass(getattr(cls, "Config", None)):
            raise TypeError(f"{cls.__qualname__} needs a dataclass `Config`")
        cls.name = name
        doc = (cls.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = _Entry(cls, {}, doc[0] if doc else "", bool(cls.in_demo))
        return cls

    return deco


def register_variant(name: str, base: str, description: str = "", in_demo: bool = False, **overrides: Any) -> None:
    """Register ``name`` as ``base`` with config ``overrides`` (e.g. SimSiam with another IoU interval).

    A variant is a method like any other for runs, notebooks and reports (its run folder is
    ``runs/<run>/<name>/``); its checkpoint records the base method and the full config.
    """
    if name in _REGISTRY and (_REGISTRY[name].cls is not _REGISTRY[base].cls or _REGISTRY[name].overrides != overrides):
        raise ValueError(f"method {name!r} is already registered")
    entry = _REGISTRY[base]
    known = {f.name for f in fields(entry.cls.Config)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"variant {name!r}: {base} has no config fields {sorted(unknown)}")
    _REGISTRY[name] = _Entry(entry.cls, {**entry.overrides, **overrides}, description or f"{base} {overrides}",
                             bool(in_demo))


def list_methods(*, trains: bool | None = None, demo: bool | None = None) -> list[str]:
    """Registered method names in report order (family, then registration order).

    ``trains``: only methods that are (True) / are not (False) optimised; ``demo``: only
    those ``make demo`` runs.
    """
    _import_builtin_methods()
    rank = {f: i for i, f in enumerate(FAMILIES)}
    order = {n: i for i, n in enumerate(_REGISTRY)}
    names = sorted(_REGISTRY, key=lambda n: (rank.get(_REGISTRY[n].cls.family, len(FAMILIES)),
                                             _REGISTRY[n].cls.family, order[n]))
    return [
        n for n in names
        if (trains is None or _REGISTRY[n].cls.trains == trains) and (demo is None or _REGISTRY[n].in_demo == demo)
    ]


def get_method_class(name: str) -> type[Method]:
    return _entry(name).cls


def method_info(name: str) -> dict[str, Any]:
    """What the registry knows about ``name``: family, citation, whether it trains, views per patch, ..."""
    e = _entry(name)
    return {"method": name, "base": e.cls.name, "family": e.cls.family, "paper": e.cls.paper,
            "trains": e.cls.trains, "views_per_patch": e.cls.views_per_patch, "in_demo": e.in_demo,
            "in_finetune_demo": e.cls.in_finetune_demo, "overrides": dict(e.overrides), "description": e.description,
            "val_measure": tuple(e.cls.val_measure)}


def make_config(name: str, **overrides: Any) -> Any:
    """The method's default Config with the variant's and then ``overrides`` applied (unknown keys raise)."""
    e = _entry(name)
    check_overrides(e.cls.Config, overrides, f"{name} config")
    return replace(e.cls.Config(), **{**e.overrides, **overrides})


def create_method(name: str, config: Any = None, **overrides: Any) -> Method:
    """Build a registered method (or variant) from its default config, a config, or overrides."""
    e = _entry(name)
    if config is None:
        config = make_config(name, **overrides)
    elif overrides:
        config = replace(config, **overrides)
    method = e.cls(config)
    method.registry_name = name
    return method


def _entry(name: str) -> _Entry:
    _import_builtin_methods()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; registered: {', '.join(list_methods())}") from None


def _import_builtin_methods() -> None:
    # Importing the package imports every module in it, and each registers its methods.
    import medssl.methods  # noqa: F401
