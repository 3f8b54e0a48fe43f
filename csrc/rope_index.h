// rope_index: transformers' get_rope_index (3-D mRoPE position ids and deltas) for every mRoPE family and both
// transformers lines, computed natively: a host loop (one pull for accelerator inputs), a device algorithm written
// with ATen tensor ops (no host sync; the CPU-tested reference), and a fused CUDA kernel.
#pragma once

#include "rope_index_kernel.h"
#include "rope_index_walk.h"

#include <ATen/core/Tensor.h>
#include <c10/core/Scalar.h>

#include <optional>
#include <string_view>
#include <tuple>

namespace ropekit {

// The omni conventions' extra arguments (see ops.rope_index).
struct OmniOptions {
  std::optional<at::Tensor> audio_seqlens;
  int64_t audio_token_id = -1, audio_start_token_id = -1;
  bool use_audio_in_video = false;
  int64_t tokens_per_chunk = 0, audio_n_window = 0;
};

struct RopeIndexArgs {
  at::Tensor input_ids;           // (B, S) integer
  at::Tensor image_grid_thw;      // (N_img, 3) integer or undefined
  at::Tensor video_grid_thw;      // (N_vid, 3) integer or undefined; t // temporal_merge_size once checked
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
  int64_t num_axes = 3;       // rows of position_ids: xdrope's leading rows hold every token's sample index
  // omni conventions (Qwen2.5-Omni, Qwen3-Omni-MoE)
  at::Tensor audio_seqlens;   // (N_audio,) integer or undefined: each audio's feature length
  int64_t audio_token_id = -1, audio_start_token_id = -1;
  bool use_audio_in_video = false;
  int64_t tokens_per_chunk = 0;  // Qwen2.5-Omni: int(position_id_per_seconds * seconds_per_chunk)
  int64_t audio_n_window = 0;    // Qwen3-Omni: audio_config.n_window
  bool omni() const { return rope_index_detail::is_omni(convention); }
  bool float_positions() const { return convention == rope_index_detail::kOmni3; }
  // 5.x: modality from mm_token_type_ids (every 5.x family, HunYuan-VL's xdrope and HY-V4-VL's frame blocks included)
  bool token_types() const {
    return convention == rope_index_detail::kTokenTypes || convention == rope_index_detail::kXdRope ||
           convention == rope_index_detail::kFrameBlocks;
  }
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
                               bool strict, int64_t temporal_merge_size = 1, int64_t num_axes = 3,
                               const OmniOptions& omni = OmniOptions{});

// Host algorithm: linear in B*S plus the vision tokens. Inputs on an accelerator are pulled to the host in one
// transfer (one sync) and the results pushed back with non-blocking copies. No result: ValueError.
std::tuple<at::Tensor, at::Tensor> rope_index_host(const RopeIndexArgs& args);

// Device algorithm with ATen tensor ops on the inputs' device, no host sync (CUDA-graph capturable); the reference
// the fused kernel is tested against. Inputs without a result trip an asynchronous assert; every index is clamped
// first, so nothing is read out of bounds. Its domain: every input of the runs-based conventions (token_types,
// video_brackets), and for vision_start the inputs whose vision spans each match their grid (what the 4.57 scan
// then does); other vision_start inputs trip the assert, and on_host=True computes them.
std::tuple<at::Tensor, at::Tensor> rope_index_reference(const RopeIndexArgs& args);

// The fused device algorithm (rope_index_kernel.h): on CUDA two launches with no host sync; on the CPU the same row
// code run serially (what the tests compare, as no GPU runs the CI). Inputs without a result: a device-side assert
// on CUDA, a ValueError naming the row on the CPU.
std::tuple<at::Tensor, at::Tensor> rope_index_kernel(const RopeIndexArgs& args);
#ifdef ROPEKIT_WITH_CUDA
void launch_rope_index_kernel(const rope_index_detail::KernelParams& params);  // cuda/rope_index.cu
#endif

// Pieces the algorithms share (rope_index.cpp).
namespace rope_index_detail {

// Which tokens count: 5.x attends where mask.bool(), 4.57 where mask == 1, packed rows where the segment id != 0,
// and with cu_seqlens the tokens inside [cu_seqlens[0], cu_seqlens[-1]). (B, S) bool, on the inputs' device.
at::Tensor attended(const RopeIndexArgs& a);

// transformers 4.57 without any grid (unpacked): positions from the mask's cumulative sum, no vision at all.
bool text_only_branch_applies(const RopeIndexArgs& a);
std::tuple<at::Tensor, at::Tensor> text_only_branch(const RopeIndexArgs& a);

// The time interval as transformers computes it, per video, as tensors on the inputs' device (no sync): `pre`
// (int64) and `interval` (of the dtype the product runs in). 5.x: interval = tokens_per_second *
// second_per_grid_ts[v], pre = 1 (or tokens_per_second alone without second_per_grid_ts); 4.57: pre =
// int(second_per_grid_ts[v]) (or 1), interval = tokens_per_second.
struct TimeTensors {
  at::Tensor pre;            // (N,) int64
  at::Tensor interval;       // (N,) of `dtype`
  at::Tensor interval_bits;  // (N,) int64: the integer, or a float64's bits (GridLists::time_interval)
  at::ScalarType dtype = at::kLong;
  int32_t code = kTimeInt;
};
TimeTensors time_tensors(const RopeIndexArgs& a, int64_t n_videos);

// The omni conventions' time scales (GridLists::time_interval): second_per_grids[v].float() as a float64's bits.
at::Tensor omni_time_bits(const RopeIndexArgs& a);

// frames_end (GridLists) of the (N_vid, 3) int64 video grids: entries per video are 1 (whole videos), or its frames
// (5.x and 4.57 Qwen-VL: repeat_interleave by t, t = 0 drops it; 4.57 GLM-4V: max(t, 1)), summed inclusively.
at::Tensor video_frames_end(const RopeIndexArgs& a, const at::Tensor& videos);

Rules rules_of(const RopeIndexArgs& a);

}  // namespace rope_index_detail

// The op: on_host selects the host algorithm, otherwise the device algorithm (the fused kernel on CUDA).
std::tuple<at::Tensor, at::Tensor> rope_index(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size, int64_t image_token_id,
    int64_t video_token_id, int64_t vision_start_token_id, c10::string_view convention, bool on_host,
    bool video_frames, const std::optional<at::Tensor>& second_per_grid_ts,
    const std::optional<c10::Scalar>& tokens_per_second, int64_t video_start_token_id, int64_t video_end_token_id,
    bool packed, const std::optional<at::Tensor>& cu_seqlens, bool strict, int64_t temporal_merge_size = 1,
    int64_t num_axes = 3, const std::optional<at::Tensor>& audio_seqlens = std::nullopt, int64_t audio_token_id = -1,
    int64_t audio_start_token_id = -1, bool use_audio_in_video = false, int64_t tokens_per_chunk = 0,
    int64_t audio_n_window = 0);

// Any of the three algorithms as an op of its own (ropekit::_rope_index_algorithm, algorithm "host", "reference" or
// "kernel"), so that tests compare them on the same device.
std::tuple<at::Tensor, at::Tensor> rope_index_algorithm_op(
    const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
    const std::optional<at::Tensor>& video_grid_thw, const std::optional<at::Tensor>& attention_mask,
    const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size, int64_t image_token_id,
    int64_t video_token_id, int64_t vision_start_token_id, c10::string_view convention, bool video_frames,
    const std::optional<at::Tensor>& second_per_grid_ts, const std::optional<c10::Scalar>& tokens_per_second,
    int64_t video_start_token_id, int64_t video_end_token_id, bool packed, const std::optional<at::Tensor>& cu_seqlens,
    bool strict, int64_t temporal_merge_size, int64_t num_axes, const std::optional<at::Tensor>& audio_seqlens,
    int64_t audio_token_id, int64_t audio_start_token_id, bool use_audio_in_video, int64_t tokens_per_chunk,
    int64_t audio_n_window, c10::string_view algorithm);

}  // namespace ropekit
