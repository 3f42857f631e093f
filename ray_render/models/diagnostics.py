"""What a machine check needs to know of torch and the model runtime, without rendering anything: the CUDA
devices, the RoPE self-checks on the embedded model, and whether a snapshot is complete. `ray-render doctor`
(tools/doctor.py) reports these; torch is imported here, under models/, and only when a check runs."""

from __future__ import annotations

import os
from typing import NamedTuple

BF16_CAPABILITY = (8, 0)  # Ampere and later compute in bfloat16 natively


class Finding(NamedTuple):
    """One check's outcome: "ok", "warn" or "fail", a line for people, and the figures."""

    status: str
    detail: str
    data: dict = {}


def cuda_devices() -> Finding:
    """The CUDA devices torch sees: name, memory, compute capability, native bfloat16."""
    import torch

    if not torch.cuda.is_available():
        return Finding("ok", f"no CUDA device (torch {torch.__version__}): renders on this machine run on "
                       "the CPU in float32", {"devices": []})
    devices, no_bf16 = [], []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        capability = (props.major, props.minor)
        bf16 = capability >= BF16_CAPABILITY
        devices.append({"index": i, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                        "capability": f"{props.major}.{props.minor}", "bf16": bf16})
        if not bf16:
            no_bf16.append(f"cuda:{i}")
    summary = ", ".join(f"cuda:{d['index']} {d['name']} {d['memory_gib']} GiB sm_{d['capability']}" for d in devices)
    data = {"devices": devices, "cuda": torch.version.cuda}
    if no_bf16:
        return Finding("warn", f"{summary}; no native bfloat16 on {', '.join(no_bf16)}: use --dtype float32 "
                       "there (float16 is refused)", data)
    return Finding("ok", f"{summary}; bfloat16 on every device (CUDA {torch.version.cuda})", data)


def embedded_rope() -> Finding:
    """The loader's self-checks on the embedded model, with float32 and the official bf16 frequencies (and on
    the GPU when there is one); plus how far the bf16 phase drifts at NextStep-1's size."""
    import torch

    from ray_render.models.nextstep import load_nextstep
    from ray_render.models.nextstep.selfcheck import expected_inv_freq

    loaded = []
    targets = [("cpu", "float32")] + ([("cuda", "bfloat16")] if torch.cuda.is_available() else [])
    for device, dtype in targets:
        for precision in ("fp32", "bf16"):
            model = load_nextstep("tiny", device=device, dtype=dtype, rope_precision=precision)  # runs the checks
            loaded.append(f"{device} {dtype} {precision}")
    config = model.config
    # Phase at the end of a 1024x1024 render (position 4196) for NextStep-1-Large (theta 1e6, head_dim 128).
    drift = float(((expected_inv_freq(1e6, 128, "fp32") - expected_inv_freq(1e6, 128, "bf16")) * 4196).abs().max())
    return Finding("ok", f"embedded model: theta {config.rope_theta:.4g}, head_dim {config.head_dim}, "
                   f"attention sdpa, checked on {', '.join(loaded)}; bf16 vs fp32 RoPE phase at "
                   f"position 4196 of NextStep-1: {drift:.2f} rad",
                   {"theta": config.rope_theta, "loaded": loaded, "bf16_phase_drift_rad_at_4196": round(drift, 3)})




def nextstep_snapshot(name: str) -> Finding:
    """A NextStep snapshot found (never downloaded) and described without loading weights: tensor names and shapes
    from the headers, the tokenizer, the VAE files."""
    import torch

    from ray_render.models.nextstep import snapshot as snap
    from ray_render.models.nextstep.model import NextStepModel
    from ray_render.models.nextstep.resolve import HUB_ID, resolve, resolve_vae, tiny_dir

    if name != "tiny" and not os.path.exists(os.path.expanduser(name)) and HUB_ID.match(name):
        from huggingface_hub import snapshot_download

        from ray_render.models.nextstep.resolve import HUB_PATTERNS

        try:  # the local cache only: doctor never downloads a checkpoint
            directory = snapshot_download(name, local_files_only=True, allow_patterns=HUB_PATTERNS)
        except Exception:  # noqa: BLE001 - huggingface_hub raises several kinds for "not cached"
            return Finding("warn", f"{name}: not in the local hub cache; the first render on each node "
                           "downloads it (set HF_HUB_OFFLINE=1 to forbid that)")
    else:
        directory = tiny_dir() if name == "tiny" else resolve(name).path
    config = snap.settle_o_attention_bias(snap.read_config(directory), directory)
    identity = snap.read_identity(directory, config, name)
    with torch.device("meta"):  # names and shapes only: no memory for the weights
        expected = NextStepModel(config)
    expected.check_official_keys(snap.tensor_shapes(snap.weight_files(directory)))
    snap.load_tokenizer(directory)
    vae_dir = resolve_vae(None, directory, config.vae_name_or_path)
    for needed in (vae_dir / snap.VAE_CONFIG_FILE, vae_dir / snap.VAE_WEIGHTS_FILE):
        if not needed.is_file():
            return Finding("fail", f"{needed}: missing")
    task = "edit" if identity.edit else "text to image"
    return Finding("ok", f"{directory}: NextStep-{identity.version} ({identity.version_source}), {task} "
                   f"({identity.edit_source}); tensor names and shapes, tokenizer and VAE in place",
                   {"path": str(directory), "version": identity.version, "edit": identity.edit})
