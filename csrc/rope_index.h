// rope_index: transformers' get_rope_index (3-D mRoPE position ids and deltas) for every mRoPE family and both
// transformers lines, computed natively: a host loop (one pull for accelerator inputs), a device algorithm written
// with ATen tensor ops (no host sync; the CPU-tested reference), and a fused CUDA kernel.
#pragma once

#include "rope_index_walk.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace ropekit {

struct RopeIndexArgs {
  at::Tensor input_ids;           // (B, S) integer
  at::Tensor image_grid_thw;      // (N_img, 3) integer or undefined
  at::Tensor video_grid_thw;      // (N_vid, 3) integer or undefined
  at::Tensor attention_mask;      // (B, S) or undefined; segment ids when packed
  at::Tensor mm_token_type_ids;   // (B, S) integer or undefined
  at::Tensor second_per_grid_ts;  // (N_vid,) real or undefined (Qwen2.5-VL)
  at::Tensor cu_seqlens;          // (K + 1,) integer or undefined: packed samples over the flattened (B * S) tokens
  std::optional<c10::Scalar> tokens_per_second;  // Qwen2.5-VL temporal scaling; int or float, as in the config
  int64_t merge = 2;
  int64_t image_token_id = -1, video_token_id = -1, vision_start_token_id = -1;
  int64_t video_start_token_id = -1, video_end_token_id = -1;
  rope_index_detail::Convention convention = rope_index_detail::kTokenTypes;
  bool video_frames = true;  // split each video into t single-frame grids (Qwen3-VL, Qwen3.5, GLM-4V)
  bool packed = false;       // attention_mask holds segment ids (1, 2, ...; 0 = padding)
  bool strict = false;       // reject inputs transformers would silently accept (see ops.rope_index)

  bool is_packed() const { return packed || cu_seqlens.defined(); }
  bool token_types() const { return convention == rope_index_detail::kTokenTypes; }
};

RopeIndexArgs check_rope_index(const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
                               const std::optional<at::Tensor>& video_grid_thw,
                               const std::optional<at::Tensor>& attention_mask,
                               const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size,
                               int64_t image_token_id, int64_t video_token_id, int64_t vision_start_token_id,
                               std::string_view convention, bool video_frames,
                               const std::optional<at::Tensor>& second_per_grid_ts,
                               const std::optional<c10::Scalar>& tokens_per_second, int64_t video_start_token_id,
                               int64_t video_end_token_id, bool packed, const std::optional<at::Tensor>& cu_seqlens,
                               bool strict);

// Host algorithm: linear in B*S plus the vision tokens. Inputs on an accelerator are pulled to the host in one
// transfer (one sync) and the results pushed back with non-blocking copies. No result: ValueError.
std::tuple<at::Tensor, at::Tensor> rope_index_host(const RopeIndexArgs& args);

// Device algorithm with ATen tensor ops on the inputs' device, no host sync (CUDA-graph capturable); the reference
// the fused kernel is tested against. Inputs without a result trip an asynchronous assert; every index is clamped
// first, so nothing is read out of bounds. Its domain: every input of the runs-based conventions (token_types,
// video_brackets), and for vision_start the inputs whose vision spans each match their grid (what the 4.57 scan
// then does); other vision_start inputs trip the assert, and on_host=True computes them.
std::tuple<at::Tensor, at::Tensor> rope_index_reference(const RopeIndexArgs& args);

// The op: on_host selects the host algorithm, otherwise the device algorithm.
std::tuple<at::Tensor, at::Tensor> rope_index(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size, int64_t image_token_id,
    int64_t video_token_id, int64_t vision_start_token_id, c10::string_view convention, bool on_host,
    bool video_frames, const std::optional<at::Tensor>& second_per_grid_ts,
    const std::optional<c10::Scalar>& tokens_per_second, int64_t video_start_token_id, int64_t video_end_token_id,
    bool packed, const std::optional<at::Tensor>& cu_seqlens, bool strict);

}  // namespace ropekit
