"""The render actor's journal writes: before every model call the journal in storage names that call's rows, a fast
model shares one write among several calls, and a suspect row is always named alone."""

from __future__ import annotations

import json

from ray_render import journal, manifest, storage
from ray_render.actor import RenderActor
from ray_render.config import JobConfig
from conftest import prompt_rows


def _journal_at_each_call(actor: RenderActor, shard_id: str) -> list[tuple[list[str], list[str]]]:
    """Wrap the actor's model: at the start of each call, read the journal from storage. -> [(call rows, named)]"""
    seen = []
    render = actor.model.render

    def render_and_look(requests):
        state = json.loads(storage.read_bytes(journal.journal_url(actor.root, shard_id)))
        seen.append((sorted({r.key.rsplit("#", 1)[0] for r in requests}), state["rendering"]))
        return render(requests)

    actor.model.render = render_and_look
    return seen


def test_fast_model_names_rows_ahead_and_every_call_is_covered(tmp_path, make_manifest):
    job = JobConfig(manifests=[make_manifest(prompt_rows(400))], out=str(tmp_path / "out"), model="placeholder",
                    batch_size=4, progress=False)
    plan = manifest.plan(job.manifests, 400)
    actor = RenderActor(job, 0, plan.passthrough_schema)
    seen = _journal_at_each_call(actor, plan.shards[0].shard_id)
    result = actor.render_shard(plan.shards[0])
    assert result.counts["ok"] == 400 and len(seen) == 100
    assert all(set(rows) <= set(named) for rows, named in seen)
    writes = len({tuple(named) for _, named in seen})
    assert writes < len(seen) // 4  # the placeholder renders far faster than a journal write


def test_suspects_are_named_alone(tmp_path, make_manifest):
    rows = prompt_rows(12)
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model="placeholder", batch_size=4,
                    progress=False)
    plan = manifest.plan(job.manifests, 12)
    shard = plan.shards[0]
    # An earlier attempt died while rendering rows r4..r7: they are suspects now.
    storage.write_bytes(journal.journal_url(job.out, shard.shard_id),
                        json.dumps({"rendering": ["r4", "r5", "r6", "r7"], "suspects": [], "deaths": {}}).encode())
    actor = RenderActor(job, 0, plan.passthrough_schema)
    seen = _journal_at_each_call(actor, shard.shard_id)
    assert actor.render_shard(shard).counts["ok"] == 12
    for rows_of_call, named in seen:
        assert set(rows_of_call) <= set(named)
        if set(rows_of_call) & {"r4", "r5", "r6", "r7"}:
            assert rows_of_call == named and len(named) == 1
