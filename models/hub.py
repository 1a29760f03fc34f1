"""Loading Hugging Face checkpoints offline-safely: shared by the segmenter and the experts.

A checkpoint is a hub id or a local directory. Only safetensors weights load (pickle is
refused). Offline settings are read at call time (huggingface_hub reads them at import),
so a missing checkpoint fails at once with a message that says what to do. Without
HF_HUB_OFFLINE, a short TCP probe of the hub (or the proxy) decides: no network means offline
now, instead of ~40 s of retries before the same error.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlparse

from storage.sources import is_local, url_fs

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
REMOTE_CACHE = "geofeat-remote-checkpoints"  # under the temp dir: local copies of remote checkpoints
PROBE_TIMEOUT = 1.5  # s to open a TCP connection to the hub before calling it offline
PROBE_TTL = 60.0  # s a probe's answer is reused (a long-lived worker sees the network come back)
# The field (and flag) that names each kind of checkpoint, for the messages.
SEGMENTER_FIELD = "segmenter.checkpoint (geofeat build/segment --segmenter-checkpoint)"
EXPERT_FIELD = "spec.checkpoint of train-experts (geofeat train --experts-checkpoint)"
_probes: dict[tuple[str, int], tuple[float, bool]] = {}


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


def hub_address() -> tuple[str, int]:
    """(host, port) a hub download connects to first: the HTTPS proxy if one is set, else HF_ENDPOINT."""
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)),
                 None)
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}" if proxy else endpoint)
    return url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)


def hub_reachable() -> bool:
    """Can a TCP connection to the hub (or proxy) be opened within PROBE_TIMEOUT? Name resolution
    included (it has no timeout of its own, hence the thread). Answers are reused for PROBE_TTL."""
    address = hub_address()
    now = time.monotonic()
    cached = _probes.get(address)
    if cached and now - cached[0] < PROBE_TTL:
        return cached[1]
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=PROBE_TIMEOUT).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(PROBE_TIMEOUT + 0.25)
    reachable = bool(result and result[0])
    _probes[address] = (now, reachable)
    return reachable


def in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """Is the checkpoint's config.json in the local HF cache (for this revision)?"""
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json", cache_dir=hub_cache_dir(), revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id or cache: not cached
        return False
    return isinstance(found, str)


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
    # No HF_HUB_OFFLINE but no network either: offline now (the cache still serves what it holds).
    hub: dict[str, Any] = {"local_files_only": hub_offline() or (not local and not hub_reachable())}
    if revision:
        hub["revision"] = revision
    if not local and hub_cache_dir():
        hub["cache_dir"] = hub_cache_dir()
    return (expanded if local else checkpoint), local, hub


def check_checkpoint(checkpoint: str, field: str, error: type[Exception], revision: str | None = None) -> None:
    """Fail now (in well under 2 s) when a checkpoint cannot load: a missing or pickle-only local
    directory, or a hub id that is not cached while the hub cannot be reached. Nothing is downloaded
    (remote URLs are checked when they are copied)."""
    if "://" in checkpoint and not is_local(checkpoint):
        return
    path, local, hub = resolve_checkpoint(checkpoint, field, error, revision)
    if not local and hub["local_files_only"] and not in_hub_cache(checkpoint, revision):
        raise error(load_error(checkpoint, local, hub, FileNotFoundError("not in the local cache"), "", field))


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
    if hub_offline():
        why = "HF_HUB_OFFLINE=1"
    elif hub.get("local_files_only"):
        why = "no network: %s:%d did not answer within %.1f s" % (*hub_address(), PROBE_TIMEOUT)
    else:
        why = "no network"
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
