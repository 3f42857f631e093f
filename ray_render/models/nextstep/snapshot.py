"""Reading and writing a NextStep snapshot directory in the official layout.

    config.json                          NextStep-1 (or 1.1) field names, model_type "nextstep"
    model.safetensors                    un-prefixed tensor names ...
    model-00001-of-0000N.safetensors     ... or shards plus model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, special_tokens_map.json   the fast tokenizer (tokenizer.json needed)
    vae/config.json, vae/checkpoint.pt   official VAE params and a plain state dict (torch.save)
    render_defaults.json                 optional, ours: the snapshot's native render defaults

Every error names the file and what was expected. Weights are read with safetensors or
torch.load(weights_only=True) only. Importing this module imports no torch: describing a snapshot without loading
it (describe.py) reads its JSON files only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

from ray_render.models.nextstep.config import NextStepConfig

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
RENDER_DEFAULTS_FILE = "render_defaults.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json")
VAE_CONFIG_FILE = "config.json"
VAE_WEIGHTS_FILE = "checkpoint.pt"


logger = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """A snapshot file is missing or does not match what the config asks for."""


# Writing -------------------------------------------------------------------------------------------------------

def write_snapshot(directory, config, model_state_dict: dict, tokenizer_dir_or_obj, vae_config: dict,
                   vae_official_state_dict: dict, render_defaults: dict | None = None,
                   shard_bytes: int | None = None) -> Path:
    """Write a snapshot in the official layout and return its path.

    config: NextStepConfig or a config dict; model_state_dict: official (un-prefixed) names, e.g.
    `NextStepModel.official_state_dict()`; tokenizer_dir_or_obj: a directory holding tokenizer files, or a
    tokenizer object with save_pretrained; vae_official_state_dict: official VAE names (see
    vae.diffusers_to_official); shard_bytes: split the weights into shards of about this size plus an index.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = NextStepConfig.from_dict(config) if isinstance(config, dict) else dataclasses.replace(config)
    config.vae_name_or_path = config.vae_name_or_path or "vae"
    config.to_file(directory / "config.json")
    _write_weights(directory, model_state_dict, shard_bytes)
    if isinstance(tokenizer_dir_or_obj, (str, os.PathLike)):
        src = Path(tokenizer_dir_or_obj)
        copied = [name for name in TOKENIZER_FILES if (src / name).is_file()]
        if not copied:
            raise SnapshotError(f"{src}: no tokenizer files (expected one of {', '.join(TOKENIZER_FILES)})")
        for name in copied:
            if (directory / name).resolve() != (src / name).resolve():
                shutil.copyfile(src / name, directory / name)
    else:
        tokenizer_dir_or_obj.save_pretrained(str(directory))
    vae_dir = directory / "vae"
    vae_dir.mkdir(exist_ok=True)
    (vae_dir / VAE_CONFIG_FILE).write_text(json.dumps(vae_config, indent=2) + "\n")
    import torch

    plain = {k: v.detach().cpu().contiguous() for k, v in vae_official_state_dict.items()}
    torch.save(plain, vae_dir / VAE_WEIGHTS_FILE)
    if render_defaults is not None:
        (directory / RENDER_DEFAULTS_FILE).write_text(json.dumps(render_defaults, indent=2) + "\n")
    return directory


def _write_weights(directory: Path, state_dict: dict, shard_bytes: int | None) -> None:
    from safetensors.torch import save_file

    # safetensors refuses shared storage; clone so every tensor owns its memory.
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in sorted(state_dict.items())}
    for stale in [WEIGHTS_FILE, INDEX_FILE, *(p.name for p in directory.glob("model-*-of-*.safetensors"))]:
        (directory / stale).unlink(missing_ok=True)
    if not shard_bytes:
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return
    shards: list[dict] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# Reading -------------------------------------------------------------------------------------------------------

def read_config(directory) -> NextStepConfig:
    return NextStepConfig.from_file(Path(directory) / "config.json")


def weight_files(directory) -> dict[str, Path]:
    """Tensor name -> file holding it, from the index or the single model.safetensors."""
    directory = Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SnapshotError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        files = {name: directory / fname for name, fname in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise SnapshotError(f"{path}: missing; {index.name} lists it as a shard of the weights")
        return files
    single = directory / WEIGHTS_FILE
    if not single.is_file():
        raise SnapshotError(f"{directory}: no weights; expected {WEIGHTS_FILE} or {INDEX_FILE} with its shards")
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def tensor_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers, without reading the tensors."""
    from safetensors import safe_open

    shapes = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            present = set(f.keys())
            for name in [n for n, p in files.items() if p == path]:
                if name not in present:
                    raise SnapshotError(f"{path}: lacks tensor {name} that the index assigns to it")
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def settle_o_attention_bias(config: NextStepConfig, directory) -> NextStepConfig:
    """`config` with o_attention_bias decided when config.json leaves it out.

    The official rule then gives o_proj a bias (attention_bias is true in every NextStep config), and the official
    loader initialises a bias the checkpoint lacks to zero: so the bias is on exactly when the checkpoint holds it.
    """
    if config.o_attention_bias is not None:
        return config
    held = any(name.endswith("self_attn.o_proj.bias") for name in weight_files(directory))
    if config.o_proj_bias and not held:
        logger.info("%s: o_attention_bias is unset and the checkpoint has no o_proj bias; the official loader makes "
                    "it zero, so there is none", directory)
    return dataclasses.replace(config, o_attention_bias=config.o_proj_bias and held)


def load_weights(model, directory) -> None:
    """Stream the snapshot's tensors into a NextStepModel, file by file, after checking names and shapes.

    Tensors the model does not use (`lm_head.weight`, 3 GB in NextStep-1-Large; `gen_pos_embed` when off) are
    never read."""
    from safetensors import safe_open

    from ray_render.models.nextstep.model import StateDictError

    files = weight_files(directory)
    try:
        model.check_official_keys(tensor_shapes(files))
    except StateDictError as e:
        names = sorted({p.name for p in files.values()})
        raise SnapshotError(f"{Path(directory)} ({', '.join(names)}) does not match config.json: {e}") from None
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if model.holds(name):
                    model.copy_official_tensor(name, f.get_tensor(name))


def load_tokenizer(directory):
    """The fast tokenizer saved with the snapshot: tokenizer.json, plus tokenizer_config.json and
    special_tokens_map.json when present. vocab.json + merges.txt alone are not enough (converting them needs the
    model's own tokenizer class, which is remote code); every released NextStep snapshot has tokenizer.json."""
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file():
        also = " (vocab.json + merges.txt alone are not enough)" if (directory / "vocab.json").is_file() else ""
        raise SnapshotError(f"{directory}: no tokenizer; expected tokenizer.json{also}")
    return PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)


def read_vae(vae_dir) -> tuple[dict, dict]:
    """(official VAE config, official state dict) from vae/config.json + vae/checkpoint.pt."""
    vae_dir = Path(vae_dir)
    cfg_path, ckpt_path = vae_dir / VAE_CONFIG_FILE, vae_dir / VAE_WEIGHTS_FILE
    for path in (cfg_path, ckpt_path):
        if not path.is_file():
            raise SnapshotError(f"{path}: missing; a NextStep VAE directory holds {VAE_CONFIG_FILE} and "
                                f"{VAE_WEIGHTS_FILE}")
    try:
        vae_config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{cfg_path}: not valid JSON ({e})") from None
    import torch

    try:
        sd = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling refusal or corrupt file
        raise SnapshotError(f"{ckpt_path}: not a plain tensor state dict readable with weights_only=True ({e})") \
            from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SnapshotError(f"{ckpt_path}: expected a dict of tensor name -> tensor")
    return vae_config, sd


@dataclasses.dataclass(frozen=True)
class Identity:
    """What a snapshot is, with what decided it: which sampler it needs, and whether it is an edit model."""

    version: str  # "1" or "1.1" (see config.NextStepConfig.version)
    version_source: str
    edit: bool
    edit_source: str


_HUB_FOLDER = re.compile(r"^models--(?P<owner>[^/]+?)--(?P<name>[^/]+)$")
_EDIT_WORD = re.compile(r"(?<![a-z])edit(?![a-z])")
_NAMED_VERSION = re.compile(r"nextstep-1(?P<minor>\.1)?(?![.0-9])")


def snapshot_names(directory, config, given_name: str) -> list[str]:
    """The names a snapshot carries about itself, most trustworthy first: config.json's `_name_or_path`, the hub
    repo whose cache holds it, its directory name; then the name it was loaded by."""
    directory = Path(directory)
    names = []
    recorded = config.extra.get("_name_or_path")
    if isinstance(recorded, str) and recorded.strip():
        names.append(recorded.strip().rstrip("/").rsplit("/", 1)[-1])
    for part in directory.parts:
        if match := _HUB_FOLDER.match(part):
            names.append(match.group("name"))
    names += [directory.name, given_name.rstrip("/").rsplit("/", 1)[-1]]
    return [name for name in dict.fromkeys(names) if name]


def read_identity(directory, config, given_name: str) -> Identity:
    """The snapshot's sampler version and task from explicit facts first.

    Version: config.json's `nextstep_version`; else a name of the snapshot (see snapshot_names) spelling
    NextStep-1 or NextStep-1.1; else the spelling of the config's fields (a guess, logged). Edit: config.json's
    `nextstep_task` ("edit" or "t2i"); else the word "edit" in a name of the snapshot.
    """
    names = snapshot_names(directory, config, given_name)
    version, version_source = config.version, config.version_source
    if version_source != "nextstep_version":
        for name in names:
            if match := _NAMED_VERSION.search(name.lower()):
                version, version_source = ("1.1" if match.group("minor") else "1"), f"name {name!r}"
                break
    if version_source == "field names":
        logger.warning("%s: NextStep-%s sampler guessed from the config's field names; add \"nextstep_version\" "
                       "to config.json to say which it is", directory, version)
    task = config.extra.get("nextstep_task")
    if task is not None:
        if task not in ("edit", "t2i"):
            raise SnapshotError(f"{Path(directory) / 'config.json'}: nextstep_task must be 'edit' or 't2i', "
                                f"got {task!r}")
        return Identity(version, version_source, task == "edit", "nextstep_task")
    for name in names:
        if _EDIT_WORD.search(name.lower()):
            return Identity(version, version_source, True, f"name {name!r}")
    return Identity(version, version_source, False, "default")


def read_render_defaults(directory) -> dict:
    """The optional render_defaults.json: RenderRequest field -> value, validated like job options."""
    from ray_render.config import RENDER_PARAMS, check_render_param

    path = Path(directory) / RENDER_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise SnapshotError(f"{path}: expected an object of render parameter -> value")
    out = {}
    for name, value in d.items():
        if name not in RENDER_PARAMS or name == "num_images":
            allowed = ", ".join(k for k in RENDER_PARAMS if k != "num_images")
            raise SnapshotError(f"{path}: unknown render parameter {name!r}; allowed: {allowed}")
        try:
            out[name] = check_render_param(name, value)
        except ValueError as e:
            raise SnapshotError(f"{path}: {e}") from None
    return out


FINGERPRINT_SMALL = 64 << 20  # files up to this size are hashed whole


def fingerprint(*directories, small: int = FINGERPRINT_SMALL) -> str:
    """A content hash of snapshot files: full sha256 of files up to `small` bytes, size + first and last MiB of
    larger ones (hashing 50 GB of shards at every actor start would take minutes)."""
    files = []
    for directory in directories:
        directory = Path(directory)
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            files.append((path.relative_to(directory).as_posix(), path.stat().st_size, _local_reader(path)))
    return fingerprint_files(files, small)


def fingerprint_files(files, small: int = FINGERPRINT_SMALL) -> str:
    """`fingerprint` of snapshot files given as (relative path, size, read(start, stop) -> bytes), in the order a
    sorted walk of the directory visits them: the one hash, for a local directory and for files on object storage
    (nextstep.describe reads a URL's revision without copying its weights)."""
    h = hashlib.sha256()
    for rel, size, read in files:
        if rel.startswith(".") or "/." in rel or rel.endswith((".py", ".md", ".lock")):
            continue
        h.update(f"{rel}\0{size}\0".encode())
        if size <= small:
            h.update(hashlib.sha256(read(0, size)).digest())
        else:
            h.update(read(0, 1 << 20))
            h.update(read(size - (1 << 20), size))
    return h.hexdigest()[:16]


def _local_reader(path: Path):
    def read(start: int, stop: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(stop - start)

    return read
