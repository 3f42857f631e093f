"""report.html of a real run, opened in a real browser (headless Chromium, from Debian's package; .ci/run installs
it): the headline is what a person sees first, then the failures by error, the timeline, the samples, the settings.

The screenshot is checked for the headline's presence (its colour fills the top of the page), not pixel by pixel;
the rendered DOM for the text and the order of the sections.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.engine import summary as exits
from ray_render.output import headline, status

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1400"]


def chromium(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert CHROMIUM, "headless Chromium is needed for this test: apt-get install -y chromium (.ci/run does)"
    result = subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_the_report_leads_with_the_outcome_in_a_real_browser(ray_cluster, tmp_path, make_manifest):
    # Slow enough rows (2 s a shard) that both actors render, whichever is ready first: the timeline has two lanes.
    rows = [{"id": f"r{i}", "prompt": f"a shape number {i} [placeholder:sleep=0.5]"} for i in range(24)]
    rows[5]["width"], rows[17]["width"] = 100, 30  # two invalid rows, one kind of error
    rows[9]["prompt"] = "a shape [placeholder:raise]"  # one failed row
    job = JobConfig(manifests=[make_manifest(rows, name="catalogue.parquet")], out=str(tmp_path / "out"),
                    model="placeholder", device="cpu", actors=2, shard_size=4, retries=0, progress=False)
    summary = driver.run(job)
    assert summary.exit_code == exits.EXIT_ROWS and summary.rows == {"ok": 21, "invalid": 2, "failed": 1}
    page = Path(job.out) / "report.html"

    shot = tmp_path / "report.png"
    chromium(f"--screenshot={shot}", page.as_uri(), cwd=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    colour = np.array([int(headline.TONES["problems"][i:i + 2], 16) for i in (1, 3, 5)])
    matches = (np.abs(pixels - colour).max(axis=2) <= 3)
    assert matches[:120].mean() > 0.5, "the headline block does not fill the top of the page"
    assert matches[400:].mean() < 0.01  # ... and it is a block, not the whole page

    dom = chromium("--dump-dom", page.as_uri(), cwd=tmp_path).stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    order = [text.index(heading) for heading in ("ray-render: finished with problems", "Failures by error",
                                                 "Timeline", "Samples", "Settings")]
    assert order == sorted(order), order
    for tile in ("21 of 24 rows ok", "2 invalid", "1 failed", "21 images", "none (CPU run) GPU-hours"):
        assert tile in text, tile
    assert re.search(r"invalid 2 column 'width' must be a multiple of 16 from 16 to 4096, got \.\.\.", text)
    assert "r5 (catalogue.parquet row 5)" in text and "r17 (catalogue.parquet row 17)" in text
    assert re.search(r"failed 1 RuntimeError: \[placeholder:raise\]", text)
    lanes = re.findall(r'<text class="lane"[^>]*>([^<]*)</text>', dom)
    assert len(lanes) == 2 and all(re.search(r"actor\d \(\d+% busy\)", lane) for lane in lanes)
    assert len(re.findall(r'<rect class="shard"', dom)) == summary.shards_committed == 6
    assert "a shape number 0" in text  # samples carry their prompts
    assert not re.search(r"\d\.\d{5,}", text), "raw floats on the page"  # numbers are formatted for people

    # `ray-render status` leads with the same headline.
    assert status.format_status(status.job_status(job.out)).splitlines()[0].startswith(
        "finished with problems: 21 of 24 rows ok, 2 invalid, 1 failed; 21 images in ")
