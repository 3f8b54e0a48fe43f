// rope_index: Qwen3-VL / Qwen3.5 get_rope_index (3-D mRoPE position ids and deltas), computed natively.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace ropekit {

// Which transformers get_rope_index the op reproduces.
enum class RopeIndexConvention {
  kTokenTypes,   // transformers 5.x: modality from mm_token_type_ids; padding 0; deltas vs attended tokens
  kVisionStart,  // transformers 4.57: spans found after vision_start_token_id; padding 1; deltas vs padded length
};

struct RopeIndexArgs {
  at::Tensor input_ids;        // (B, S) integer
  at::Tensor image_grid_thw;   // (N_img, 3) integer or undefined
  at::Tensor video_grid_thw;   // (N_vid, 3) integer or undefined
  at::Tensor attention_mask;   // (B, S) or undefined
  at::Tensor mm_token_type_ids;  // (B, S) integer or undefined
  int64_t merge = 2;
  int64_t image_token_id = 0, video_token_id = 0, vision_start_token_id = 0;
  RopeIndexConvention convention = RopeIndexConvention::kTokenTypes;
};

RopeIndexArgs check_rope_index(const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
                               const std::optional<at::Tensor>& video_grid_thw,
                               const std::optional<at::Tensor>& attention_mask,
                               const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size,
                               int64_t image_token_id, int64_t video_token_id, int64_t vision_start_token_id,
                               std::string_view convention);

// Host algorithm: linear in B*S plus the vision tokens. Inputs on an accelerator are pulled to the host in one
// transfer (one sync) and the results pushed back with non-blocking copies. Inconsistent inputs: ValueError.
std::tuple<at::Tensor, at::Tensor> rope_index_host(const RopeIndexArgs& args);

// Device algorithm: tensor ops on the inputs' device with no host sync (CUDA-graph capturable). Inconsistent
// inputs trip an asynchronous assert; every index is clamped first, so nothing is read out of bounds.
std::tuple<at::Tensor, at::Tensor> rope_index_device(const RopeIndexArgs& args);

// The op: on_host selects the algorithm (CPU tensors always run on the host unless on_host is false).
std::tuple<at::Tensor, at::Tensor> rope_index(const at::Tensor& input_ids,
                                              const std::optional<at::Tensor>& image_grid_thw,
                                              const std::optional<at::Tensor>& video_grid_thw,
                                              const std::optional<at::Tensor>& attention_mask,
                                              const std::optional<at::Tensor>& mm_token_type_ids,
                                              int64_t spatial_merge_size, int64_t image_token_id,
                                              int64_t video_token_id, int64_t vision_start_token_id,
                                              c10::string_view convention, bool on_host);

}  // namespace ropekit
