"""Fault injection (`-m chaos`): actors and the driver SIGKILLed, storage failing and gone, out-of-memory, poison rows.

Each test runs one drill of `ray_render.tools.chaos` (the same code `ray-render soak` runs) and asserts its figures.
"""

from __future__ import annotations

import pyarrow.dataset as ds
import pytest

from ray_render import storage
from ray_render.engine import summary as exits
from ray_render.output import commits
from ray_render.tools import chaos

pytestmark = pytest.mark.chaos


def assert_complete(figures: chaos.Figures, check: dict) -> None:
    assert figures.ok == figures.rows, figures
    assert (figures.duplicates, figures.lost) == (0, 0), figures
    assert (check["rows"], check["undecodable"], check["unreferenced_images"], check["outside_root"]) == \
        (figures.rows, 0, 0, 0), check


def test_actor_chaos_1000_rows_tiny_model_at_least_6_kills(ray_cluster, tmp_path):
    # The soak runs it at 2,000 rows and 10 kills or more (README); half of that here keeps the suite short.
    figures = chaos.actor_chaos(str(tmp_path), rows=1000, min_kills=6, seed=1, steps=2, batch_size=16,
                                shard_size=32, interval=(2.0, 4.0))
    assert figures.details["kills"] >= 6
    assert_complete(figures, figures.details["check"])
    summary = figures.details["summary"]
    assert summary["exit_code"] == exits.EXIT_OK and summary["shards_lost"] == []
    assert summary["actors_replaced"] >= 6  # every kill was seen and the actor replaced
    # Metadata matches images one to one: one ok row per image object, no image without its row.
    table = ds.dataset(str(tmp_path / "actor-chaos-out" / "metadata")).to_table().to_pylist()
    assert sorted(row["id"] for row in table) == [f"r{i:05d}" for i in range(1000)]
    assert len({row["image_uri"] for row in table}) == 1000


def test_driver_killed_3_times_then_output_is_complete_and_exactly_once(ray_cluster, tmp_path):
    # The soak kills it 5 times (README); 3 here keeps the suite short.
    figures = chaos.driver_chaos(str(tmp_path), ray_cluster, kills=3, seed=2)
    assert_complete(figures, figures.details["check"])
    kills = figures.details["kills"]
    assert len(kills) == 3 and not any(kill["finished_before_kill"] for kill in kills), kills
    assert kills[-1]["committed"] < 100  # the job was still running at the last kill
    # Redone work after each kill: only shards in flight (started, not committed); committed ones are never redone.
    assert figures.details["redone_max"] <= figures.details["in_flight_bound"], kills
    assert figures.details["committed_shards_recommitted"] == 0
    summary = figures.details["summary"]
    assert summary["shards_resumed"] >= kills[-1]["committed"]
    assert summary["rows_this_run"] + summary["rows_resumed"] == 400


@pytest.fixture
def upstream(s3):
    return {**s3.storage_options, "bucket": s3.bucket}


def test_storage_faults_and_outage(ray_cluster, tmp_path, upstream, monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_DELAY", 0.05)  # the driver's own retries; actors keep the defaults
    figures = chaos.storage_chaos(str(tmp_path), upstream, seed=3, rows=300)
    proxy = figures.details["proxy"]
    assert proxy["500"] + proxy["503"] >= 0.05 * proxy["requests"], proxy
    assert proxy["reset_before"] + proxy["reset_after"] > 0 and proxy["delayed"] > 0, proxy
    assert figures.details["flaky_summary"]["exit_code"] == exits.EXIT_OK
    assert_complete(figures, figures.details["check"])

    outage = figures.details["outage"]
    assert outage["exit_code"] == exits.EXIT_ABORTED
    assert "storage unreachable" in outage["message"] and "rerun" in outage["message"], outage["message"]
    assert upstream["secret"] not in outage["message"]
    assert 3 <= outage["committed"] < 15
    assert outage["resumed_exit_code"] == exits.EXIT_OK and outage["shards_resumed"] == outage["committed"]
    check = outage["check"]
    assert (check["rows"], check["duplicates"], check["lost"], check["undecodable"], check["unreferenced_images"]) \
        == (300, 0, 0, 0, 0), check


def test_out_of_memory_halves_the_batch_and_goes_on(ray_cluster, tmp_path):
    figures = chaos.out_of_memory(str(tmp_path), rows=48, batch_size=16)
    assert_complete(figures, figures.details["check"])
    assert figures.details["batch_sizes"] == [chaos.TinyOutOfMemoryAbove4.MAX_BATCH]  # 16 -> 8 -> 4
    assert figures.details["summary"]["exit_code"] == exits.EXIT_OK


def test_poison_row_is_isolated_and_failed_and_the_rest_renders(ray_cluster, tmp_path):
    retries = 2
    figures = chaos.poison_row(str(tmp_path), rows=200, seed=4, retries=retries)
    summary = figures.details["summary"]
    assert summary["exit_code"] == exits.EXIT_ROWS and summary["shards_lost"] == []
    assert summary["rows"] == {"ok": 199, "invalid": 0, "failed": 1, "removed": 0} or \
        (summary["rows"]["ok"], summary["rows"]["failed"]) == (199, 1)
    assert (figures.ok, figures.duplicates, figures.lost) == (199, 0, 0)
    # At most one death in a batch, then retries + 1 alone: the row is named and given up on.
    assert retries + 1 <= summary["actors_replaced"] <= retries + 2
    table = ds.dataset(str(tmp_path / "poison-out" / "metadata")).to_table().to_pylist()
    failed = [row for row in table if row["status"] != "ok"]
    assert [row["id"] for row in failed] == [figures.details["poison_id"]]
    assert "died" in failed[0]["error"] and "alone" in failed[0]["error"]
    check = figures.details["check"]
    assert (check["rows"], check["unreferenced_images"], check["undecodable"]) == (200, 0, 0), check
    assert commits.committed_shard_ids(str(tmp_path / "poison-out")) == {
        f"00000-poison-{start:010d}" for start in range(0, 200, 25)}
