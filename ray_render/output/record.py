"""The job record (`_job.json`: settings, plan identity, model, last summary) and the summary file (`_summary.json`)
of an output root. Credentials never reach them: settings keep storage option names only, and free-text messages
are redacted where they are made (the session's summary message, rows' errors). The records' structure is never
redacted: a storage option's value that also occurs in a path or a bucket name (a region, say) stays there."""

from __future__ import annotations

import json

from ray_render import storage
from ray_render.output import layout


def _write_json(root: str, name: str, record: dict, storage_options: dict | None) -> str:
    record = dict(record)
    if isinstance(record.get("storage_options"), dict):  # keep the option names only: the values may be secrets
        record["storage_options"] = sorted(record["storage_options"])
    text = json.dumps(record, indent=2, sort_keys=True, default=str)
    url = storage.join(root, name)
    storage.write_bytes(url, text.encode(), storage_options)
    return url


class RecordDamaged(Exception):
    """A record file that is not a JSON object (a truncated write by something else, an edit gone wrong)."""


def _read_json(root: str, name: str, storage_options: dict | None) -> dict | None:
    url = storage.join(root, name)
    try:
        data = storage.read_bytes(url, storage_options)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
    except ValueError as exc:  # json's errors and a bad encoding alike
        raise RecordDamaged(f"{url} is damaged ({len(data)} bytes, not JSON: {exc}): restore it, or pass "
                            f"--overwrite to render the output again, or choose another --out") from None
    if not isinstance(record, dict):
        raise RecordDamaged(f"{url} is damaged (a JSON {type(record).__name__}, not an object): restore it, or "
                            f"pass --overwrite to render the output again, or choose another --out")
    return record


def write_job_record(root: str, record: dict, storage_options: dict | None = None) -> str:
    """Write `_job.json` (settings, plan fingerprint, model revision ...)."""
    return _write_json(root, layout.JOB_RECORD, record, storage_options)


def read_job_record(root: str, storage_options: dict | None = None) -> dict | None:
    return _read_json(root, layout.JOB_RECORD, storage_options)


def write_summary(root: str, summary: dict, storage_options: dict | None = None) -> str:
    return _write_json(root, layout.SUMMARY, summary, storage_options)


def read_summary(root: str, storage_options: dict | None = None) -> dict | None:
    return _read_json(root, layout.SUMMARY, storage_options)
