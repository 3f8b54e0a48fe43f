"""Replacement for Qwen3-VL / Qwen3.5 ``get_rope_index`` backed by ``ropekit.rope_index``.

The replacement keeps the original's exact signature: transformers 5.x passes ``mm_token_type_ids`` second and
generate relies on the ``**kwargs`` sink; 4.57 passes ``(input_ids, image_grid_thw, video_grid_thw,
attention_mask)`` positionally. The convention is chosen by inspecting that signature, never by version string.

The fidelity rule: the op runs in its non-strict mode, which returns exactly what transformers returns wherever
transformers returns a result (masked-out spans, grids left over, tril or segment-id masks, odd grids) and raises a
ValueError where transformers itself fails. Inputs outside the op's argument domain (float token types, grids that
are not (N, 3) integers, masks that are not (B, S)) go to transformers' own code unchanged.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .. import ops
from ._patching import is_live


def _on_host(input_ids) -> bool:
    # CPU tensors: the host loop is the fast path. GPU tensors: the device algorithm, with zero host syncs.
    return input_ids.device.type == "cpu"


def _to(t, device):
    return None if t is None else t.to(device)


def _integral(t) -> bool:
    return isinstance(t, torch.Tensor) and not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _in_op_domain(input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids=None) -> bool:
    """Whether ropekit.rope_index takes these arguments as they are; anything else runs transformers' own code."""
    if not _integral(input_ids) or input_ids.dim() != 2:
        return False
    for grid in (image_grid_thw, video_grid_thw):
        if grid is not None and not (_integral(grid) and grid.dim() == 2 and grid.shape[1] == 3):
            return False
    if attention_mask is not None and not (
        isinstance(attention_mask, torch.Tensor) and attention_mask.shape == input_ids.shape
        and not attention_mask.is_complex()
    ):
        return False
    if mm_token_type_ids is not None and not (_integral(mm_token_type_ids) and mm_token_type_ids.shape == input_ids.shape):
        return False
    return True


def make_get_rope_index(original):
    params = inspect.signature(original).parameters

    if "mm_token_type_ids" in params:  # transformers 5.x

        @functools.wraps(original)
        def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                           attention_mask=None, **kwargs):
            if (
                not is_live(get_rope_index)
                or mm_token_type_ids is None
                or not _in_op_domain(input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids)
            ):
                return original(self, input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask,
                                **kwargs)
            device = input_ids.device
            return ops.rope_index(
                input_ids, _to(image_grid_thw, device), _to(video_grid_thw, device), _to(attention_mask, device),
                mm_token_type_ids=mm_token_type_ids.to(device),
                spatial_merge_size=self.config.vision_config.spatial_merge_size,
                convention="token_types", on_host=_on_host(input_ids),
            )

    else:  # transformers 4.57: token-id based, called positionally

        @functools.wraps(original)
        def get_rope_index(self, input_ids=None, image_grid_thw=None, video_grid_thw=None, attention_mask=None):
            if not is_live(get_rope_index) or not _in_op_domain(input_ids, image_grid_thw, video_grid_thw,
                                                                 attention_mask):
                return original(self, input_ids, image_grid_thw, video_grid_thw, attention_mask)
            device = input_ids.device
            config = self.config
            return ops.rope_index(
                input_ids, _to(image_grid_thw, device), _to(video_grid_thw, device), _to(attention_mask, device),
                spatial_merge_size=config.vision_config.spatial_merge_size,
                image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                vision_start_token_id=config.vision_start_token_id,
                convention="vision_start", on_host=_on_host(input_ids),
            )

    get_rope_index.__ropekit_original__ = original
    return get_rope_index
