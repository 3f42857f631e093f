"""Template expansion: manifests the real planner accepts, stable ids, clear errors, and the shipped jobs."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_render import storage
from ray_render.config import job_from_options, load_config_file
from ray_render.engine import plan as planning
from ray_render.engine import rows as rows_lib
from ray_render.synthesis import templates
from ray_render.synthesis.templates import Template, TemplateError

REPO = Path(__file__).resolve().parents[1]
JOBS = ["brand_identity", "marketing_ab", "educational_visuals"]


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def planned_tasks(manifest_url: str, storage_options: dict | None = None, **job_options):
    """The manifest as the renderer sees it: planned, read and validated by ray_render.engine (plan and rows)."""
    job = job_from_options({"manifests": [manifest_url], "out": "unused", "storage_options": storage_options or {},
                            **job_options})
    plan = planning.plan(job.manifests, job.shard_size, storage_options)
    results = []
    for shard in plan.shards:
        rows = rows_lib.read_shard_rows(shard, storage_options)
        results += rows_lib.validate_rows(rows, shard, model_defaults={}, job=job)
    return results


def test_product_mode_makes_every_combination_with_stable_ids(tmp_path):
    template = Template(name="logo", prompt="{asset} for {brand} in {style}", mode="product",
                        negative_prompt="no {style} clutter")
    values = {"brand": ["Acme", "Zenith"], "asset": ["a logo", "a card", "a banner"], "style": ["flat", "3d"]}
    table = templates.expand(template, values)
    assert table.num_rows == 12
    rows = table.to_pylist()
    combos = {(r["brand"], r["asset"], r["style"]) for r in rows}
    assert len(combos) == 12
    first = next(r for r in rows if (r["brand"], r["asset"], r["style"]) == ("Zenith", "a card", "3d"))
    assert first["prompt"] == "a card for Zenith in 3d"
    assert first["negative_prompt"] == "no 3d clutter"
    assert first["template"] == "logo"
    assert all(re.fullmatch(planning.ROW_ID_PATTERN, r["id"]) and r["id"].startswith("logo-") for r in rows)
    assert len({r["id"] for r in rows}) == 12
    # Same values, columns in another order and new wording: same ids, so a refresh re-renders changed prompts only.
    reworded = Template(name="logo", prompt="{brand}: {asset}, {style} style", mode="product")
    again = templates.expand(reworded, dict(reversed(list(values.items()))))
    ids = {(r["brand"], r["asset"], r["style"]): r["id"] for r in again.to_pylist()}
    assert all(ids[(r["brand"], r["asset"], r["style"])] == r["id"] for r in rows)
    # A changed value changes that row's id only.
    changed = templates.expand(template, {**values, "brand": ["Acme", "Zenith Ltd"]}).column("id").to_pylist()
    assert len(set(changed) & {r["id"] for r in rows}) == 6


def test_csv_zip_values_keep_text_and_type_manifest_columns(tmp_path):
    write(tmp_path / "values.csv", "sku,product,width,height,seed,use_norm\n"
                                   "007,a lamp,512,768,42,true\n"
                                   "010,a chair,768,512,43,false\n")
    template_file = write(tmp_path / "t.yaml", "name: shop\nmode: zip\nvalues: values.csv\n"
                                               "prompt: 'Photo of {product}, item {sku}'\n")
    out = str(tmp_path / "manifest.parquet")
    assert templates.expand_file(template_file, out) == 2
    table = pq.read_table(out)
    assert table.schema.field("width").type == pa.int32() and table.schema.field("seed").type == pa.int64()
    assert table.schema.field("use_norm").type == pa.bool_()
    assert table.column("sku").to_pylist() == ["007", "010"]  # CSV cells stay text
    assert table.column("prompt").to_pylist() == ["Photo of a lamp, item 007", "Photo of a chair, item 010"]
    # The renderer's own planner and validator accept every row and take the per-row settings from the values.
    tasks = planned_tasks(out)
    assert [type(t).__name__ for t in tasks] == ["RowTask", "RowTask"]
    assert [(t.params["width"], t.params["height"], t.seed, t.params["use_norm"]) for t in tasks] == \
        [(512, 768, 42, True), (768, 512, 43, False)]
    assert tasks[0].passthrough["sku"] == "007" and tasks[0].passthrough["template"] == "shop"


def test_parquet_and_yaml_row_tables(tmp_path):
    parquet_values = tmp_path / "values.parquet"
    pq.write_table(pa.table({"animal": ["fox", "owl"], "count": [2, 3]}), parquet_values)
    template = Template(name="zoo", prompt="{count} {animal}s", mode="zip")
    table = templates.expand(template, templates.read_values(str(parquet_values)))
    assert table.column("prompt").to_pylist() == ["2 foxs", "3 owls"]
    assert table.schema.field("count").type == pa.int64()  # Parquet keeps its own types
    rows_yaml = write(tmp_path / "rows.yaml", "- {animal: fox, count: 2}\n- {animal: owl, count: 3}\n")
    from_yaml = templates.expand(template, templates.read_values(rows_yaml))
    assert from_yaml.column("id").to_pylist() == table.column("id").to_pylist()  # same values, same ids


def test_unknown_placeholder_names_the_placeholder_and_the_columns():
    template = Template(name="t", prompt="{brand} in {colour}", source="t.yaml")
    with pytest.raises(TemplateError) as error:
        templates.expand(template, {"brand": ["a"], "style": ["b"]}, source="values.csv")
    message = str(error.value)
    assert "{colour}" in message and "t.yaml" in message and "values.csv" in message
    assert "brand, style" in message


@pytest.mark.parametrize("text", ["{}", "{0}", "{brand.__class__}", "{brand[0]}", "{brand", "oops }"])
def test_malformed_placeholders_are_refused(text):
    with pytest.raises(TemplateError, match="placeholder|brace|Single"):
        Template(name="t", prompt=text)


def test_literal_braces_and_format_specs():
    template = Template(name="t", prompt="{{logo}} for {brand}, {price:.2f} USD")
    row = templates.expand(template, {"brand": ["Acme"], "price": [3.5]}).to_pylist()[0]
    assert row["prompt"] == "{logo} for Acme, 3.50 USD"


def test_row_errors_name_the_row_column_and_allowed_values():
    template = Template(name="t", prompt="{thing}")
    with pytest.raises(TemplateError, match=r"values\.csv row 2, column 'width': must be a multiple of 16"):
        templates.expand(template, {"thing": ["a", "b"], "width": ["512", "500"]}, source="values.csv")
    with pytest.raises(TemplateError, match=r"row 1, column 'seed': .*whole number"):
        templates.expand(template, {"thing": ["a"], "seed": ["abc"]})
    with pytest.raises(TemplateError, match=r"row 2: column 'thing' is empty"):
        templates.expand(template, {"thing": ["a", None]})
    with pytest.raises(TemplateError, match=r"row 3 has the same values as .*row 1"):
        templates.expand(template, {"thing": ["a", "b", "a"]})
    with pytest.raises(TemplateError, match="same number of values"):
        templates.expand(template, {"thing": ["a", "b"], "other": ["x"]})
    with pytest.raises(TemplateError, match="mixes kinds of values"):
        templates.expand(template, {"thing": ["a", "b"], "size": [1, "large"]})
    with pytest.raises(TemplateError, match="would overwrite"):
        templates.expand(template, {"thing": ["a"], "prompt": ["x"]})


def test_product_mode_limits(tmp_path):
    template = Template(name="t", prompt="{a} {b}", mode="product")
    with pytest.raises(TemplateError, match="lists 'x' twice"):
        templates.expand(template, {"a": ["x", "x"], "b": ["y"]})
    with pytest.raises(TemplateError, match=r"makes 10000 rows \(100 a x 100 b\), more than the limit of 500"):
        templates.expand(template, {"a": list(map(str, range(100))), "b": list(map(str, range(100)))}, max_rows=500)
    # Columns of a CSV in product mode differ in length: empty cells at the bottom are not values.
    values = write(tmp_path / "v.csv", "a,b\nx,1\ny,\nz,\n")
    assert templates.expand(template, templates.read_values(values)).num_rows == 3


def test_bad_template_files(tmp_path):
    with pytest.raises(TemplateError, match="unknown key.*promt"):
        templates.load_template(write(tmp_path / "a.yaml", "name: a\npromt: x\nprompt: y\n"))
    with pytest.raises(TemplateError, match="missing 'prompt'"):
        templates.load_template(write(tmp_path / "b.yaml", "name: b\n"))
    with pytest.raises(TemplateError, match="mode must be one of zip, product"):
        templates.load_template(write(tmp_path / "c.yaml", "name: c\nprompt: x\nmode: cartesian\n"))
    with pytest.raises(TemplateError, match="name must be"):
        templates.load_template(write(tmp_path / "d.yaml", "name: ../up\nprompt: x\n"))
    with pytest.raises(TemplateError, match=r"\.yaml, \.yml, \.csv or \.parquet"):
        templates.read_values(write(tmp_path / "v.txt", "x"))


def test_command_line(tmp_path, capsys):
    write(tmp_path / "v.yaml", "colour: [red, blue]\n")
    good = write(tmp_path / "t.yaml", "name: c\nmode: product\nvalues: v.yaml\nprompt: a {colour} ball\n")
    out = str(tmp_path / "m.parquet")
    assert templates.main([good, "--out", out]) == 0
    assert "wrote 2 rows" in capsys.readouterr().out
    bad = write(tmp_path / "bad.yaml", "name: c\nvalues: v.yaml\nprompt: a {color} ball\n")
    assert templates.main([bad, "--out", str(tmp_path / "n.parquet")]) == 2
    assert "{color}" in capsys.readouterr().err
    assert not (tmp_path / "n.parquet").exists()


def test_expansion_on_object_storage(s3):
    base = s3.fresh_url("templates")
    options = s3.storage_options
    storage.write_bytes(storage.join(base, "values.csv"), b"city\nParis\nOslo\n", options)
    storage.write_bytes(storage.join(base, "t.yaml"), b"name: cities\nvalues: values.csv\nprompt: '{city} at dusk'\n",
                        options)
    out = storage.join(base, "manifest.parquet")
    assert templates.expand_file(storage.join(base, "t.yaml"), out, options) == 2
    assert [t.prompt for t in planned_tasks(out, options)] == ["Paris at dusk", "Oslo at dusk"]


@pytest.mark.parametrize("job", JOBS)
def test_shipped_jobs_are_ready_to_run(job, tmp_path):
    directory = REPO / "jobs" / job
    template = templates.load_template(str(directory / "template.yaml"))
    assert Path(template.values).exists()
    # The job file holds only `ray-render run` options and render parameters, and names the shipped manifest.
    options = load_config_file(str(directory / "job.yaml"))
    config = job_from_options(options)
    assert config.manifests == [f"jobs/{job}/manifest.parquet"]
    shipped = REPO / config.manifests[0]
    # The shipped manifest is what the template expands to today (regenerate it after editing the template).
    fresh = str(tmp_path / "manifest.parquet")
    templates.expand_file(str(directory / "template.yaml"), fresh)
    assert pq.read_table(shipped).equals(pq.read_table(fresh)), f"regenerate {shipped} from its template"
    # Every row is valid for the renderer with the job's own settings.
    tasks = planned_tasks(str(shipped), **{k: v for k, v in options.items() if k not in ("manifests", "out")})
    assert tasks and all(isinstance(t, rows_lib.RowTask) for t in tasks), [getattr(t, "error", "") for t in tasks]
