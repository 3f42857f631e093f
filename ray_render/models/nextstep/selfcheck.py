"""Runtime self-checks of a built NextStep backbone: what a transformers version can get wrong without an error.

- RoPE: transformers reads theta from whichever config key its version knows (`rope_parameters` in 5.x,
  `rope_theta` in 4.x); a key it does not read leaves theta at 1e4 instead of NextStep's 1e6, silently. The
  check compares the backbone's rotary frequencies, and the cos/sin they produce at far positions, with
  `1 / theta ** (2i / head_dim)` computed here.
- Attention: transformers' sdpa path applies the boolean 4-D masks this runtime passes; eager adds their 0/1
  values to the scores (nothing is masked), and flash-attention is not verified with them.

Both raise SelfCheckError with what was found and what to do. `ray-render doctor` runs them on the embedded model.
"""

from __future__ import annotations

import torch

SUPPORTED_ATTENTION = ("sdpa",)
# Positions whose phases are compared: the far end of a 1024x1024 render (4096 tokens plus a prompt).
_CHECK_POSITIONS = (0, 1, 1124, 4196)


class SelfCheckError(RuntimeError):
    """The loaded backbone would not compute what the checkpoint was trained with."""


def expected_inv_freq(theta: float, head_dim: int, precision: str) -> torch.Tensor:
    """(head_dim / 2,) float32 rotary frequencies; "bf16" rounds them to bfloat16 as the official pipeline's
    `.to(torch.bfloat16)` does to the whole model, buffers included."""
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if precision == "bf16":
        return inv_freq.to(torch.bfloat16).float()
    if precision == "fp32":
        return inv_freq
    raise ValueError(f"rope precision must be bf16 or fp32 here, got {precision!r}")


def check_rotary(backbone, theta: float, head_dim: int, precision: str) -> None:
    """Raise SelfCheckError unless `backbone` (a transformers Qwen2Model) rotates with `theta` at `precision`."""
    rotary = backbone.rotary_emb
    found = rotary.inv_freq.detach().float().cpu()
    expected = expected_inv_freq(theta, head_dim, precision)
    advice = ("install a transformers version in the range ray-render is tested with (see `ray-render doctor`); "
              "transformers 4.x reads rope_theta, 5.x rope_parameters")
    if found.shape != expected.shape:
        raise SelfCheckError(f"RoPE: the backbone has {found.numel()} rotary frequencies, head_dim {head_dim} "
                             f"needs {expected.numel()}; {advice}")
    # bf16 frequencies must be bf16 values (within one bf16 step of ours: transformers' float32 formula may round
    # the other way at a tie); fp32 ones must be the float32 formula's.
    if precision == "bf16":
        close = bool((found == found.to(torch.bfloat16).float()).all()) and torch.allclose(found, expected,
                                                                                              rtol=2**-8, atol=0.0)
    else:
        close = torch.allclose(found, expected, rtol=1e-6, atol=0.0)
    if not close:
        # inv_freq[1] = theta ** (-2 / head_dim): the theta transformers actually used.
        used = float(found[1] ** (-head_dim / 2)) if found.numel() > 1 and found[1] > 0 else float("nan")
        raise SelfCheckError(f"RoPE: the backbone's rotary frequencies are not those of theta {theta:.4g} in "
                             f"{precision} (they are theta {used:.4g}'s, max difference "
                             f"{(found - expected).abs().max():.3g}); {advice}")
    positions = torch.tensor([_CHECK_POSITIONS], device=rotary.inv_freq.device)
    probe = torch.zeros(1, len(_CHECK_POSITIONS), head_dim, device=rotary.inv_freq.device)
    with torch.no_grad():
        cos, sin = rotary(probe, positions)
    angles = torch.tensor(_CHECK_POSITIONS, dtype=torch.float32)[:, None] * expected  # (P, head_dim / 2)
    want = torch.cat([angles, angles], dim=-1)
    error = max((cos[0].float().cpu() - want.cos()).abs().max(), (sin[0].float().cpu() - want.sin()).abs().max())
    if error > 1e-3:
        raise SelfCheckError(f"RoPE: cos/sin at positions {list(_CHECK_POSITIONS)} are off by up to {error:.3g} "
                             f"from theta {theta:.4g}; {advice}")


def check_attention(backbone) -> None:
    """Raise SelfCheckError unless the backbone runs an attention implementation that applies our masks."""
    found = getattr(backbone.config, "_attn_implementation", None)
    if found not in SUPPORTED_ATTENTION:
        raise SelfCheckError(f"attention: the backbone runs {found!r}, but only {', '.join(SUPPORTED_ATTENTION)} "
                             "applies the boolean padding masks correctly (eager adds them to the scores; "
                             "flash-attention is not verified with them); load with attn_implementation='sdpa'")


def check_backbone(backbone, theta: float, head_dim: int, precision: str) -> None:
    """All self-checks of a built backbone (see the module docstring)."""
    check_attention(backbone)
    check_rotary(backbone, theta, head_dim, precision)
