// The vision towers' position inputs, computed from grid_thw (one (t, h, w) row per image or video) natively:
//   vision_position_ids: each patch's (h, w) position in spatial-merge-block order, repeated per frame
//     (transformers 5.x `vision_utils.get_vision_position_ids`, the pos_ids of 4.57's `rot_pos_emb`);
//   vision_window_index: Qwen2.5-VL's window-attention order and window boundaries (4.57 `get_window_index`,
//     5.x `vision_utils.get_vision_window_index` before its `unique_consecutive`);
//   vision_pos_embed_interp: Qwen3-VL 4.57's `fast_pos_embed_interpolate` bilinear taps and weights (per grid, one
//     frame in raster order, as transformers lists them before it repeats frames and reorders by merge block).
// Each reads grid_thw on the host once (one device-to-host pull for accelerator grids, the only sync);
// vision_position_ids also has a device path with no sync at all when the token count is given.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace ropekit {

// One row of grid_thw, read on the host.
struct VisionGrid {
  int64_t t = 0, h = 0, w = 0;
};

// grid_thw checked ((n, 3) integer tensor) and read on the host in one transfer. Values are checked by each op
// (`what` names the op in messages).
std::vector<VisionGrid> read_vision_grids(const at::Tensor& grid_thw, const char* what);

// (N, 2) int64 (h, w) positions, N = sum(t * h * w), on grid_thw's device. `num_tokens` (N, when the caller knows
// it) selects the device path on CUDA: no host sync, a device-side assert where the grids give another count.
at::Tensor vision_position_ids(const at::Tensor& grid_thw, int64_t spatial_merge_size,
                               std::optional<int64_t> num_tokens);

// (window_index (sum(t * (h // m) * (w // m)),) int64, cu_window_seqlens (1 + windows,) int64), on grid_thw's
// device: transformers' values before any unique_consecutive (empty padding windows repeat the previous bound).
std::tuple<at::Tensor, at::Tensor> vision_window_index(const at::Tensor& grid_thw, int64_t spatial_merge_size,
                                                       int64_t window_size, int64_t patch_size);

// (indices (4, N) int64, weights (4, N) of the default float dtype), N = sum(h * w), on grid_thw's device: the four
// bilinear taps of each patch of a frame, in raster order, into the (num_grid_per_side ** 2)-row learned table and
// their weights, computed with torch's own CPU linspace and float ops as transformers 4.57 computes them.
std::tuple<at::Tensor, at::Tensor> vision_pos_embed_interp(const at::Tensor& grid_thw, int64_t num_grid_per_side,
                                                           int64_t spatial_merge_size);

#ifdef ROPEKIT_WITH_CUDA
// The device path of vision_position_ids (cuda/vision_positions.cu): `grid` is (n, 3) int64 on the device.
at::Tensor vision_position_ids_cuda_kernel(const at::Tensor& grid, int64_t spatial_merge_size, int64_t num_tokens);
#endif

}  // namespace ropekit
