"""Monkeypatches that route transformers' Qwen3-family RoPE through ropekit's ops.

Methods and module functions are patched, never classes, so models built before patching pick the change up too
(and ``from_pretrained``'s buffer re-initialisation keeps working). ``unpatch()`` restores every original object.
"""

from __future__ import annotations

from ._patching import import_optional, patch, unpatch_all
from .rotary import make_apply_rotary_pos_emb, make_rotary_forward

__all__ = ["apply_to_qwen3", "apply_to_qwen3_vl", "unpatch"]

# model module -> (rotary embedding class name, is mRoPE)
_QWEN3_MODULES = {
    "transformers.models.qwen3.modeling_qwen3": ("Qwen3RotaryEmbedding", False),
    "transformers.models.qwen3_moe.modeling_qwen3_moe": ("Qwen3MoeRotaryEmbedding", False),
}
_QWEN3_VL_MODULES = {
    "transformers.models.qwen3_vl.modeling_qwen3_vl": ("Qwen3VLTextRotaryEmbedding", True),
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe": ("Qwen3VLMoeTextRotaryEmbedding", True),
}


def _patch_modules(modules: dict, rope: bool) -> list[str]:
    patched = []
    for module_name, (rotary_name, mrope) in modules.items():
        module = import_optional(module_name)
        if module is None:
            continue
        if rope:
            rotary_cls = getattr(module, rotary_name)
            original_forward = rotary_cls.__dict__["forward"]
            original_forward = getattr(original_forward, "__ropekit_original__", original_forward)
            patch(rotary_cls, "forward", make_rotary_forward(original_forward, mrope))
            original_apply = module.apply_rotary_pos_emb
            original_apply = getattr(original_apply, "__ropekit_original__", original_apply)
            patch(module, "apply_rotary_pos_emb", make_apply_rotary_pos_emb(original_apply))
        patched.append(module_name)
    return patched


def _require(patched: list[str], family: str) -> None:
    if not patched:
        import transformers

        raise RuntimeError(
            f"ropekit: transformers {transformers.__version__} has no {family} modeling module; "
            "supported: transformers 4.57.x and 5.x"
        )


def apply_to_qwen3(model=None, *, rope: bool = True) -> None:
    """Route Qwen3 (and Qwen3-MoE) RoPE through ropekit.

    ``rope``: the rotary embedding gathers cos/sin from a cached fp32 table (bit-identical to transformers for
    static rope types) and ``apply_rotary_pos_emb`` runs as one native op. ``model`` is accepted for symmetry:
    patched methods already reach instances built before this call.
    """
    _require(_patch_modules(_QWEN3_MODULES, rope), "Qwen3")


def apply_to_qwen3_vl(model=None, *, rope: bool = True) -> None:
    """Route Qwen3-VL (and Qwen3-VL-MoE) text RoPE through ropekit: cached interleaved mRoPE cos/sin and the native
    ``apply_rotary_pos_emb``. ``model`` is accepted for symmetry (instances pick the patch up through their class).
    """
    _require(_patch_modules(_QWEN3_VL_MODULES, rope), "Qwen3-VL")


def unpatch() -> None:
    """Undo every ropekit patch, restoring the original functions and methods (by identity)."""
    unpatch_all()
