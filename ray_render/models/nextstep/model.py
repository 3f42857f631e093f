"""NextStepModel: the Qwen2 backbone, the two image projectors and the flow-matching head, in one module.

The checkpoint's tensor names carry no prefix (`embed_tokens.weight`, `layers.0...`, `image_head.net...`);
`official_state_dict` / `load_official_state_dict` map between them and this module (whose backbone lives under
`backbone.`). `lm_head.weight` and `gen_pos_embed` are part of the released files; the image pipeline needs
neither (gen_pos_embed only when `use_gen_pos_embed` is on), so they are optional here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ray_render.models.nextstep.config import NextStepConfig
from ray_render.models.nextstep.head import FlowMatchingHead

# Checkpoint names that the image pipeline may ignore.
OPTIONAL_KEYS = ("lm_head.weight", "gen_pos_embed")


class StateDictError(ValueError):
    """Tensors missing, unexpected or of the wrong shape; the message lists them."""


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) 2-D sin-cos table (MAE style: half the channels for rows, half for columns)."""
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_d(dim // 2, gw), one_d(dim // 2, gh)], axis=1)


class NextStepModel(nn.Module):
    """Backbone (transformers Qwen2Model) + image_in_projector + image_out_projector + image_head.

    `forward(inputs_embeds, attention_mask)` returns the final-normed hidden states, for teacher-forced training;
    inference drives `backbone` with a KV cache directly (see generate.py).
    """

    def __init__(self, config: NextStepConfig, with_lm_head: bool = False, attn_implementation: str = "sdpa"):
        super().__init__()
        from transformers import Qwen2Model

        self.config = config
        self.backbone = Qwen2Model(config.qwen2_config(attn_implementation))
        if config.o_proj_bias:
            # transformers' Qwen2 has no o_proj bias; a checkpoint trained with one gets it here.
            for layer in self.backbone.layers:
                o_proj = layer.self_attn.o_proj
                layer.self_attn.o_proj = nn.Linear(o_proj.in_features, o_proj.out_features, bias=True)
        hidden = config.hidden_size
        self.image_in_projector = nn.Linear(config.token_dim, hidden)
        self.image_out_projector = nn.Linear(hidden, hidden)
        self.image_head = FlowMatchingHead(config.token_dim, hidden, config.fm_head_dim, config.fm_head_layers)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False) if with_lm_head else None
        if config.use_gen_pos_embed:
            table = sincos_pos_embed_2d(hidden, config.base_image_grid_size)
            self.register_buffer("gen_pos_embed", torch.from_numpy(table).float()[None], persistent=False)
        else:
            self.gen_pos_embed = None

    # Names ---------------------------------------------------------------------------------------------------

    @staticmethod
    def _to_official(name: str) -> str:
        return name[len("backbone."):] if name.startswith("backbone.") else name

    @staticmethod
    def _from_official(name: str) -> str:
        if name.startswith(("embed_tokens.", "layers.", "norm.")):
            return "backbone." + name
        return name

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the checkpoint's names (plus `gen_pos_embed`, as the released files carry it)."""
        sd = {self._to_official(k): v for k, v in self.state_dict().items() if "rotary_emb" not in k}
        hidden = self.config.hidden_size
        if self.gen_pos_embed is not None:
            sd["gen_pos_embed"] = self.gen_pos_embed
        elif hidden % 4 == 0:
            sd["gen_pos_embed"] = torch.from_numpy(sincos_pos_embed_2d(hidden, 32)).float()[None]
        return sd

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint name -> shape for every tensor this module needs."""
        return {self._to_official(k): tuple(v.shape) for k, v in self.state_dict().items() if "rotary_emb" not in k}

    def check_official_keys(self, shapes: dict[str, tuple[int, ...]], strict: bool = True) -> None:
        """Raise StateDictError listing missing, wrongly shaped and (if strict) unexpected tensors."""
        expected = self.expected_shapes()
        missing = sorted(set(expected) - set(shapes))
        wrong = sorted(f"{k} has shape {list(shapes[k])}, expected {list(expected[k])}"
                       for k in expected if k in shapes and tuple(shapes[k]) != expected[k])
        unexpected = sorted(k for k in set(shapes) - set(expected) if k not in OPTIONAL_KEYS)
        problems = []
        if missing:
            problems.append(f"missing tensors: {short_listing(missing)}")
        if wrong:
            problems.append("wrong shapes: " + short_listing(wrong))
        if unexpected and strict:
            problems.append(f"unexpected tensors: {short_listing(unexpected)}")
        if problems:
            raise StateDictError("; ".join(problems))

    def load_official_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Copy checkpoint tensors (official names) into this module, converting dtype and device."""
        self.check_official_keys({k: tuple(v.shape) for k, v in sd.items()}, strict=strict)
        own = self.state_dict()
        with torch.no_grad():
            for name, tensor in sd.items():
                local = self._from_official(name)
                if local in own:
                    own[local].copy_(tensor)
                elif name == "gen_pos_embed" and self.gen_pos_embed is not None:
                    self.gen_pos_embed.copy_(tensor.reshape(self.gen_pos_embed.shape))

    def holds(self, name: str) -> bool:
        """Whether the checkpoint tensor `name` is one this module uses (so it is worth reading at all)."""
        if name == "gen_pos_embed":
            return self.gen_pos_embed is not None
        if getattr(self, "_own_names", None) is None:
            self._own_names = frozenset(self.state_dict())  # fixed once built; state_dict() per tensor is slow
        return self._from_official(name) in self._own_names

    def copy_official_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor in (used when streaming a large checkpoint file by file)."""
        own = self.state_dict()
        local = self._from_official(name)
        with torch.no_grad():
            if local in own:
                own[local].copy_(tensor)
            elif name == "gen_pos_embed" and self.gen_pos_embed is not None:
                self.gen_pos_embed.copy_(tensor.reshape(self.gen_pos_embed.shape))

    # Compute ---------------------------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, image_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, hidden); the `image_placeholder_id` positions, in row-major order, take
        image_in_projector(image_tokens), image_tokens being (P, token_dim) with P = number of placeholders."""
        embeds = self.backbone.embed_tokens(input_ids)
        if image_tokens is not None:
            where = input_ids == self.config.image_placeholder_id
            if int(where.sum()) != image_tokens.shape[0]:
                raise ValueError(f"{int(where.sum())} image placeholders but {image_tokens.shape[0]} image tokens")
            embeds = embeds.clone()
            embeds[where] = self.image_in_projector(image_tokens.to(embeds.dtype))
        return embeds

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, hidden) of a full sequence (no cache): teacher-forced training.
        attention_mask (B, T) marks real tokens with 1; position_ids default to the slot index 0..T-1."""
        b, t = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(t, device=inputs_embeds.device).expand(b, t)
        out = self.backbone(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
        return out.last_hidden_state


def short_listing(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")
