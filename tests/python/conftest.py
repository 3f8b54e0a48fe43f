"""Shared fixtures: devices, tiny Qwen3-family configs built from their config classes (random weights, no
downloads), and patch/unpatch around each test that patches transformers."""

from __future__ import annotations

import pytest
import torch

import ropekit

HAS_CUDA = torch.cuda.is_available() and ropekit.has_cuda_kernels()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build of ropekit")


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def unpatch_after():
    ropekit.unpatch()
    yield
    ropekit.unpatch()


def uses_rope_parameters() -> bool:
    """transformers 5.x folds rope settings into config.rope_parameters; 4.57 has rope_theta/rope_scaling."""
    from transformers import Qwen3Config

    return hasattr(Qwen3Config(), "rope_parameters")


def rope_kwargs(rope_type: str = "default", theta: float = 1e6, **params) -> dict:
    """Config kwargs selecting a rope type, in whichever form the installed transformers takes."""
    if uses_rope_parameters():
        return {"rope_parameters": {"rope_type": rope_type, "rope_theta": theta, **params}}
    scaling = {"rope_type": rope_type, **params}
    if rope_type == "default" and not params:
        scaling = None
    return {"rope_theta": theta, "rope_scaling": scaling}


TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
)


def tiny_qwen3_config(rope_type: str = "default", **params):
    from transformers import Qwen3Config

    config = Qwen3Config(**TINY, **rope_kwargs(rope_type, **params))
    config._attn_implementation = "eager"
    return config


def tiny_qwen3_vl_text_config(mrope_section=(6, 5, 5), rope_type: str = "default", **params):
    from transformers import Qwen3VLTextConfig

    kwargs = rope_kwargs(rope_type, theta=5e6, mrope_section=list(mrope_section), **params)
    if not uses_rope_parameters() and kwargs["rope_scaling"] is None:
        kwargs["rope_scaling"] = {"rope_type": "default", "mrope_section": list(mrope_section)}
    config = Qwen3VLTextConfig(**TINY, **kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_qwen3_vl_config():
    """A tiny Qwen3-VL (text + vision tower) whose vision tokens use the real special token ids."""
    from transformers import Qwen3VLConfig

    text = dict(TINY, vocab_size=160000, max_position_embeddings=256)
    text.update(rope_kwargs("default", theta=5e6, mrope_section=[6, 5, 5], mrope_interleaved=True))
    if not uses_rope_parameters():
        text["rope_scaling"] = {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY["hidden_size"],
                  spatial_merge_size=2, patch_size=4, temporal_patch_size=2, in_channels=3,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Qwen3VLConfig(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    return config
