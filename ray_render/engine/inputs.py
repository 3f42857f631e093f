"""Fetching the input images that edit rows name: untrusted URIs from a manifest, so only from allowed places, with
a byte cap and a deadline each.

A manifest's `input_image` could name anything the job's credentials reach: a cloud metadata endpoint, another
tenant's bucket, /etc/hostname, a FIFO that never answers. So:

- only URIs under the allowed roots are read: by default the directories of the job's own manifests, plus
  `--input-roots` (local paths are compared after resolving symbolic links, so a link cannot point out);
- a local input must be a regular file; no input may be larger than `--max-input-bytes`;
- a fetch that takes longer than `--input-timeout` fails its row.

A refusal (outside the roots, not a regular file, too large, missing) makes the row `invalid` with a message that
says why and how to allow it; a fetch that fails or times out makes the row `failed`. Neither touches another row.
"""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from ray_render import storage

DEFAULT_MAX_BYTES = 64 << 20  # 64 MiB: a 8192x8192 PNG fits; a video or a disk image does not
DEFAULT_TIMEOUT_S = 60.0


class InputRefused(Exception):
    """The row names an input it may not use (the row ends `invalid`)."""


class InputFailed(Exception):
    """The input could not be read in time (the row ends `failed`)."""


def _normalized(url: str) -> str:
    if "://" in url or "::" in url:
        return url
    return os.path.realpath(os.path.expanduser(url))


class InputFetcher:
    """Reads input images for one actor; `fetch` is safe to call from several threads."""

    def __init__(self, roots: list[str], storage_options: dict | None = None, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.roots = sorted({_normalized(root).rstrip("/") + "/" for root in roots if root})
        self.so = storage_options
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        # Its own threads: a read that hangs (a dead NFS server, a FIFO) holds one of them, never an upload thread.
        self._threads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="input")

    def fetch_many(self, uris: list[str]) -> dict[str, bytes | Exception]:
        """Each URI's content, read concurrently, or the InputRefused / InputFailed that stopped it."""
        futures = {}
        for uri in dict.fromkeys(uris):
            target = _normalized(uri)
            if any(target.startswith(root) for root in self.roots):
                futures[uri] = self._threads.submit(self._read, target)
        deadline = time.monotonic() + self.timeout_s
        found: dict[str, bytes | Exception] = {}
        for uri in dict.fromkeys(uris):
            if uri not in futures:
                shown = ", ".join(self.roots) or "none"
                found[uri] = InputRefused(f"{uri!r} is outside the allowed input roots ({shown}); add its location "
                                          f"with --input-roots")
                continue
            try:
                found[uri] = futures[uri].result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                found[uri] = InputFailed(f"{uri!r}: no answer within {self.timeout_s:g} s (--input-timeout)")
            except (InputRefused, InputFailed) as exc:
                found[uri] = exc
        return found

    def _read(self, target: str) -> bytes:
        if "://" not in target and "::" not in target:
            return self._read_local(target)
        try:
            size = storage.identity(target, self.so).get("size")
        except FileNotFoundError:
            raise InputRefused(f"{target!r}: no such object") from None
        except Exception as exc:  # noqa: BLE001 - any storage failure fails the row, not the shard
            raise InputFailed(f"{target!r}: {storage.redact(f'{type(exc).__name__}: {exc}', self.so)}") from None
        self._check_size(target, size)
        try:
            return storage.read_bytes(target, self.so)
        except FileNotFoundError:
            raise InputRefused(f"{target!r}: no such object") from None
        except Exception as exc:  # noqa: BLE001
            raise InputFailed(f"{target!r}: {storage.redact(f'{type(exc).__name__}: {exc}', self.so)}") from None

    def _read_local(self, path: str) -> bytes:
        try:
            info = os.stat(path)
        except FileNotFoundError:
            raise InputRefused(f"{path!r}: no such file") from None
        except OSError as exc:
            raise InputFailed(f"{path!r}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(info.st_mode):
            raise InputRefused(f"{path!r} is not a regular file (a directory, device or FIFO is never read)")
        self._check_size(path, info.st_size)
        with open(path, "rb") as handle:
            data = handle.read(self.max_bytes + 1)
        self._check_size(path, len(data))  # it grew since the stat
        return data

    def _check_size(self, target: str, size: int | None) -> None:
        if size is not None and size > self.max_bytes:
            raise InputRefused(f"{target!r} is {size:,} bytes, more than --max-input-bytes {self.max_bytes:,}")
