"""Replacements for transformers' rotary-embedding forward and apply_rotary_pos_emb, shared by every family.

These know transformers' calling conventions; they know nothing about CUDA (that lives in the ops).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch

from .. import ops
from ..modules import RopeTable
from ._patching import global_module_hooks, is_live, kernel_devices, module_hooks, plain_tensors

_TABLE_ATTR = "_ropekit_table"
_LAYER_TABLES_ATTR = "_ropekit_tables"  # layer type -> table, for a rotary per layer type
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_dynamic_rope(module, rope_type=None) -> bool:
    """dynamic NTK and longrope change inv_freq with max(position_ids): no static table can serve them. ``rope_type``:
    one layer type's (a rotary per layer type), else the module's."""
    rope_type = getattr(module, "rope_type", "default") if rope_type is None else rope_type
    return not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope"


def _new_table(module) -> RopeTable:
    max_positions = getattr(getattr(module, "config", None), "max_position_embeddings", None) or 8192
    return RopeTable(min(max_positions, 8192), expected_rows=max_positions)


def table_of(module, layer_type: str | None = None) -> RopeTable:
    """The module's lazy table cache, a plain (non-persistent, non-buffer) attribute; ``layer_type``: the table of
    one layer type's inv_freq, for modules with a rotary per layer type."""
    if layer_type is not None:
        tables = module.__dict__.setdefault(_LAYER_TABLES_ATTR, {})
        return tables.get(layer_type) or tables.setdefault(layer_type, _new_table(module))
    table = module.__dict__.get(_TABLE_ATTR)
    if table is None:
        table = module.__dict__[_TABLE_ATTR] = _new_table(module)
    return table


@dataclass(frozen=True)
class RotaryLayout:
    """What a family's rotary forward returns, so that the patched forward returns exactly that.

    ``mrope``: ``None`` for 1-D RoPE ((B, S) positions, (B, S, D) cos/sin); ``"interleaved"`` for Qwen3-VL / Qwen3.5 /
    Qwen4-Exp mRoPE; ``"sectioned"`` for Qwen2-VL / Qwen2.5-VL / GLM-4V mRoPE (consecutive ``mrope_section``
    chunks). ``per_axis`` (transformers 4.57's sectioned families): the forward returns each axis's cos/sin,
    ``(3, B, S, D)`` in the ``cat((freqs, freqs))`` layout, and ``apply_multimodal_rotary_pos_emb`` picks the sections.
    ``is_neox``: the duplicated layout of a combined (B, S, D) output: ``cat((f, f))`` (True) or GLM-4V 5.x's
    ``repeat_interleave(2)`` (False).
    """

    mrope: str | None = None
    per_axis: bool = False
    is_neox: bool = True


def _sections(module, inv_freq):
    """The module's mrope_section when the sectioned gather takes it (three sections covering every frequency, as
    transformers' split then covers the frequencies exactly); None otherwise (the original forward runs)."""
    section = getattr(module, "mrope_section", None)
    try:
        section = [int(s) for s in section]
    except (TypeError, ValueError):
        return None
    if len(section) != 3 or min(section) < 0 or sum(section) != inv_freq.shape[-1]:
        return None
    return section


def _integer_valued(position_ids: torch.Tensor) -> torch.Tensor:
    """float32 positions (Qwen3-Omni's) as int64 where they are CPU tensors that all hold integers: the table then
    serves them bit for bit (transformers' ``position_ids.float() * inv_freq`` multiplies the same float32 values).
    Anything else is returned as given, for transformers' own code: fractional positions (no table row holds them),
    and CUDA tensors, whose check would be a host sync on every forward, costing more than the table saves."""
    if position_ids.device.type != "cpu" or torch.compiler.is_compiling() or position_ids.requires_grad:
        return position_ids
    as_int = position_ids.to(torch.int64)
    # compared bit for bit: fractional, NaN, inf, outside int64, and -0.0 (whose sin is -0.0, a row's +0.0) stay
    if not torch.equal(as_int.to(torch.float32).view(torch.int32), position_ids.view(torch.int32)):
        return position_ids
    return as_int


def make_rotary_forward(original, layout: RotaryLayout | bool):
    """A rotary forward that gathers from the cached table, returning what ``original`` returns for ``layout``
    (``True`` / ``False``: interleaved mRoPE / 1-D, the Qwen3 families' shorthand).

    Falls back to the original forward, whose numbers are the reference, where a table cannot serve the call:
    dynamic/longrope rope types, a per-layer-type call, tracing under torch.compile (the table cache is Python
    state), positions of a shape the layout does not take, sections that do not cover the frequencies; and once
    unpatched.
    """
    if not isinstance(layout, RotaryLayout):
        layout = RotaryLayout("interleaved" if layout else None)
    mrope, per_axis, is_neox = layout.mrope, layout.per_axis, layout.is_neox
    # interleaved: (3|1, B, S), and (B, S) as 4.57's Qwen3-VL expands it; sectioned forwards index a 3-D tensor
    ranks = {None: (2,), "interleaved": (2, 3), "sectioned": (3,)}[mrope]

    # No torch.no_grad() here: the table ops take no gradient and make none, and `original` carries its own.
    @functools.wraps(original)
    def forward(self, x, position_ids, *args, **kwargs):
        # this runs on every decode step: the checks are ordered and written for host time (one buffer lookup, plain
        # type tests for the common case before plain_tensors' general one)
        if type(position_ids) is torch.Tensor and position_ids.dtype == torch.float32:
            position_ids = _integer_valued(position_ids)  # Qwen3-Omni's float32 positions; unchanged unless served
        inv_freq = self._buffers.get("inv_freq") if "_buffers" in self.__dict__ else None
        if inv_freq is None:
            inv_freq = getattr(self, "inv_freq", None)
        if (
            args
            or kwargs
            or not forward.__ropekit_live__  # a reference that outlived unpatch()
            or not isinstance(inv_freq, torch.Tensor)
            or not (type(x) is torch.Tensor and type(position_ids) is torch.Tensor and type(inv_freq) is torch.Tensor
                    or plain_tensors(x, position_ids, inv_freq))
            or not kernel_devices(x, position_ids, inv_freq)
            or x.dtype not in _SUPPORTED_DTYPES
            or position_ids.dtype not in (torch.int64, torch.int32)  # transformers casts any dtype to float
            or position_ids.dim() not in ranks
            # (4, B, S) and other row counts (5.18's Cosmos3-Edge text model hands its rotary all four rows of
            # packed positions): transformers' code, whose error is then the one raised
            or (position_ids.dim() == 3 and position_ids.shape[0] not in (1, 3))
            or inv_freq.requires_grad  # the table ops take no gradient; the original's matmul does
            or is_dynamic_rope(self)
            or torch.compiler.is_compiling()
        ):
            return original(self, x, position_ids, *args, **kwargs)
        table = self.__dict__.get(_TABLE_ATTR) or table_of(self)
        if mrope is None:
            return table.cos_sin(inv_freq, self.attention_scaling, position_ids, x.dtype)
        if mrope == "interleaved":
            return table.cos_sin(inv_freq, self.attention_scaling, position_ids, x.dtype, self.mrope_section)
        if position_ids.shape[0] not in (1, 3):  # transformers' (3, ...) expand fails on it
            return original(self, x, position_ids)
        if per_axis:  # (3, B, S, D): each axis's own 1-D cos/sin
            _, batch, seq = position_ids.shape
            cos, sin = table.cos_sin(inv_freq, self.attention_scaling,
                                     position_ids.expand(3, batch, seq).reshape(3 * batch, seq), x.dtype)
            return cos.view(3, batch, seq, -1), sin.view(3, batch, seq, -1)
        section = _sections(self, inv_freq)
        if section is None:
            return original(self, x, position_ids)
        return table.cos_sin(inv_freq, self.attention_scaling, position_ids, x.dtype, section,
                             mrope_interleaved=False, is_neox=is_neox)

    forward.__ropekit_original__ = original
    forward.__ropekit_live__ = False  # set by patch(), cleared by unpatch()
    return forward


def make_layered_rotary_forward(original, recompose, layered: bool = True, float32_cos: bool = False):
    """A rotary forward for a module whose own ``recomposition_frequencies`` lays the mRoPE axes out, on (3, B, S)
    positions: each axis's cos/sin is gathered from a cached table and that method (an index copy, part of the
    checked code) recomposes them as the installed release does.

    ``layered=True``: one rotary per layer type (Cohere Compass: ``forward(x, position_ids, layer_type)`` reading
    ``{layer_type}_inv_freq``, ``{layer_type}_attention_scaling`` and ``rope_type[layer_type]``, one table per layer
    type, ``recomposition_frequencies(freq, layer_type)``; 5.16-5.18: sections h, w, t in (i + 1) % 3 order, 5.19
    on: interleaved), on (3, B, S) positions. ``layered=False``: one rotary, ``forward(x, position_ids)`` reading
    ``inv_freq`` and ``recomposition_frequencies(freq)``, on (len(mrope_section), B, S) positions: ERNIE-4.5-VL
    (inv_freq pre-rotated on the h/w frequencies; sections h, w, t in (i + 1) % 3 order, h and w interleaved, GPT-J
    pairs), HunYuan-VL (three or more axes, each a section of ``cat((f, f))``). Cos/sin are cast to x's dtype, or
    left in float32 where the original leaves them (``float32_cos``: ERNIE-4.5-VL).

    The gather gives transformers' fp32 ``cos(position * inv_freq) * attention_scaling`` (cast to x's dtype where
    the original casts), and copying commutes with the cast: bit for bit the original's result. The original runs
    where a table cannot serve the call, as in :func:`make_rotary_forward`, for every other position shape, and
    where ``recomposition_frequencies`` is not ``recompose``, the checked class's own (a subclass or an instance that
    overrides it)."""

    def serve(self, x, position_ids, layer_type):
        if layered:
            rope_types = getattr(self, "rope_type", None)
            rope_type = (rope_types.get(layer_type) if isinstance(rope_types, dict) and isinstance(layer_type, str)
                         else None)
            prefix = f"{layer_type}_"
            axes = 3
        else:
            rope_type, prefix = getattr(self, "rope_type", None), ""
            sections = getattr(self, "mrope_section", None)
            axes = len(sections) if isinstance(sections, (list, tuple)) else 0
        inv_freq = getattr(self, f"{prefix}inv_freq", None) if rope_type is not None else None
        if (
            not forward.__ropekit_live__
            or not isinstance(rope_type, str)
            or is_dynamic_rope(self, rope_type)
            or not isinstance(inv_freq, torch.Tensor)
            or not plain_tensors(x, position_ids, inv_freq)
            or not kernel_devices(x, position_ids, inv_freq)
            or x.dtype not in _SUPPORTED_DTYPES
            or position_ids.dtype not in (torch.int64, torch.int32)
            or position_ids.dim() != 3
            or position_ids.shape[0] != axes
            or axes < 3
            or inv_freq.requires_grad
            or "recomposition_frequencies" in self.__dict__
            or getattr(type(self), "recomposition_frequencies", None) is not recompose
            or torch.compiler.is_compiling()
        ):
            return None
        _, batch, seq = position_ids.shape
        half = inv_freq.shape[-1]
        table = table_of(self, layer_type if layered else None)
        cos, sin = table.cos_sin(inv_freq, getattr(self, f"{prefix}attention_scaling"),
                                 position_ids.reshape(axes * batch, seq), torch.float32 if float32_cos else x.dtype)
        # each axis's cos/sin of its frequencies, (axes, B, S, D / 2), as the original's freqs before recomposing
        cos, sin = (t[..., :half].reshape(axes, batch, seq, half) for t in (cos, sin))
        extra = (layer_type,) if layered else ()
        sin = self.recomposition_frequencies(sin, *extra)
        cos = self.recomposition_frequencies(cos, *extra)
        return cos, sin

    if layered:
        @functools.wraps(original)
        def forward(self, x, position_ids, layer_type=None, *args, **kwargs):
            served = None if args or kwargs else serve(self, x, position_ids, layer_type)
            return original(self, x, position_ids, layer_type, *args, **kwargs) if served is None else served
    else:
        @functools.wraps(original)
        def forward(self, x, position_ids, *args, **kwargs):
            served = None if args or kwargs else serve(self, x, position_ids, None)
            return original(self, x, position_ids, *args, **kwargs) if served is None else served

    forward.__ropekit_original__ = original
    forward.__ropekit_live__ = False  # set by patch(), cleared by unpatch()
    return forward


def _rotate(original, q, k, cos, sin, unsqueeze_dim, is_neox, partial, live, upcast=False):
    """ops.apply_rope where it computes what ``original(q, k, cos, sin, unsqueeze_dim=...)`` computes (``k`` may be
    None: only q is rotated, as Qwen4-Exp's indexer asks); the original otherwise: its broadcasting takes shapes the
    op does not (cos/sin of seq 1, a q or k of batch 1 against a batch of cos/sin, an odd rotary dim).

    ``upcast``: the original computes ``q.float() * cos + rotate_half(q).float() * sin`` and casts the result back to
    q's dtype (ERNIE-4.5-VL's text rotation). That is ops.apply_rope on float32 cos/sin (q's exact widening, each
    product and the sum rounded once in float32, and the same gradient roundings: the q gradient of each product is
    rounded to q's dtype, then the two are summed) followed by the cast; float64 q, which the original narrows to
    float32, runs the original."""
    if upcast:
        if not (live and isinstance(q, torch.Tensor) and isinstance(cos, torch.Tensor)
                and isinstance(sin, torch.Tensor) and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and cos.dtype in (torch.float32, torch.bfloat16, torch.float16) and sin.dtype == cos.dtype):
            return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        dtype = q.dtype
        out = _rotate(original, q, k, cos.float(), sin.float(), unsqueeze_dim, is_neox, partial, live)
        return tuple(t.to(dtype) for t in out) if isinstance(out, tuple) else out.to(dtype)
    if not (
        live
        and isinstance(q, torch.Tensor)
        and isinstance(cos, torch.Tensor)
        and isinstance(sin, torch.Tensor)
        and plain_tensors(q, k, cos, sin)
        and kernel_devices(q, k, cos, sin)
        and q.dim() == 4
        and cos.dim() == 3
        and sin.shape == cos.shape
        and q.dtype in _SUPPORTED_DTYPES
        and cos.dtype in (q.dtype, torch.float32)
        and sin.dtype == cos.dtype
        and cos.device == q.device
        and sin.device == q.device
        and unsqueeze_dim in (1, 2, -3, -2)
    ):
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    seq_dim = 2 if unsqueeze_dim in (1, -3) else 1
    batch, seq, head_dim, rot_dim = q.shape[0], q.shape[seq_dim], q.shape[-1], cos.shape[-1]
    if not (
        cos.shape[1] == seq
        and cos.shape[0] in (1, batch)
        and rot_dim % 2 == 0
        and rot_dim <= head_dim
        and (partial or rot_dim == head_dim)  # a full-rotary original fails to broadcast a narrower cos/sin
        and (k is None or (isinstance(k, torch.Tensor) and k.dim() == 4 and k.dtype == q.dtype
                           and k.device == q.device and k.shape[0] == batch and k.shape[seq_dim] == seq
                           and k.shape[-1] == head_dim))
    ):
        return original(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    if k is None:  # rotate q alone: k with no heads costs nothing
        heads = 1 if unsqueeze_dim in (1, -3) else 2
        return ops.apply_rope(q, q.narrow(heads, 0, 0), cos, sin, unsqueeze_dim, is_neox=is_neox)[0]
    return ops.apply_rope(q, k, cos, sin, unsqueeze_dim, is_neox=is_neox)


def make_apply_rotary_pos_emb(original, is_neox: bool = True, partial: bool = True, routed=None,
                              upcast: bool = False):
    """apply_rotary_pos_emb with the original's exact signature: 4.57 has position_ids as the 5th argument; Qwen4-Exp's
    takes ``k=None`` (its sparse-attention indexer rotates queries alone). ``is_neox=False``: GLM-4V's
    ``rotate_half_llm`` pairs. ``partial=False``: the original rotates the whole head (a narrower cos/sin is its
    broadcasting error, so the original runs). ``upcast``: the original rotates in float32 and casts back to q's
    dtype (ERNIE-4.5-VL, see ``_rotate``).

    ``original`` may be the ``kernels`` Hub-kernel module that transformers 5.25 makes of the function
    (``@use_kernel_forward_from_hub``): the signature is the function's inside it, every fallback calls the module
    (so its dispatch stays as it was), and ``routed()`` tells whether a call made now would reach a kernel that
    ``kernelize`` selected, in which case the module runs it."""
    from ._guard import underlying

    function = underlying(original)
    params = inspect.signature(function).parameters
    # a Hub-kernel module is called as a module: its hooks, and global module hooks, see the call
    is_module = isinstance(original, torch.nn.Module)

    def rotate(q, k, cos, sin, unsqueeze_dim):
        live = (
            is_live(apply_rotary_pos_emb)
            and not (routed is not None and routed())
            and not (is_module and (global_module_hooks() or module_hooks(original)))
        )
        return _rotate(original, q, k, cos, sin, unsqueeze_dim, is_neox, partial, live, upcast)

    if "position_ids" in params:

        def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
            return rotate(q, k, cos, sin, unsqueeze_dim)

    elif params["k"].default is None:  # Qwen4-Exp: apply_rotary_pos_emb(q, k=None, cos=None, sin=None, ...)

        def apply_rotary_pos_emb(q, k=None, cos=None, sin=None, unsqueeze_dim=1):
            return rotate(q, k, cos, sin, unsqueeze_dim)

    else:

        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            return rotate(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__doc__ = function.__doc__
    apply_rotary_pos_emb.__ropekit_original__ = original
    return apply_rotary_pos_emb


def make_apply_multimodal_rotary_pos_emb(original, is_neox: bool = True, partial: bool = True,
                                         gptj_layout: bool = False):
    """transformers 4.57's ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1)``
    (Qwen2-VL, Qwen2.5-VL, GLM-4V, GLM-4V-MoE): cos/sin arrive per axis, ``(3, B, S, D)``. The sections are picked
    with transformers' own expression (a copy, so bit for bit the same values; GLM-4V then takes the first half in
    the ``repeat_interleave(2)`` layout, ``gptj_layout=True``) and the rotation runs as ``ops.apply_rope``."""

    def pick(t, mrope_section):
        t = torch.cat([m[i % 3] for i, m in enumerate(t.split(list(mrope_section) * 2, dim=-1))], dim=-1)
        if gptj_layout:
            t = t[..., : t.shape[-1] // 2].repeat_interleave(2, dim=-1)
        return t

    @functools.wraps(original)
    def apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        live = is_live(apply_multimodal_rotary_pos_emb)
        if not (
            live
            and k is not None
            and isinstance(cos, torch.Tensor)
            and isinstance(sin, torch.Tensor)
            and cos.dim() == 4
            and cos.shape[0] == 3
            and sin.shape == cos.shape
            and isinstance(mrope_section, (list, tuple))
            and len(mrope_section) == 3
            and all(isinstance(s, int) and s >= 0 for s in mrope_section)
            and 2 * sum(mrope_section) == cos.shape[-1]
        ):
            return original(q, k, cos, sin, mrope_section, unsqueeze_dim)

        def unpatched(*_, **__):  # what _rotate falls back to: the original, on the arguments as given
            return original(q, k, cos, sin, mrope_section, unsqueeze_dim)

        return _rotate(unpatched, q, k, pick(cos, mrope_section), pick(sin, mrope_section), unsqueeze_dim, is_neox,
                       partial, live)

    apply_multimodal_rotary_pos_emb.__ropekit_original__ = original
    return apply_multimodal_rotary_pos_emb
