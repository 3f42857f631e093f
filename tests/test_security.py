"""Security (`-m chaos`): credentials stay out of logs, metadata and records; weights are never unpickled except
through `weights_only`; output keys cannot escape the output root."""

from __future__ import annotations

import ast
import logging
import os
from pathlib import Path

import pyarrow.dataset as ds
import pytest
import ray

from ray_render import storage
from ray_render.config import JobConfig
from ray_render.engine import driver
from ray_render.engine import summary as exits
from ray_render.output import layout, record, status
from ray_render.tools import chaos

pytestmark = pytest.mark.chaos

PACKAGE = Path(__file__).resolve().parents[1] / "ray_render"


def test_credentials_never_reach_logs_metadata_or_records(ray_cluster, s3, make_manifest, caplog, capfd):
    proxy = chaos.StorageFaultProxy(s3.endpoint_url, error_rate=0.05, reset_rate=0.0, delay_rate=0.0, seed=6).start()
    so = {**s3.storage_options, "endpoint_url": proxy.endpoint_url,
          "config_kwargs": {"retries": {"total_max_attempts": 1}}}  # failures reach our retries, and their logs
    secrets = [so["key"], so["secret"]]
    rows = [{"id": f"s{i}", "prompt": f"a small boat {i}"} for i in range(12)]
    rows[3]["input_image"] = s3.url("no-such-dir/missing.png")  # a failing fetch: its message names a URL
    rows[5]["prompt"] = "a small boat [placeholder:raise]"  # a failing row: its error goes to the metadata
    manifest = make_manifest(rows, url=s3.fresh_url("manifests") + "/m.parquet", storage_options=so)
    out = s3.fresh_url("out")
    caplog.set_level(logging.DEBUG, logger="ray_render")
    summary = driver.run(JobConfig(manifests=[manifest], out=out, model="placeholder", shard_size=4, retries=1,
                                   storage_options=so, progress=False))
    assert summary.exit_code == exits.EXIT_ROWS, summary.format()
    # A job that fails on storage: its message names the URL, never the credentials.
    proxy.down = True
    try:
        aborted = driver.run(JobConfig(manifests=[manifest], out=s3.fresh_url("out2"), model="placeholder",
                                       storage_options=so, progress=False))
    finally:
        proxy.stop()
    assert aborted.exit_code == exits.EXIT_ABORTED and aborted.message

    texts = {"driver log": caplog.text, "stdout/stderr (actors' logs too)": "".join(capfd.readouterr()),
             "summary": summary.format() + aborted.format() + aborted.message,
             "status": str(status.job_status(out, s3.storage_options))}
    fs, root = storage.open_fs(out, s3.storage_options)
    for path in fs.find(root):
        texts[path] = fs.cat_file(path).decode("latin-1")
    texts["job record settings"] = str(record.read_job_record(out, s3.storage_options)["settings"])
    session = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in session.glob("worker-*"):
        texts[str(path)] = path.read_text(errors="replace")
    assert len(texts) > 10
    for name, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"credential found in {name}"
    assert "storage_options" in texts["job record settings"]  # the option names are kept, their values are not


def test_weights_are_only_loaded_with_weights_only_or_safetensors():
    sources = {path: path.read_text() for path in PACKAGE.rglob("*.py")}
    loads = 0
    for path, text in sources.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            called = ast.unparse(node.func)
            if called in ("torch.load", "load") and called == "torch.load":
                loads += 1
                keywords = {kw.arg: ast.unparse(kw.value) for kw in node.keywords}
                assert keywords.get("weights_only") == "True", f"{path}:{node.lineno} torch.load without weights_only"
            assert called not in ("pickle.load", "pickle.loads", "dill.load", "cloudpickle.load", "joblib.load"), \
                f"{path}:{node.lineno} unpickles"
            if called.endswith(("np.load", "numpy.load")):
                keywords = {kw.arg: ast.unparse(kw.value) for kw in node.keywords}
                assert keywords.get("allow_pickle", "False") == "False", f"{path}:{node.lineno}"
            keywords = {kw.arg: ast.unparse(kw.value) for kw in node.keywords}
            assert keywords.get("trust_remote_code", "False") == "False", f"{path}:{node.lineno} trust_remote_code"
    assert loads >= 1  # the VAE checkpoint reader is found, so the scan looks where the loads are


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["RAY_RENDER_PWNED_DIR"],))


def test_a_pickled_checkpoint_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    from ray_render.models.nextstep import snapshot

    pwned = tmp_path / "pwned"
    monkeypatch.setenv("RAY_RENDER_PWNED_DIR", str(pwned))
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / snapshot.VAE_CONFIG_FILE).write_text("{}")
    import torch

    torch.save({"weight": _Payload()}, vae / snapshot.VAE_WEIGHTS_FILE)
    with pytest.raises(snapshot.SnapshotError, match="weights_only"):
        snapshot.read_vae(vae)
    assert not pwned.exists()


@pytest.mark.parametrize("name", ["../x", "..", ".", "a/b", "a\\b", "/abs", "a b", "a\x00b", "", "x" * 300,
                                  "s3://bucket/k", "~"])
def test_unsafe_names_cannot_become_output_keys(name):
    with pytest.raises(ValueError):
        layout.image_key("00000-m-0000000000", "0123456789ab-1", name, 0, "png")
    with pytest.raises(ValueError):
        layout.image_key(name, "0123456789ab-1", "row", 0, "png")
    with pytest.raises(ValueError):
        layout.image_key("00000-m-0000000000", name, "row", 0, "png")
    with pytest.raises(ValueError):
        layout.row_image_url("/out", "00000-m-0000000000", {"id": "r", "image_uri": f"/x/images/00000-m-0000000000/"
                                                                                     f"{name}/r_0.png"})


def test_hostile_file_names_and_ids_stay_under_the_output_root(ray_cluster, tmp_path, make_manifest):
    rows = [{"id": f"ok{i}", "prompt": f"a pebble {i}"} for i in range(3)]
    rows += [{"id": bad, "prompt": "a pebble"} for bad in ["../../outside", "/etc/x", "a/../../b", "..", "a b"]]
    weird = tmp_path / "in" / ".. weird ..name" / "..manifest ../..parquet"
    weird.parent.mkdir(parents=True)
    source = make_manifest(rows)
    weird.write_bytes(Path(source).read_bytes())
    out = tmp_path / "deep" / "out"
    before = {p for p in tmp_path.rglob("*")}
    summary = driver.run(JobConfig(manifests=[str(weird)], out=str(out), model="placeholder", progress=False))
    assert summary.exit_code == exits.EXIT_ROWS and summary.rows["ok"] == 3 and summary.rows["invalid"] == 5
    created = {p for p in tmp_path.rglob("*")} - before - set(out.parents)
    assert created and all(str(p).startswith(str(out)) for p in created), sorted(map(str, created))[:5]
    table = ds.dataset(str(out / "metadata")).to_table().to_pylist()
    assert all(os.path.realpath(row["image_uri"]).startswith(str(out) + os.sep)
               for row in table if row["status"] == "ok")
    assert {row["status"] for row in table if row["id"] not in ("ok0", "ok1", "ok2")} == {"invalid"}
