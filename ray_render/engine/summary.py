"""The outcome of a run: the Summary printed at the end and written to the output root, and the exit codes.

Exit codes (`Summary.exit_code`: the process status of `ray-render run` and `ray-render refresh`), decided in one
place, `Summary.finish`:

    0  EXIT_OK        every row of the plan is `ok`
    2  EXIT_ABORTED   aborted: bad configuration, unreadable manifest, output holding another job (without
                      --overwrite), a model that does not load, storage gone, crashes that are systematic, more
                      failed rows than --max-failed-fraction, or a committed shard that vanished from the output
    3  EXIT_LOST      the Ray cluster was lost or the run was interrupted (SIGTERM, Ctrl-C); rerun to resume
    4  EXIT_INTERNAL  an unexpected error inside ray-render (a bug): one line, the traceback with --verbose
    5  EXIT_ROWS      the job finished, but some rows are `failed` or `invalid` (see the metadata's `error`)

1 is never ray-render's: it is Python's own status for an error before ray-render runs (an import that fails), so
an orchestrator may treat 5 as success without also taking a crash for one. The jobs/ entrypoints, which the
cluster files run, do exactly that (exit 0 for 5) unless given --strict: one invalid row in a million must not make
a RayJob FAILED and start new GPU clusters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

from ray_render.output.schema import STATUSES, empty_counts

EXIT_OK = 0
EXIT_ABORTED = 2
EXIT_LOST = 3
EXIT_INTERNAL = 4
EXIT_ROWS = 5
EXIT_CODES = {  # what --help prints
    EXIT_OK: "every row ok",
    EXIT_ABORTED: "aborted: bad configuration, unreadable manifest, --out holding another job (without "
                  "--overwrite), a model that does not load, storage unreachable, systematic crashes, more failed "
                  "rows than --max-failed-fraction, or a committed shard that vanished",
    EXIT_LOST: "Ray cluster lost or run interrupted (SIGTERM, Ctrl-C): rerun the same command to resume",
    EXIT_INTERNAL: "internal error (a bug in ray-render): one line, the traceback with --verbose",
    EXIT_ROWS: "finished, but some rows are failed or invalid (see the metadata's error column); the jobs/ "
               "entrypoints exit 0 for it unless given --strict",
}
STATES = ("running", "finished", "aborted", "interrupted", "failed")  # "failed": an internal error


class JobAborted(Exception):
    """The job cannot go on (exit code 2); the message says why and how to fix it."""


class JobLost(Exception):
    """The cluster went away or the run was interrupted (exit code 3); a rerun resumes."""


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Summary:
    """The outcome of one `ray-render run`. Row counts cover the whole output, resumed shards included."""

    out: str  # the output root, as given
    state: str = "running"  # see STATES
    exit_code: int | None = None
    message: str = ""  # why the job aborted or was interrupted; "" when it finished
    run_id: str = ""
    model: dict = field(default_factory=dict)  # ModelInfo of the actors, as a dict
    rows_total: int = 0  # rows in the plan
    rows: dict = field(default_factory=empty_counts)  # input rows by final status
    images: int = 0  # images written (status ok)
    shards_total: int = 0
    shards_committed: int = 0  # committed by the end of this run, resumed ones included
    shards_resumed: int = 0  # already committed when this run started (skipped)
    rows_resumed: int = 0
    rows_updated: int = 0  # rows a refresh updated in place: only their passthrough values changed, nothing rendered
    shards_lost: list = field(default_factory=list)  # shard ids that failed every attempt (not committed)
    shard_retries: int = 0  # shard attempts beyond the first (actor lost, storage error, ...)
    actors_replaced: int = 0  # actors that died and were replaced
    actors_retired: int = 0  # actors retired (and replaced) for failing far more rows than the others
    rows_repaired: int = 0  # failed rows that a repair on another actor rendered ok (engine/repairs.py)
    rows_suspected: int = 0  # rows made suspects (rendered alone next time) because an actor died rendering them
    node_losses: int = 0  # attempts lost with their node (a preemption): nobody's fault, no suspects
    actors_started: int = 0  # render actors this run asked Ray for (replacements included); 0: no model loaded
    actors_peak: int = 0  # the most render actors ready at once
    actors_released: int = 0  # actors the elastic pool stopped because no work was left for them
    actors_timeline: list = field(default_factory=list)  # [seconds since the pool started, actors ready] changes
    stragglers_reissued: int = 0  # copies of slow or queued shards given to idle actors
    rows_this_run: int = 0  # rows finished by this run
    images_this_run: int = 0
    render_s: float = 0.0  # model time summed over actors
    wall_s: float = 0.0  # the whole run, Ray start-up and model loading included
    startup_s: float = 0.0  # planning, connecting to Ray and loading the model in the actors
    plan_s: float = 0.0  # of which planning: the manifests' footers, and the id column for repeated ids
    rendering_s: float = 0.0  # from the actors being ready to the last shard: the basis of the rates
    started_at: str = ""
    finished_at: str = ""

    @property
    def rows_per_s(self) -> float:
        return self.rows_this_run / self.rendering_s if self.rendering_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.images_this_run / self.rendering_s if self.rendering_s > 0 else 0.0

    def finish(self, state: str, message: str = "") -> None:
        """Set the final state and the exit code that goes with it: the one place outcomes become exit codes."""
        self.state, self.message, self.finished_at = state, message, now_iso()
        if state == "aborted":
            self.exit_code = EXIT_ABORTED
        elif state == "interrupted":
            self.exit_code = EXIT_LOST
        elif state == "failed":
            self.exit_code = EXIT_INTERNAL
        elif self.rows["failed"] or self.rows["invalid"]:
            self.exit_code = EXIT_ROWS
        else:
            self.exit_code = EXIT_OK

    def add(self, counts: dict, images: int) -> None:
        for status in STATUSES:
            self.rows[status] += counts.get(status, 0)
        self.images += images

    def to_dict(self) -> dict:
        data = asdict(self)
        data["rows_per_s"] = round(self.rows_per_s, 3)
        data["images_per_s"] = round(self.images_per_s, 3)
        return data

    def format(self) -> str:
        rows = self.rows
        lines = [
            f"ray-render: {self.state}" + (f": {self.message}" if self.message else ""),
            f"  rows      {sum(rows.values())}/{self.rows_total}  ok {rows['ok']}  invalid {rows['invalid']}"
            f"  failed {rows['failed']}",
            f"  images    {self.images}",
            f"  shards    {self.shards_committed}/{self.shards_total} committed ({self.shards_resumed} resumed, "
            f"{self.rows_resumed} rows)" + (f", lost: {', '.join(self.shards_lost)}" if self.shards_lost else "")
            + (f"; {self.rows_updated} rows updated in place" if self.rows_updated else ""),
            f"  faults    {self.shard_retries} shard retries, {self.actors_replaced} actors replaced, "
            f"{self.actors_retired} retired, {self.stragglers_reissued} straggler copies, {self.rows_repaired} "
            f"failed rows repaired",
            f"  this run  {self.rows_this_run} rows, {self.images_this_run} images in {self.wall_s:.1f} s "
            f"({self.startup_s:.1f} s start-up, {self.rendering_s:.1f} s rendering: {self.rows_per_s:.1f} rows/s, "
            f"{self.images_per_s:.1f} images/s; model time {self.render_s:.1f} s), {self.actors_started} render "
            f"actor(s) started",
            f"  model     {self.model.get('name', '?')} ({self.model.get('family', '?')} "
            f"{self.model.get('revision', '?')}, {self.model.get('device', '?')} {self.model.get('dtype', '?')})",
            f"  output    {self.out}",
            f"  exit code {self.exit_code}",
        ]
        return "\n".join(lines)
