"""`ray-render status OUT`: a job's progress read from its output root alone.

Works for a job that is running (on any machine), interrupted or finished, because everything it needs is in the
output: the job record (`_job.json`: plan size, settings, run id), the commit log (`_log/`: each committed shard's
counts, and who holds the output's lease), the holder's heartbeat and the summary (`_summary.json`, written when a
run ends).
"""

from __future__ import annotations

from ray_render import storage
from ray_render.output import headline, layout, record
from ray_render.output.commits import commit_totals
from ray_render.output.lease import holder_status
from ray_render.output.log import read_state
from ray_render.output.schema import ALL_STATUSES, REMOVED


def job_status(out: str, storage_options: dict | None = None) -> dict | None:
    """Counts and state of the job in `out`, or None if there is no job there."""
    job_record = record.read_job_record(out, storage_options)
    if job_record is None:
        return None
    log_state = read_state(out, storage_options)
    holder = holder_status(out, log_state, storage_options)
    summary = record.read_summary(out, storage_options)
    done = {shard_id: entry.get("info", {}) for shard_id, entry in log_state.committed.items()}
    rows, images, rows_done = commit_totals(done.values())
    if holder is not None and holder["live"]:
        state = "running"
    elif summary is not None and summary.get("run_id") == job_record.get("run_id"):
        state = summary.get("state", "finished")  # the latest run has ended
    else:
        state = "stopped"  # killed without a summary: `ray-render run` again resumes it
    if "refresh" in job_record and state != "running":
        # A refresh supersedes rows of older shards, whose commits still count them: count the metadata instead.
        rows, images, rows_done = metadata_totals(out, storage_options)
    total_rows = job_record.get("total_rows", 0)
    top = headline.headline(summary, job_record, done, running=state == "running")
    if "refresh" in job_record and state != "running":  # the counts of the metadata, as above
        top.rows, top.images = {status: rows.get(status, 0) for status in ("ok", "invalid", "failed")}, images
    return {
        "headline": top.line(),
        "out": out,
        "state": state,
        "run_id": job_record.get("run_id"),
        "started_at": job_record.get("started_at"),
        "model": job_record.get("model", {}),
        "shards_total": job_record.get("shards", 0),
        "shards_committed": len(log_state.committed),
        "rows_total": total_rows,
        "rows_done": rows_done,
        "percent": round(100.0 * rows_done / total_rows, 1) if total_rows else 0.0,
        "rows": rows,
        "images": images,
        "summary": summary if state != "running" else None,
        "lease": holder,
    }


def metadata_totals(out: str, storage_options: dict | None = None) -> tuple[dict, int, int]:
    """(rows per status, images, rows) counted from the metadata's `status` and `image_index` columns alone."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    fs, path = storage.open_fs(storage.join(out, layout.METADATA_DIR), storage_options)
    table = ds.dataset(path, filesystem=fs, format="parquet").to_table(columns=["status", "image_index"])
    # One metadata row per image; a row that produced no image has a null image_index.
    first = table.filter(pc.or_(pc.is_null(table["image_index"]), pc.equal(table["image_index"], 0)))
    rows = {status: 0 for status in ALL_STATUSES}
    for status, count in zip(*(column.to_pylist() for column in pc.value_counts(first["status"]).flatten())):
        rows[status] = count
    images = pc.sum(pc.equal(table["status"], "ok")).as_py() or 0
    return rows, images, sum(count for status, count in rows.items() if status != REMOVED)


def _state_note(report: dict) -> str:
    lease = report.get("lease")
    if report["state"] == "running" and lease:
        return (f" (run {lease['run_id']} on {lease['host']}, last heartbeat {lease['heartbeat_age_s']:.0f} s ago)")
    if report["state"] == "stopped":
        return " without a summary (the run was killed): rerun the same command to resume"
    return ""


def format_status(report: dict) -> str:
    rows = report["rows"]
    model = report.get("model") or {}
    lines = [
        report["headline"],
        f"{report['out']}: {report['state']}" + _state_note(report),
        f"  run       {report['run_id']} started {report['started_at']}",
        f"  model     {model.get('name', '?')} ({model.get('family', '?')} {model.get('revision', '?')})",
        f"  shards    {report['shards_committed']}/{report['shards_total']} committed",
        f"  rows      {report['rows_done']}/{report['rows_total']} ({report['percent']}%)  ok {rows['ok']}  "
        f"invalid {rows['invalid']}  failed {rows['failed']}"
        + (f"  removed {rows['removed']}" if rows.get("removed") else ""),
        f"  images    {report['images']}",
    ]
    summary = report.get("summary")
    if summary:
        lines.append(f"  last run  {summary.get('state')}, exit code {summary.get('exit_code')}, "
                     f"{headline.rate(summary.get('rows_per_s'), 'rows')}, {headline.duration(summary.get('wall_s'))}"
                     + (f": {summary['message']}" if summary.get("message") else ""))
    return "\n".join(lines)
