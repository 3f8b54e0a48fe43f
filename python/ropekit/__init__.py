"""ropekit: exact, fast and trainable rotary position embeddings for Qwen-family and other mRoPE models."""

from . import data, ops
from .modules import CachedMRotaryEmbedding, CachedRotaryEmbedding, RopeTable
from .ops import (apply_rope, apply_rope_vision, mrope_cos_sin, qk_norm_rope, qk_norm_rope_qkv_, rope_cache,
                  rope_cos_sin, rope_index)
from .transformers import (apply_to_cohere_compass, apply_to_cosmos3, apply_to_ernie4_5_vl, apply_to_glm4v,
                           apply_to_glm_ocr, apply_to_hunyuan_vl, apply_to_hy_v4_vl, apply_to_model,
                           apply_to_paddleocr_vl, apply_to_qwen2_5_omni, apply_to_qwen3_omni_moe,
                           apply_to_qwen2_5_vl, apply_to_qwen2_vl, apply_to_qwen3, apply_to_qwen3_5, apply_to_qwen3_vl,
                           apply_to_qwen4_exp, unpatch)

__version__ = "0.1.0"

__all__ = [
    "rope_cache",
    "rope_cos_sin",
    "mrope_cos_sin",
    "apply_rope",
    "apply_rope_vision",
    "rope_index",
    "qk_norm_rope",
    "qk_norm_rope_qkv_",
    "RopeTable",
    "CachedRotaryEmbedding",
    "CachedMRotaryEmbedding",
    "apply_to_qwen3",
    "apply_to_qwen3_vl",
    "apply_to_qwen3_5",
    "apply_to_qwen2_vl",
    "apply_to_qwen2_5_vl",
    "apply_to_qwen4_exp",
    "apply_to_glm4v",
    "apply_to_paddleocr_vl",
    "apply_to_glm_ocr",
    "apply_to_cosmos3",
    "apply_to_cohere_compass",
    "apply_to_ernie4_5_vl",
    "apply_to_hunyuan_vl",
    "apply_to_hy_v4_vl",
    "apply_to_qwen2_5_omni",
    "apply_to_qwen3_omni_moe",
    "apply_to_model",
    "unpatch",
    "has_cuda_kernels",
]


def has_cuda_kernels() -> bool:
    """True when this build of ropekit carries CUDA kernels."""
    import torch

    return torch._C._dispatch_has_kernel_for_dispatch_key("ropekit::apply_rope", "CUDA")
