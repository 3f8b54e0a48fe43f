"""Replacement for Qwen3-VL / Qwen3.5 ``get_rope_index`` backed by ``ropekit.rope_index``.

The replacement keeps the original's exact signature: transformers 5.x passes ``mm_token_type_ids`` second and
generate relies on the ``**kwargs`` sink; 4.57 passes ``(input_ids, image_grid_thw, video_grid_thw,
attention_mask)`` positionally. The convention is chosen by inspecting that signature, never by version string.
"""

from __future__ import annotations

import functools
import inspect

from .. import ops
from ._patching import is_live


def _on_host(input_ids) -> bool:
    # CPU tensors: the host loop is the fast path. GPU tensors: the device algorithm, with zero host syncs.
    return input_ids.device.type == "cpu"


def _to(t, device):
    return None if t is None else t.to(device)


def make_get_rope_index(original):
    params = inspect.signature(original).parameters

    if "mm_token_type_ids" in params:  # transformers 5.x

        @functools.wraps(original)
        def get_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                           attention_mask=None, **kwargs):
            if not is_live(get_rope_index) or input_ids is None or mm_token_type_ids is None or input_ids.dim() != 2:
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
            if (
                not is_live(get_rope_index)
                or input_ids is None
                or input_ids.dim() != 2
                or (attention_mask is not None and attention_mask.dim() != 2)
            ):
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
