"""`ray-render doctor`: what to check before a million-prompt run, on the machine that will start it.

    python, packages   the interpreter, and torch / transformers / diffusers / ... against the ranges ray-render
                       is tested with (its own package metadata)
    cuda               devices, memory, compute capability, bfloat16
    rope               the runtime self-checks on the embedded model: RoPE theta and precision, attention
    cluster            the Ray cluster at --address / RAY_ADDRESS: nodes, GPUs, object store (--local-ray: a local one)
    output             --out: write, list, read back and delete a probe through fsspec with --storage-options
    model              --model: found, config read, tensor names and shapes, tokenizer, VAE (nothing big is read)

Exit status 0 when nothing failed, 1 otherwise, naming what failed. `--json` prints the checks as JSON.
Credentials from --storage-options never appear in the output. torch is imported by the checks, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ray_render import storage

# Distributions whose versions decide whether renders are right, in the order they are reported.
PACKAGES = ("torch", "transformers", "diffusers", "tokenizers", "safetensors", "huggingface_hub", "ray")
STATUSES = ("ok", "warn", "fail", "skip")


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # one of STATUSES; only "fail" makes the exit status non-zero
    detail: str
    data: dict = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", metavar="ADDR", default=None,
                        help="Ray cluster to check (default: RAY_ADDRESS; none: the cluster check is skipped)")
    parser.add_argument("--local-ray", dest="local_ray", action="store_true",
                        help="without a cluster address, start a one-CPU local Ray to check that Ray works here")
    parser.add_argument("--out", metavar="URI", default=None, help="output root to check for write, list, read")
    parser.add_argument("--model", metavar="NAME", default=None,
                        help="model to check: tiny, a snapshot directory, a hub repo id, an fsspec URL")
    parser.add_argument("--storage-options", dest="storage_options", metavar="JSON", default=None,
                        help="fsspec options (JSON) for --out and --model; never printed")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(address: str | None = None, local_ray: bool = False, out: str | None = None, model: str | None = None,
        storage_options: dict | None = None, as_json: bool = False, stream=None) -> int:
    """Run every check, print the report to `stream` (stdout) and return the exit status."""
    stream = stream or sys.stdout
    so = storage_options or {}
    address = address or os.environ.get("RAY_ADDRESS") or None
    checks: list[Check] = [check_python()]
    checks += check_packages()
    checks += _guarded("cuda", check_cuda)
    checks += _guarded("rope", check_rope)
    checks += _guarded("cluster", lambda: check_ray(address, local_ray))
    checks += _guarded("output", lambda: check_output(out, so))
    checks += _guarded("model", lambda: check_model(model, so))
    failed = [c for c in checks if c.status == "fail"]
    if as_json:
        text = json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2, default=str)
    else:
        lines = [f"  {c.status:<5} {c.name:<16} {c.detail}" for c in checks]
        verdict = ("all checks passed" if not failed else
                   f"{len(failed)} failed: " + "; ".join(f"{c.name} ({c.detail})" for c in failed))
        text = "\n".join(["ray-render doctor", *lines, verdict])
    print(storage.redact(text, so), file=stream)
    return 1 if failed else 0


def _guarded(name: str, check: Callable[[], Check | list[Check]]) -> list[Check]:
    """A check that raised is a failed check naming the error, not a crashed doctor."""
    try:
        result = check()
    except Exception as e:  # noqa: BLE001 - whatever broke is what the user needs to read
        return [Check(name, "fail", f"{type(e).__name__}: {e}")]
    return result if isinstance(result, list) else [result]


# This machine -------------------------------------------------------------------------------------------------

def _tested_ranges() -> dict[str, str]:
    """Canonical distribution name -> the version range in ray-render's own requirements."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    ranges = {}
    for line in requires("ray-render") or []:
        req = Requirement(line)
        if req.marker is None:
            ranges[canonicalize_name(req.name)] = str(req.specifier)
    return ranges


def check_python() -> Check:
    from importlib.metadata import PackageNotFoundError, metadata

    from packaging.specifiers import SpecifierSet

    version = platform.python_version()
    try:
        needed = metadata("ray-render").get("Requires-Python") or ""
    except PackageNotFoundError:
        needed = ""
    if needed and version not in SpecifierSet(needed):
        return Check("python", "fail", f"{version}, but ray-render needs {needed}", {"version": version})
    return Check("python", "ok", f"{version} ({sys.executable})", {"version": version, "requires": needed})


def check_packages() -> list[Check]:
    from importlib.metadata import PackageNotFoundError, version

    from packaging.specifiers import SpecifierSet
    from packaging.utils import canonicalize_name

    try:
        ranges = _tested_ranges()
    except PackageNotFoundError:
        return [Check("packages", "warn", "ray-render is not installed (pip install -e .), so its tested version "
                                          "ranges are unknown")]
    checks = []
    for name in PACKAGES:
        wanted = ranges.get(canonicalize_name(name), "")
        try:
            found = version(name)
        except PackageNotFoundError:
            checks.append(Check(name, "fail", f"not installed; ray-render needs {name}{wanted}"))
            continue
        data = {"version": found, "tested": wanted}
        if wanted and not SpecifierSet(wanted).contains(found, prereleases=True):
            checks.append(Check(name, "fail", f"{found} is outside the tested range {wanted}; "
                                              f"pip install '{name}{wanted}'", data))
        else:
            checks.append(Check(name, "ok", f"{found} (tested: {wanted or 'any'})", data))
    return checks


def check_cuda() -> Check:
    from ray_render.models import diagnostics

    return Check("cuda", *diagnostics.cuda_devices())


def check_rope() -> Check:
    from ray_render.models import diagnostics

    return Check("rope", *diagnostics.embedded_rope())


# The cluster, the output root, the model ------------------------------------------------------------------------

def check_ray(address: str | None, local_ray: bool) -> Check:
    import ray

    if not address and not local_ray:
        return Check("cluster", "skip", f"no cluster given (--address or RAY_ADDRESS); `ray-render run` starts a local "
                                    f"Ray for the job (ray {ray.__version__})")
    target = address or "local"
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialised in this process; run doctor on its own")
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        store = resources.get("object_store_memory", 0) / 2**30
        data = {"address": target, "ray": ray.__version__, "nodes": len(nodes), "cpus": resources.get("CPU", 0),
                "gpus": gpus, "object_store_gib": round(store, 2),
                "gpus_per_node": [int(n.get("Resources", {}).get("GPU", 0)) for n in nodes]}
    finally:
        ray.shutdown()
    detail = (f"{target}: {len(nodes)} node(s), {data['cpus']:g} CPUs, {gpus} GPUs, object store {store:.1f} GiB "
              f"(ray {ray.__version__})")
    return Check("cluster", "ok" if gpus or not address else "warn",
                 detail + ("" if gpus or not address else "; no GPUs: renders will run on CPUs"), data)


def check_output(out: str | None, storage_options: dict) -> Check:
    """Write a probe under the output root, find it in a listing, read it back, delete it."""
    if not out:
        return Check("output", "skip", "no --out given")
    root = storage.normalize_url(out)
    name = f".ray-render-doctor-{uuid.uuid4().hex[:12]}"
    probe, payload = storage.join(root, name), f"ray-render doctor {uuid.uuid4().hex}".encode()
    fs, path = storage.open_fs(root, storage_options)
    created_root = storage.is_local(fs) and not os.path.exists(path)
    steps = []
    try:
        storage.write_bytes(probe, payload, storage_options)
        steps.append("write")
        if name not in storage.list_names(root, storage_options):
            return Check("output", "fail", f"{root}: wrote {name} but a listing does not show it")
        steps.append("list")
        if storage.read_bytes(probe, storage_options) != payload:
            return Check("output", "fail", f"{root}: {name} reads back different bytes than were written")
        steps.append("read")
    except Exception as e:  # noqa: BLE001 - the storage error is the finding
        done = f" after {', '.join(steps)}" if steps else ""
        return Check("output", "fail", f"{root}: cannot {['write', 'list', 'read'][len(steps)]}{done} "
                                       f"({type(e).__name__}: {e})", {"root": root, "steps": steps})
    finally:
        if steps:
            storage.delete(probe, storage_options)
        if created_root and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)  # leave no empty directory the user did not have
    steps.append("delete")
    return Check("output", "ok", f"{root}: write, list, read back and delete work", {"root": root, "steps": steps})


def check_model(name: str | None, storage_options: dict) -> Check:
    """Find the model and read what describes it; the weights themselves are only listed (headers for shapes)."""
    if not name:
        return Check("model", "skip", "no --model given")
    if name == "placeholder":
        return Check("model", "ok", "placeholder: no weights to check")
    if ":" in name and "://" not in name and not os.path.exists(name):
        import importlib

        module_name, attribute = name.split(":", 1)
        getattr(importlib.import_module(module_name), attribute)
        return Check("model", "ok", f"{name}: importable model factory")
    if "://" in name:
        return _check_model_url(name, storage_options)
    return _check_model_dir(name)


def _check_model_url(url: str, storage_options: dict) -> Check:
    from ray_render.models.nextstep.config import NextStepConfig

    names = storage.list_names(url, storage_options)
    if not names:
        return Check("model", "fail", f"{url}: nothing listed there")
    config = NextStepConfig.from_dict(json.loads(storage.read_bytes(storage.join(url, "config.json"),
                                                                    storage_options)), source=f"{url}/config.json")
    wanted = {"tokenizer.json": "tokenizer.json" in names,
              "weights": "model.safetensors" in names or "model.safetensors.index.json" in names,
              "vae/": "vae" in names or config.vae_name_or_path not in (None, "vae", "vae/")}
    missing = [what for what, present in wanted.items() if not present]
    data = {"files": len(names), "version": config.version, "hidden_size": config.hidden_size}
    if missing:
        return Check("model", "fail", f"{url}: listed and config.json read, but no {', '.join(missing)}", data)
    return Check("model", "ok", f"{url}: listed, config.json read (NextStep-{config.version} layout, hidden "
                                f"{config.hidden_size}); copied to each node's cache at the first render", data)


def _check_model_dir(name: str) -> Check:
    from ray_render.models import diagnostics

    return Check("model", *diagnostics.nextstep_snapshot(name))
