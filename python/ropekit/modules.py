"""Cached rotary embeddings: an fp32 cos/sin table built once per device and gathered by position."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import ops

__all__ = ["RopeTable", "CachedRotaryEmbedding", "CachedMRotaryEmbedding", "DEFAULT_TABLE_ROWS", "MAX_TABLE_ROWS"]

# Rows built up front. 8192 x 64 frequencies x 2 tables x 4 bytes = 4 MiB; positions past the table are handled
# exactly (see RopeTable.cos_sin), so a model's full max_position_embeddings need not be allocated.
DEFAULT_TABLE_ROWS = 8192
# The table never grows past this many rows: 2 tables x 131072 x 64 frequencies x 4 bytes = 64 MiB at rotary dim 128
# (32 MiB for Qwen3.5's rotary dim 64). Positions at or past it are computed exactly, row by row, for just the
# positions asked for (CPU) or inside the gather kernel (CUDA), so memory stays bounded whatever the position.
MAX_TABLE_ROWS = 1 << 17
_MAX_EXACT_POSITION = 1 << 24  # float32 represents every integer position below it


# the ops' overload handles, looked up once (the rotary forward runs once per model forward, decode included)
_rope_cos_sin = torch.ops.ropekit.rope_cos_sin.default
_mrope_cos_sin = torch.ops.ropekit.mrope_cos_sin.default


def _round_rows(rows: int, max_rows: int) -> int:
    return min(max(256, 1 << max(rows - 1, 0).bit_length()), max_rows)


class RopeTable:
    """A lazily built fp32 cos/sin table for one rotary embedding, never stale and bounded in size.

    **Never stale.** The table is rebuilt when the ``inv_freq`` tensor (object, storage, dtype, in-place version),
    the device or the attention scaling change. In-place changes that leave all of those as they were (writes
    through ``.data``, to an inference tensor, or through a numpy view) are caught by comparing values with a
    snapshot of the frequencies the table was built from: on CPU here, on every call, after which the table is
    rebuilt; on CUDA inside the gather kernel (no host sync), which computes every frequency that differs from the
    snapshot exactly from the current ``inv_freq`` instead of reading the table. Either way the result equals what
    transformers computes from the module's current ``inv_freq`` and ``attention_scaling``.

    **Bounded.** On CPU the table grows (doubling) to cover the largest position, which costs no sync there; on
    CUDA, reading the largest position would be a host sync, so the table covers the sequence length and the
    expected context (``expected_rows``, the model's ``max_position_embeddings``), known on the host. It never
    grows past ``max_rows`` (:data:`MAX_TABLE_ROWS`). Positions past the table, and negative positions
    (transformers produces them for padding slots after adding negative mRoPE deltas), are computed exactly by the
    gather from the current ``inv_freq``: on CPU for just those positions, on CUDA inside the kernel.

    It is a plain attribute, not a buffer: checkpoints never carry it.
    """

    def __init__(self, initial_rows: int = DEFAULT_TABLE_ROWS, max_rows: int = MAX_TABLE_ROWS,
                 expected_rows: int = 0):
        self.max_rows = int(min(max_rows, _MAX_EXACT_POSITION))
        self.initial_rows = int(min(initial_rows, self.max_rows))
        self.expected_rows = int(min(expected_rows, self.max_rows))
        # what the table was built from: the inv_freq tensor (kept alive, so its address cannot be reused by another
        # tensor), its version, storage and dtype, the device and the scaling; and the float32 snapshot of its values
        self._inv_freq: torch.Tensor | None = None
        self._version = self._data_ptr = self._dtype = self._device = self._scaling = None
        self._table_inv_freq: torch.Tensor | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None

    @property
    def rows(self) -> int:
        return 0 if self.cos is None else self.cos.shape[0]

    def _current(self, inv_freq: torch.Tensor, attention_scaling: float, device: torch.device) -> bool:
        """Whether the table was built from exactly this inv_freq and scaling on this device. The cheap checks come
        first; on CPU the values are compared too (on CUDA the gather kernel compares them, with no sync)."""
        if (
            inv_freq is not self._inv_freq
            or attention_scaling != self._scaling
            or device != self._device
            or inv_freq.dtype != self._dtype
            or inv_freq.data_ptr() != self._data_ptr
        ):
            return False
        # inference tensors (made under torch.inference_mode) track no version; the value check covers them
        if not inv_freq.is_inference() and inv_freq._version != self._version:
            return False
        return device.type != "cpu" or inv_freq.device.type != "cpu" or torch.equal(
            inv_freq.float(), self._table_inv_freq)

    def tables(
        self, inv_freq: torch.Tensor, attention_scaling: float, device: torch.device, min_rows: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(cos_table, sin_table, table_inv_freq)`` on ``device``, covering at least
        ``min(min_rows, max_rows)`` rows; ``table_inv_freq`` is the float32 snapshot they were built from."""
        if not self._current(inv_freq, attention_scaling, device):
            self.cos = self.sin = None
            self._inv_freq = inv_freq
            self._version = None if inv_freq.is_inference() else inv_freq._version
            self._data_ptr, self._dtype, self._device = inv_freq.data_ptr(), inv_freq.dtype, device
            self._scaling = float(attention_scaling)
            self._table_inv_freq = inv_freq.detach().to(device=device, dtype=torch.float32, copy=True)
        rows = self.rows
        if rows < min_rows and rows < self.max_rows or self.cos is None:
            first = max(self.initial_rows, self.expected_rows if device.type != "cpu" else 0)
            rows = _round_rows(max(min_rows, first if self.cos is None else 2 * rows), self.max_rows)
            self.cos, self.sin = ops.rope_cache(self._table_inv_freq, rows, attention_scaling)
        return self.cos, self.sin, self._table_inv_freq

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
        *,
        mrope_interleaved: bool = True,
        is_neox: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``dtype`` for ``position_ids`` (1-D RoPE, or mRoPE when ``mrope_section`` is given), exactly
        as transformers computes them from the current ``inv_freq`` and ``attention_scaling``.
        ``mrope_interleaved=False``: Qwen2-VL / Qwen2.5-VL / GLM-4V sectioned mRoPE; ``is_neox=False``: GLM-4V's
        ``repeat_interleave(2)`` layout (see :func:`ropekit.mrope_cos_sin`)."""
        device = position_ids.device
        cos_t, sin_t, table_inv = self.tables(inv_freq, attention_scaling, device, self.min_rows_for(position_ids))
        if inv_freq.device != device:
            inv_freq = inv_freq.to(device)
        if mrope_section is None:
            return _rope_cos_sin(cos_t, sin_t, position_ids, dtype, inv_freq, attention_scaling, table_inv, is_neox)
        return _mrope_cos_sin(cos_t, sin_t, position_ids, mrope_section, dtype, inv_freq, attention_scaling,
                              table_inv, mrope_interleaved, is_neox)


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
