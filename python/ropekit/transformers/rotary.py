"""Replacements for transformers' rotary-embedding forward and apply_rotary_pos_emb, shared by every Qwen3 family.

These know transformers' calling conventions; they know nothing about CUDA (that lives in the ops).
"""

from __future__ import annotations

import functools
import inspect

import torch

from .. import ops
from ..modules import RopeTable
from ._patching import is_live

_TABLE_ATTR = "_ropekit_table"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_dynamic_rope(module) -> bool:
    """dynamic NTK and longrope change inv_freq with max(position_ids): no static table can serve them."""
    rope_type = getattr(module, "rope_type", "default")
    return not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope"


def table_of(module) -> RopeTable:
    """The module's lazy table cache, a plain (non-persistent, non-buffer) attribute."""
    table = module.__dict__.get(_TABLE_ATTR)
    if table is None:
        max_positions = getattr(getattr(module, "config", None), "max_position_embeddings", None) or 8192
        table = RopeTable(min(max_positions, 8192), expected_rows=max_positions)
        module.__dict__[_TABLE_ATTR] = table
    return table


def make_rotary_forward(original, mrope: bool):
    """A rotary forward that gathers from the cached table; mrope=True for Qwen3-VL-style (3, B, S) positions.

    Falls back to the original forward, whose numbers are the reference, where a table cannot serve the call:
    dynamic/longrope rope types, a per-layer-type call, or tracing under torch.compile (the table cache is
    Python state); and once unpatched.
    """

    @torch.no_grad()
    @functools.wraps(original)
    def forward(self, x, position_ids, *args, **kwargs):
        if (
            args
            or kwargs
            or not is_live(forward)  # a reference that outlived unpatch()
            or is_dynamic_rope(self)
            or torch.compiler.is_compiling()
            or x.dtype not in _SUPPORTED_DTYPES
            or position_ids.dim() not in ((2, 3) if mrope else (2,))
        ):
            return original(self, x, position_ids, *args, **kwargs)
        table = table_of(self)
        section = list(self.mrope_section) if mrope else None
        return table.cos_sin(self.inv_freq, self.attention_scaling, position_ids, x.dtype, section)

    forward.__ropekit_original__ = original
    return forward


def make_apply_rotary_pos_emb(original):
    """apply_rotary_pos_emb with the original's exact signature (4.57 has position_ids as the 5th argument)."""
    params = inspect.signature(original).parameters

    def rotate(q, k, cos, sin, unsqueeze_dim):
        if (
            not is_live(apply_rotary_pos_emb)
            or q.dim() != 4
            or k.dim() != 4
            or cos.dim() != 3
            or q.dtype != k.dtype
            or q.dtype not in _SUPPORTED_DTYPES
            or cos.dtype not in (q.dtype, torch.float32)
            or unsqueeze_dim not in (1, 2, -3, -2)
        ):
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        return ops.apply_rope(q, k, cos, sin, unsqueeze_dim)

    if "position_ids" in params:

        def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            return rotate(q, k, cos, sin, unsqueeze_dim)

    else:

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            return rotate(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__doc__ = original.__doc__
    apply_rotary_pos_emb.__ropekit_original__ = original
    return apply_rotary_pos_emb
