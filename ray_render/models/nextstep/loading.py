"""Loading a NextStep snapshot onto one device: device and dtype, the model built in place, the weights, the VAE,
the runtime self-checks, and the render defaults that fit the snapshot.

`load_nextstep` is the entry point (`ray_render.models.load_model` calls it for every NextStep name).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from ray_render.config import EDIT_INPUTS, NOISE_MODES, ROPE_PRECISIONS
from ray_render.models.base import ModelInfo
from ray_render.models.nextstep import snapshot as snap
from ray_render.models.nextstep import vae as vae_lib
from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.decoder import resolve_compile
from ray_render.models.nextstep.describe import dtype_for, render_defaults, snapshot_revision
from ray_render.models.nextstep.image_model import NextStepImageModel
from ray_render.models.nextstep.model import NextStepModel, short_listing
from ray_render.models.nextstep.resolve import resolve, resolve_vae
from ray_render.models.nextstep.selfcheck import SUPPORTED_ATTENTION, check_backbone

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_device(device: str) -> torch.device:
    """"auto" is the current CUDA device, else MPS, else the CPU; "cuda" without an index the current one."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' requested but no CUDA device is available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto" is bfloat16 on CUDA and float32 elsewhere. float16 is refused: Qwen2.5-14B's activations exceed
    its range (65504) and turn into inf/NaN, so the images would be noise or black."""
    if dtype in ("float16", torch.float16):
        raise ValueError("dtype float16 is not supported for NextStep: the Qwen2.5 backbone's activations overflow "
                         "float16; use bfloat16 (GPUs) or float32")
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype}")
        return dtype
    if dtype == "auto":  # the rule describe_nextstep reports without loading
        return DTYPES[dtype_for("auto", device.type)]
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    return DTYPES[dtype]


def resolve_rope_precision(rope_precision: str, dtype: torch.dtype) -> str:
    """"auto" follows the official pipeline, whose `.to(torch.bfloat16)` also rounds the rotary frequencies:
    bf16 for bfloat16 weights, fp32 otherwise."""
    if rope_precision not in ROPE_PRECISIONS:
        raise ValueError(f"rope_precision must be one of {', '.join(ROPE_PRECISIONS)}, got {rope_precision!r}")
    if rope_precision == "auto":
        return "bf16" if dtype == torch.bfloat16 else "fp32"
    return rope_precision


def build_model(config: NextStepConfig, device: torch.device, dtype: torch.dtype,
                attn_implementation: str = "sdpa", rope_precision: str = "fp32") -> NextStepModel:
    """An uninitialised NextStepModel allocated directly on `device` in `dtype` (no float32 copy on the way:
    the 14B backbone would not fit a GPU twice), its rotary frequencies in `rope_precision` ("bf16" or "fp32")."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    if attn_implementation not in SUPPORTED_ATTENTION:
        raise ValueError(f"attn_implementation {attn_implementation!r} is not supported: only "
                         f"{', '.join(SUPPORTED_ATTENTION)} applies the padding masks correctly")
    with torch.device("meta"):
        model = NextStepModel(config, attn_implementation=attn_implementation)
    model = model.to(dtype=dtype).to_empty(device=device)
    # Non-persistent buffers do not survive the meta device: rebuild them.
    rotary = Qwen2RotaryEmbedding(config=model.backbone.config).to(device)
    if rope_precision == "bf16":
        # As the official pipeline's model.to(torch.bfloat16) leaves them; transformers computes the angles in
        # float32 from these rounded frequencies.
        rotary.inv_freq = rotary.inv_freq.to(torch.bfloat16)
        rotary.original_inv_freq = rotary.original_inv_freq.to(torch.bfloat16)
    model.backbone.rotary_emb = rotary
    if model.gen_pos_embed is not None:
        from ray_render.models.nextstep.model import sincos_pos_embed_2d

        table = sincos_pos_embed_2d(config.hidden_size, config.base_image_grid_size)
        model.gen_pos_embed = torch.from_numpy(table).float()[None].to(device)
    return model.eval()


def load_vae(vae_dir: Path, device: torch.device, dtype: torch.dtype):
    """(diffusers AutoencoderKL, official vae config, has_encoder) from a VAE directory.

    As the official loader (load_state_dict with strict=False), tensors the architecture has no place for are
    ignored, with a warning. A checkpoint without any encoder tensor is a decoder-only VAE (text to image only).
    What the official loader would leave randomly initialised (a tensor missing from the encoder or decoder, or
    of the wrong shape) is refused, naming the tensors: it would render noise.
    """
    vae_config, official = snap.read_vae(vae_dir)
    vae = vae_lib.build_autoencoder(vae_config)
    sd = vae_lib.official_to_diffusers(official)
    has_encoder = any(k.startswith("encoder.") for k in sd)
    if not has_encoder:
        vae.encoder = None
    expected = vae.state_dict()
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        logger.warning("%s: ignoring %d tensors the VAE config has no place for: %s", vae_dir / snap.VAE_WEIGHTS_FILE,
                       len(unexpected), short_listing(sorted(vae_lib.diffusers_to_official(
                           {k: sd[k] for k in unexpected}))))
        sd = {k: v for k, v in sd.items() if k in expected}
    missing = sorted(set(expected) - set(sd))
    wrong = sorted(f"{k} {list(sd[k].shape)} (expected {list(expected[k].shape)})"
                   for k in expected if k in sd and sd[k].shape != expected[k].shape)
    if missing or wrong:
        parts = []
        if missing:  # named as in checkpoint.pt (official naming)
            parts.append("missing tensors: " + short_listing(sorted(vae_lib.diffusers_to_official(
                {k: expected[k] for k in missing}))))
        if wrong:
            parts.append("wrong shapes: " + short_listing(wrong))
        raise snap.SnapshotError(f"{vae_dir / snap.VAE_WEIGHTS_FILE} does not match "
                                 f"{vae_dir / snap.VAE_CONFIG_FILE}: " + "; ".join(parts))
    vae.load_state_dict(sd)
    # nn.Module.to, not diffusers' override, which warns about float32 modules this VAE does not have.
    vae = torch.nn.Module.to(vae, device=device, dtype=dtype)
    return vae.eval(), vae_config, has_encoder


def load_nextstep(name: str, *, vae: str | None = None, revision: str | None = None, device: str = "auto",
                  dtype: str = "auto", noise: str = "fast", storage_options: dict | None = None,
                  rope_precision: str = "auto", edit_input: str = "resize", compile: str = "auto",
                  cpu_threads: int | None = None, attn_implementation: str = "sdpa",
                  length_bucket: int | None = None) -> NextStepImageModel:
    """Load a NextStep snapshot ("tiny", a directory, a hub repo id or an fsspec URL) as an ImageModel.

    vae overrides config.json's vae_name_or_path (a directory, repo id or URL); revision picks a hub revision;
    dtype "auto" is bfloat16 on CUDA and float32 elsewhere (float16 is refused); noise is "fast" or "reference"
    (see sampler.py); rope_precision "auto" (bf16 for bfloat16, as the official pipeline), "bf16" or "fp32";
    edit_input "resize" (official) or "crop" (see images.py); compile "auto" (on for CUDA), "on" or "off" (see
    decoder.py: compiled token steps, replayed from CUDA graphs on CUDA); length_bucket the granularity of
    attention windows and cache lengths (default 128 on CUDA, 64 elsewhere). The backbone is self-checked after
    loading; on CUDA the memory planner's batch sizes are logged and kept in `info.settings["batch_plan"]`.
    """
    # 1. Check the options before touching any file.
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {', '.join(NOISE_MODES)}, got {noise!r}")
    if edit_input not in EDIT_INPUTS:
        raise ValueError(f"edit_input must be one of {', '.join(EDIT_INPUTS)}, got {edit_input!r}")
    dev = resolve_device(device)
    compiled = resolve_compile(compile, dev)
    torch_dtype = resolve_dtype(dtype, dev)
    rope = resolve_rope_precision(rope_precision, torch_dtype)

    # 2. Find the snapshot and what it is.
    found = resolve(name, revision=revision, storage_options=storage_options)
    directory = found.path
    config = snap.settle_o_attention_bias(snap.read_config(directory), directory)
    identity = snap.read_identity(directory, config, name)
    config = dataclasses.replace(config, version=identity.version, version_source=identity.version_source)
    vae_dir = resolve_vae(vae, directory, config.vae_name_or_path, storage_options=storage_options)

    # 3. Build in place, stream the weights in, check what transformers built.
    model = build_model(config, dev, torch_dtype, attn_implementation, rope)
    snap.load_weights(model, directory)
    check_backbone(model.backbone, config.rope_theta, config.head_dim, rope)
    tokenizer = snap.load_tokenizer(directory)
    # Rows are never truncated (as in the reference); check() bounds them by the model's context instead.
    tokenizer.model_max_length = config.max_position_embeddings
    vae_model, vae_config, has_encoder = load_vae(vae_dir, dev, torch_dtype)

    # 4. Render defaults: the version's, the edit model's, then the snapshot's own render_defaults.json (the same
    # rule and revision as describe.describe_nextstep, which answers without loading).
    defaults = render_defaults(config.version, identity.edit, directory)
    if identity.edit and not has_encoder:
        logger.warning("%s looks like an edit model (%s) but its VAE has no encoder", directory, identity.edit_source)
    revision_id = snapshot_revision(found, directory, vae_dir)
    settings = {"sampler": f"NextStep-{config.version}", "sampler_source": config.version_source,
                "edit_model": identity.edit, "edit_source": identity.edit_source, "rope_precision": rope,
                "noise": noise, "noise_device": dev.type, "edit_input": edit_input,
                "attention": attn_implementation, "compile": "on" if compiled else "off"}
    info = ModelInfo(name=name, family="nextstep", revision=revision_id, device=str(dev),
                     dtype=str(torch_dtype).replace("torch.", ""), settings=settings)
    return NextStepImageModel(model, vae_model, tokenizer, config, vae_config, info, defaults, noise=noise,
                              has_encoder=has_encoder, edit_input=edit_input, cpu_threads=cpu_threads,
                              compile="on" if compiled else "off", length_bucket=length_bucket)
