"""Cached rotary embeddings: an fp32 cos/sin table built once per device and gathered by position."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import ops

__all__ = ["RopeTable", "CachedRotaryEmbedding", "CachedMRotaryEmbedding", "DEFAULT_TABLE_ROWS"]

# Rows built up front. 8192 x 64 frequencies x 2 tables x 4 bytes = 4 MiB; positions past the table are handled
# exactly (see RopeTable.cos_sin), so a model's full max_position_embeddings need not be allocated.
DEFAULT_TABLE_ROWS = 8192
_MAX_EXACT_POSITION = 1 << 24  # largest table; float32 represents every integer position below it


def _round_rows(rows: int) -> int:
    return min(max(256, 1 << max(rows - 1, 0).bit_length()), _MAX_EXACT_POSITION)


class RopeTable:
    """A lazily built fp32 cos/sin table for one rotary embedding.

    It is keyed on the device, the ``inv_freq`` tensor (object, storage and in-place version) and the attention
    scaling, so ``model.to(...)``, ``_init_weights`` refilling ``inv_freq`` in place, or a meta-device model
    materialised with ``to_empty`` can never be served a stale table. It is a plain attribute, not a buffer:
    checkpoints never carry it.

    Growth: on CPU the table grows (doubling) to cover the largest position, which costs no sync there. On CUDA,
    reading the largest position would be a host sync, so the table grows to cover the sequence length (known on
    the host) and any position past its end is computed exactly inside the gather kernel from ``inv_freq``.
    Negative positions (transformers produces them for padding slots after adding negative mRoPE deltas) are
    computed the same way, on both devices.
    """

    def __init__(self, initial_rows: int = DEFAULT_TABLE_ROWS):
        self.initial_rows = int(initial_rows)
        self._key = None
        self._inv_freq: torch.Tensor | None = None  # kept alive so its address cannot be reused by another tensor
        self._inv_freq_f32: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    @staticmethod
    def _key_of(inv_freq: torch.Tensor, device: torch.device, attention_scaling: float):
        # Inference tensors (made under torch.inference_mode) track no version; their storage still identifies them.
        version = None if inv_freq.is_inference() else inv_freq._version
        return (id(inv_freq), version, inv_freq.data_ptr(), inv_freq.dtype, device, float(attention_scaling))

    @property
    def rows(self) -> int:
        return 0 if self.cos is None else self.cos.shape[0]

    def tables(
        self, inv_freq: torch.Tensor, attention_scaling: float, device: torch.device, min_rows: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(cos_table, sin_table, inv_freq_fp32)`` on ``device`` covering at least ``min_rows`` rows (at
        most 2^24: rows past the table, like negative positions, are computed exactly by the gather)."""
        min_rows = min(min_rows, _MAX_EXACT_POSITION)
        key = self._key_of(inv_freq, device, attention_scaling)
        if key != self._key or self._inv_freq is not inv_freq:
            self.cos = self.sin = None
            self._inv_freq = inv_freq
            self._inv_freq_f32 = inv_freq.detach().to(device=device, dtype=torch.float32)
            self._key = key
        if self.cos is None or self.rows < min_rows:
            rows = _round_rows(max(min_rows, self.initial_rows if self.cos is None else 2 * self.rows))
            self.cos, self.sin = ops.rope_cache(self._inv_freq_f32, rows, attention_scaling)
        return self.cos, self.sin, self._inv_freq_f32

    def min_rows_for(self, position_ids: torch.Tensor) -> int:
        if position_ids.numel() == 0:
            return 0
        if position_ids.device.type == "cpu":
            return int(position_ids.max()) + 1
        return position_ids.shape[-1]

    def cos_sin(
        self,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        position_ids: torch.Tensor,
        dtype: torch.dtype,
        mrope_section: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``dtype`` for ``position_ids`` (1-D RoPE, or mRoPE when ``mrope_section`` is given)."""
        cos_t, sin_t, inv32 = self.tables(
            inv_freq, attention_scaling, position_ids.device, self.min_rows_for(position_ids)
        )
        if mrope_section is None:
            return ops.rope_cos_sin(cos_t, sin_t, position_ids, dtype, inv32, attention_scaling)
        return ops.mrope_cos_sin(cos_t, sin_t, position_ids, mrope_section, dtype, inv32, attention_scaling)


class CachedRotaryEmbedding(nn.Module):
    """Standalone rotary embedding: ``forward(x, position_ids) -> (cos, sin)`` of ``x.dtype``, shape ``(B, S, D)``.

    Equivalent to transformers' ``Qwen3RotaryEmbedding`` for static rope types, but gathers from a cached fp32
    table instead of recomputing cos/sin with a matmul on every call.
    """

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float = 1.0, initial_rows: int = DEFAULT_TABLE_ROWS):
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().clone(), persistent=False)
        self.attention_scaling = float(attention_scaling)
        self.table = RopeTable(initial_rows)

    @classmethod
    def from_base(cls, head_dim: int, base: float = 10000.0, **kwargs) -> CachedRotaryEmbedding:
        """Default RoPE frequencies ``1 / base**(arange(0, head_dim, 2) / head_dim)``, as transformers builds them."""
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return cls(inv_freq, **kwargs)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table.cos_sin(self.inv_freq, self.attention_scaling, position_ids.to(x.device), x.dtype)


class CachedMRotaryEmbedding(CachedRotaryEmbedding):
    """Qwen3-VL interleaved mRoPE: ``position_ids`` of shape ``(3, B, S)``, ``(1, B, S)`` or ``(B, S)``."""

    def __init__(
        self,
        inv_freq: torch.Tensor,
        mrope_section: Sequence[int] = (24, 20, 20),
        attention_scaling: float = 1.0,
        initial_rows: int = DEFAULT_TABLE_ROWS,
    ):
        super().__init__(inv_freq, attention_scaling, initial_rows)
        self.mrope_section = [int(s) for s in mrope_section]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.table.cos_sin(
            self.inv_freq, self.attention_scaling, position_ids.to(x.device), x.dtype, self.mrope_section
        )
