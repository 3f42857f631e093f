"""The render actors' metrics as Ray exports them (the node's Prometheus endpoint), the names the README lists, and
the Grafana dashboard in cluster/ that charts them."""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from pathlib import Path

from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.tools.chaos import BROKEN_DEVICE_ENV

REPO = Path(__file__).resolve().parents[1]
MODEL = "ray_render.tools.chaos:PlaceholderOnBrokenDevice"
EXPORTED = ("ray_render_rows_total", "ray_render_errors_total", "ray_render_render_seconds_bucket",
            "ray_render_render_seconds_sum", "ray_render_render_seconds_count")


def scrape(deadline_s: float = 60.0) -> dict[str, list[str]]:
    """Metric name -> its sample lines on this node's metrics endpoint, once every name of EXPORTED is there."""
    import ray

    node = next(node for node in ray.nodes() if node["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline, samples = time.monotonic() + deadline_s, {}
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as response:
            lines = [line for line in response.read().decode().splitlines() if "render" in line and line[0] != "#"]
        samples = {}
        for line in lines:
            samples.setdefault(re.split(r"[{ ]", line, maxsplit=1)[0], []).append(line)
        if all(name in samples for name in EXPORTED):
            return samples
        time.sleep(1)
    raise AssertionError(f"not exported within {deadline_s:.0f} s: {sorted(set(EXPORTED) - set(samples))}")


def test_metrics_come_out_under_prometheus_names_in_seconds(ray_cluster, tmp_path, make_manifest):
    rows = [{"id": f"r{i}", "prompt": f"shape {i}" + (" [placeholder:raise]" if i == 3 else "")} for i in range(8)]
    # The node's endpoint holds every test's series: a model name of this test's own tags the ones to read. It is
    # the placeholder under another name (its broken device already claimed, so it is nowhere broken).
    claim = Path(os.environ[BROKEN_DEVICE_ENV])
    claim.touch()
    job = JobConfig(manifests=[make_manifest(rows)], out=str(tmp_path / "out"), model=MODEL, device="cpu",
                    progress=False, retries=0, batch_size=4, shard_size=4, address=ray_cluster)
    try:
        summary = driver.run(job)
    finally:
        claim.unlink()
    assert summary.rows == {"ok": 7, "invalid": 0, "failed": 1}
    samples = scrape()
    assert not any(name.startswith("ray_ray_") for name in samples), sorted(samples)
    statuses = {re.search(r'status="(\w+)"', line).group(1) for line in samples["ray_render_rows_total"]}
    assert {"ok", "failed"} <= statuses
    assert any('kind="render"' in line for line in samples["ray_render_errors_total"])
    # Seconds: the buckets start at 5 ms, and the summed model time is far below the run's seconds.
    assert any('le="0.005"' in line for line in samples["ray_render_render_seconds_bucket"])
    total = sum(float(line.rsplit(" ", 1)[1]) for line in samples["ray_render_render_seconds_sum"]
                if f'model="{MODEL}"' in line)
    assert 0 < total < 60


def test_the_grafana_dashboard_charts_the_exported_metrics():
    dashboard = json.loads((REPO / "cluster" / "grafana-dashboard.json").read_text())
    assert dashboard["uid"] == "ray-render" and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    ours = {name for expr in exprs for name in re.findall(r"\bray_render_\w+", expr)}
    assert ours == set(EXPORTED)  # every metric charted, and nothing charted that is not exported
    assert all(panel["datasource"] == "${datasource}" for panel in dashboard["panels"])
    assert {var["name"] for var in dashboard["templating"]["list"]} == {"datasource", "SessionName", "model"}
    readme = (REPO / "README.md").read_text()
    for name in ("ray_render_rows_total", "ray_render_errors_total", "ray_render_render_seconds"):
        assert f"`{name}" in readme
    assert "cluster/grafana-dashboard.json" in readme
