"""Prompt rows and token ids: how a batch of requests becomes the backbone's prefill input.

Per image b there are `branches` rows, laid out branch-major ([conditional x B, second branch x B, ...]) as the
reference pipeline does:

    1 branch   caption
    2 branches caption, negative                      (text guidance)
    3 branches caption, image string + negative, negative  (edit: image and text guidance)

caption = prompt with `<image>` replaced by the image string, then " " + positive prompt when there is one.
Each row is tokenized on its own (no padding), `<|image_area|>{h}*{w}` + `<|begin_of_image|>` is appended, and
rows are left-padded with the pad id to the longest row. For a single request this gives exactly the reference
ids (which pad the captions first and then append the prefix); in a batch it also keeps rows whose prefixes
differ in length (e.g. 5*8 and 4*10) aligned on their last token.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from ray_render.models.base import EDIT_TAG

IMAGE_TAG = EDIT_TAG  # "<image>": where an edit prompt puts its input image
IMAGE_AREA = "<|image_area|>"


@dataclass
class PromptIds:
    input_ids: torch.Tensor  # (R, L) int64, left-padded
    attention_mask: torch.Tensor  # (R, L) int64, 0 on padding
    texts: list[str]  # the R rows given to the tokenizer


class PromptBuilder:
    """Builds the rows and ids for one model's tokenizer and special ids."""

    def __init__(self, tokenizer, boi: int, eoi: int, placeholder: int, pad_id: int, add_bos_text: bool = False):
        self.tokenizer = tokenizer
        # An actor checks one call's rows (count) while its other call renders (build): a fast tokenizer must not
        # be entered from two threads at once (its Rust object is borrowed mutably per call).
        self._tokenizing = threading.Lock()
        self.boi, self.eoi, self.placeholder, self.pad_id = boi, eoi, placeholder, pad_id
        # NextStep-1.1 prepends the BOS string to every row when the tokenizer has one.
        self.bos_text = tokenizer.bos_token if (add_bos_text and tokenizer.bos_token) else ""

    def image_string(self, grid_h: int, grid_w: int) -> str:
        """`<|image_area|>h*w<|begin_of_image|>` + one placeholder per token + `<|end_of_image|>`."""
        ids = [self.boi] + [self.placeholder] * (grid_h * grid_w) + [self.eoi]
        with self._tokenizing:
            return f"{IMAGE_AREA}{grid_h}*{grid_w}" + self.tokenizer.decode(ids)

    def rows(self, prompt: str, positive: str, negative: str, branches: int, image_str: str | None) -> list[str]:
        """The texts of one image's rows, one per guidance branch."""
        caption = prompt.replace(IMAGE_TAG, image_str, 1) if image_str is not None else prompt
        if positive:
            caption = f"{caption} {positive}"
        negative = negative or ""
        if branches == 1:
            return [caption]
        if branches == 2:
            return [caption, negative]
        return [caption, (image_str or "") + negative, negative]

    def _encode(self, texts):
        """The tokenizer's ids of a text (or of each of a list of texts), special tokens added."""
        with self._tokenizing:
            return self.tokenizer(texts, add_special_tokens=True)["input_ids"]

    def prefix_ids(self, grid_h: int, grid_w: int) -> list[int]:
        ids = self._encode(f"{IMAGE_AREA}{grid_h}*{grid_w}")
        if self.tokenizer.bos_token is not None:  # the reference drops the prefix's BOS only
            ids = ids[1:]
        return ids + [self.boi]

    def count(self, text: str) -> int:
        """Token count of one row's text (used to check the context length)."""
        return len(self._encode(self.bos_text + text))

    def build(self, texts: list[str], grids: list[tuple[int, int]]) -> PromptIds:
        """Ids for rows `texts`, row r ending with the image prefix of `grids[r]` (patch-grid height, width)."""
        texts = [self.bos_text + t for t in texts]
        encoded = self._encode(texts)
        prefixes: dict[tuple[int, int], list[int]] = {}
        rows = []
        for ids, grid in zip(encoded, grids):
            if grid not in prefixes:
                prefixes[grid] = self.prefix_ids(*grid)
            rows.append(list(ids) + prefixes[grid])
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for r, ids in enumerate(rows):
            input_ids[r, length - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[r, length - len(ids):] = 1
        return PromptIds(input_ids, mask, texts)
