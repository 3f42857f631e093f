"""The names under an output root: the one place that says where a job's files go.

    images/<shard_id>/<row id>_<image index>.<ext>   the images
    metadata/<shard_id>.parquet                      one row per image, and one per row that produced none
    _commits/<shard_id>.json                         written last: the shard is done
    _journal/<shard_id>.json                         which rows a shard's attempt is rendering (advisory)
    _manifests/<stem>-<hash>.parquet                 text (or renamed) manifests staged as Parquet
    _job.json                                        resolved settings, plan fingerprint, model revision
    _summary.json                                    the final counts
    contact_sheet.png, report.html                   the job report

The root is a local path or any fsspec URL. Every name that becomes part of a key is checked with
`check_safe_name`, so no key can climb out of its directory.
"""

from __future__ import annotations

import numbers
import re

from ray_render import storage

IMAGES_DIR = "images"
METADATA_DIR = "metadata"
COMMITS_DIR = "_commits"
JOURNAL_DIR = "_journal"
MANIFESTS_DIR = "_manifests"  # staged manifests, named by content: not cleared by --overwrite, which runs after staging
JOB_RECORD = "_job.json"
SUMMARY = "_summary.json"
CONTACT_SHEET = "contact_sheet.png"
REPORT_HTML = "report.html"
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # image format -> file extension

# Directories and files a job writes under its root, in the order --overwrite removes them: markers first, so an
# interrupted clear never leaves a half-deleted shard that still counts as committed.
OWN_DIRECTORIES = (COMMITS_DIR, METADATA_DIR, IMAGES_DIR, JOURNAL_DIR)
OWN_FILES = (JOB_RECORD, SUMMARY, CONTACT_SHEET, REPORT_HTML)

# The same rule as a manifest row id: a name that cannot climb out of its directory or hide itself.
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_safe_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as one path segment of an object key, else raise ValueError."""
    if not isinstance(name, str) or not _SAFE_NAME_RE.fullmatch(name):
        raise ValueError(f"unsafe {what} for an output key: {name!r}")
    return name


def image_key(shard_id: str, row_id: str, image_index: int, fmt: str) -> str:
    """The image's key relative to the output root: images/<shard_id>/<row id>_<image index>.<ext>."""
    check_safe_name(shard_id, "shard id")
    check_safe_name(row_id, "row id")
    if isinstance(image_index, bool) or not isinstance(image_index, numbers.Integral) or image_index < 0:
        raise ValueError(f"image index must be a whole number >= 0, got {image_index!r}")
    if fmt not in EXTENSIONS:
        raise ValueError(f"image format must be one of {', '.join(EXTENSIONS)}, got {fmt!r}")
    return f"{IMAGES_DIR}/{shard_id}/{row_id}_{image_index}.{EXTENSIONS[fmt]}"


def image_url(root: str, shard_id: str, row_id: str, image_index: int, fmt: str) -> str:
    return storage.join(root, image_key(shard_id, row_id, image_index, fmt))


def row_image_url(root: str, shard_id: str, row: dict) -> str:
    """Where a metadata row's image is under `root`. Resolved from the root rather than read from `image_uri`, so a
    root copied elsewhere (s3 -> local disk) still finds its images."""
    return image_url(root, shard_id, row["id"], row["image_index"], row["format"])


def image_dir_url(root: str, shard_id: str) -> str:
    return storage.join(root, IMAGES_DIR, check_safe_name(shard_id, "shard id"))


def metadata_url(root: str, shard_id: str) -> str:
    return storage.join(root, METADATA_DIR, f"{check_safe_name(shard_id, 'shard id')}.parquet")


def commit_url(root: str, shard_id: str) -> str:
    return storage.join(root, COMMITS_DIR, f"{check_safe_name(shard_id, 'shard id')}.json")


def journal_url(root: str, shard_id: str) -> str:
    return storage.join(root, JOURNAL_DIR, f"{check_safe_name(shard_id, 'shard id')}.json")


def is_temp_name(name: str) -> bool:
    """A temp file of a local write in progress (storage.write_bytes): hidden, ends in .tmp."""
    return name.startswith(".") and name.endswith(".tmp")
