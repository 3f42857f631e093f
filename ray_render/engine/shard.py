"""ShardRenderer: one shard attempt, from the manifest's rows to the commit, around one resident model.

    prepare        read and validate the shard's rows, fetch input images, let the model check each request
    render_batches render compatible requests together; encode and store images meanwhile
    build_rows     one metadata row per image, and one per row that produced none, in manifest order
    finish         write the attempt's metadata Parquet; the driver commits the attempt (output/commits.py)

An attempt writes only under its own names (images/<shard>/<attempt>/, _attempts/<shard>/<attempt>.parquet), so two
copies of a shard never touch each other's files. The render actor (engine/actor.py) runs all four steps for each
shard; the benchmark baselines (tools/baselines.py) reuse them without the actor's safety nets, so a comparison
measures orchestration, not different work.

An actor runs two attempts at once (engine/actor.py): they take the model in turns, one shard's batches at a time,
so that one attempt's prepare, or its last uploads and its metadata, run while the other's batches render: the
model does not wait for a shard's reads and writes. The turn goes to the attempt that is ready for it first, not
always the older one (the pool's deadlines allow for that). An attempt's journal names rows only while it has the
model, so a death in one attempt's model call is never blamed on the other's rows.

Inside `render_batches`, a batch that raises is split in halves until the request that raised is alone; that one is
tried `--retries` more times and then ends failed with its error; an out-of-memory halves the batch size for good.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import quality, repairs
from ray_render.engine.inputs import InputFetcher, InputRefused
from ray_render.engine.journal import ShardJournal
from ray_render.engine.plan import Shard
from ray_render.engine.rows import InvalidRow, RowTask, read_shard_rows, validate_rows
from ray_render.models.base import (
    ImageModel,
    ModelOutOfMemory,
    RenderRequest,
    RowError,
    check_edit_tags,
    input_image_tag,
    max_batch,
)
from ray_render.output import commits, images
from ray_render.output.schema import empty_counts, metadata_table

log = logging.getLogger("ray_render")

MAX_PENDING_IMAGES = 256  # rendered images waiting for encode/upload; bounds the actor's memory
TURN_CHECK_S = 0.1  # how often an attempt waiting for the model asks whether it was cancelled


class ShardCancelled(Exception):
    """The driver cancelled this copy of the shard (another copy finished first): stop without committing."""


@dataclass
class ShardResult:
    """What the driver learns about a finished shard: counts and timings, never rows or images."""

    shard_id: str
    attempt: int  # the driver's count of this shard's attempts
    attempt_id: str  # the names this attempt wrote under (unique per call, copies included)
    rows: int  # input rows in the shard's metadata as this attempt wrote it (a repair's: the whole shard's)
    counts: dict = field(default_factory=empty_counts)  # those rows by final status
    images: int = 0  # images in that metadata
    rendered: dict = field(default_factory=empty_counts)  # the rows this attempt rendered, by status
    rendered_images: int = 0  # images this attempt wrote
    failed_rows: list = field(default_factory=list)  # source rows that ended failed: what a repair renders again
    base: str = ""  # a repair: the attempt it built on (engine/repairs.py)
    render_ms: float = 0.0  # model time
    wall_ms: float = 0.0
    worker: str = ""
    model: dict = field(default_factory=dict)  # ModelInfo as a dict
    batch_size: int = 0  # the renderer's batch size when it finished (smaller after an out-of-memory)
    started_at: float = 0.0  # epoch seconds: when this attempt began reading its rows
    finished_at: float = 0.0  # epoch seconds: when it committed
    waited_ms: float = 0.0  # time spent waiting for the model while the actor's other call had it (in wall_ms)
    rendering_from: float = 0.0  # epoch seconds: when it took the model (the report's timeline) ...
    rendering_until: float = 0.0  # ... and passed it on


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
    attempt_id: str
    checked: list  # RowTask | InvalidRow per manifest row, in order
    items: list[_Item] = field(default_factory=list)
    row_errors: dict[int, str] = field(default_factory=dict)  # position -> why the row fails without rendering
    edits: list[int] = field(default_factory=list)  # positions of edit rows: fetched and checked a batch at a time
    poisoned: set[int] = field(default_factory=set)  # rows given up on for killing actors: never repaired
    base_id: str = ""  # a repair: the attempt it builds on (engine/repairs.py) ...
    base: pa.Table | None = None  # ... its metadata
    only: dict | None = None  # ... and source row -> the image indices to render again (None: all of them)
    journal: ShardJournal | None = None
    pending: deque = field(default_factory=deque)  # image stores not yet waited for
    render_ms: float = 0.0
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)  # epoch seconds, for the commit's entry
    waited_ms: float = 0.0  # for the model's turn
    rendering_from: float = 0.0  # epoch seconds: the turn, for the commit's timeline entry
    rendering_until: float = 0.0


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
    None stores inline). `input_roots`: where edit rows' input images may come from besides the job's own
    --input-roots (the driver passes the manifests' directories; engine/inputs.py). `journal`:
    write the shard journal that isolates rows killing the process (engine/journal.py). `cancelled`: polled between
    batches; True stops the attempt without committing.
    """

    def __init__(self, model: ImageModel, job: JobConfig, schema: pa.Schema, worker: str, *,
                 input_roots: list[str] = (), uploads: ThreadPoolExecutor | None = None, journal: bool = True,
                 metrics=None, cancelled: Callable[[], bool] = lambda: False) -> None:
        self.model = model
        self.job = job
        self.root = job.out
        self.so = job.storage_options
        self.schema = schema
        self.worker = worker
        self.batch_size = job.batch_size
        self._uploads = uploads if uploads is not None else _Inline()
        self._inputs = InputFetcher([*input_roots, *job.input_roots], self.so, max_bytes=job.max_input_bytes,
                                    timeout_s=job.input_timeout_s)
        self._use_journal = journal
        self._metrics = metrics
        self._cancelled = cancelled
        self._model_turn = threading.Lock()  # held by the attempt whose batches render (see the module docstring)

    def warm_up(self) -> None:
        """Pay now, before the actor says it is ready, what its first shard would pay while its device waits: the
        first metadata table imports pandas (pyarrow converts Python rows through it: 0.4 s of CPU, seconds when
        every actor of a node starts at once), the first Parquet write and image encode load their codecs.
        Stores nothing."""
        commits.encode_metadata(metadata_table([], self.schema))
        images.encode_image(np.zeros((8, 8, 3), dtype=np.uint8), self.job.format, self.job.quality)

    def render_shard(self, shard: Shard, attempt: int, attempt_id: str, inherit: tuple[str, bool] | None = None,
                     base: str | None = None) -> ShardResult:
        """Render every row of `shard` as attempt `attempt_id` and write its metadata; returns the counts.
        `inherit`: the previous attempt of the shard and whether its death is blamed on its rows (journal.py).
        `base`: this is a repair of that attempt: only its failed images are rendered, and the metadata written is
        the base's with those rows replaced (engine/repairs.py)."""
        work = self.prepare(shard, attempt_id, inherit=inherit, base=base)
        self.render_batches(work)
        meta, counts, stored = self.build_rows(work)
        return self.finish(work, meta, counts, stored, attempt)

    # -- 1. prepare ----------------------------------------------------------------------------------------------

    def prepare(self, shard: Shard, attempt_id: str, rows: list[dict] | None = None,
                inherit: tuple[str, bool] | None = None, base: str | None = None) -> ShardWork:
        """Read (unless `rows` are given) and validate the shard's rows; turn valid rows into checked requests.
        Edit rows are only checked against the model's edit rules here: their input images are fetched, and their
        requests checked, a batch at a time while rendering (render_batches)."""
        if rows is None:
            rows = read_shard_rows(shard, self.so)
        work = ShardWork(shard, attempt_id,
                         validate_rows(rows, shard, model_defaults=self.model.defaults(), job=self.job))
        del rows
        if base is not None:
            work.base_id, work.base = base, commits.read_attempt_metadata(self.root, shard.shard_id, base, self.so)
            work.only = repairs.failed_images(work.base)
        if self._use_journal:  # a row that killed earlier attempts' actors is not rendered again
            work.journal = ShardJournal(self.root, shard.shard_id, attempt_id, self.job.retries, self.so, inherit)
        tag = input_image_tag(self.model)
        for position, task in enumerate(work.checked):
            if isinstance(task, InvalidRow):
                continue
            poison = work.journal.given_up(task.id) if work.journal else None
            if poison:
                work.row_errors[position] = poison
                work.poisoned.add(task.row_index)
                continue
            try:
                if task.input_image:
                    check_edit_tags(task.requests(b"")[0], tag)  # the tag rules need no image: fetch nothing yet
                    work.edits.append(position)
                    continue
                requests = [self.model.check(request) for request in task.requests()]
            except RowError as exc:  # the settings alone decided it: the row keeps its fingerprint
                work.checked[position] = _invalid(task, "", str(exc), fingerprint=task.fingerprint)
                continue
            work.items += _wanted(work, position, requests)
        return work

    def _fetch_and_check(self, work: ShardWork, positions: list[int]) -> list[_Item]:
        """Fetch the input images of these edit rows (concurrently, from the allowed roots, capped and timed) and
        check their requests; a row whose fetch or check fails ends `invalid` or `failed` alone."""
        tasks = {position: work.checked[position] for position in positions}
        if work.journal is not None:  # a death while reading an input is that row's, as one inside the model
            work.journal.rendering(sorted(task.id for task in tasks.values()))
        fetched = self._inputs.fetch_many([task.input_image for task in tasks.values()])
        items = []
        for position, task in tasks.items():
            data = fetched[task.input_image]
            if isinstance(data, InputRefused):
                work.checked[position] = _invalid(task, "input_image", str(data))
                continue
            if isinstance(data, Exception):
                work.row_errors[position] = self._redact(f"input_image {data}")
                continue
            try:
                requests = [self.model.check(request) for request in task.requests(data)]
            except RowError as exc:
                work.checked[position] = _invalid(task, "", str(exc))
                continue
            items += _wanted(work, position, requests)
        return items

    # -- 2. render batches ---------------------------------------------------------------------------------------

    def render_batches(self, work: ShardWork) -> None:
        """Render the requests in batches of compatible ones (the model's batch key), the edit rows a batch of
        inputs at a time, holding the model's turn; images are stored meanwhile, and the last of them after the turn
        passed to the actor's other attempt.

        Returns once every image is stored, or raises: ShardCancelled when cancelled, a storage error when a store
        failed for good (the driver retries the shard; nothing is committed)."""
        try:
            with self._turn(work):
                for batch in self._batches(work, work.items):
                    self._render_batch(batch, work)
                for start in range(0, len(work.edits), self.batch_size):
                    self._stop_if_cancelled(work)
                    items = self._fetch_and_check(work, work.edits[start:start + self.batch_size])
                    work.items += items
                    for batch in self._batches(work, items):
                        self._render_batch(batch, work)
                self._done_rendering(work)  # before the turn passes: a death in the next attempt's call is not ours
            for future in work.pending:
                future.result()  # storage errors fail the shard: the driver retries it, nothing is committed
        finally:
            for future in work.pending:
                future.cancel()
            wait(work.pending)  # an upload already running ends before the call does: a returned call writes nothing
            if work.journal is not None:
                work.journal.close()
        self._stop_if_cancelled(work)

    @contextlib.contextmanager
    def _turn(self, work: ShardWork) -> Iterator[None]:
        """Hold the model for this attempt's batches; a copy cancelled while it waits stops waiting."""
        waiting = time.monotonic()
        while not self._model_turn.acquire(timeout=TURN_CHECK_S):
            self._stop_if_cancelled(work)
        work.waited_ms, work.rendering_from = (time.monotonic() - waiting) * 1000.0, time.time()
        try:
            yield
        finally:
            work.rendering_until = time.time()
            self._model_turn.release()

    def _batches(self, work: ShardWork, items: list[_Item]) -> list[list[_Item]]:
        """Items in batches of one batch key and at most _batch_limit; then each suspect alone, fewest deaths first,
        so that a death names one row and an innocent suspect's success comes before a poison row's crash."""
        groups: dict = {}
        suspects = []
        for item in items:
            if work.journal and work.checked[item.row].id in work.journal.suspects:
                suspects.append(item)
            else:
                groups.setdefault(self.model.batch_key(item.request), []).append(item)
        batches = []
        for group in groups.values():
            size = self._batch_limit(group[0].request)
            batches += [group[start:start + size] for start in range(0, len(group), size)]
        suspects.sort(key=lambda item: work.journal.deaths.get(work.checked[item.row].id, 0))
        return batches + [[item] for item in suspects]

    def _batch_limit(self, request: RenderRequest) -> int:
        """Requests per call for this shape: the job's batch size (smaller after an out-of-memory), or fewer when
        the model's memory planner says only fewer fit; the job's batch size stays the cap."""
        return min(self.batch_size, max_batch(self.model, request) or self.batch_size)

    def _render_batch(self, batch: list[_Item], work: ShardWork) -> None:
        self._stop_if_cancelled(work)
        work.render_ms += self._render(batch, work)

    def _stop_if_cancelled(self, work: ShardWork) -> None:
        if self._cancelled():
            self._done_rendering(work)  # a clean stop, not a death: the next attempt blames no row
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
        if work.journal is not None:
            work.journal.call_returned()
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
        item.stored = self._uploads.submit(self._store, array, work.shard.shard_id, work.attempt_id, row_id,
                                           item.image_index)
        work.pending.append(item.stored)
        # Bound the images held in memory: wait for the oldest upload when the model runs ahead of storage.
        while len(work.pending) > MAX_PENDING_IMAGES:
            work.pending.popleft().result()

    def _store(self, array: np.ndarray, shard_id: str, attempt_id: str, row_id: str,
               image_index: int) -> tuple[str, str, int, int]:
        data = images.encode_image(array, self.job.format, self.job.quality)
        uri = images.write_image(self.root, shard_id, attempt_id, row_id, image_index, self.job.format, data, self.so)
        return uri, images.sha256_hex(data), int(array.shape[1]), int(array.shape[0])

    def _done_rendering(self, work: ShardWork) -> None:
        if work.journal is not None:
            work.journal.done_rendering()

    # -- 3. build rows -------------------------------------------------------------------------------------------

    def build_rows(self, work: ShardWork) -> tuple[list[dict], dict, int]:
        """(metadata rows in manifest order, input rows by status, images stored)."""
        meta: list[dict] = []
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
                failed = True
            else:
                failed = False
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
                        failed = True
            counts["failed" if failed else "ok"] += 1
        return meta, counts, stored

    # -- 4. finish ------------------------------------------------------------------------------------------------

    def finish(self, work: ShardWork, meta: list[dict], counts: dict, stored: int, attempt: int) -> ShardResult:
        """Write the attempt's metadata under its own name (a repair's: merged into its base's); return what the
        driver needs to commit it."""
        shard = work.shard
        table = metadata_table(meta, self.schema)
        failed = [row for row in repairs.failed_rows(table) if row not in work.poisoned]  # another death each
        totals, images, rows = counts, stored, len(work.checked)
        if work.base is not None:
            table = repairs.merge(work.base, table, work.only)
            totals, images, rows = repairs.row_counts(table)
        commits.write_attempt_metadata(self.root, shard.shard_id, work.attempt_id, table, self.so)
        result = ShardResult(shard_id=shard.shard_id, attempt=attempt, attempt_id=work.attempt_id, rows=rows,
                             counts=totals, images=images, rendered=counts, rendered_images=stored,
                             failed_rows=list(failed), base=work.base_id,
                             render_ms=work.render_ms,
                             wall_ms=(time.monotonic() - work.started) * 1000.0, worker=self.worker,
                             model=asdict(self.model.info), batch_size=self.batch_size,
                             started_at=work.started_at, finished_at=time.time(), waited_ms=work.waited_ms,
                             rendering_from=work.rendering_from, rendering_until=work.rendering_until)
        if self._metrics is not None:
            self._metrics.shard_done(counts)
        return result

    # -- helpers -------------------------------------------------------------------------------------------------

    def _redact(self, text: str) -> str:
        return storage.redact(text, self.so)

    def _count_error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.error(kind)


def _wanted(work: ShardWork, position: int, requests: list[RenderRequest]) -> list[_Item]:
    """The items to render of a row's requests: all of them, or in a repair only the images that failed."""
    only = None if work.only is None else work.only.get(work.checked[position].row_index)
    return [_Item(position, k, request) for k, request in enumerate(requests) if only is None or k in only]


def _invalid(task: RowTask, column: str, message: str, fingerprint: str | None = None) -> InvalidRow:
    where = f"manifest {task.source_file} row {task.row_index} (id {task.id!r})"
    return InvalidRow(row_index=task.row_index, id=task.id, column=column,
                      error=f"{where}: {column + ': ' if column else ''}{message}", passthrough=task.passthrough,
                      source_file=task.source_file, prompt=task.prompt, fingerprint=fingerprint)
