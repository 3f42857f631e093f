"""fsspec helpers: open any URL, write atomically, retry transient errors, keep credentials out of messages.

Every other module reaches storage through these functions, so a local path, `s3://`, `gs://` or any other fsspec
URL behaves the same, and a flaky object store costs a retry instead of a shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

T = TypeVar("T")

# Object stores and network filesystems report overload and blips with these; anything else is the caller's fault
# (missing key, no permission, bad name) and retrying it only delays the error.
TRANSIENT_ERRNOS = {
    errno.EAGAIN, errno.EBUSY, errno.EINTR, errno.EIO, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED,
    errno.ECONNABORTED, errno.EPIPE, errno.ENETDOWN, errno.ENETUNREACH, errno.EHOSTUNREACH,
    getattr(errno, "EREMOTEIO", errno.EIO),
}
TRANSIENT_HTTP_STATUS = {429, 500, 502, 503, 504}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "InternalError",
                   "ServiceUnavailable", "TooManyRequests", "RequestLimitExceeded"}
NON_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)
# Errors from these libraries are network or protocol failures (connection reset, read timeout, closed connection).
TRANSIENT_LIBRARY_ERRORS = ("botocore.exceptions.HTTPClientError", "botocore.exceptions.ConnectionError",
                            "botocore.exceptions.IncompleteReadError", "aiohttp.client_exceptions.ClientError",
                            "urllib3.exceptions.HTTPError", "requests.exceptions.ConnectionError",
                            "requests.exceptions.Timeout")


# What the helpers below use; module-level so a test or a job can make retries faster or more patient.
RETRY_ATTEMPTS = 6
RETRY_BASE_DELAY = 0.2  # seconds; doubles per attempt, with jitter: 0.1-0.2, 0.2-0.4, ... about 6 s in all


class FilesystemMissing(ImportError):
    """A URL whose fsspec implementation is not installed (gs:// without gcsfs, ...): the message names the extra."""


class StorageError(OSError):
    """A storage operation still failed after its retries; the message names the URL, never the credentials."""


# The package extra that brings the fsspec implementation of a protocol (pyproject.toml).
EXTRAS = {"gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure", "adl": "azure"}

_fs_cache: dict[tuple[str, str], fsspec.AbstractFileSystem] = {}
_fs_cache_lock = threading.Lock()


def _options_key(storage_options: dict | None) -> str:
    # Hash rather than keep the options as text: the cache key then holds no credentials.
    text = json.dumps(storage_options or {}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def open_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for a local path or fsspec URL; one filesystem per protocol+options."""
    if "::" in url:  # chained URLs ("simplecache::s3://...") configure each link: leave them to fsspec
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocol = fsspec.utils.get_protocol(url)
    key = (protocol, _options_key(storage_options))
    with _fs_cache_lock:
        fs = _fs_cache.get(key)
    if fs is None:
        try:
            fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except ImportError as exc:
            extra = EXTRAS.get(protocol)
            if extra is None:
                raise
            raise FilesystemMissing(f"{url}: {exc}; install it with: pip install 'ray-render[{extra}]'") from None
        with _fs_cache_lock:
            _fs_cache.setdefault(key, fs)
        return fs, path
    return fs, fs._strip_protocol(url)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def normalize_url(url: str) -> str:
    """A local path made absolute (`~` expanded); URLs unchanged. Ray workers run in other directories than the
    driver, so an output root or manifest path must be absolute before it is sent to them."""
    if "://" in url or "::" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def join(root: str, *parts: str) -> str:
    """Join parts onto a local path or URL with "/", keeping the scheme: join("s3://b/x", "a/b") == "s3://b/x/a/b"."""
    pieces = [root.rstrip("/") if root.rstrip("/") else root]
    pieces += [part.strip("/") for part in parts if part.strip("/")]
    return "/".join(pieces)


def _exception_chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen and len(seen) < 8:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _qualified_names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}" for cls in type(exc).__mro__}


def is_transient(exc: BaseException) -> bool:
    """True if retrying the operation may succeed: throttling, server errors, timeouts, dropped connections."""
    for err in _exception_chain(exc):
        if isinstance(err, NON_TRANSIENT):
            return False
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        response = getattr(err, "response", None)  # botocore ClientError
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            if status in TRANSIENT_HTTP_STATUS or code in TRANSIENT_CODES:
                return True
        for attribute in ("status", "code", "status_code"):  # aiohttp, gcsfs HttpError, requests
            status = getattr(err, attribute, None)
            if isinstance(status, int) and 400 <= status <= 599:  # an HTTP answer: its status decides
                return status in TRANSIENT_HTTP_STATUS
        if _qualified_names(err) & set(TRANSIENT_LIBRARY_ERRORS):
            return True
        if "SlowDown" in str(err) or "Please reduce your request rate" in str(err):
            return True
        if isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS:
            return True
    return False


def with_retries(fn: Callable[[], T], *, attempts: int | None = None, base_delay: float | None = None,
                 what: str = "", storage_options: dict | None = None) -> T:
    """Call `fn()`; on a transient error wait (exponential backoff with jitter) and call again.

    Non-transient errors (missing file, no permission, ...) are raised at once, unchanged. When the attempts are
    spent, raises StorageError naming `what` (say "write s3://bucket/key"); the last error is its cause.
    Defaults: RETRY_ATTEMPTS attempts, RETRY_BASE_DELAY seconds before the first retry. `storage_options` only
    serves to blank their values out of the message.
    """
    attempts = RETRY_ATTEMPTS if attempts is None else max(1, attempts)
    delay = RETRY_BASE_DELAY if base_delay is None else base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified just below
            if not is_transient(exc):
                raise
            if attempt == attempts:
                message = f"{what or 'storage operation'} failed after {attempts} attempts: {type(exc).__name__}: {exc}"
                raise StorageError(redact(message, storage_options)) from exc
            # Full jitter keeps many actors that hit the same throttled prefix from retrying in lockstep.
            time.sleep(random.uniform(0.5, 1.0) * min(delay, 30.0))
            delay *= 2
    raise AssertionError("unreachable")


def _write_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    # A temp file in the same directory, then a rename: readers see the old file or the whole new one, never half.
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# Local directories this process made or found: a render writes many files into one directory, and a makedirs
# for each costs a stat of every parent. Forgotten when large; a directory removed since is made again on demand.
_made_dirs: set[str] = set()
MADE_DIRS_LIMIT = 10_000


def _write_local_private(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    if directory not in _made_dirs:
        os.makedirs(directory, exist_ok=True)
        if len(_made_dirs) >= MADE_DIRS_LIMIT:
            _made_dirs.clear()
        _made_dirs.add(directory)
    try:
        handle = open(path, "wb")
    except FileNotFoundError:  # the directory went away since (a cleanup): make it again
        _made_dirs.discard(directory)
        os.makedirs(directory, exist_ok=True)
        handle = open(path, "wb")
    with handle:
        handle.write(data)


def write_bytes(url: str, data: bytes, storage_options: dict | None = None, *, private: bool = False) -> None:
    """Write `data` to `url` atomically: local files via temp file + rename, object stores with one PUT.

    `private`: no reader opens `url` before this call has returned (an attempt's images, found only through metadata
    written after them), so a local file is written in place: a half-written one is never read, and the temp file
    and rename are saved (a fifth of a render actor's CPU per row at small images)."""
    fs, path = open_fs(url, storage_options)

    def write() -> None:
        if is_local(fs):
            (_write_local_private if private else _write_local)(path, data)
        else:
            fs.pipe_file(path, data)

    with_retries(write, what=f"write {url}", storage_options=storage_options)


def create_bytes(url: str, data: bytes, storage_options: dict | None = None) -> bool:
    """Create `url` with `data` only if nothing is there yet, atomically; returns False when it already exists.

    Local files: a temp file hard-linked into place (link() fails if the name exists, and a reader never sees half a
    file). Object stores: one conditional PUT (S3 `If-None-Match: *`, through fsspec's `mode="create"`). A create
    whose answer was lost and is retried finds its own object: equal content counts as created.
    """
    fs, path = open_fs(url, storage_options)

    def create() -> bool:
        try:
            if is_local(fs):
                _create_local(path, data)
            else:
                fs.pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False

    created = with_retries(create, what=f"create {url}", storage_options=storage_options)
    if not created:
        try:
            return read_bytes(url, storage_options) == data
        except FileNotFoundError:  # deleted in between: the caller decides again
            return False
    return True


def _create_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.link(tmp, path)  # FileExistsError if another writer got there first
    finally:
        os.unlink(tmp)


def copy(source: str, target: str, storage_options: dict | None = None) -> None:
    """Copy one object to another name on the same storage: a server-side copy on object stores, an atomic local
    write (temp file + rename) on local disk."""
    fs, source_path = open_fs(source, storage_options)
    _, target_path = open_fs(target, storage_options)

    def run() -> None:
        if is_local(fs):
            with open(source_path, "rb") as handle:
                _write_local(target_path, handle.read())
        else:
            fs.copy(source_path, target_path)

    with_retries(run, what=f"copy {source} to {target}", storage_options=storage_options)


def identity(url: str, storage_options: dict | None = None) -> dict:
    """What tells this object's content apart cheaply: its size and, where the store has one, its ETag (S3), md5
    or crc32c (GCS); empty for local files, whose callers hash the content."""
    fs, path = open_fs(url, storage_options)

    def info() -> dict:
        fs.invalidate_cache(path)
        return fs.info(path)

    found = with_retries(info, what=f"stat {url}", storage_options=storage_options)
    result = {"size": found.get("size")}
    if not is_local(fs):
        for key in ("ETag", "etag", "md5Hash", "crc32c", "checksum"):
            if found.get(key):
                result["etag"] = str(found[key]).strip('"')
                break
    return result
def upload_file(local_path: str, url: str, storage_options: dict | None = None) -> None:
    """Copy a local file to `url` so that readers see nothing or all of it: a rename on local storage, one
    (multipart) upload on an object store. For files too big to hold in memory for `write_bytes`."""
    fs, path = open_fs(url, storage_options)

    def upload() -> None:
        if is_local(fs):
            directory = os.path.dirname(path) or "."
            os.makedirs(directory, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
            os.close(fd)
            try:
                with open(local_path, "rb") as source, open(tmp, "wb") as target:
                    while chunk := source.read(1 << 22):
                        target.write(chunk)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        else:
            fs.put_file(local_path, path)

    with_retries(upload, what=f"write {url}", storage_options=storage_options)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    """The whole content of `url`; FileNotFoundError if it does not exist."""
    fs, path = open_fs(url, storage_options)
    return with_retries(lambda: fs.cat_file(path), what=f"read {url}", storage_options=storage_options)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = open_fs(url, storage_options)

    def check() -> bool:
        # Listing caches (s3fs) would hide objects that other processes wrote since the last listing.
        fs.invalidate_cache(path)
        return fs.exists(path)

    return with_retries(check, what=f"check {url}", storage_options=storage_options)


def list_names(prefix_url: str, storage_options: dict | None = None) -> list[str]:
    """Sorted base names of the entries directly under a "directory" URL; [] if it does not exist."""
    fs, path = open_fs(prefix_url, storage_options)

    def listing() -> list[str]:
        fs.invalidate_cache(path)
        try:
            entries = fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = path.rstrip("/")
        return sorted({entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.rstrip("/") != base})

    return with_retries(listing, what=f"list {prefix_url}", storage_options=storage_options)


def delete(url: str, storage_options: dict | None = None) -> None:
    """Delete one file; a missing file is not an error (deletes are retried and may have succeeded already)."""
    fs, path = open_fs(url, storage_options)

    def remove() -> None:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass

    with_retries(remove, what=f"delete {url}", storage_options=storage_options)


def delete_tree(url: str, storage_options: dict | None = None) -> None:
    """Delete a "directory" and everything below it; a missing one is not an error. On local disk a symbolic link is
    removed as a link, never followed: nothing outside the tree is touched."""
    fs, path = open_fs(url, storage_options)

    def remove() -> None:
        if is_local(fs):
            _delete_local_tree(path)
            return
        fs.invalidate_cache(path)
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache(path)

    with_retries(remove, what=f"delete {url}", storage_options=storage_options)


def _delete_local_tree(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
        return
    if not os.path.isdir(path):
        return
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                _delete_local_tree(entry.path)
            else:
                os.unlink(entry.path)
    os.rmdir(path)


def remove_empty_dir(url: str, storage_options: dict | None = None) -> None:
    """Remove a local directory if it is empty (object stores have no empty directories)."""
    fs, path = open_fs(url, storage_options)
    if is_local(fs):
        try:
            os.rmdir(path)
        except OSError:  # not empty, or not there
            pass


def is_link(url: str, storage_options: dict | None = None) -> bool:
    """True for a local symbolic link (object stores have none)."""
    fs, path = open_fs(url, storage_options)
    return is_local(fs) and os.path.islink(path)


def redact(text: str, storage_options: dict | None) -> str:
    """`text` with every credential-like value from `storage_options` (nested too) replaced by "***"."""
    secrets: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                collect(item)
        elif isinstance(value, str) and len(value) >= 4:
            # Short strings ("s3", "us") would blank out ordinary words; real secrets are longer.
            secrets.append(value)

    collect(storage_options or {})
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
