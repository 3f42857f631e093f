"""RenderActor: holds one resident model and turns a shard descriptor into committed images and metadata.

A plain class; `pool.py` wraps it with `ray.remote`, and tests may call it directly. The actor reads its own rows,
so prompts and images never travel through the driver: it receives a `manifest.Shard` and returns a small
`ShardResult`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from ray_render import manifest, quality, storage, writer
from ray_render.journal import ShardJournal
from ray_render.config import JobConfig
from ray_render.manifest import InvalidRow, RowTask
from ray_render.models import ModelOutOfMemory, RenderRequest, RowError, load_model
from ray_render.progress import RenderMetrics, empty_counts

log = logging.getLogger("ray_render")

UPLOAD_THREADS = 8  # encode + upload run here while the model renders the next batch
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
    batch_size: int = 0  # the actor's batch size when it finished (smaller after an out-of-memory)


@dataclass
class _Item:
    """One request on its way through the model: which row and image it is, and how it went."""

    row: int  # position of its RowTask in the shard
    image_index: int
    request: RenderRequest
    calls: int = 0  # render calls that included it
    solo_failures: int = 0  # calls that raised with it alone in the batch
    render_ms: float | None = None
    error: str | None = None
    stored: Future | None = None  # -> (image_uri, sha256, width, height)
    seed: int | None = None  # the seed of the kept image (a --min-quality re-render uses another)
    scores: dict = field(default_factory=dict)  # quality columns of the kept image, when the job scores


def _worker_name(index: int) -> str:
    """hostname/node id prefix/actor index (+ GPU ids): enough to find the machine and device that rendered."""
    name = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            context = ray.get_runtime_context()
            name += f"/{context.get_node_id()[:8]}"
            gpus = context.get_accelerator_ids().get("GPU", [])
            if gpus:
                return f"{name}/actor{index}/gpu{','.join(str(g) for g in gpus)}"
    except Exception:  # noqa: BLE001 - the name is informational; never fail a job over it
        pass
    return f"{name}/actor{index}"


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001
        return False


class RenderActor:
    """One resident model on one device; `render_shard` does a whole shard from reading rows to the commit."""

    def __init__(self, job: JobConfig, index: int = 0, passthrough_schema: pa.Schema | None = None) -> None:
        """`passthrough_schema` is the plan's (all manifest files): every shard then writes the same columns."""
        self.job = job
        self.index = index
        self.root = job.out
        self.so = job.storage_options  # reaches the actor as a constructor argument, never through logs
        self.model = load_model(job.model, vae=job.vae, revision=job.revision, device=job.device, dtype=job.dtype,
                                noise=job.noise, storage_options=job.storage_options,
                                rope_precision=job.rope_precision, edit_input=job.edit_input)
        self.schema = writer.metadata_schema(passthrough_schema, quality_columns=job.scores_quality)
        self.batch_size = job.batch_size
        self.worker = _worker_name(index)
        self._in_ray = _in_ray_actor()
        self._metrics = RenderMetrics(job.model) if self._in_ray else None
        self._uploads = ThreadPoolExecutor(max_workers=UPLOAD_THREADS, thread_name_prefix="upload")
        self._journal: ShardJournal | None = None  # the shard in progress: which rows each model call renders

    def ping(self) -> str:
        return self.worker

    def info(self) -> dict:
        """The model's info plus this actor's worker name and current batch size."""
        return {**asdict(self.model.info), "worker": self.worker, "batch_size": self.batch_size}

    def defaults(self) -> dict:
        return self.model.defaults()

    def index_shard(self, shard: manifest.Shard) -> list[tuple]:
        """(row index, id, row fingerprint, error) of every row of `shard`, rendering nothing: what
        `ray-render refresh` compares with an output's metadata. The fingerprint is None for an invalid row, whose
        error says why; it resolves the row with this model's defaults, as render_shard does."""
        rows = manifest.read_shard_rows(shard, self.so)
        checked = manifest.validate_rows(rows, shard, model_defaults=self.model.defaults(), job=self.job)
        return [(item.row_index, item.id, item.fingerprint, None) if isinstance(item, RowTask)
                else (item.row_index, item.id, None, item.error) for item in checked]

    # -- one shard ---------------------------------------------------------------------------------------------

    def render_shard(self, shard: manifest.Shard, attempt: int = 1) -> ShardResult:
        """Render every row of `shard`, write its metadata Parquet, then commit it; returns the counts."""
        start = time.monotonic()
        info = asdict(self.model.info)

        # 1. Read and validate the shard's own rows
        rows = manifest.read_shard_rows(shard, self.so)
        checked = manifest.validate_rows(rows, shard, model_defaults=self.model.defaults(), job=self.job)
        del rows
        # A row that killed earlier attempts' actors is not rendered again; suspects are rendered alone.
        journal = self._journal = ShardJournal(self.root, shard.shard_id, self.job.retries, self.so)

        # 2. Expand valid rows into requests; fetch input images; let the model reject what it cannot render
        items: list[_Item] = []
        row_errors: dict[int, str] = {}  # position in `checked` -> why the row is failed without rendering
        inputs = self._fetch_inputs(checked)
        for position, task in enumerate(checked):
            if isinstance(task, InvalidRow):
                continue
            poison = journal.given_up(task.id)
            if poison:
                row_errors[position] = poison
                continue
            data = inputs.get(position)
            if isinstance(data, BaseException):
                if isinstance(data, FileNotFoundError):
                    checked[position] = self._invalid(task, "input_image", f"no such file {task.input_image!r}")
                else:
                    row_errors[position] = self._redact(f"input_image {task.input_image!r}: "
                                                        f"{type(data).__name__}: {data}")
                continue
            try:
                requests = [self.model.check(request) for request in task.requests(data)]
            except RowError as exc:
                checked[position] = self._invalid(task, "", str(exc))
                continue
            items += [_Item(position, k, request) for k, request in enumerate(requests)]

        # 3. Render batches of compatible requests; encode and upload in the background meanwhile
        groups: dict = {}
        for item in items:
            key = self.model.batch_key(item.request)
            if checked[item.row].id in journal.suspects:
                key = ("suspect", item.row, item.image_index)  # alone: a death now names exactly one row
            groups.setdefault(key, []).append(item)
        pending: deque[Future] = deque()
        render_ms = 0.0
        try:
            for group in groups.values():
                done = 0
                while done < len(group):
                    if self._cancelled():
                        journal.done_rendering()  # a clean stop, not a death: the next attempt blames no row
                        raise ShardCancelled(f"shard {shard.shard_id} cancelled")
                    batch = group[done:done + self.batch_size]
                    done += len(batch)
                    render_ms += self._render(batch, shard.shard_id, pending)
            for future in pending:
                future.result()  # storage errors fail the shard: the driver retries it, nothing is committed
            journal.done_rendering()
        finally:
            for future in pending:
                future.cancel()
            wait(pending)  # an upload already running ends before the call does: a returned call writes nothing more
        if self._cancelled():
            raise ShardCancelled(f"shard {shard.shard_id} cancelled")

        # 4. Metadata rows in manifest order: one per image, one per row that produced none
        meta = []
        stale: list[str] = []
        counts = empty_counts()
        images = 0
        by_row: dict[int, list[_Item]] = {}
        for item in items:
            by_row.setdefault(item.row, []).append(item)
        common = {"model": self.model.info.name, "model_revision": self.model.info.revision, "worker": self.worker}
        for position, task in enumerate(checked):
            if isinstance(task, InvalidRow):
                meta.append(writer.invalid_row(task, **common))
                counts["invalid"] += 1
                continue
            if position in row_errors:
                meta.append(writer.failed_row(task, row_errors[position], 1, **common))
                failed_images = range(task.params["num_images"])
            else:
                failed_images = []
                for item in by_row[position]:
                    if item.error is None:
                        uri, digest, width, height = item.stored.result()
                        meta.append(writer.ok_row(task, item.image_index, image_uri=uri, sha256=digest, width=width,
                                                  height=height, fmt=self.job.format, render_ms=item.render_ms,
                                                  attempts=item.calls, seed=item.seed, **common))
                        meta[-1].update(item.scores)
                        images += 1
                    else:
                        meta.append(writer.failed_row(task, item.error, item.calls, image_index=item.image_index,
                                                      render_ms=item.render_ms, **common))
                        failed_images.append(item.image_index)
            counts["failed" if failed_images else "ok"] += 1
            # An earlier attempt of this shard may have stored these images: no image without an ok row.
            stale += [writer.image_url(self.root, shard.shard_id, task.id, k, self.job.format) for k in failed_images]
        for _ in self._uploads.map(lambda url: storage.delete(url, self.so), stale):
            pass
        writer.remove_temp_files(self.root, shard.shard_id, self.so)  # half-written images of killed attempts

        # 5. Write the metadata, then commit: the marker is written last, so a crash before it leaves no commit
        table = writer.metadata_table(meta, self.schema)
        writer.write_shard_metadata(self.root, shard.shard_id, table, self.so)
        wall_ms = (time.monotonic() - start) * 1000.0
        result = ShardResult(shard_id=shard.shard_id, attempt=attempt, rows=len(checked), counts=counts,
                             images=images, render_ms=render_ms, wall_ms=wall_ms, worker=self.worker, model=info,
                             batch_size=self.batch_size)
        writer.commit_shard(self.root, shard.shard_id, {**asdict(result), "file": shard.file,
                                                        "row_start": shard.row_start, "row_stop": shard.row_stop},
                            self.so)
        journal.delete()
        if self._metrics is not None:
            self._metrics.shard_done(counts)
        return result

    # -- helpers -----------------------------------------------------------------------------------------------

    def _render(self, batch: list[_Item], shard_id: str, pending: deque[Future]) -> float:
        """Render one batch and queue its images for storage; returns the model time (ms) spent on it.

        A batch that raises is split in halves until the request that raised is alone; that one is tried
        `retries` more times and then ends failed with its error. Out-of-memory halves the actor's batch size.
        """
        if len(batch) > self.batch_size:  # cut before an out-of-memory shrank the batch size: cut it again
            size = self.batch_size
            return sum(self._render(batch[i:i + size], shard_id, pending) for i in range(0, len(batch), size))
        for item in batch:
            item.calls += 1
        row_ids = sorted({item.request.key.rsplit("#", 1)[0] for item in batch})
        if self._journal is not None:  # durable before the call: if it kills the process, the journal names the rows
            self._journal.rendering(row_ids)
        started = time.monotonic()
        try:
            arrays = self._render_requests([item.request for item in batch])
            if len(arrays) != len(batch):
                raise RuntimeError(f"model returned {len(arrays)} images for {len(batch)} requests")
            error = None
        except Exception as exc:  # noqa: BLE001 - any model error: isolate the request that raised
            error = exc
        spent = (time.monotonic() - started) * 1000.0
        if self._journal is not None and self._journal.suspects.intersection(row_ids):
            # A suspect survived its call: a death from here on (uploading, the next read) must not count against it.
            self._journal.done_rendering()
        if error is None:
            if self._metrics is not None:
                self._metrics.render_call(spent)
            for item, array in zip(batch, arrays):
                item.render_ms = spent / len(batch)
                if isinstance(array, quality.Outcome):
                    item.seed, item.scores, array = array.request.seed, array.columns(), array.image
                self._queue_store(item, array, shard_id, pending)
            return spent

        out_of_memory = isinstance(error, ModelOutOfMemory)
        self._count_error("out_of_memory" if out_of_memory else "render")
        if len(batch) == 1:
            item = batch[0]
            item.solo_failures += 1
            if item.solo_failures <= self.job.retries:
                return spent + self._render(batch, shard_id, pending)
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
        return spent + sum(self._render(batch[i:i + size], shard_id, pending) for i in range(0, len(batch), size))

    def _render_requests(self, requests: list[RenderRequest]) -> list:
        """One model call for the batch: images, or with quality scoring on, quality.Outcomes (image, the seed
        actually used, scores), where images below --min-quality were re-rendered together with new seeds."""
        if not self.job.scores_quality:
            return self.model.render(requests)
        return quality.render_until_passing(requests, self.model.render, self.job.min_quality,
                                            self.job.quality_retries if self.job.min_quality is not None else 0)

    def _queue_store(self, item: _Item, array, shard_id: str, pending: deque[Future]) -> None:
        row_id = item.request.key.rsplit("#", 1)[0]
        item.stored = self._uploads.submit(self._store, array, shard_id, row_id, item.image_index)
        pending.append(item.stored)
        # Bound the images held in memory: wait for the oldest upload when the model runs ahead of storage.
        while len(pending) > MAX_PENDING_IMAGES:
            pending.popleft().result()

    def _store(self, array, shard_id: str, row_id: str, image_index: int) -> tuple[str, str, int, int]:
        data = writer.encode_image(array, self.job.format, self.job.quality)
        uri = writer.write_image(self.root, shard_id, row_id, image_index, self.job.format, data, self.so)
        return uri, writer.sha256_hex(data), int(array.shape[1]), int(array.shape[0])

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

    def _invalid(self, task: RowTask, column: str, message: str) -> InvalidRow:
        where = f"manifest {task.source_file} row {task.row_index} (id {task.id!r})"
        return InvalidRow(row_index=task.row_index, id=task.id, column=column,
                          error=f"{where}: {column + ': ' if column else ''}{message}", passthrough=task.passthrough,
                          source_file=task.source_file, prompt=task.prompt)

    def _redact(self, text: str) -> str:
        return storage.redact(text, self.so)

    def _count_error(self, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.error(kind)

    def _cancelled(self) -> bool:
        if not self._in_ray:
            return False
        import ray

        return ray.get_runtime_context().is_canceled()
