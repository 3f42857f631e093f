"""A NextStep snapshot described without loading it: its render defaults, size rules, context length and revision,
from its JSON files alone (no weights read, no torch, nothing downloaded).

`describe_nextstep` answers what `load_nextstep` would report, and the loader takes its defaults and revision from
the same functions here (`render_defaults`, `snapshot_revision`), so the two cannot drift apart:

    defaults     the sampler version's published defaults, an edit model's, then the snapshot's render_defaults.json
    down_factor  the VAE's spatial factor (2 ** (levels - 1)) times the latent patch size: 16 for every release
    context      config.json's max_position_embeddings: prompt + image prefix + image tokens must fit
    revision     the hub commit of a cached repo, else the content fingerprint of the snapshot (and an outside VAE)
    dtype        the one asked for; "auto" is bfloat16 on CUDA and float32 elsewhere (`dtype_for`)

Where it looks: "tiny", a local directory and a cached hub repo are read in place; an fsspec URL has its three
JSON files read remotely, and its revision from its listing and a few reads (`url_revision`: no weights copied); a
NextStep repo id that is not cached gets the published facts of its name (the `source` says so) and no revision.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path, PurePosixPath

from ray_render import storage
from ray_render.models.base import ModelDescription
from ray_render.models.nextstep import snapshot as snap
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.resolve import HUB_ID, Resolved, ResolveError, remote_listing, resolve, resolve_vae

# Published defaults (NEXTSTEP.md): NextStep-1 and NextStep-1.1; edit models add shift 3.2 and cfg_img 2.0.
VERSION_DEFAULTS = {
    "1": {"num_sampling_steps": 50, "cfg": 7.5, "use_norm": True, "timesteps_shift": 1.0, "width": 512,
          "height": 512, "cfg_schedule": "constant"},
    "1.1": {"num_sampling_steps": 28, "cfg": 7.5, "use_norm": False, "timesteps_shift": 1.0, "width": 512,
            "height": 512, "cfg_schedule": "constant"},
}
EDIT_DEFAULTS = {"timesteps_shift": 3.2, "cfg_img": 2.0}
RELEASED_CH_MULT = (1, 2, 4, 4)  # the released f8ch16 VAE (vae.VAE_DEFAULTS): what a config without ch_mult means
AUTO_DTYPES = {"cuda": "bfloat16"}  # dtype "auto" by device type; float32 on every other device


def dtype_for(dtype: str, device_type: str) -> str:
    """The dtype a model loads in on a device of `device_type` ("cuda", "cpu", "mps") when `dtype` is asked for."""
    return AUTO_DTYPES.get(device_type, "float32") if dtype == "auto" else dtype


def _device_and_dtype(device: str, dtype: str) -> dict:
    """The device type and dtype a load with these options reports; None for both while the device is "auto"."""
    if device == "auto":
        return {"device": None, "dtype": None}
    device_type = device.split(":")[0]
    return {"device": device_type, "dtype": dtype_for(dtype, device_type)}


def render_defaults(version: str, edit: bool, directory: Path | None) -> dict:
    """The render defaults of a snapshot: its version's, an edit model's, then its own render_defaults.json."""
    defaults = dict(VERSION_DEFAULTS[version])
    if edit:
        defaults.update(EDIT_DEFAULTS)
    if directory is not None:
        defaults.update(snap.read_render_defaults(directory))
    return defaults


def snapshot_revision(found: Resolved, directory: Path, vae_dir: Path) -> str:
    """The revision a loaded model reports: the hub commit, else a fingerprint of the snapshot's files (and of the
    VAE's when it lives outside the snapshot)."""
    outside_vae = [] if vae_dir.is_relative_to(directory) else [vae_dir]
    return found.revision or snap.fingerprint(directory, *outside_vae)


def down_factor(vae_config: dict, config: NextStepConfig) -> int:
    """Pixels per image-token side (generate.Parts.down_factor of the loaded model)."""
    levels = len(vae_config.get("ch_mult", RELEASED_CH_MULT))
    return 2 ** (levels - 1) * config.latent_patch_size


def architecture(config: NextStepConfig) -> dict:
    """The parameter counts and shapes a cost estimate needs (base.ModelDescription.architecture), from the config:
    the weights one image token reads in the backbone (layers and projectors; of the embeddings only its own row),
    and the head's, read once per sampling step."""
    h, d, heads = config.hidden_size, config.fm_head_dim, config.num_attention_heads
    q_width, kv_width = heads * config.head_dim, config.num_key_value_heads * config.head_dim
    attention = h * q_width + q_width + 2 * (h * kv_width + kv_width) + q_width * h + (h if config.o_proj_bias else 0)
    mlp = 3 * h * config.intermediate_size
    layer = attention + mlp + 2 * h  # + the two RMSNorm weights
    projectors = (config.token_dim * h + h) + (h * h + h)
    block = (2 * d * d + 2 * d) + (3 * d * d + 3 * d) + 2 * d  # MLP, adaLN modulation, LayerNorm
    head = ((256 * d + d) + (d * d + d) + (h * d + d) + (config.token_dim * d + d) + config.fm_head_layers * block
            + (2 * d * d + 2 * d) + (d * config.token_dim + config.token_dim))
    return {"backbone_params": config.num_hidden_layers * layer + h + projectors, "head_params": head,
            "embedding_params": config.vocab_size * h, "layers": config.num_hidden_layers,
            "head_layers": config.fm_head_layers, "kv_width": kv_width}


def describe_nextstep(name: str, *, vae: str | None = None, revision: str | None = None,
                      storage_options: dict | None = None, device: str = "auto", dtype: str = "auto",
                      **_ignored) -> ModelDescription:
    """Describe the NextStep model `name` without loading it (see the module docstring). `device` and `dtype` say
    what the description's device and dtype are (a concrete device: what a load there reports); the other options
    that only matter once weights are on a device (noise, ...) are accepted and ignored. Raises ResolveError when
    nothing about the model can be found here."""
    return dataclasses.replace(_describe(name, vae, revision, storage_options), **_device_and_dtype(device, dtype))


def _describe(name: str, vae: str | None, revision: str | None, storage_options: dict | None) -> ModelDescription:
    if "://" in name and not name.startswith("file://"):
        return _describe_url(name, vae, storage_options or {})
    try:
        found = resolve(name, revision=revision, storage_options=storage_options, download=False)
    except ResolveError:
        if HUB_ID.match(name):
            published = _describe_published(name)
            if published is not None:
                return published
        raise
    return _describe_directory(name, found, vae, storage_options)


def _describe_directory(name: str, found: Resolved, vae: str | None, storage_options: dict | None,
                        revision_known: bool = True) -> ModelDescription:
    directory = found.path
    config = snap.read_config(directory)
    identity = snap.read_identity(directory, config, name)
    try:
        vae_dir = resolve_vae(vae, directory, config.vae_name_or_path, storage_options=storage_options,
                              download=False)
        vae_config = json.loads((vae_dir / snap.VAE_CONFIG_FILE).read_text())
        revision = snapshot_revision(found, directory, vae_dir) if revision_known else None
    except (ResolveError, FileNotFoundError):  # a VAE elsewhere, not on this machine: the released one's shape
        vae_config, revision = {}, None
    return ModelDescription(
        name=name, family="nextstep", revision=revision, defaults=render_defaults(identity.version, identity.edit,
                                                                                  directory),
        down_factor=down_factor(vae_config, config), context_length=config.max_position_embeddings,
        source=str(directory) if revision_known else name, architecture=architecture(config),
        settings={"sampler": f"NextStep-{identity.version}", "sampler_source": identity.version_source,
                  "edit_model": identity.edit, "edit_source": identity.edit_source})


def _describe_url(url: str, vae: str | None, storage_options: dict) -> ModelDescription:
    """Read config.json, render_defaults.json and the VAE's config.json from the URL into a scratch directory named
    like the snapshot (its name is one of the facts read_identity weighs); the revision from `url_revision`."""
    base = url.rstrip("/")
    wanted = {"config.json": storage.join(base, "config.json"),
              snap.RENDER_DEFAULTS_FILE: storage.join(base, snap.RENDER_DEFAULTS_FILE),
              "vae/config.json": storage.join(vae.rstrip("/") if vae else storage.join(base, "vae"), "config.json")}
    with tempfile.TemporaryDirectory(prefix="ray-render-describe-") as scratch:
        directory = Path(scratch) / (base.rsplit("/", 1)[-1] or "model")
        for relative, source in wanted.items():
            try:
                data = storage.read_bytes(source, storage_options)
            except FileNotFoundError:
                if relative == "config.json":
                    raise ResolveError(f"{url}: no config.json there") from None
                continue
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            (directory / relative).write_bytes(data)
        described = _describe_directory(url, Resolved(directory, "url"), None, storage_options,
                                        revision_known=False)
        config_vae_path = snap.read_config(directory).vae_name_or_path
    return dataclasses.replace(described, revision=url_revision(url, vae, config_vae_path, storage_options))


def url_revision(url: str, vae: str | None, config_vae_path: str | None, storage_options: dict,
                 small: int = snap.FINGERPRINT_SMALL) -> str | None:
    """The revision a load of the snapshot at `url` reports (`snapshot_revision` of the copy resolve.fetch_url
    makes), without copying it: the fingerprint of the same files, from the listing's sizes, the small files and
    the first and last MiB of the large ones. None when the VAE may come from elsewhere (--vae, a vae_name_or_path
    that is a URL, a repo id or a path outside the snapshot): only a load tells which, and its files count too."""
    import fsspec

    name = config_vae_path or "vae"
    if vae is not None or "://" in name or name.startswith(("/", "~")) or ".." in name.split("/"):
        return None
    fs, root = fsspec.core.url_to_fs(url.rstrip("/"), **storage_options)
    listing = remote_listing(fs, root)
    if not any(rel.startswith(name.rstrip("/") + "/") for rel in listing):
        return None

    def reader(rel: str):
        return lambda start, stop: fs.cat_file(f"{root}/{rel}", start=start, end=stop)

    # The order of the copy's sorted walk: paths compare part by part ("vae/x" before "vae.txt")
    ordered = sorted(listing, key=lambda rel: PurePosixPath(rel).parts)
    return snap.fingerprint_files([(rel, listing[rel], reader(rel)) for rel in ordered], small)


def _describe_published(repo_id: str) -> ModelDescription | None:
    """The published facts of a NextStep repo that is not in the local cache, from its name; None for a name that
    says neither NextStep-1 nor NextStep-1.1."""
    identity = snap.read_identity(Path(repo_id.rsplit("/", 1)[-1]), NextStepConfig(), repo_id)
    if not identity.version_source.startswith("name"):
        return None
    released = NextStepConfig()  # the dataclass defaults are NextStep-1-Large's
    return ModelDescription(
        name=repo_id, family="nextstep", revision=None,
        defaults=render_defaults(identity.version, identity.edit, None),
        down_factor=down_factor({}, released), context_length=released.max_position_embeddings,
        source=f"published defaults of NextStep-{identity.version} (not in the local hub cache)",
        architecture=architecture(released),
        settings={"sampler": f"NextStep-{identity.version}", "sampler_source": identity.version_source,
                  "edit_model": identity.edit, "edit_source": identity.edit_source})
