"""Loading Hugging Face checkpoints offline-safely: shared by the segmenter and the experts.

A checkpoint is a hub id or a local directory. Only safetensors weights load (pickle is
refused). Offline settings are read at call time (huggingface_hub reads them at import),
so a missing checkpoint fails at once with a message that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from typing import Any

from storage.sources import is_local, url_fs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
REMOTE_CACHE = "geofeat-remote-checkpoints"  # under the temp dir: local copies of remote checkpoints


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at import."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode())
    except Exception:  # noqa: BLE001 - older hub: no helper
        return False


def hub_cache_dir() -> str | None:
    """The hub cache from the environment at call time (HF_HUB_CACHE, else HF_HOME/hub); None = library default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def mirror_checkpoint(url: str, field: str, error: type[Exception]) -> str:
    """A local copy of the checkpoint directory at a remote URL (s3://, gs://, ...): from_pretrained
    reads local directories only. Cached per URL and content (every file's name, size and ETag or
    mtime): an unchanged checkpoint is fetched once, a changed one again. Fetched into a temp
    folder and renamed, so a killed download never passes for a checkpoint."""
    fs, path = url_fs(url)
    path = path.rstrip("/")
    try:
        files = {p: i for p, i in fs.find(path, detail=True).items() if i.get("type") != "directory"}
    except OSError as exc:
        raise error(f"could not list checkpoint '{url}' ({type(exc).__name__}: {exc}); check {field}, "
                    "the endpoint and the credentials (docs/object-storage.md)") from exc
    if not files:
        raise error(f"checkpoint '{url}' does not exist (no files under it); set {field} to a folder "
                    "holding config.json + model.safetensors")
    rels = {p: posixpath.relpath(p, path) for p in files}
    stamp = sorted((rels[p], i.get("size"), str(i.get("ETag") or i.get("mtime") or i.get("LastModified")))
                   for p, i in files.items())
    key = hashlib.sha256(json.dumps([url, stamp]).encode()).hexdigest()[:20]
    local = os.path.join(tempfile.gettempdir(), REMOTE_CACHE, key)
    if os.path.isdir(local):
        return local
    tmp = f"{local}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        fs.get(list(files), [os.path.join(tmp, *rels[p].split("/")) for p in files])
        os.rename(tmp, local)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isdir(local):  # else another process finished the same copy first
            raise
    return local


def resolve_checkpoint(checkpoint: str, field: str, error: type[Exception],
                       revision: str | None = None) -> tuple[str, bool, dict[str, Any]]:
    """(path to pass to from_pretrained, is it a local dir, hub kwargs); raises `error` early for
    a path that does not exist or a local directory without safetensors weights. A URL
    (s3://bucket/checkpoints/x/best) is copied to a local cache first."""
    expanded = os.path.expanduser(checkpoint)
    if "://" in checkpoint:
        expanded = url_fs(checkpoint)[1] if is_local(checkpoint) else mirror_checkpoint(checkpoint, field, error)
    local = os.path.isdir(expanded)
    if not local and (not HUB_REPO_ID.fullmatch(checkpoint) or checkpoint.startswith((".", "~", "/"))):
        raise error(f"checkpoint directory '{checkpoint}' does not exist (it is not a local directory, nor a hub id). "
                    f"Set {field} to a directory holding config.json + model.safetensors "
                    "(e.g. from `hf download ORG/NAME --local-dir DIR`) or to a hub id")
    if local:
        names = set(os.listdir(expanded))
        if not ({"model.safetensors", "model.safetensors.index.json"} & names):
            pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
            if pickles:
                raise error(f"checkpoint '{checkpoint}' has no safetensors weights, only {pickles}: pickle checkpoints "
                            "are refused. Convert it on a trusted machine (load it and `save_pretrained` again: "
                            "transformers 5 writes model.safetensors) or download a revision with model.safetensors")
            raise error(f"local directory '{checkpoint}' holds no model.safetensors (found: {sorted(names)[:10]}); "
                        "expected config.json + model.safetensors (+ preprocessor_config.json), e.g. from "
                        f"`hf download ORG/NAME --local-dir DIR`, then set {field} to DIR")
    hub: dict[str, Any] = {"local_files_only": hub_offline()}
    if revision:
        hub["revision"] = revision
    if not local and hub_cache_dir():
        hub["cache_dir"] = hub_cache_dir()
    return (expanded if local else checkpoint), local, hub


def load_error(checkpoint: str, local: bool, hub: dict[str, Any], exc: BaseException, what: str, field: str) -> str:
    """A from_pretrained failure, said as what to do about it."""
    detail = f"{type(exc).__name__}: {exc}".strip()
    if len(detail) > 600:
        detail = detail[:600] + "..."
    msg = str(exc)
    if ("safetensors" in msg and "does not appear to have" in msg) or "no file named model.safetensors" in msg:
        return (f"checkpoint '{checkpoint}' has no safetensors weights; pickle checkpoints (pytorch_model.bin) "
                "are refused. Convert it on a trusted machine (load it and `save_pretrained` again) or use a "
                f"revision with model.safetensors. ({detail})")
    if local:
        return (f"could not load the {what} checkpoint in local directory '{checkpoint}': expected "
                f"config.json + model.safetensors (+ preprocessor_config.json). ({detail})")
    why = "HF_HUB_OFFLINE=1" if hub.get("local_files_only") else "HF_HUB_OFFLINE=1 / no network"
    return (f"checkpoint '{checkpoint}' is not in the local Hugging Face cache and the hub cannot be reached "
            f"({why}). Download it on a machine with network (`hf download {checkpoint} --local-dir DIR`) "
            f"and set {field} to DIR. ({detail})")


def processor_mean_std(processor: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for x/255 inputs from an image processor config (HF: (x * rescale_factor - mean) / std)."""
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get("do_rescale", True) else 1.0
    if processor.get("do_normalize", True):
        mean = tuple(float(v) for v in processor.get("image_mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in processor.get("image_std", IMAGENET_STD))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if len(mean) == 1:
        mean = mean * 3
    if len(std) == 1:
        std = std * 3
    k = 1.0 / (255.0 * rescale)  # (x/255 - m') / s' == (x * r - m) / s  with  m' = m * k, s' = s * k
    return tuple(m * k for m in mean), tuple(s * k for s in std)
