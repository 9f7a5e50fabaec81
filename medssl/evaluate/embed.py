"""Frozen embeddings: the backbone in eval mode, under no-grad, BatchNorm statistics untouched.

Every evaluation protocol reads embeddings from :func:`embed_patches`. It switches the
model to eval mode (so BatchNorm uses, and never updates, its running statistics,
and dropout is off), runs batches under ``torch.no_grad()``, and afterwards restores
the train/eval flag of *every* submodule exactly as it was. The authors' probe code
let BatchNorm statistics drift while the "frozen" backbone was probed; this module is the one place that prevents it.

:class:`EmbeddingCache` stores embeddings as ``.npy`` keyed by the model's weights
(sha256 of the checkpoint file, or of the state_dict for untrained models) and the
patch set, so an evaluation re-run does not recompute them.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medssl._files import atomic_save_npy, file_sha256
from medssl.data.volume import Volume
from medssl.evaluate.patchsets import PatchSet

__all__ = ["embed_patches", "frozen", "EmbeddingCache", "model_fingerprint", "file_sha256", "embed_methods"]


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode + no-grad for the duration; every submodule's train/eval flag is restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        for m, was_training in modes:
            m.training = was_training


def _module_device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _forward(module: nn.Module):
    # A Method embeds through `embed`; a bare backbone through its forward.
    return module.embed if hasattr(module, "embed") and callable(module.embed) else module


def embed_patches(
    model: nn.Module,
    patches: np.ndarray | torch.Tensor | PatchSet,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    progress: bool = True,
    volumes: Sequence[Volume] | None = None,
) -> np.ndarray:
    """Embed patches with a frozen model.

    Args:
        model: a ``Method`` (uses ``method.embed``) or a backbone ``nn.Module`` (uses forward).
        patches: ``(N, C, *S)`` float array/tensor (any sequence with slicing and ``shape``), or
            a :class:`PatchSet` (its :meth:`PatchSet.inputs_for` the model).
        volumes: the volumes of a PatchSet's cases, needed when the model's input differs from
            the stored patches (another size, or its own ``cut_inputs``).
        batch_size: patches per forward pass.
        device: ``"auto"`` = where the model's parameters already are; otherwise the model
            is moved there for the call and moved back afterwards.
        progress: show a tqdm bar.

    Returns:
        ``(N, D)`` float32 numpy array.
    """
    x = patches.inputs_for(model, volumes) if isinstance(patches, PatchSet) else patches
    if x.ndim < 3:
        raise ValueError(f"patches must be (N, C, *S), got shape {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    home = _module_device(model)
    target = home if str(device) == "auto" else torch.device(device)
    if target != home:
        model.to(target)
    out = []
    try:
        with frozen(model):
            fn = _forward(model)
            starts = range(0, len(x), batch_size)
            for s in tqdm(starts, desc="embedding", disable=not progress, leave=False):
                chunk = x[s : s + batch_size]
                xb = chunk if torch.is_tensor(chunk) else torch.as_tensor(np.asarray(chunk))
                z = fn(xb.to(device=target, dtype=torch.float32))  # (b, D)
                if z.ndim != 2:
                    raise ValueError(f"the model returned shape {tuple(z.shape)}; expected (B, D) embeddings")
                out.append(z.detach().float().cpu().numpy())
    finally:
        if target != home:
            model.to(home)
    if not out:
        raise ValueError("no patches to embed")
    return np.concatenate(out).astype(np.float32, copy=False)


def embed_methods(
    models: Mapping[str, nn.Module],
    patch_set: PatchSet,
    cache: "EmbeddingCache | None" = None,
    checkpoints: Mapping[str, str | os.PathLike | None] | None = None,
    settings: Mapping[str, Any] | None = None,
    **embed_kw: Any,
) -> dict[str, np.ndarray]:
    """:func:`embed_patches` for every model in ``models``, through ``cache`` when given.

    ``checkpoints`` maps a name to its checkpoint file (cache key = file hash); names
    without one are keyed by their state_dict. Returns ``{name: (N, D) float32}``.
    """
    out = {}
    for name, model in models.items():
        if cache is None:
            out[name] = embed_patches(model, patch_set, **embed_kw)
        else:
            ckpt = (checkpoints or {}).get(name)
            out[name] = cache.embed(model, patch_set, checkpoint=ckpt, settings=settings, **embed_kw)
    return out


def model_fingerprint(model: nn.Module, checkpoint: str | os.PathLike | None = None) -> str:
    """sha256 of the checkpoint file when given, else of the class name and every state_dict tensor."""
    if checkpoint is not None:
        return "file-" + file_sha256(checkpoint)
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        a = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{a.dtype}|{tuple(t.shape)}".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return "state-" + h.hexdigest()


class EmbeddingCache:
    """``.npy`` embeddings under ``root`` (e.g. ``runs/<run>/eval/embeddings``), keyed by weights + inputs.

    The key hashes the model fingerprint (:func:`model_fingerprint`), the patch set's
    content hash, name and seed, and any extra ``settings``. Writes are atomic; reads use
    ``allow_pickle=False``.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def key(self, fingerprint: str, patch_set: PatchSet, settings: Mapping[str, Any] | None = None,
            input_spec: Any = None) -> str:
        spec = {
            "model": fingerprint,
            "input": input_spec,
            "patch_set": patch_set.content_sha256,
            "patch_set_name": patch_set.meta.get("name", ""),
            "seed": int(patch_set.seed),
            "settings": dict(settings or {}),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def embed(
        self,
        model: nn.Module,
        patch_set: PatchSet,
        checkpoint: str | os.PathLike | None = None,
        settings: Mapping[str, Any] | None = None,
        **embed_kw: Any,
    ) -> np.ndarray:
        """Cached :func:`embed_patches` of ``patch_set``; computes and stores on a miss."""
        input_spec = [list(getattr(model, "input_size_vox", ())), type(model).__qualname__]
        path = self.path(self.key(model_fingerprint(model, checkpoint), patch_set, settings, input_spec))
        if path.exists():
            emb = np.load(path, allow_pickle=False)
            if emb.shape[0] == len(patch_set):
                return emb
        emb = embed_patches(model, patch_set, **embed_kw)
        self._save(path, emb)
        return emb

    def _save(self, path: Path, emb: np.ndarray) -> None:
        atomic_save_npy(path, emb)
