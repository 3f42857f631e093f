"""The names under an output root: the one place that says where a job's files go.

    images/<shard>/<attempt>/<row id>_<index>.<ext>   the images, under the attempt that rendered them
    metadata/<shard>.parquet                          the committed attempt's metadata, published at its commit
    _attempts/<shard>/<attempt>.parquet               each attempt's metadata as its actor wrote it
    _log/<seq>.json                                   the commit log: lease acquisitions, commits, releases
    _lease/<run id>.json                              the lease holder's heartbeat
    _journal/<shard>/<attempt>.json                   which rows an attempt is rendering (advisory)
    _manifests/<stem>-<hash>.parquet                  text (or renamed) manifests staged as Parquet
    _job.json                                         resolved settings, plan identity, model revision
    _summary.json                                     the final counts
    contact_sheet.png, report.html                    the job report

The root is a local path or any fsspec URL. Every name that becomes part of a key is checked with
`check_safe_name`, so no key can climb out of its directory. Clean-up and --overwrite delete only these names
(OWN_DIRECTORIES, OWN_FILES, and under images/ and metadata/ only names of the shard and attempt patterns).
"""

from __future__ import annotations

import numbers
import re

from ray_render import storage

IMAGES_DIR = "images"
METADATA_DIR = "metadata"
ATTEMPTS_DIR = "_attempts"
LOG_DIR = "_log"
LEASE_DIR = "_lease"
JOURNAL_DIR = "_journal"
OLD_COMMITS_DIR = "_commits"  # the commit markers of outputs written before the commit log
MANIFESTS_DIR = "_manifests"  # staged manifests, named by content: not cleared by --overwrite, which runs after staging
JOB_RECORD = "_job.json"
SUMMARY = "_summary.json"
CONTACT_SHEET = "contact_sheet.png"
REPORT_HTML = "report.html"
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}  # image format -> file extension

LAYOUT_VERSION = 2  # in the job record: 2 is attempt-scoped files and the commit log

# Directories that hold nothing but ray-render's files (the log and the lease are never deleted: see output/log.py),
# and the files a job writes at the top of its root.
OWN_DIRECTORIES = (ATTEMPTS_DIR, JOURNAL_DIR, OLD_COMMITS_DIR)
OWN_FILES = (JOB_RECORD, SUMMARY, CONTACT_SHEET, REPORT_HTML)

# Shard ids (engine/plan.py: "<file index>-<stem>-<row start>", a refresh prefixes "g<generation>-") and attempt ids
# ("<run id>-<n>"): the only names clean-up deletes under images/ and metadata/.
SHARD_ID_RE = re.compile(r"(g\d{4}-)?\d{5}-[A-Za-z0-9_-]{1,40}-\d{10}")
ATTEMPT_ID_RE = re.compile(r"[0-9a-f]{12}-\d+")

# The same rule as a manifest row id: a name that cannot climb out of its directory or hide itself.
_SAFE_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_safe_name(name: str, what: str = "name") -> str:
    """Return `name` if it is safe as one path segment of an object key, else raise ValueError."""
    if not isinstance(name, str) or not _SAFE_NAME_RE.fullmatch(name):
        raise ValueError(f"unsafe {what} for an output key: {name!r}")
    return name


def image_key(shard_id: str, attempt_id: str, row_id: str, image_index: int, fmt: str) -> str:
    """The image's key relative to the output root: images/<shard>/<attempt>/<row id>_<image index>.<ext>."""
    check_safe_name(shard_id, "shard id")
    check_safe_name(attempt_id, "attempt id")
    check_safe_name(row_id, "row id")
    if isinstance(image_index, bool) or not isinstance(image_index, numbers.Integral) or image_index < 0:
        raise ValueError(f"image index must be a whole number >= 0, got {image_index!r}")
    if fmt not in EXTENSIONS:
        raise ValueError(f"image format must be one of {', '.join(EXTENSIONS)}, got {fmt!r}")
    return f"{IMAGES_DIR}/{shard_id}/{attempt_id}/{row_id}_{image_index}.{EXTENSIONS[fmt]}"


def image_url(root: str, shard_id: str, attempt_id: str, row_id: str, image_index: int, fmt: str) -> str:
    return storage.join(root, image_key(shard_id, attempt_id, row_id, image_index, fmt))


def row_image_url(root: str, shard_id: str, row: dict) -> str:
    """Where a metadata row's image is under `root`: its key taken from `image_uri` (the part from images/<shard>/
    on), so a root copied elsewhere (s3 -> local disk) still finds its images."""
    marker = f"/{IMAGES_DIR}/{check_safe_name(shard_id, 'shard id')}/"
    uri = row["image_uri"] or ""
    if marker not in uri:
        raise ValueError(f"image_uri {uri!r} of row {row.get('id')!r} is not under {IMAGES_DIR}/{shard_id}/")
    attempt_id, name = uri.rsplit(marker, 1)[1].split("/", 1)
    return storage.join(root, IMAGES_DIR, shard_id, check_safe_name(attempt_id, "attempt id"),
                        check_safe_name(name, "image name"))


def shard_images_url(root: str, shard_id: str) -> str:
    return storage.join(root, IMAGES_DIR, check_safe_name(shard_id, "shard id"))


def attempt_images_url(root: str, shard_id: str, attempt_id: str) -> str:
    return storage.join(shard_images_url(root, shard_id), check_safe_name(attempt_id, "attempt id"))


def attempt_metadata_url(root: str, shard_id: str, attempt_id: str) -> str:
    return storage.join(root, ATTEMPTS_DIR, check_safe_name(shard_id, "shard id"),
                        f"{check_safe_name(attempt_id, 'attempt id')}.parquet")


def metadata_url(root: str, shard_id: str) -> str:
    return storage.join(root, METADATA_DIR, f"{check_safe_name(shard_id, 'shard id')}.parquet")


def log_entry_url(root: str, seq: int) -> str:
    return storage.join(root, LOG_DIR, f"{seq:012d}.json")


def heartbeat_url(root: str, run_id: str) -> str:
    return storage.join(root, LEASE_DIR, f"{check_safe_name(run_id, 'run id')}.json")


def journal_url(root: str, shard_id: str, attempt_id: str) -> str:
    return storage.join(root, JOURNAL_DIR, check_safe_name(shard_id, "shard id"),
                        f"{check_safe_name(attempt_id, 'attempt id')}.json")


def is_temp_name(name: str) -> bool:
    """A temp file of a local write in progress (storage.write_bytes): hidden, ends in .tmp."""
    return name.startswith(".") and name.endswith(".tmp")
