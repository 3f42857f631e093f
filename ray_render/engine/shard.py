"""ShardRenderer: one shard attempt, from the manifest's rows to the commit, around one resident model.

    prepare        read and validate the shard's rows, fetch input images, let the model check each request
    render_batches render compatible requests together; encode and store images meanwhile
    build_rows     one metadata row per image, and one per row that produced none, in manifest order
    commit         write the metadata Parquet, then the commit marker (last: a crash before it commits nothing)

The render actor (engine/actor.py) runs all four for each shard; the benchmark baselines (tools/baselines.py) reuse
the same steps without the actor's safety nets, so a comparison measures orchestration, not different work.

Inside `render_batches`, a batch that raises is split in halves until the request that raised is alone; that one is
tried `--retries` more times and then ends failed with its error; an out-of-memory halves the batch size for good.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import quality
from ray_render.engine.journal import ShardJournal
from ray_render.engine.plan import Shard
from ray_render.engine.rows import InvalidRow, RowTask, read_shard_rows, validate_rows
from ray_render.models.base import ImageModel, ModelOutOfMemory, RenderRequest, RowError
from ray_render.output import commits, images, layout
from ray_render.output.schema import empty_counts, metadata_table

log = logging.getLogger("ray_render")

MAX_PENDING_IMAGES = 256  # rendered images waiting for encode/upload; bounds the actor's memory


class ShardCancelled(Exception):
    """The driver cancelled this copy of the shard (another copy finished first): stop without committing."""


@dataclass
class ShardResult:
    """What the driver learns about a finished shard: counts and timings, never rows or images."""

    shard_id: str
    attempt: int
    rows: int  # input rows in the shard
    counts: dict = field(default_factory=empty_counts)  # input rows by final status
    images: int = 0  # images written
    render_ms: float = 0.0  # model time
    wall_ms: float = 0.0
    worker: str = ""
    model: dict = field(default_factory=dict)  # ModelInfo as a dict
    batch_size: int = 0  # the renderer's batch size when it finished (smaller after an out-of-memory)
    started_at: float = 0.0  # epoch seconds: when this attempt began reading its rows (the report's timeline)
    finished_at: float = 0.0  # epoch seconds: when it committed


@dataclass
class _Item:
    """One request on its way through the model: which row and image it is, and how it went."""

    row: int  # position of its task in the shard's checked rows
    image_index: int
    request: RenderRequest
    calls: int = 0  # render calls that included it
    solo_failures: int = 0  # calls that raised with it alone in the batch
    render_ms: float | None = None
    error: str | None = None
    stored: Future | None = None  # -> (image_uri, sha256, width, height)
    seed: int | None = None  # the seed of the kept image (a --min-quality re-render uses another)
    scores: dict = field(default_factory=dict)  # quality columns of the kept image, when the job scores


@dataclass
class ShardWork:
    """A shard attempt between the steps: its rows as checked, the requests to render and how they went."""

    shard: Shard
    checked: list  # RowTask | InvalidRow per manifest row, in order
    items: list[_Item] = field(default_factory=list)
    row_errors: dict[int, str] = field(default_factory=dict)  # position -> why the row fails without rendering
    journal: ShardJournal | None = None
    pending: deque = field(default_factory=deque)  # image stores not yet waited for
    render_ms: float = 0.0
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)  # epoch seconds, for the commit's timeline entry


class _Inline:
    """An executor that runs each call at once: encode and store inline, as a plain map function does."""

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:  # noqa: BLE001 - delivered through the future, as a thread pool would
            future.set_exception(exc)
        return future

    def map(self, fn, items):
        return map(fn, items)


class ShardRenderer:
    """Renders shard attempts with one model; see the module docstring for the four steps.

    `uploads`: the executor that encodes and stores images (a thread pool overlaps them with the next batch;
    None stores inline). `journal`: write the shard journal that isolates rows killing the process (engine/
    journal.py). `cancelled`: polled between batches; True stops the attempt without committing.
    """

    def __init__(self, model: ImageModel, job: JobConfig, schema: pa.Schema, worker: str, *,
                 uploads: ThreadPoolExecutor | None = None, journal: bool = True, metrics=None,
                 cancelled: Callable[[], bool] = lambda: False) -> None:
        self.model = model
        self.job = job
        self.root = job.out
        self.so = job.storage_options
        self.schema = schema
        self.worker = worker
        self.batch_size = job.batch_size
        self._uploads = uploads if uploads is not None else _Inline()
        self._use_journal = journal
        self._metrics = metrics
        self._cancelled = cancelled

    def render_shard(self, shard: Shard, attempt: int = 1) -> ShardResult:
        """Render every row of `shard`, write its metadata Parquet, then commit it; returns the counts."""
        work = self.prepare(shard)
        self.render_batches(work)
        meta, counts, stored = self.build_rows(work)
        return self.commit(work, meta, counts, stored, attempt)

    # -- 1. prepare ----------------------------------------------------------------------------------------------

    def prepare(self, shard: Shard, rows: list[dict] | None = None) -> ShardWork:
        """Read (unless `rows` are given) and validate the shard's rows; turn valid rows into checked requests."""
        if rows is None:
            rows = read_shard_rows(shard, self.so)
        work = ShardWork(shard, validate_rows(rows, shard, model_defaults=self.model.defaults(), job=self.job))
        del rows
        if self._use_journal:  # a row that killed earlier attempts' actors is not rendered again
            work.journal = ShardJournal(self.root, shard.shard_id, self.job.retries, self.so)
        inputs = self._fetch_inputs(work.checked)
        for position, task in enumerate(work.checked):
            if isinstance(task, InvalidRow):
                continue
            poison = work.journal.given_up(task.id) if work.journal else None
            if poison:
                work.row_errors[position] = poison
                continue
            data = inputs.get(position)
            if isinstance(data, BaseException):
                if isinstance(data, FileNotFoundError):
                    work.checked[position] = _invalid(task, "input_image", f"no such file {task.input_image!r}")
                else:
                    work.row_errors[position] = self._redact(f"input_image {task.input_image!r}: "
                                                             f"{type(data).__name__}: {data}")
                continue
            try:
                requests = [self.model.check(request) for request in task.requests(data)]
            except RowError as exc:
                work.checked[position] = _invalid(task, "", str(exc))
                continue
            work.items += [_Item(position, k, request) for k, request in enumerate(requests)]
        return work

    def _fetch_inputs(self, checked: list) -> dict[int, bytes | BaseException]:
        """Input images of edit rows, fetched concurrently: position -> bytes, or the error that stopped it."""
        wanted = {position: task.input_image for position, task in enumerate(checked)
                  if isinstance(task, RowTask) and task.input_image}
        futures = {position: self._uploads.submit(storage.read_bytes, uri, self.so) for position, uri in wanted.items()}
        fetched: dict[int, bytes | BaseException] = {}
        for position, future in futures.items():
            try:
                fetched[position] = future.result()
            except Exception as exc:  # noqa: BLE001 - the row fails, not the shard
                fetched[position] = exc
        return fetched

    # -- 2. render batches ---------------------------------------------------------------------------------------

    def render_batches(self, work: ShardWork) -> None:
        """Render the requests in batches of compatible ones (the model's batch key); stores run meanwhile.

        Returns once every image is stored, or raises: ShardCancelled when cancelled, a storage error when a store
        failed for good (the driver retries the shard; nothing is committed)."""
        groups: dict = {}
        for item in work.items:
            key = self.model.batch_key(item.request)
            if work.journal and work.checked[item.row].id in work.journal.suspects:
                key = ("suspect", item.row, item.image_index)  # alone: a death now names exactly one row
            groups.setdefault(key, []).append(item)
        try:
            for group in groups.values():
                for start in range(0, len(group), self.batch_size):
                    if self._cancelled():
                        self._done_rendering(work)  # a clean stop, not a death: the next attempt blames no row
                        raise ShardCancelled(f"shard {work.shard.shard_id} cancelled")
                    work.render_ms += self._render(group[start:start + self.batch_size], work)
            for future in work.pending:
                future.result()  # storage errors fail the shard: the driver retries it, nothing is committed
            self._done_rendering(work)
        finally:
            for future in work.pending:
                future.cancel()
            wait(work.pending)  # an upload already running ends before the call does: a returned call writes nothing
        if self._cancelled():
            raise ShardCancelled(f"shard {work.shard.shard_id} cancelled")

    def _render(self, batch: list[_Item], work: ShardWork) -> float:
        """Render one batch and queue its images for storage; returns the model time (ms) spent on it."""
        if len(batch) > self.batch_size:  # cut before an out-of-memory shrank the batch size: cut it again
            size = self.batch_size
            return sum(self._render(batch[i:i + size], work) for i in range(0, len(batch), size))
        for item in batch:
            item.calls += 1
        row_ids = sorted({work.checked[item.row].id for item in batch})
        if work.journal is not None:  # durable before the call: if it kills the process, the journal names the rows
            work.journal.rendering(row_ids)
        started = time.monotonic()
        try:
            arrays = self._render_requests([item.request for item in batch])
            if len(arrays) != len(batch):
                raise RuntimeError(f"model returned {len(arrays)} images for {len(batch)} requests")
            error = None
        except Exception as exc:  # noqa: BLE001 - any model error: isolate the request that raised
            error = exc
        spent = (time.monotonic() - started) * 1000.0
        if work.journal is not None and work.journal.suspects.intersection(row_ids):
            # A suspect survived its call: a death from here on (uploading, the next read) must not count against it.
            work.journal.done_rendering()
        if error is None:
            if self._metrics is not None:
                self._metrics.render_call(spent)
            for item, array in zip(batch, arrays):
                item.render_ms = spent / len(batch)
                if isinstance(array, quality.Outcome):
                    item.seed, item.scores, array = array.request.seed, array.columns(), array.image
                self._queue_store(item, array, work)
            return spent

        out_of_memory = isinstance(error, ModelOutOfMemory)
        self._count_error("out_of_memory" if out_of_memory else "render")
        if len(batch) == 1:
            item = batch[0]
            item.solo_failures += 1
            if item.solo_failures <= self.job.retries:
                return spent + self._render(batch, work)
            item.error = self._redact(f"{type(error).__name__}: {error}"[:2000])
            log.warning("%s: %s failed after %d render calls: %s", self.worker, item.request.key, item.calls,
                        item.error)
            return spent
        size = (len(batch) + 1) // 2
        if out_of_memory:
            size = max(1, min(self.batch_size, len(batch)) // 2)
            if size < self.batch_size:
                log.warning("%s: out of memory with a batch of %d; batch size is now %d for this actor",
                            self.worker, len(batch), size)
                self.batch_size = size
        return spent + sum(self._render(batch[i:i + size], work) for i in range(0, len(batch), size))

    def _render_requests(self, requests: list[RenderRequest]) -> list:
        """One model call for the batch: images, or with quality scoring on, quality.Outcomes (image, the seed
        actually used, scores), where images below --min-quality were re-rendered together with new seeds."""
        if not self.job.scores_quality:
            return self.model.render(requests)
        return quality.render_until_passing(requests, self.model.render, self.job.min_quality,
                                            self.job.quality_retries if self.job.min_quality is not None else 0)

    def _queue_store(self, item: _Item, array: np.ndarray, work: ShardWork) -> None:
        row_id = work.checked[item.row].id
        item.stored = self._uploads.submit(self._store, array, work.shard.shard_id, row_id, item.image_index)
        work.pending.append(item.stored)
        # Bound the images held in memory: wait for the oldest upload when the model runs ahead of storage.
        while len(work.pending) > MAX_PENDING_IMAGES:
            work.pending.popleft().result()

    def _store(self, array: np.ndarray, shard_id: str, row_id: str, image_index: int) -> tuple[str, str, int, int]:
        data = images.encode_image(array, self.job.format, self.job.quality)
        uri = images.write_image(self.root, shard_id, row_id, image_index, self.job.format, data, self.so)
        return uri, images.sha256_hex(data), int(array.shape[1]), int(array.shape[0])

    def _done_rendering(self, work: ShardWork) -> None:
        if work.journal is not None:
            work.journal.done_rendering()

    # -- 3. build rows -------------------------------------------------------------------------------------------

    def build_rows(self, work: ShardWork) -> tuple[list[dict], dict, int]:
        """(metadata rows in manifest order, input rows by status, images stored). Also deletes images an earlier
        attempt of this shard stored for images that failed now: no image without an ok row."""
        meta: list[dict] = []
        stale: list[str] = []
        counts = empty_counts()
        stored = 0
        by_row: dict[int, list[_Item]] = {}
        for item in work.items:
            by_row.setdefault(item.row, []).append(item)
        common = {"model": self.model.info.name, "model_revision": self.model.info.revision, "worker": self.worker}
        for position, task in enumerate(work.checked):
            if isinstance(task, InvalidRow):
                meta.append(task.metadata_row(**common))
                counts["invalid"] += 1
                continue
            if position in work.row_errors:
                meta.append(task.failed_row(work.row_errors[position], 1, **common))
                failed_images = list(range(task.params["num_images"]))
            else:
                failed_images = []
                for item in by_row[position]:
                    if item.error is None:
                        uri, digest, width, height = item.stored.result()
                        meta.append(task.ok_row(item.image_index, image_uri=uri, sha256=digest, width=width,
                                                height=height, fmt=self.job.format, render_ms=item.render_ms,
                                                attempts=item.calls, seed=item.seed, **common))
                        meta[-1].update(item.scores)
                        stored += 1
                    else:
                        meta.append(task.failed_row(item.error, item.calls, image_index=item.image_index,
                                                    render_ms=item.render_ms, **common))
                        failed_images.append(item.image_index)
            counts["failed" if failed_images else "ok"] += 1
            stale += [layout.image_url(self.root, work.shard.shard_id, task.id, k, self.job.format)
                      for k in failed_images]
        for _ in self._uploads.map(lambda url: storage.delete(url, self.so), stale):
            pass
        return meta, counts, stored

    # -- 4. commit -----------------------------------------------------------------------------------------------

    def commit(self, work: ShardWork, meta: list[dict], counts: dict, stored: int, attempt: int) -> ShardResult:
        """Write the shard's metadata, then its commit marker (last); drop its journal; return what the driver
        learns."""
        shard = work.shard
        commits.remove_temp_files(self.root, shard.shard_id, self.so)  # half-written images of killed attempts
        commits.write_shard_metadata(self.root, shard.shard_id, metadata_table(meta, self.schema), self.so)
        result = ShardResult(shard_id=shard.shard_id, attempt=attempt, rows=len(work.checked), counts=counts,
                             images=stored, render_ms=work.render_ms,
                             wall_ms=(time.monotonic() - work.started) * 1000.0, worker=self.worker,
                             model=asdict(self.model.info), batch_size=self.batch_size,
                             started_at=work.started_at, finished_at=time.time())
        commits.commit_shard(self.root, shard.shard_id, {**asdict(result), "file": shard.file,
                                                         "row_start": shard.row_start, "row_stop": shard.row_stop},
                             self.so)
        if work.journal is not None:
            work.journal.delete()
        if self._metrics is not None:
            self._metrics.shard_done(counts)
        return result

    # -- helpers -------------------------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return storage.redact(text, self.so)

    def _count_error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.error(kind)


def _invalid(task: RowTask, column: str, message: str) -> InvalidRow:
    where = f"manifest {task.source_file} row {task.row_index} (id {task.id!r})"
    return InvalidRow(row_index=task.row_index, id=task.id, column=column,
                      error=f"{where}: {column + ': ' if column else ''}{message}", passthrough=task.passthrough,
                      source_file=task.source_file, prompt=task.prompt)
