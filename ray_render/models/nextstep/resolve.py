"""Turn a model (or VAE) name into a local snapshot directory.

    "tiny"                    the checkpoint embedded in the package (ray_render/models/tiny/)
    a directory               used in place
    "owner/name"              a Hugging Face repo id, read from the local hub cache (HF_HUB_CACHE); downloaded
                              only when not cached and the hub is not offline (HF_HUB_OFFLINE=1)
    "s3://bucket/prefix" ...  any fsspec URL: copied once per node into a local cache shared by every process
                              (a file lock serialises the copy, an atomic rename publishes it)

This module imports neither torch nor transformers, so processes that only fetch stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# What a snapshot needs from a hub repo (skips remote-code .py files, READMEs and images).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "vae/*"]
COMPLETE_MARKER = ".ray-render-complete.json"


class ResolveError(ValueError):
    """The name does not lead to a usable local directory; the message says what was tried."""


@dataclass(frozen=True)
class Resolved:
    path: Path
    source: str  # "tiny", "local", "hub", "url"
    revision: str | None = None  # hub commit, when known


def tiny_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "tiny"


def model_cache_dir() -> Path:
    """Where fsspec URLs are copied: $RAY_RENDER_MODEL_CACHE, else ~/.cache/ray-render/models."""
    root = os.environ.get("RAY_RENDER_MODEL_CACHE") or Path.home() / ".cache" / "ray-render" / "models"
    return Path(root)


def resolve(name: str, *, revision: str | None = None, storage_options: dict | None = None,
            download: bool = True) -> Resolved:
    """Local directory for `name` (see the module docstring). `download=False` finds only what is already on this
    machine (the hub cache, no URL copy): for describing a model without fetching its weights."""
    if name == "tiny":
        return Resolved(tiny_dir(), "tiny")
    if name.startswith("file://"):
        name = name[len("file://"):]
    elif "://" in name:
        if not download:
            raise ResolveError(f"{name}: an fsspec URL, and fetching it was not allowed here")
        return Resolved(fetch_url(name, storage_options or {}), "url")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ResolveError(f"{path}: a model must be a snapshot directory, not a file")
        return Resolved(path.resolve(), "local")
    if HUB_ID.match(name):
        path, commit = hub_snapshot(name, revision, download=download)
        return Resolved(path, "hub", commit)
    raise ResolveError(f"model {name!r}: no such directory, and not a Hugging Face repo id (owner/name) or an "
                       "fsspec URL (s3://..., gs://...)")


# Hugging Face hub cache --------------------------------------------------------------------------------------

def _hub_cache() -> str | None:
    # huggingface_hub reads its environment at import; read it at call time so a changed HF_HUB_CACHE counts.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, revision: str | None = None, download: bool = True) -> tuple[Path, str]:
    """(snapshot directory, commit) of a hub repo: the local cache first, the network only if allowed (not with
    `download=False`)."""
    from huggingface_hub import snapshot_download

    cache = _hub_cache()
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True,
                                 allow_patterns=HUB_PATTERNS)
    except Exception as cached_error:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
        if _hub_offline() or not download:
            where = cache or "the default hub cache"
            raise ResolveError(f"{repo_id}{'@' + revision if revision else ''}: no such local directory; as a "
                               f"Hugging Face repo id it is not in {where} and "
                               f"{'HF_HUB_OFFLINE is set' if download else 'downloading was not allowed here'} "
                               f"({type(cached_error).__name__}: {cached_error})") from None
        try:
            path = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=HUB_PATTERNS)
        except Exception as e:  # noqa: BLE001
            raise ResolveError(f"{repo_id}: no such local directory; as a Hugging Face repo id it is not in the "
                               "local hub cache and the download failed "
                               f"({type(e).__name__}: {e})") from None
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ResolveError(f"{path}: the cached snapshot of {repo_id} has no config.json")
    return path, path.name


# fsspec URLs -------------------------------------------------------------------------------------------------

def remote_listing(fs, root: str) -> dict[str, int]:
    """Relative path -> size of every file under `root` that a copy of the URL holds (hidden ones are left out)."""
    found = fs.find(root, detail=True)
    listing = {}
    for full, info in found.items():
        if info.get("type", "file") != "file":
            continue
        rel = full[len(root):].lstrip("/") if full.startswith(root) else os.path.basename(full)
        if rel and not rel.startswith(".") and "/." not in rel:
            listing[rel] = int(info.get("size") or 0)
    return listing


def fetch_url(url: str, storage_options: dict, cache_root: Path | None = None) -> Path:
    """Copy the files under `url` to this node's cache once and return the local directory.

    The copy's name is a hash of the URL and of the remote listing (names and sizes), so a changed remote
    snapshot gets a fresh copy. Concurrent processes take a file lock; the first copies into a temporary
    directory and renames it into place, the others wait and reuse it. When the remote cannot be listed
    (offline), the newest complete copy of the URL is used.
    """
    import fsspec
    from filelock import FileLock

    cache_root = Path(cache_root or model_cache_dir())
    cache_root.mkdir(parents=True, exist_ok=True)
    url = url.rstrip("/")
    url_key = hashlib.sha256(url.encode()).hexdigest()[:12]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[:64] or "model"
    try:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        listing = remote_listing(fs, root)
    except Exception as e:  # noqa: BLE001 - any storage error: fall back to a cached copy
        copies = sorted(cache_root.glob(f"{base}-{url_key}-*/{COMPLETE_MARKER}"), key=lambda p: p.stat().st_mtime)
        if copies:
            return copies[-1].parent
        raise ResolveError(f"{url}: cannot list the snapshot ({type(e).__name__}: {e}) and no cached copy") \
            from None
    if not listing:
        raise ResolveError(f"{url}: no files under this URL")
    listing_key = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:8]
    dest = cache_root / f"{base}-{url_key}-{listing_key}"
    if (dest / COMPLETE_MARKER).is_file():
        return dest
    with FileLock(str(dest) + ".lock"):
        if (dest / COMPLETE_MARKER).is_file():  # another process finished while we waited
            return dest
        for stale in cache_root.glob(f".{dest.name}.tmp-*"):  # left by a killed process; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = cache_root / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        logger.info("copying %s (%d files) to %s", url, len(listing), dest)
        try:
            for rel in sorted(listing):
                local = tmp / rel
                local.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root}/{rel}", str(local))
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"url": url, "files": listing}, indent=1))
            if dest.exists():  # an incomplete copy from an older layout; replace it
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


# The VAE -----------------------------------------------------------------------------------------------------

def resolve_vae(vae: str | None, snapshot: Path, config_vae_path: str | None, *, revision: str | None = None,
                storage_options: dict | None = None, download: bool = True) -> Path:
    """Directory holding the VAE's config.json + checkpoint.pt.

    `vae` (the caller's override) is resolved like a model name; otherwise config.json's vae_name_or_path is
    taken relative to the snapshot directory (absolute paths, repo ids and URLs as they are). Released configs
    often name a path on the machine that trained them: when vae_name_or_path leads nowhere, the snapshot's own
    `vae/` is used, as the official loaders fall back to it.
    """
    if vae is not None:
        base = resolve(vae, revision=None, storage_options=storage_options, download=download).path
        what = f"vae {vae!r}"
    else:
        name = config_vae_path or "vae"
        what = f"config.json's vae_name_or_path {name!r}"
        candidate = snapshot / name
        own = snapshot / "vae"
        if candidate.exists():
            base = candidate
        elif "://" in name or (HUB_ID.match(name.rstrip("/")) and not Path(name).exists()):
            try:
                base = resolve(name.rstrip("/"), storage_options=storage_options, download=download).path
            except ResolveError as e:
                if not _holds_vae(own):
                    raise
                logger.warning("%s cannot be resolved (%s); using the snapshot's own %s", what, e, own)
                base = own
        elif _holds_vae(own):
            logger.warning("%s does not exist; using the snapshot's own %s", what, own)
            base = own
        else:
            raise ResolveError(f"{candidate}: missing; {what} (relative to the snapshot {snapshot}) should be a "
                               "directory with config.json and checkpoint.pt")
    for directory in (base, base / "vae"):
        if (directory / "config.json").is_file() and (directory / "checkpoint.pt").is_file():
            return directory
    for directory in (base, base / "vae"):
        if (directory / "config.json").is_file() or (directory / "checkpoint.pt").is_file():
            return directory  # half a VAE: the reader names the missing file
    raise ResolveError(f"{base}: {what} has no config.json + checkpoint.pt (looked in {base} and {base / 'vae'})")


def _holds_vae(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "checkpoint.pt").is_file()
