"""The tiny-model training script: a miniature run writes a snapshot the runtime loads, and is deterministic."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ray_render.models import RenderRequest, load_model  # noqa: E402
from ray_render.models.nextstep import train_tiny  # noqa: E402

# A few steps of every stage on a model a fraction of the shipped size: enough to exercise the whole path.
MICRO = train_tiny.Recipe(vae_crop_steps=2, vae_full_steps=1, vae_crop_batch=4, vae_full_batch=2, num_pictures=48,
                          hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                          head_width=32, head_depth=1, steps=3, batch=4, warmup=1)


def _digest(directory) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    first = train_tiny.train(root / "a", seed=3, recipe=MICRO)
    second = train_tiny.train(root / "b", seed=3, recipe=MICRO)
    return first, second


def test_same_seed_same_weights(two_runs):
    first, second = two_runs
    assert _digest(first) == _digest(second)


def test_snapshot_loads_and_renders_through_the_runtime(two_runs):
    path, _ = two_runs
    names = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vae/config.json", "vae/checkpoint.pt",
            "render_defaults.json"} <= names
    model = load_model(str(path), device="cpu")
    defaults = model.defaults()
    assert (defaults["width"], defaults["height"], defaults["use_norm"]) == (64, 64, True)
    request = RenderRequest(key="r#0", prompt="a red circle on a blue background", width=64, height=64,
                            cfg=defaults["cfg"], num_sampling_steps=3, use_norm=True, seed=1)
    (image,) = model.render([request])
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8


def test_tokenizer_keeps_nextstep_special_tokens_after_the_bpe_ids():
    tokenizer = train_tiny.train_tokenizer(MICRO)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in train_tiny.SPECIAL_TOKENS]
    bpe = len(tokenizer) - len(ids)
    assert ids == list(range(bpe, bpe + len(ids)))
    assert tokenizer.pad_token == "[PAD]" and tokenizer.bos_token is None and tokenizer.padding_side == "left"
    text = "a small cyan diamond at the top left on a black background"
    encoded = tokenizer(text)["input_ids"]
    assert max(encoded) < bpe and tokenizer.decode(encoded) == text
    assert len(tokenizer("<|image_area|>4*4")["input_ids"]) == 4  # the special token, then "4", "*", "4"
