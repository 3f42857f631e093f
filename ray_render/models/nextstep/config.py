"""NextStepConfig: the hyper-parameters of a NextStep checkpoint, read from its config.json.

The published configs come in two spellings: NextStep-1 (`fm_head_dim`, `fm_head_layers`, `latent_channels`,
`latent_patch_size`) and NextStep-1.1 (`genloss_width`, `genloss_depth`, `num_channels`, `patch_size`). Both read
into the same dataclass; `to_dict` writes the NextStep-1 spelling plus `nextstep_version`, so the sampler survives
a round trip. Fields the runtime does not use are kept in `extra` and written back unchanged.

Which sampler a checkpoint needs is read from an explicit fact when there is one: `nextstep_version` here, or the
snapshot's own name (see snapshot.read_identity); the spelling of the fields is only the last resort, and
`version_source` says which decided.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

# NextStep-1.1 name -> NextStep-1 name.
_V11_ALIASES = {
    "genloss_width": "fm_head_dim",
    "genloss_depth": "fm_head_layers",
    "num_channels": "latent_channels",
    "patch_size": "latent_patch_size",
}
MODEL_TYPES = ("nextstep",)
VERSIONS = ("1", "1.1")


class ConfigFileError(ValueError):
    """A config.json that cannot describe a NextStep model; the message names the file and the field."""


@dataclass
class NextStepConfig:
    """Everything the runtime needs to build a NextStep model (defaults: NextStep-1-Large)."""

    # Backbone (Qwen2.5-14B in the released models).
    vocab_size: int = 152064
    hidden_size: int = 5120
    intermediate_size: int = 13824
    num_hidden_layers: int = 48
    num_attention_heads: int = 40
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 131072
    hidden_act: str = "silu"
    attention_bias: bool = True  # q/k/v biases
    # o_proj bias. None (absent from config.json) means "same as attention_bias", as in the official config class;
    # snapshot.settle_o_attention_bias decides it against the checkpoint's tensors.
    o_attention_bias: bool | None = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    # Image tokens: a token is latent_channels * latent_patch_size**2 values.
    latent_channels: int = 16
    latent_patch_size: int = 2
    # Flow-matching head.
    fm_head_dim: int = 1536
    fm_head_layers: int = 12
    # Special ids.
    boi: int = 151667
    eoi: int = 151668
    image_placeholder_id: int = 151669
    pad_token_id: int | None = 151643
    bos_token_id: int | None = None
    eos_token_id: int | None = 151643
    # Optional 2-D sin-cos position added to each image token's condition (off in released configs).
    use_gen_pos_embed: bool = False
    base_image_grid_size: int = 32  # grid of gen_pos_embed (NextStep-1 hard-codes 32, NextStep-1.1 reads it)
    vae_name_or_path: str | None = "vae"
    torch_dtype: str | None = None  # how the weights are stored
    # "1": S-point grid to 0.96 plus a 0.04 Euler step; "1.1": S+1-point grid to 1.0, all steps stochastic.
    version: str = "1"
    # What decided `version`: "nextstep_version" (config.json says so), "field names" (the 1.1 spelling, a guess),
    # "default"; snapshot.read_identity may settle it from the snapshot's name instead of the spelling.
    version_source: str = field(default="default", compare=False)
    extra: dict = field(default_factory=dict)  # unknown fields, kept for to_dict

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.version not in VERSIONS:
            raise ConfigFileError(f"nextstep_version must be one of {', '.join(VERSIONS)}, got {self.version!r}")

    @property
    def o_proj_bias(self) -> bool:
        """Whether o_proj has a bias: o_attention_bias, or when that is unset, attention_bias (the official rule)."""
        return self.attention_bias if self.o_attention_bias is None else bool(self.o_attention_bias)

    @property
    def token_dim(self) -> int:
        """Values per image token: channels x patch x patch (64 in the released models)."""
        return self.latent_channels * self.latent_patch_size**2

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> NextStepConfig:
        """Read a NextStep-1 or NextStep-1.1 config dict; `source` names the file in error messages."""
        d = dict(d)
        model_type = d.pop("model_type", "nextstep")
        if model_type not in MODEL_TYPES:
            raise ConfigFileError(
                f"{source}: unknown model_type {model_type!r}; expected one of {', '.join(MODEL_TYPES)}")
        explicit_version = d.pop("nextstep_version", None)
        spelled_v11 = any(new in d for new in _V11_ALIASES)
        if explicit_version is not None:
            version, version_source = str(explicit_version), "nextstep_version"
        else:
            version, version_source = ("1.1", "field names") if spelled_v11 else ("1", "default")
        d.setdefault("o_attention_bias", None)  # absent: see o_proj_bias
        for new, old in _V11_ALIASES.items():
            if new in d:
                if old in d and d[old] != d[new]:
                    raise ConfigFileError(f"{source}: {new}={d[new]!r} contradicts {old}={d[old]!r}")
                d[old] = d.pop(new)
        if "image_size" in d and "base_image_grid_size" not in d and version == "1.1":
            d["base_image_grid_size"] = d["image_size"]
        rope_scaling = d.pop("rope_scaling", None)
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters:  # transformers 5 spelling
            d.setdefault("rope_theta", rope_parameters.get("rope_theta", cls.rope_theta))
            rope_scaling = rope_scaling or {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type", "default")) != "default":
            raise ConfigFileError(f"{source}: rope_scaling {rope_scaling!r} is not supported; expected the "
                                  "default RoPE (rope_scaling null)")
        if "dtype" in d and "torch_dtype" not in d:
            d["torch_dtype"] = d.pop("dtype")
        known = {f.name for f in fields(cls)} - {"extra", "version", "version_source"}
        kwargs = {k: d.pop(k) for k in list(d) if k in known}
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if k not in kwargs]
        if missing:
            raise ConfigFileError(f"{source}: missing required field(s) {', '.join(missing)}")
        cfg = cls(**kwargs, version=version, version_source=version_source, extra=d)
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> NextStepConfig:
        """Read config.json; errors name the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file; a NextStep snapshot needs config.json")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigFileError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def validate(self, source: str = "config.json") -> None:
        """Refuse settings the Qwen2 backbone cannot express, with the field and the supported value."""
        wrong = []
        if not self.attention_bias:
            wrong.append("attention_bias must be true (q/k/v biases)")
        if self.mlp_bias:
            wrong.append("mlp_bias must be false")
        if self.hidden_act != "silu":
            wrong.append(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            wrong.append("num_attention_heads must be a multiple of num_key_value_heads")
        if self.extra.get("use_2d_rope"):
            wrong.append("use_2d_rope must be false (2-D RoPE is not implemented)")
        for name in ("boi", "eoi", "image_placeholder_id"):
            if getattr(self, name) is None:
                wrong.append(f"{name} must be set")
        if wrong:
            raise ConfigFileError(f"{source}: unsupported NextStep config: " + "; ".join(wrong))

    def to_dict(self) -> dict:
        """The NextStep-1 spelling, as the official loaders read it."""
        d: dict[str, Any] = {"architectures": ["NextStep"], "model_type": "nextstep"}
        d.update(self.extra)
        for f in fields(self):
            if f.name in ("extra", "version", "version_source", "base_image_grid_size"):
                continue
            d[f.name] = getattr(self, f.name)
        d["rope_scaling"] = None
        if self.version != "1" or self.base_image_grid_size != 32:
            d["base_image_grid_size"] = self.base_image_grid_size
        d["nextstep_version"] = self.version
        return dict(sorted(d.items()))

    def to_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def qwen2_config(self, attn_implementation: str = "sdpa"):
        """The transformers Qwen2Config of the backbone."""
        from transformers import Qwen2Config

        cfg = Qwen2Config(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, hidden_act=self.hidden_act,
            rope_parameters={"rope_type": "default", "rope_theta": float(self.rope_theta)},
            tie_word_embeddings=False, use_sliding_window=False, pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id,
            attn_implementation=attn_implementation,
        )
        cfg.head_dim = self.head_dim
        return cfg
