"""Shared fixtures: devices, tiny Qwen3-family configs built from their config classes (random weights, no
downloads), model/input builders, and patch/unpatch around each test that patches transformers."""

from __future__ import annotations

import importlib
import inspect

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


TINY_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TINY["hidden_size"],
              spatial_merge_size=2, patch_size=4, temporal_patch_size=2, in_channels=3, num_position_embeddings=64)


def tiny_qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(**TINY, **TINY_MOE, **rope_kwargs())
    config._attn_implementation = "eager"
    return config


def tiny_qwen3_vl_config(moe: bool = False):
    """A tiny Qwen3-VL (text + vision tower; moe=True: Qwen3-VL-MoE) whose vision tokens use the real special
    token ids."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    text = dict(TINY, vocab_size=160000, max_position_embeddings=256, **(TINY_MOE if moe else {}))
    text.update(rope_kwargs("default", theta=5e6, mrope_section=[6, 5, 5], mrope_interleaved=True))
    if not uses_rope_parameters():
        text["rope_scaling"] = {"rope_type": "default", "mrope_section": [6, 5, 5], "mrope_interleaved": True}
    vision = dict(VISION, deepstack_visual_indexes=[0])
    config = (Qwen3VLMoeConfig if moe else Qwen3VLConfig)(text_config=text, vision_config=vision)
    config._attn_implementation = "eager"
    return config


def has_qwen3_5() -> bool:
    try:
        importlib.import_module("transformers.models.qwen3_5.modeling_qwen3_5")
    except ImportError:
        return False
    return True


def tiny_qwen3_5_text_config(moe: bool = False, **overrides):
    """A tiny Qwen3.5 (or Qwen3.5-MoE) text config: a linear-attention layer then a gated full-attention layer,
    partial rotary 0.25 of head_dim 64: 8 frequencies in interleaved mRoPE sections [3, 3, 2], with rope_theta 1e4
    so that all 8 turn by a visible angle at the few dozen positions a tiny test uses."""
    from transformers import Qwen3_5MoeTextConfig, Qwen3_5TextConfig

    kwargs = dict(
        TINY, head_dim=64, layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
        linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    )
    if moe:
        del kwargs["intermediate_size"]  # every Qwen3.5-MoE layer is sparse
        kwargs.update(TINY_MOE, shared_expert_intermediate_size=32)
    kwargs.update(overrides)
    config = (Qwen3_5MoeTextConfig if moe else Qwen3_5TextConfig)(**kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_qwen3_5_config(moe: bool = False):
    """A tiny Qwen3.5 (or Qwen3.5-MoE) conditional-generation config with the real special token ids."""
    from transformers import Qwen3_5Config, Qwen3_5MoeConfig

    text = tiny_qwen3_5_text_config(moe, vocab_size=248320, max_position_embeddings=256)
    config = (Qwen3_5MoeConfig if moe else Qwen3_5Config)(text_config=text.to_dict(), vision_config=dict(VISION))
    config._attn_implementation = "eager"
    return config


def build(cls, config, device, seed=0):
    """A model with random weights, norm weights included (their init of ones/zeros would hide weight mistakes)."""
    torch.manual_seed(seed)
    model = cls(config)
    zero_centred = any(family in type(model).__module__ for family in ("qwen3_5", "qwen4_exp"))  # (1 + w) norms
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0 if zero_centred else 1.0, 0.2)
    return model.to(device).eval()


_SAME_WIDTH_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: same dtype, shape and bit pattern (``torch.equal`` takes -0 for +0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = _SAME_WIDTH_INT[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _count_calls(monkeypatch, op_name: str) -> list:
    """Wraps ropekit.ops.<op_name> (what the patched transformers code calls) to record each call."""
    calls = []
    real = getattr(ropekit.ops, op_name)
    monkeypatch.setattr(ropekit.ops, op_name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def count_fused(monkeypatch):
    """Counts calls of the fused q/k norm + RoPE op made by the patched attention."""
    return _count_calls(monkeypatch, "qk_norm_rope")


@pytest.fixture
def count_apply_rope(monkeypatch):
    """Counts calls of ropekit.apply_rope made by the patched apply_rotary_pos_emb (families without q/k norms)."""
    return _count_calls(monkeypatch, "apply_rope")


@pytest.fixture
def count_rope_index(monkeypatch):
    """Counts calls of ropekit.rope_index made by the patched get_rope_index."""
    return _count_calls(monkeypatch, "rope_index")


def multimodal_batch(config, generator):
    """Two rows: an image + a 2-frame video (timestamps between frames), and a left-padded row with one image."""
    image, video, start, end = (config.image_token_id, config.video_token_id, config.vision_start_token_id,
                                config.vision_end_token_id)
    merge = config.vision_config.spatial_merge_size
    image_grid = torch.tensor([[1, 4, 6], [1, 4, 4]])
    video_grid = torch.tensor([[2, 4, 4]])
    tokens = lambda t, h, w: t * h * w // merge**2  # noqa: E731
    row0 = [11, 12, start] + [image] * tokens(1, 4, 6) + [end, 13, 14, start] + [video] * tokens(1, 4, 4) + [end, 15]
    row0 += [start] + [video] * tokens(1, 4, 4) + [end, 16]
    row1 = [21, start] + [image] * tokens(1, 4, 4) + [end, 22, 23]
    seq = len(row0)
    ids = torch.tensor([row0, [0] * (seq - len(row1)) + row1])
    mask = torch.tensor([[1] * seq, [0] * (seq - len(row1)) + [1] * len(row1)])
    patch_dim = 3 * config.vision_config.temporal_patch_size * config.vision_config.patch_size**2
    inputs = dict(
        input_ids=ids, attention_mask=mask, image_grid_thw=image_grid, video_grid_thw=video_grid,
        pixel_values=torch.randn(int(image_grid.prod(-1).sum()), patch_dim, generator=generator),
        pixel_values_videos=torch.randn(int(video_grid.prod(-1).sum()), patch_dim, generator=generator),
    )
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    if "mm_token_type_ids" in inspect.signature(Qwen3VLModel.get_rope_index).parameters:
        inputs["mm_token_type_ids"] = torch.where(ids == image, 1, torch.where(ids == video, 2, 0))
    return inputs
