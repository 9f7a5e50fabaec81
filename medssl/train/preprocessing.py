"""The preprocessing record a checkpoint carries, and how readers of a checkpoint use it.

An encoder only means something on inputs prepared the way its training volumes were: the
same grid spacing and orientation, the same intensity rule (CT window or percentiles and
their values), the same body-mask rule and crop. ``fit`` therefore writes, into every
checkpoint, a **preprocessing record** taken from the training volumes themselves
(``volume.meta["preprocess_config"]``, which :func:`medssl.data.preprocess.preprocess` and
the volume cache put there), plus what the volumes turned out to be (modalities, the
intensity rule ``"auto"`` chose, voxel sizes) and the method's patch size. The record is a
JSON object string (``state["preprocessing"]``): checkpoints stay loadable with
``weights_only=True``.

Readers (``medssl map``, :func:`medssl.viz.mapping.map_scan`, dense embeddings, fine-tuning)
take the preprocessing from the record. A setting given explicitly that disagrees with it is
an error naming both values (:class:`PreprocessingMismatchError`), unless it is forced.

**Older checkpoints** (written before records existed) and checkpoints trained on volumes
that carry no preprocessing (arrays built by hand) are **used with a warning** that lists
every setting assumed: by default :data:`LEGACY_ASSUMPTION`, what ``medssl map`` always used
before (3 mm RAS, percentile 5-95 scaling, the modality's body rule), which is also the demo
cohort's preprocessing at its default spacing. Refusing them would strand every run made
before this record; the warning says exactly what to check.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import asdict, fields
from typing import Any, Mapping, Sequence

import numpy as np

from medssl.data.preprocess import PREPROCESS_VERSION, PreprocessConfig

__all__ = [
    "LEGACY_ASSUMPTION",
    "RECORD_FORMAT",
    "TRANSFORM_FIELDS",
    "PreprocessingMismatchError",
    "check_volume_preprocessing",
    "config_from_record",
    "describe_config",
    "record_from_volumes",
    "record_from_state",
    "resolve_preprocessing",
]

RECORD_FORMAT = "medssl-preprocessing-v1"
# Fields that change what the network sees. min_shape_vox is a size check, not a transform.
TRANSFORM_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(PreprocessConfig) if f.name != "min_shape_vox")
# What `medssl map` used before checkpoints carried a record (its flags' defaults): the demo cohort's
# preprocessing at its default 3 mm (DemoCohort.default_preprocess_config).
LEGACY_ASSUMPTION = PreprocessConfig(target_spacing_mm=(3.0, 3.0, 3.0), intensity="percentile")


class PreprocessingMismatchError(ValueError):
    """Preprocessing given (or found on a volume) differs from the checkpoint's record.

    ``differences`` maps each field to ``(checkpoint value, other value)``.
    """

    def __init__(self, where: str, differences: dict[str, tuple[Any, Any]], other: str, hint: str) -> None:
        self.where, self.differences = where, differences
        listed = "; ".join(f"{k}: checkpoint {_show(a)}, {other} {_show(b)}" for k, (a, b) in differences.items())
        super().__init__(f"{where}: preprocessing differs from what the encoder was trained with ({listed}). {hint}")


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + ")"
    return repr(value)


# ----------------------------------------------------------------------------- writing the record


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def record_from_volumes(volumes: Sequence[Any], patch_size_vox: Sequence[int],
                        input_size_vox: Sequence[int] | None = None) -> dict[str, Any]:
    """The preprocessing record of a training pool (JSON-safe).

    Keys: ``format``; ``config`` (the :class:`PreprocessConfig` fields as JSON, or None when the
    volumes carry none or disagree); ``configs`` (every distinct config found, when more than
    one); ``n_volumes`` and ``n_without_record``; ``modalities`` and ``intensity_modes``
    (counts: what ``"auto"`` resolved to per volume); ``spacing_mm_min``/``spacing_mm_max``
    (the volumes' voxel sizes); ``patch_size_vox`` and ``input_size_vox`` (the method's);
    ``preprocess_version`` (of this code) and ``digests``.
    """
    configs: dict[str, dict] = {}
    digests, modalities, modes, spacings = set(), Counter(), Counter(), []
    missing = 0
    for v in volumes:
        meta = getattr(v, "meta", None) or {}
        cfg = meta.get("preprocess_config")
        if isinstance(cfg, Mapping):
            configs.setdefault(_config_key(cfg), dict(cfg))
        else:
            missing += 1
        if meta.get("preprocess_digest"):
            digests.add(str(meta["preprocess_digest"]))
        if meta.get("modality"):
            modalities[str(meta["modality"])] += 1
        if meta.get("intensity_mode"):
            modes[str(meta["intensity_mode"])] += 1
        affine = getattr(v, "affine", None)
        if affine is not None:
            spacings.append(np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0))
    found = list(configs.values())
    config = None
    if len(found) == 1 and missing == 0:
        try:  # normalised (tuples, floats) and validated
            config = json.loads(json.dumps(asdict(PreprocessConfig(**found[0]))))
        except (TypeError, ValueError):  # a record of another medssl version's layout: not usable here
            config = None
    record: dict[str, Any] = {
        "format": RECORD_FORMAT,
        "config": config,
        "n_volumes": len(volumes),
        "n_without_record": missing,
        "modalities": dict(sorted(modalities.items())),
        "intensity_modes": dict(sorted(modes.items())),
        "spacing_mm_min": np.min(spacings, axis=0).round(6).tolist() if spacings else None,
        "spacing_mm_max": np.max(spacings, axis=0).round(6).tolist() if spacings else None,
        "patch_size_vox": [int(p) for p in patch_size_vox],
        "input_size_vox": [int(p) for p in (input_size_vox or patch_size_vox)],
        "preprocess_version": PREPROCESS_VERSION,
        "digests": sorted(digests),
    }
    if len(found) > 1:
        record["configs"] = found
    return record


def record_from_state(state: Mapping[str, Any]) -> dict[str, Any] | None:
    """The record of a loaded checkpoint, or None for a checkpoint written before records existed."""
    text = state.get("preprocessing")
    if text is None:
        return None
    record = json.loads(text) if isinstance(text, str) else dict(text)
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def config_from_record(record: Mapping[str, Any] | None) -> PreprocessConfig | None:
    """The :class:`PreprocessConfig` a record holds (None when unknown or mixed)."""
    if not record or not isinstance(record.get("config"), Mapping):
        return None
    return PreprocessConfig(**record["config"])


def describe_config(config: PreprocessConfig) -> str:
    """One line with every transform setting, as ``name=value``."""
    return ", ".join(f"{k}={_show(getattr(config, k))}" for k in TRANSFORM_FIELDS)


def _why_unknown(record: Mapping[str, Any] | None) -> str:
    if record is None:
        return "it was written before checkpoints recorded their preprocessing"
    if record.get("configs"):
        return f"its training volumes were preprocessed in {len(record['configs'])} different ways"
    return "its training volumes carried no preprocessing record (arrays built in memory, not by open_data)"


# ----------------------------------------------------------------------------- reading it back


def _differences(a: PreprocessConfig, b: PreprocessConfig, names: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    return {k: (getattr(a, k), getattr(b, k)) for k in names if getattr(a, k) != getattr(b, k)}


def resolve_preprocessing(
    record: Mapping[str, Any] | None,
    given: "PreprocessConfig | Mapping[str, Any] | None" = None,
    *,
    force: bool = False,
    where: str = "checkpoint",
    force_hint: str = "pass force_preprocessing=True to use the given values anyway",
) -> PreprocessConfig:
    """The preprocessing to apply to new scans for a checkpoint with ``record``.

    Args:
        record: :func:`record_from_state` of the checkpoint (None: an older checkpoint).
        given: None (use the record), a mapping of the settings given explicitly (only those
            are compared and applied; e.g. command-line flags), or a whole
            :class:`PreprocessConfig` (every transform field is compared).
        force: apply ``given`` even where it disagrees with the record (with a warning
            listing the differences) instead of raising.
        where: names the checkpoint in messages.

    Raises:
        PreprocessingMismatchError: ``given`` disagrees with the record and ``force`` is False.
        ValueError: ``given`` names a field :class:`PreprocessConfig` does not have, or a bad value.

    Warns when the record is unknown, listing every setting assumed.
    """
    recorded = config_from_record(record)
    if isinstance(given, PreprocessConfig):
        overrides, compared = {k: getattr(given, k) for k in TRANSFORM_FIELDS}, TRANSFORM_FIELDS
    else:
        overrides = dict(given or {})
        unknown = sorted(set(overrides) - {f.name for f in fields(PreprocessConfig)})
        if unknown:
            raise ValueError(f"unknown preprocessing settings {unknown}; known: {', '.join(TRANSFORM_FIELDS)}")
        compared = tuple(k for k in overrides if k in TRANSFORM_FIELDS)
    base = recorded if recorded is not None else LEGACY_ASSUMPTION
    merged = PreprocessConfig(**{**asdict(base), **overrides})  # validates and normalises the given values
    if recorded is None:
        warnings.warn(
            f"{where}: no preprocessing record ({_why_unknown(record)}); assumed: {describe_config(merged)}. "
            "If the encoder was trained otherwise, give those settings explicitly.",
            stacklevel=3,
        )
        return merged
    diffs = _differences(recorded, merged, compared)
    if diffs and not force:
        raise PreprocessingMismatchError(where, diffs, "given", force_hint)
    if diffs:
        listed = "; ".join(f"{k}: trained {_show(a)}, used {_show(b)}" for k, (a, b) in diffs.items())
        warnings.warn(f"{where}: preprocessing forced away from the training record ({listed})", stacklevel=3)
    return merged


def check_volume_preprocessing(method: Any, volume: Any) -> None:
    """Raise when ``volume`` was preprocessed otherwise than ``method``'s training volumes.

    Compares the record the method was loaded with (``method.preprocessing``, set by
    :func:`medssl.train.checkpoint.load_method` and by ``fit``) with the volume's own
    ``meta["preprocess_config"]``; does nothing when either is unknown (a method built in
    memory, volumes made by hand).

    Raises:
        PreprocessingMismatchError: names the case, the method and every differing setting.
    """
    recorded = config_from_record(getattr(method, "preprocessing", None))
    cfg = (getattr(volume, "meta", None) or {}).get("preprocess_config")
    if recorded is None or not isinstance(cfg, Mapping):
        return
    try:
        theirs = PreprocessConfig(**cfg)
    except (TypeError, ValueError):
        return  # a foreign or older layout of the volume's record: nothing reliable to compare
    diffs = _differences(recorded, theirs, TRANSFORM_FIELDS)
    if diffs:
        name = getattr(method, "registry_name", type(method).__name__)
        raise PreprocessingMismatchError(
            f"case {getattr(volume, 'case_id', '?')} ({getattr(volume, 'source', None) or 'in memory'}) for {name}",
            diffs, "volume",
            "Open the data with the checkpoint's preprocessing: open_data(source, preprocess="
            "medssl.train.preprocessing.config_from_record(method.preprocessing)).",
        )
