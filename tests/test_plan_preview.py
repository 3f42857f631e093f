"""`ray-render plan` (no Ray, no weights: counts and an estimate whose figures say where they come from) and
`ray-render preview` (a stratified sample rendered with its report)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from ray_render.config import JobConfig
from ray_render.engine import calibration, forecast, preview
from ray_render.engine import summary as exits
from ray_render.models import describe_model

REPO = Path(__file__).resolve().parents[1]
PLAN_AND_SAY_WHAT_LOADED = """
import json, sys
from ray_render import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"exit": code, "loaded": sorted(m for m in ("ray", "torch", "transformers") if m in sys.modules)}))
"""


def plan(*argv: str) -> tuple[dict, dict]:
    """(the plan's JSON, {"exit", "loaded"}) of `ray-render plan ARGV --json` in a fresh process."""
    result = subprocess.run([sys.executable, "-c", PLAN_AND_SAY_WHAT_LOADED, "plan", *argv, "--json"],
                            capture_output=True, text=True, timeout=120, cwd=REPO)
    *printed, facts = result.stdout.strip().splitlines()
    assert result.returncode == 0, result.stderr[-2000:]
    return (json.loads("\n".join(printed)) if printed else {}), json.loads(facts) | {"stderr": result.stderr}


def test_plan_counts_rows_shards_images_and_tokens_without_ray_or_weights(tmp_path, make_manifest):
    manifest = make_manifest([
        *[{"prompt": f"square {i}"} for i in range(3)],                              # 64x64: 16 tokens
        *[{"prompt": f"wide {i}", "width": 128, "num_images": 2} for i in range(2)],  # 32 tokens, 2 images
        {"prompt": "bad width", "width": 100},                                       # invalid: costs nothing
        {"prompt": "a draft", "preset": "draft"},                                    # 8 steps instead of 20
    ])
    csv = tmp_path / "more.csv"
    csv.write_text("prompt,height\ntall,128\nbroken,abc\n")                          # a staged file, one bad cell
    result, facts = plan(manifest, str(csv), "--shard-size", "3", "--price", "H100=2.5")
    assert facts["exit"] == 0 and facts["loaded"] == []  # neither Ray nor a model library was imported
    assert (result["rows"], result["shards"], result["images"], result["invalid_rows"]) == (9, 4, 9, 2)
    assert result["image_tokens"] == 3 * 16 + 2 * 2 * 32 + 16 + 32
    assert result["files"] == [manifest, str(csv)]  # the user's files, not the staged copies
    assert {(s["width"], s["height"], s["steps"]): s["images"] for s in result["sizes"]} == {
        (64, 64, 20): 3, (128, 64, 20): 4, (64, 64, 8): 1, (64, 128, 20): 1}
    entries = {entry["gpu"]: entry for entry in result["estimate"]}
    assert set(entries) == {"cpu-2core"} | {gpu.name for gpu in calibration.GPUS}
    for entry in entries.values():
        assert set(entry) >= {"gpu", "seconds_per_image", "gpu_hours", "origin"}
        assert math.isclose(entry["gpu_hours"], entry["seconds_per_image"] * 9 / 3600, rel_tol=1e-3)
    assert entries["cpu-2core"]["origin"].startswith("measured: ray-render bench")
    assert all("not measured" in entries[gpu.name]["origin"] for gpu in calibration.GPUS)
    assert math.isclose(entries["H100"]["usd"], entries["H100"]["gpu_hours"] * 2.5, rel_tol=1e-2)
    # At the measured shape and batch size the estimate is the measurement itself.
    tiny_only, _ = plan(make_manifest(n=10), "--batch-size", "16")
    assert math.isclose(tiny_only["estimate"][0]["seconds_per_image"], 1 / 41.0, rel_tol=1e-3)


def test_plan_names_what_it_cannot_use(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ray_render", "plan", str(tmp_path / "missing.jsonl")],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == exits.EXIT_ABORTED and "missing.jsonl" in result.stderr
    (tmp_path / "m.csv").write_text("prompt\na cat\n")
    result = subprocess.run([sys.executable, "-m", "ray_render", "plan", str(tmp_path / "m.csv"), "--price", "T4=1"],
                            capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == exits.EXIT_ABORTED and "--price must be DEVICE=USD_PER_HOUR" in result.stderr


def test_the_bandwidth_model_reproduces_its_source():
    """NEXTSTEP.md, Performance facts: NextStep-1-Large on one H100, CFG on, 512x512, 50 steps: about 12.7 s an
    image at batch 1, 1.65 s at batch 8, 0.47 s at batch 32 (memory bandwidth); a compute ceiling of about 34k images
    an hour; 1024x1024 fits batch 16 on 80 GB but not 32; and 34.7 ms of host time a token in eager mode."""
    arch = describe_model("stepfun-ai/NextStep-1-Large").architecture
    h100 = next(gpu for gpu in calibration.GPUS if gpu.name == "H100")
    shape = calibration.RowShape(512, 512, 1024, 50, 2)
    for batch, seconds in ((1, 12.7), (8, 1.65), (32, 0.47)):
        bounds = calibration.token_bounds(h100, arch, shape, batch)
        assert math.isclose(bounds["memory bandwidth"] * 1024 / batch, seconds, rel_tol=0.06), (batch, bounds)
    ceiling = calibration.token_bounds(h100, arch, shape, 256)["compute"] * 1024 / 256
    assert 30_000 < 3600 / ceiling < 38_000
    assert math.isclose(calibration.token_bounds(h100, arch, shape, 8)["host dispatch (eager)"], 34.7e-3, rel_tol=0.01)
    large = calibration.RowShape(1024, 1024, 4096, 50, 2)
    assert 16 <= calibration.max_batch(h100, arch, large) < 32


def test_gpu_estimates_follow_compile(make_manifest):
    """Eager token steps wait on the host's launches (34.7 ms a NextStep-1-Large token); compiled ones, the default
    on CUDA, are bounded by reading the weights: 1.65 s an image at batch 8 on an H100 (NEXTSTEP.md)."""
    manifest = make_manifest([{"prompt": f"a cat {i}"} for i in range(8)])
    by_mode = {}
    for mode in ("auto", "off"):
        job = JobConfig(manifests=[manifest], out="unused", model="stepfun-ai/NextStep-1-Large", compile=mode)
        by_mode[mode] = {e.gpu: e for e in forecast.forecast(job).estimate}["H100"]
    assert by_mode["auto"].limit == "memory bandwidth"
    assert math.isclose(by_mode["auto"].seconds_per_image, 1.65, rel_tol=0.06)
    assert by_mode["off"].limit == "host dispatch (eager)"
    assert math.isclose(by_mode["off"].seconds_per_image, 1024 * 34.7e-3 / 8, rel_tol=0.02)


def test_preview_renders_a_stratified_sample_with_its_report(ray_cluster, tmp_path, make_manifest):
    rows = [{"id": f"s{i}", "prompt": f"small {i}", "width": 32, "height": 32} for i in range(40)]
    rows += [{"id": f"d{i}", "prompt": f"draft {i}", "preset": "draft"} for i in range(15)]
    rows += [{"id": f"w{i}", "prompt": f"wide {i}", "width": 96, "height": 48} for i in range(5)]
    manifest = make_manifest(rows, row_group_size=10)
    job = JobConfig(manifests=[manifest], out=str(tmp_path / "preview"), model="placeholder", device="cpu",
                    progress=False, shard_size=8)
    summary = preview.run(job, 6)
    assert summary.exit_code == exits.EXIT_OK and summary.rows_total == 6 and summary.images == 6
    table = ds.dataset(str(tmp_path / "preview" / "metadata"), format="parquet").to_table().to_pylist()
    picked = sorted(row["source_row"] for row in table)
    # 40 : 15 : 5 rows -> 4 : 1 : 1, evenly spaced through each group (rows 5, 15, 25, 35 of the small ones).
    assert picked == [5, 15, 25, 35, 47, 57]
    assert {row["id"] for row in table} == {"s5", "s15", "s25", "s35", "d7", "w2"}
    assert {row["source_file"] for row in table} == {manifest}
    assert (tmp_path / "preview" / "report.html").exists() and (tmp_path / "preview" / "contact_sheet.png").exists()
    again = preview.run(job, 6)  # the same sample again: resumed, nothing rendered
    assert again.exit_code == exits.EXIT_OK and again.rows_this_run == 0
    other = preview.run(job, 7)  # another sample into the same output is another job
    assert other.exit_code == exits.EXIT_ABORTED and "holds another job" in other.message


@pytest.mark.parametrize("sizes, total, expected", [
    ({"a": 40, "b": 15, "c": 5}, 6, {"a": 4, "b": 1, "c": 1}),
    ({"a": 40, "b": 15, "c": 5}, 2, {"a": 1, "b": 1}),            # fewer rows than groups: the largest groups
    ({"a": 3, "b": 1}, 10, {"a": 3, "b": 1}),                      # more than there is: everything
    ({"a": 98, "b": 1, "c": 1}, 10, {"a": 8, "b": 1, "c": 1}),     # every group shows, at the largest's expense
])
def test_sample_allocation(sizes, total, expected):
    assert preview.allocate(sizes, total) == expected
