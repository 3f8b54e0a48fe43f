"""Tiny models of the mRoPE families beyond Qwen3-VL / Qwen3.5 (Qwen2-VL, Qwen2.5-VL, Qwen4-Exp, GLM-4V,
GLM-4V-MoE, GLM-4.6V), built from their config classes with random weights, for whichever transformers line is
installed; and multimodal batches in each family's own token layout (images, multi-frame videos, left padding).

The configs are as small as the modeling code allows (one or two text layers, a one-block vision tower, a
256-token vocabulary with the special tokens renumbered into it), so that a model forward takes milliseconds on a
CPU; their rotary settings still exercise what matters: every mRoPE section non-empty, partial rotary where the
family has it (GLM-4V, GLM-4V-MoE, Qwen4-Exp), rope_theta low enough that every frequency turns visibly at the few
dozen positions a test uses.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from dataclasses import dataclass
from typing import Callable

import torch

import ropekit
from conftest import build, uses_rope_parameters

VOCAB = 256
PAD = 0
# special tokens, renumbered below VOCAB (the real ids would need a ~150k-row embedding and lm_head)
QWEN_IDS = dict(image_token_id=250, video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
GLM_IDS = dict(image_token_id=250, video_token_id=251, image_start_token_id=246, image_end_token_id=247,
               video_start_token_id=248, video_end_token_id=249)
TEXT_IDS = (2, 240)  # ordinary text tokens are drawn from [2, 240): no pad, no special token among them


def _text_rope(mrope_section, theta=1e4, partial=None) -> dict:
    """Text-config kwargs for default RoPE with these mRoPE sections, in the installed line's form."""
    if uses_rope_parameters():
        params = {"rope_type": "default", "rope_theta": theta, "mrope_section": list(mrope_section)}
        if partial is not None:
            params["partial_rotary_factor"] = partial
        return {"rope_parameters": params}
    kwargs = {"rope_theta": theta, "rope_scaling": {"rope_type": "default", "mrope_section": list(mrope_section)}}
    if partial is not None:
        kwargs["partial_rotary_factor"] = partial
    return kwargs


TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD)


def qwen2_vl_config(version: str = "2"):
    """Qwen2-VL (version "2") or Qwen2.5-VL ("2.5"): head_dim 16, sections [2, 3, 3] (8 frequencies, full rotary)."""
    import transformers

    text = dict(TEXT, **_text_rope([2, 3, 3]))
    if version == "2":
        cls = transformers.Qwen2VLConfig
        vision = dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, mlp_ratio=2,
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
    else:
        cls = transformers.Qwen2_5_VLConfig
        # tokens_per_second 2: a video's temporal positions step by 2 * second_per_grid_ts
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"],
                      patch_size=4, spatial_merge_size=2, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1], tokens_per_second=2)
    config = cls(text_config=text, vision_config=vision, **QWEN_IDS)
    config._attn_implementation = "eager"
    return config


def glm4v_config(kind: str = "glm4v", **text_overrides):
    """GLM-4V ("glm4v"), GLM-4V-MoE ("glm4v_moe") or GLM-4.6V ("glm46v"): head_dim 32 with partial rotary 0.5, so 16
    rotary channels, 8 frequencies in sections [2, 3, 3]; the other 16 channels pass through."""
    import transformers

    text = dict(TEXT, hidden_size=128, intermediate_size=128, **_text_rope([2, 3, 3], partial=0.5))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, image_size=32, spatial_merge_size=2, temporal_patch_size=2)
    if kind == "glm4v_moe":
        text.update(moe_intermediate_size=32, num_experts_per_tok=2, n_shared_experts=1, n_routed_experts=4,
                    first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True, head_dim=32)
        cls = transformers.Glm4vMoeConfig
    elif kind == "glm46v":
        cls = transformers.Glm46VConfig
        text["model_type"], vision["model_type"] = "glm4v_text", "glm4v_vision"
    else:
        cls = transformers.Glm4vConfig
    text.update(text_overrides)
    config = cls(text_config=text, vision_config=vision, **GLM_IDS)
    config._attn_implementation = "eager"
    return config


def qwen4_exp_text_config(**overrides):
    """Qwen4-Exp text: a linear-attention layer, then an indexed (sparse) attention layer with zero-centred q/k norms,
    output gate and the QSA indexer (budget 4 tokens in blocks of 2, so it really selects on the test's lengths);
    head_dim 64, partial rotary 0.25: 16 channels, 8 frequencies in interleaved sections [3, 3, 2]."""
    from transformers import Qwen4ExpTextConfig

    kwargs = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=64, max_position_embeddings=256, pad_token_id=PAD, eos_token_id=1,
        layer_types=["linear_attention", "indexed_attention"], linear_num_key_heads=2, linear_num_value_heads=2,
        linear_key_head_dim=16, linear_value_head_dim=16, moe_intermediate_size=32,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2, hc_count=2, hc_lowrank=8,
        indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32, indexer_budget=4, indexer_compress_ratio=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.25,
                         "mrope_section": [3, 3, 2], "mrope_interleaved": True},
    )
    kwargs.update(overrides)
    config = Qwen4ExpTextConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def qwen4_exp_config(**text_overrides):
    from transformers import Qwen4ExpConfig

    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=4,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64)
    text = qwen4_exp_text_config(**text_overrides).to_dict()
    config = Qwen4ExpConfig(text_config=text, vision_config=vision, **QWEN_IDS)
    config._attn_implementation = "eager"
    return config


def paddleocr_vl_config():
    """PaddleOCR-VL (5.x): Qwen2-VL's text model (head_dim 16, sections [2, 3, 3]) and a one-layer SigLIP tower
    (patches of 4 pixels, a 4 x 4 learned position grid, interpolated per image)."""
    from transformers import PaddleOCRVLConfig

    text = dict(TEXT, head_dim=16, **_text_rope([2, 3, 3]))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                  image_size=16, spatial_merge_size=2)
    config = PaddleOCRVLConfig(text_config=text, vision_config=vision, **QWEN_IDS)
    config._attn_implementation = "eager"
    return config


def glm_ocr_config():
    """GLM-OCR (5.x): GLM-4V's text model (head_dim 32, partial rotary 0.5: 8 frequencies in sections [2, 3, 3])
    and a one-block tower with q/k norms."""
    from transformers import GlmOcrConfig

    text = dict(TEXT, hidden_size=128, intermediate_size=128, **_text_rope([2, 3, 3], partial=0.5))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, image_size=32, spatial_merge_size=2, temporal_patch_size=2)
    config = GlmOcrConfig(text_config=text, vision_config=vision, **GLM_IDS)
    config._attn_implementation = "eager"
    return config


def cosmos3_omni_config():
    """Cosmos3-Omni (5.x): Qwen3-VL's text model (q/k norms, interleaved sections [3, 3, 2]) and tower."""
    from transformers import Cosmos3OmniConfig

    text = dict(TEXT, head_dim=16, model_type="qwen3_vl_text", **_text_rope([3, 3, 2]))
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(model_type="qwen3_vl_vision", depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=TEXT["hidden_size"], patch_size=4, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=64, deepstack_visual_indexes=[0])
    config = Cosmos3OmniConfig(text_config=text, vision_config=vision, **QWEN_IDS)
    config._attn_implementation = "eager"
    return config


def cosmos3_edge_config():
    """Cosmos3-Edge (5.x): Qwen3-VL's interleaved text rotary (head_dim 16, sections [3, 3, 2]), no q/k norms, and
    a one-layer SigLIP2 tower (flat patches of 3 x 4 x 4 values, a 4 x 4 learned position grid)."""
    from transformers import Cosmos3EdgeConfig

    text = dict(TEXT, head_dim=16, eos_token_id=1, **_text_rope([3, 3, 2]))
    text["rope_parameters"]["mrope_interleaved"] = True
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                  num_patches=16, spatial_merge_size=2)
    config = Cosmos3EdgeConfig(text_config=text, vision_config=vision, projector_hidden_size=64, **QWEN_IDS)
    config._attn_implementation = "eager"
    return config


def cohere_compass_config():
    """Cohere Compass (5.x): a full-attention and a sliding-window layer, each layer type with its own rotary
    (theta 1e4 and 3e3, sections [3, 3, 2] and [2, 3, 3] of 8 frequencies: head_dim 16), and a one-block
    Qwen3-VL-style tower.
    The window (256 tokens) spans every test sequence: a 4-D packing mask replaces transformers' window, and the
    samples of a packed row must see what they see alone."""
    from transformers import CohereCompassConfig

    def rope(theta, section):
        return {"rope_type": "default", "rope_theta": theta, "mrope_section": section}

    text = dict(TEXT, eos_token_id=1, layer_types=["full_attention", "sliding_attention"], sliding_window=256,
                rope_parameters={"full_attention": rope(1e4, [3, 3, 2]), "sliding_attention": rope(3e3, [2, 3, 3])})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=TEXT["hidden_size"],
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    config = CohereCompassConfig(text_config=text, vision_config=vision, **QWEN_IDS)
    config._attn_implementation = "eager"
    return config


def ernie4_5_vl_moe_config():
    """ERNIE-4.5-VL (5.x): head_dim 16, sections [3, 3, 2] (h/w pre-rotated, GPT-J pairs), a dense and a MoE layer
    (four experts of which two run, one shared), a one-block tower with its axial rotary, and a resampler that
    merges 2 x 2 patches and 2 frames."""
    from transformers import Ernie4_5_VLMoeConfig

    text = dict(TEXT, eos_token_id=1, moe_intermediate_size=[32, 32], moe_k=2, moe_num_experts=4,
                moe_num_shared_experts=1, **_text_rope([3, 3, 2]))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4, spatial_merge_size=2,
                  temporal_merge_size=2, rope_parameters={"rope_type": "axial", "rope_theta": 1e4})
    config = Ernie4_5_VLMoeConfig(text_config=text, vision_config=vision, **GLM_IDS)
    config._attn_implementation = "eager"
    return config


def hunyuan_vl_config():
    """HunYuan-VL (5.x): XD-RoPE over four axes (head_dim 16: sections [2, 2, 2, 2]), q/k norms after the rotation,
    and a one-layer tower whose merger adds a newline column per row and a first and last token per image."""
    from transformers import HunYuanVLConfig

    text = dict(TEXT, head_dim=16, eos_token_id=1, **_text_rope([2, 2, 2, 2]))
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                  spatial_merge_size=2, out_hidden_size=TEXT["hidden_size"], text_hidden_size=TEXT["hidden_size"],
                  max_image_size=64, min_image_size=8)
    config = HunYuanVLConfig(text_config=text, vision_config=vision, image_token_id=250, im_start_id=246,
                             im_end_id=247, im_newline_id=248)
    config._attn_implementation = "eager"
    return config


def hy_v4_vl_config(**text_overrides):
    """HY-V4-VL (5.24 on): an MLA text model (rope slice 16: sections [3, 3, 2], interleaved), hyper-connections
    (2 streams), a dense and a MoE layer (four experts of which two run, one shared) and the sparse-attention indexer
    with a budget above any test's length (every token selected: no discrete choice, see without_discrete_choices);
    a one-layer tower whose merger adds a newline column to every row of a frame."""
    from transformers import HYV4VLConfig

    text = dict(TEXT, eos_token_id=1, bos_token_id=2, moe_intermediate_size=32, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=16, v_head_dim=16, index_topk=512, index_head_dim=16, index_n_heads=2, hc_mult=2,
                **_text_rope([3, 3, 2]))
    text.pop("num_key_value_heads")  # MLA: one key / value per query head
    text.update(text_overrides)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=4,
                  spatial_merge_size=2, out_hidden_size=TEXT["hidden_size"], max_image_size=64)
    config = HYV4VLConfig(text_config=text, vision_config=vision, image_token_id=250, video_token_id=251)
    config._attn_implementation = "eager"
    return config


# ------------------------------------------------------------------------------------------------------------------
# Families


def has_module(name: str) -> bool:
    try:
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Family:
    id: str
    cls: str  # conditional-generation class (transformers)
    config: Callable
    apply: Callable
    module: str  # modeling module of its text model (rotary / apply_rotary_pos_emb)
    rotary: str  # its text rotary class
    # token layout of the batches: "qwen2" (whole videos), "qwen3" (frames + timestamps), "glm", "ernie" (image and
    # video brackets, videos whole), "hunyuan" (images only, spans of the merger's tokens)
    layout: str
    fused: bool = False  # the attention has q/k norms: the fused op runs
    time_scaled: bool = False  # Qwen2.5-VL's second_per_grid_ts
    # how the tower takes pixels: "patches" (N, C * temporal_patch * P * P), "flat" (N, C * P * P; SigLIP2),
    # "images" (N, C, P, P; PaddleOCR-VL's SigLIP)
    pixels: str = "patches"
    videos: bool = True  # False: the model takes images only (PaddleOCR-VL); batches hold images in their place
    layer_types: tuple = ()  # a rotary per layer type (Cohere Compass): forward(x, position_ids, layer_type)
    temporal_merge: int = 1  # the resampler merges this many frames (ERNIE-4.5-VL): batches' videos have that many more
    axes: int = 3  # rows of its mRoPE positions (HunYuan-VL: len(mrope_section))
    rotation: bool = True  # ropekit patches the module's apply_rotary_pos_emb (HY-V4-VL's MLA rotation: it does not)

    def available(self) -> bool:
        return has_module(self.module) and has_module(self.config_module())

    def config_module(self) -> str:
        return {"glm46v": "glm46v", "qwen4_exp": "qwen4_exp", "cosmos3_omni": "cosmos3_omni"}.get(self.id, self.module)

    def build(self, seed=0, config=None):
        import transformers

        return build(getattr(transformers, self.cls), config or self.config(), "cpu", seed=seed)

    def modeling(self):
        return importlib.import_module(f"transformers.models.{self.module}.modeling_{self.module}")


FAMILIES = {
    f.id: f
    for f in (
        Family("qwen2_vl", "Qwen2VLForConditionalGeneration", qwen2_vl_config, ropekit.apply_to_qwen2_vl,
               "qwen2_vl", "Qwen2VLRotaryEmbedding", "qwen2"),
        Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", lambda: qwen2_vl_config("2.5"),
               ropekit.apply_to_qwen2_5_vl, "qwen2_5_vl", "Qwen2_5_VLRotaryEmbedding", "qwen2", time_scaled=True),
        Family("qwen4_exp", "Qwen4ExpForConditionalGeneration", qwen4_exp_config, ropekit.apply_to_qwen4_exp,
               "qwen4_exp", "Qwen4ExpTextRotaryEmbedding", "qwen3", fused=True),
        Family("glm4v", "Glm4vForConditionalGeneration", glm4v_config, ropekit.apply_to_glm4v, "glm4v",
               "Glm4vTextRotaryEmbedding", "glm"),
        Family("glm4v_moe", "Glm4vMoeForConditionalGeneration", lambda: glm4v_config("glm4v_moe"),
               ropekit.apply_to_glm4v, "glm4v_moe", "Glm4vMoeTextRotaryEmbedding", "glm"),
        Family("glm46v", "Glm46VForConditionalGeneration", lambda: glm4v_config("glm46v"), ropekit.apply_to_glm4v,
               "glm4v", "Glm4vTextRotaryEmbedding", "glm"),
        Family("paddleocr_vl", "PaddleOCRVLForConditionalGeneration", paddleocr_vl_config,
               ropekit.apply_to_paddleocr_vl, "paddleocr_vl", "PaddleOCRRotaryEmbedding", "qwen2", pixels="images",
               videos=False),
        Family("glm_ocr", "GlmOcrForConditionalGeneration", glm_ocr_config, ropekit.apply_to_glm_ocr, "glm_ocr",
               "GlmOcrTextRotaryEmbedding", "glm"),
        Family("cosmos3_omni", "Cosmos3OmniForConditionalGeneration", cosmos3_omni_config, ropekit.apply_to_cosmos3,
               "qwen3_vl", "Qwen3VLTextRotaryEmbedding", "qwen3", fused=True),
        Family("cosmos3_edge", "Cosmos3EdgeForConditionalGeneration", cosmos3_edge_config, ropekit.apply_to_cosmos3,
               "cosmos3_edge", "Cosmos3EdgeTextRotaryEmbedding", "qwen3", pixels="flat"),
        Family("cohere_compass", "CohereCompassForConditionalGeneration", cohere_compass_config,
               ropekit.apply_to_cohere_compass, "cohere_compass", "CohereCompassRotaryEmbedding", "qwen3",
               layer_types=("full_attention", "sliding_attention")),
        Family("ernie4_5_vl_moe", "Ernie4_5_VLMoeForConditionalGeneration", ernie4_5_vl_moe_config,
               ropekit.apply_to_ernie4_5_vl, "ernie4_5_vl_moe", "Ernie4_5_VLMoeTextRotaryEmbedding", "ernie",
               pixels="flat", temporal_merge=2),
        Family("hunyuan_vl", "HunYuanVLForConditionalGeneration", hunyuan_vl_config, ropekit.apply_to_hunyuan_vl,
               "hunyuan_vl", "HunYuanVLRotaryEmbedding", "hunyuan", pixels="flat", videos=False, axes=4),
        Family("hy_v4_vl", "HYV4VLForConditionalGeneration", hy_v4_vl_config, ropekit.apply_to_hy_v4_vl,
               "hy_v4_vl", "HYV4VLRotaryEmbedding", "hy", pixels="flat", rotation=False),
    )
}


def without_discrete_choices(family: Family):
    """The family's tiny config with no data-dependent top-k choice left: GLM-4V-MoE with dense MLPs in every layer
    (first_k_dense_replace), Qwen4-Exp with one routed expert and an indexer budget above the sequence length (every
    block selected). Routing and block selection are discrete: where two scores nearly tie, any change of rounding
    (ropekit's, or another kernel's) can flip the choice and move that token's output by the difference between the
    two experts or blocks, outside any rounding criterion. ropekit changes neither; the bf16 comparison measures the
    rounding of what it does change. Other families: their usual config."""
    if family.id == "glm4v_moe":
        return glm4v_config("glm4v_moe", first_k_dense_replace=TEXT["num_hidden_layers"])
    if family.id == "qwen4_exp":
        return qwen4_exp_config(**DENSE_QWEN4_EXP)
    return family.config()


DENSE_QWEN4_EXP = dict(num_experts=1, num_experts_per_tok=1, indexer_budget=128)  # see without_discrete_choices


def family_params(ids=None, needs=None):
    """pytest params over the families (those the installed transformers lacks are skipped, saying why)."""
    import pytest
    import transformers

    params = []
    for family in FAMILIES.values():
        if ids is not None and family.id not in ids:
            continue
        if needs is not None and not needs(family):
            continue
        marks = () if family.available() else pytest.mark.skipif(
            True, reason=f"{family.id} is not in transformers {transformers.__version__} (a later release adds it)")
        params.append(pytest.param(family, id=family.id, marks=marks))
    return params


@functools.lru_cache(maxsize=None)
def _shared(family_id: str, seed: int):
    return FAMILIES[family_id].build(seed=seed)


def shared_model(family: Family, seed: int = 0):
    """One model per (family, seed) for the whole session (building the vision tower and MoE blocks is the slow
    part); callers get it in eval mode with no stored rope deltas, and must not change its weights (deep-copy
    it to train)."""
    model = _shared(family.id, seed)
    model.eval()
    reset(model)
    return model


def trainable_copy(family: Family, seed: int = 0):
    return copy.deepcopy(shared_model(family, seed)).train()


def reset(model):
    """Forget the rope deltas a previous forward / generate stored (4.57 decodes from them when set)."""
    inner = getattr(model, "model", model)
    if hasattr(inner, "rope_deltas"):
        inner.rope_deltas = None


def language_model(model):
    inner = model.model
    return getattr(inner, "language_model", inner)


# ------------------------------------------------------------------------------------------------------------------
# Batches in each family's own token layout


def takes_token_types(family: Family) -> bool:
    """transformers 5.x reads the modality from mm_token_type_ids (the processor makes it); 4.57 scans token ids."""
    rules = ropekit.transformers.rope_index.MROPE_RULES[family.id]
    return "mm_token_type_ids" in inspect.signature(rules.model_class().get_rope_index).parameters


def _tokens(config, t, h, w):
    merge = config.vision_config.spatial_merge_size
    return t * h * w // merge**2


def _image(family, config, h, w):
    n = _tokens(config, 1, h, w)
    if family.layout == "hunyuan":  # the merger's tokens: a newline column per row, a first and a last token
        n = (h // config.vision_config.spatial_merge_size) * (w // config.vision_config.spatial_merge_size + 1) + 2
        return [config.image_token_id] * n, [1] * n
    if family.layout == "hy":  # the merger's tokens (a newline column per row) between two text tokens
        return _hy_span(config, 1, h, w, config.image_token_id, 1)
    if family.layout in ("glm", "ernie"):
        return [config.image_start_token_id] + [config.image_token_id] * n + [config.image_end_token_id], \
            [0] + [1] * n + [0]
    return [config.vision_start_token_id] + [config.image_token_id] * n + [config.vision_end_token_id], \
        [0] + [1] * n + [0]


def _hy_span(config, t, h, w, token, kind):
    """HY-V4-VL: t frames of (h // m) rows of (w // m + 1) tokens (the last of each row the newline), between two
    ordinary text tokens (246, 247: no special id in its config)."""
    merge = config.vision_config.spatial_merge_size
    n = t * (h // merge) * (w // merge + 1)
    return [246] + [token] * n + [247], [0] + [kind] * n + [0]


def _video(family, config, t, h, w, text):
    """A t-frame video in the family's layout (``text(n)`` draws timestamp tokens)."""
    n = _tokens(config, 1, h, w)
    ids, types = [], []
    if family.layout == "ernie":  # <|VIDEO_START|> (t // temporal merge) * n tokens <|VIDEO_END|>
        span = t // family.temporal_merge * n
        return [config.video_start_token_id] + [config.video_token_id] * span + [config.video_end_token_id], \
            [0] + [2] * span + [0]
    if family.layout == "hy":
        return _hy_span(config, t, h, w, config.video_token_id, 2)
    if family.layout == "qwen2":  # one span of t * n tokens
        return [config.vision_start_token_id] + [config.video_token_id] * (t * n) + [config.vision_end_token_id], \
            [0] + [2] * (t * n) + [0]
    if family.layout == "glm":  # <video_start> (<image_start> frame of image tokens <image_end> stamp)* <video_end>
        ids, types = [config.video_start_token_id], [0]
        for frame in range(t):
            ids += [config.image_start_token_id] + [config.image_token_id] * n + [config.image_end_token_id]
            types += [0] + [2] * n + [0]
            stamp = text(1 + frame % 2)
            ids += stamp
            types += [0] * len(stamp)
        return ids + [config.video_end_token_id], types + [0]
    for frame in range(t):  # qwen3: stamp <vision_start> frame <vision_end>
        stamp = text(1 + frame % 2)
        ids += stamp + [config.vision_start_token_id] + [config.video_token_id] * n + [config.vision_end_token_id]
        types += [0] * len(stamp) + [0] + [2] * n + [0]
    return ids, types


def _pixels(family: Family, config, grid, gen):
    """Random pixel values for the patches of these grids, in the layout the family's tower takes."""
    vision, n = config.vision_config, int(grid.prod(-1).sum())
    if family.pixels == "images":
        return torch.randn(n, vision.num_channels, vision.patch_size, vision.patch_size, generator=gen)
    if family.pixels == "flat":
        channels = getattr(vision, "num_channels", None) or vision.in_channels
        return torch.randn(n, channels * vision.patch_size**2, generator=gen)
    return torch.randn(n, vision.in_channels * vision.temporal_patch_size * vision.patch_size**2, generator=gen)


def multimodal_inputs(family: Family, config, seed: int = 0, rows=None, seconds=(1.5, 0.5)):
    """A left-padded batch with images and multi-frame videos in the family's layout, with pixel values, grids,
    mm_token_type_ids (5.x) and, for Qwen2.5-VL, second_per_grid_ts (fp32, not 1). ``rows``: per row, a list of
    ("text", n) / ("image", h, w) / ("video", t, h, w) items (default: two rows, two images, two videos of 2 and 3
    frames, the second row left-padded)."""
    gen = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(*TEXT_IDS, (n,), generator=gen).tolist()

    rows = rows or [
        [("text", 3), ("image", 4, 6), ("text", 2), ("video", 2, 4, 4), ("text", 2), ("video", 3, 4, 4), ("text", 2)],
        [("text", 2), ("image", 4, 4), ("text", 3)],
    ]
    seqs, kinds, images, videos = [], [], [], []
    for row in rows:
        ids, types = [], []
        if not family.videos:  # a model that takes no videos: an image of a frame's size in each video's place
            row = [("image", *item[2:]) if item[0] == "video" else item for item in row]
        for item in row:
            if item[0] == "text":
                part, part_types = text(item[1]), [0] * item[1]
            elif item[0] == "image":
                part, part_types = _image(family, config, *item[1:])
                images.append([1, *item[1:]])
            else:
                # a resampler that merges frames takes that many more: the same positions as another family's t
                item = ("video", item[1] * family.temporal_merge, *item[2:])
                part, part_types = _video(family, config, *item[1:], text)
                videos.append(list(item[1:]))
            ids += part
            types += part_types
        seqs.append(ids)
        kinds.append(types)
    seq = max(map(len, seqs))
    input_ids = torch.full((len(seqs), seq), PAD)
    mask = torch.zeros_like(input_ids)
    token_types = torch.zeros_like(input_ids)
    for b, (ids, types) in enumerate(zip(seqs, kinds)):
        input_ids[b, seq - len(ids):] = torch.tensor(ids)
        token_types[b, seq - len(ids):] = torch.tensor(types)
        mask[b, seq - len(ids):] = 1
    inputs = dict(input_ids=input_ids, attention_mask=mask)
    if images:
        grid = torch.tensor(images)
        inputs.update(image_grid_thw=grid, pixel_values=_pixels(family, config, grid, gen))
    if videos:
        grid = torch.tensor(videos)
        inputs.update(video_grid_thw=grid, pixel_values_videos=_pixels(family, config, grid, gen))
        if family.time_scaled:
            inputs["second_per_grid_ts"] = torch.tensor(seconds[: len(videos)], dtype=torch.float32)
    if takes_token_types(family):
        inputs["mm_token_type_ids"] = token_types
    return inputs


def clone_inputs(inputs: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def assert_inputs_unchanged(inputs: dict, before: dict) -> None:
    """Nothing wrote into the caller's tensors (grids, masks, ids, timestamps)."""
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(inputs[key], value), f"{key} was written to"
