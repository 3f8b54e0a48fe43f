// Every ropekit schema, and its CPU / CUDA / Autograd kernels. Fake (Meta) kernels live in python/ropekit/ops.py,
// where symbolic shapes come for free.
#include "apply_rope.h"
#include "cpu_isa.h"
#include "qk_norm_rope.h"
#include "rope_index.h"
#include "rope_table.h"
#include "vision_positions.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <initializer_list>
#include <utility>

namespace ropekit {
namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

// Positions index a table, so the tables and gathers have no useful derivative; transformers builds them under
// no_grad. Say so instead of handing back a tensor whose backward would silently stop.
void forbid_grad(const char* op, std::initializer_list<std::pair<const char*, const at::Tensor*>> args) {
  if (!torch::autograd::GradMode::is_enabled()) return;
  for (const auto& [name, t] : args) {
    TORCH_CHECK(!(t->defined() && t->requires_grad()), "ropekit.", op, ": ", name,
                " requires grad, but this op is not differentiable (cos/sin tables are constants, as transformers "
                "builds them under torch.no_grad; the in-place qkv op is for inference; backward ops do not "
                "support double backward); pass a detached tensor or run under torch.no_grad()");
  }
}

template <typename Fn>
auto below_autograd(Fn&& fn) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return fn();
}

template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

TensorPair rope_cache_autograd(const at::Tensor& inv_freq, int64_t max_position, double attention_scaling) {
  forbid_grad("rope_cache", {{"inv_freq", &inv_freq}});
  static auto op = op_handle<TensorPair(const at::Tensor&, int64_t, double)>("ropekit::rope_cache");
  return below_autograd([&] { return op.call(inv_freq, max_position, attention_scaling); });
}

TensorPair rope_cos_sin_autograd(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                                 const at::Tensor& position_ids, at::ScalarType dtype,
                                 const std::optional<at::Tensor>& inv_freq, double attention_scaling,
                                 const std::optional<at::Tensor>& table_inv_freq, bool is_neox) {
  const at::Tensor f = inv_freq.value_or(at::Tensor());
  const at::Tensor tf = table_inv_freq.value_or(at::Tensor());
  forbid_grad("rope_cos_sin", {{"cos_cache", &cos_cache}, {"sin_cache", &sin_cache}, {"inv_freq", &f},
                               {"table_inv_freq", &tf}});
  static auto op = op_handle<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                                        const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
                                        bool)>("ropekit::rope_cos_sin");
  return below_autograd([&] {
    return op.call(cos_cache, sin_cache, position_ids, dtype, inv_freq, attention_scaling, table_inv_freq, is_neox);
  });
}

TensorPair mrope_cos_sin_autograd(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                                  const at::Tensor& position_ids, c10::IntArrayRef mrope_section,
                                  at::ScalarType dtype, const std::optional<at::Tensor>& inv_freq,
                                  double attention_scaling, const std::optional<at::Tensor>& table_inv_freq,
                                  bool mrope_interleaved, bool is_neox) {
  const at::Tensor f = inv_freq.value_or(at::Tensor());
  const at::Tensor tf = table_inv_freq.value_or(at::Tensor());
  forbid_grad("mrope_cos_sin", {{"cos_cache", &cos_cache}, {"sin_cache", &sin_cache}, {"inv_freq", &f},
                                {"table_inv_freq", &tf}});
  static auto op =
      op_handle<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                           at::ScalarType, const std::optional<at::Tensor>&, double,
                           const std::optional<at::Tensor>&, bool, bool)>("ropekit::mrope_cos_sin");
  return below_autograd([&] {
    return op.call(cos_cache, sin_cache, position_ids, mrope_section, dtype, inv_freq, attention_scaling,
                   table_inv_freq, mrope_interleaved, is_neox);
  });
}

// The backward ops are not differentiable again (double backward / create_graph=True): say so.
TensorPair apply_rope_backward_autograd(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
                                        const at::Tensor& sin, int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                        bool is_neox) {
  forbid_grad("apply_rope_backward (double backward)", {{"grad_q", &grad_q}, {"grad_k", &grad_k}, {"cos", &cos},
                                                        {"sin", &sin}});
  static auto op = op_handle<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        int64_t, at::ScalarType, bool)>("ropekit::apply_rope_backward");
  return below_autograd([&] { return op.call(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, is_neox); });
}

using TensorQuad = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

TensorQuad qk_norm_rope_backward_autograd(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q,
                                          const at::Tensor& k, const at::Tensor& q_weight, const at::Tensor& k_weight,
                                          const at::Tensor& cos, const at::Tensor& sin, double eps,
                                          bool zero_centered, bool is_neox) {
  forbid_grad("qk_norm_rope_backward (double backward)",
              {{"grad_q", &grad_q}, {"grad_k", &grad_k}, {"q", &q}, {"k", &k}, {"q_weight", &q_weight},
               {"k_weight", &k_weight}});
  static auto op = op_handle<TensorQuad(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        double, bool, bool)>("ropekit::qk_norm_rope_backward");
  return below_autograd([&] {
    return op.call(grad_q, grad_k, q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox);
  });
}

// Inference only: it overwrites q and k inside qkv, which autograd could not undo.
void qk_norm_rope_qkv_autograd(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                               const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t num_q_heads,
                               int64_t num_kv_heads, bool zero_centered, bool is_neox) {
  forbid_grad("qk_norm_rope_qkv_", {{"qkv", &qkv}, {"q_weight", &q_weight}, {"k_weight", &k_weight}});
  static auto op = op_handle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, double, int64_t, int64_t, bool, bool)>(
      "ropekit::qk_norm_rope_qkv_");
  below_autograd([&] {
    op.call(qkv, q_weight, k_weight, cos, sin, eps, num_q_heads, num_kv_heads, zero_centered, is_neox);
    return 0;
  });
  torch::autograd::impl::bump_version(qkv);  // readers of qkv see that it changed
}

template <TensorPair (*Gather)(const GatherArgs&)>
TensorPair rope_cos_sin_impl(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                             const at::Tensor& position_ids, at::ScalarType dtype,
                             const std::optional<at::Tensor>& inv_freq, double attention_scaling,
                             const std::optional<at::Tensor>& table_inv_freq, bool is_neox) {
  return Gather(check_rope_cos_sin(cos_cache, sin_cache, position_ids, dtype, inv_freq, attention_scaling,
                                   table_inv_freq, is_neox));
}

template <TensorPair (*Gather)(const GatherArgs&)>
TensorPair mrope_cos_sin_impl(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                              const at::Tensor& position_ids, c10::IntArrayRef mrope_section, at::ScalarType dtype,
                              const std::optional<at::Tensor>& inv_freq, double attention_scaling,
                              const std::optional<at::Tensor>& table_inv_freq, bool mrope_interleaved,
                              bool is_neox) {
  return Gather(check_mrope_cos_sin(cos_cache, sin_cache, position_ids, mrope_section, dtype, inv_freq,
                                    attention_scaling, table_inv_freq, mrope_interleaved, is_neox));
}

}  // namespace
}  // namespace ropekit

TORCH_LIBRARY(ropekit, m) {
  m.def("rope_cache(Tensor inv_freq, int max_position, float attention_scaling=1.0) -> (Tensor cos, Tensor sin)");
  m.def(
      "rope_cos_sin(Tensor cos_cache, Tensor sin_cache, Tensor position_ids, ScalarType dtype, "
      "Tensor? inv_freq=None, float attention_scaling=1.0, Tensor? table_inv_freq=None, bool is_neox=True) -> "
      "(Tensor cos, Tensor sin)");
  m.def(
      "mrope_cos_sin(Tensor cos_cache, Tensor sin_cache, Tensor position_ids, int[] mrope_section, "
      "ScalarType dtype, Tensor? inv_freq=None, float attention_scaling=1.0, Tensor? table_inv_freq=None, "
      "bool mrope_interleaved=True, bool is_neox=True) -> (Tensor cos, Tensor sin)");
  m.def(
      "apply_rope(Tensor q, Tensor k, Tensor cos, Tensor sin, int unsqueeze_dim=1, bool is_neox=True) -> "
      "(Tensor q_out, Tensor k_out)");
  // The vision towers' apply_rotary_pos_emb_vision: q/k (tokens, heads, head_dim), cos/sin (tokens, rotary_dim);
  // float32 math, outputs in q's dtype. Its backward is apply_rope_backward with grads in q's dtype.
  m.def(
      "apply_rope_vision(Tensor q, Tensor k, Tensor cos, Tensor sin, bool is_neox=True) -> "
      "(Tensor q_out, Tensor k_out)");
  m.def(
      "apply_rope_backward(Tensor grad_q, Tensor grad_k, Tensor cos, Tensor sin, int unsqueeze_dim, "
      "ScalarType q_dtype, bool is_neox=True) -> (Tensor grad_q_in, Tensor grad_k_in)");
  m.def(
      "rope_index(Tensor input_ids, Tensor? image_grid_thw, Tensor? video_grid_thw, Tensor? attention_mask, "
      "Tensor? mm_token_type_ids, int spatial_merge_size, int image_token_id, int video_token_id, "
      "int vision_start_token_id, str convention, bool on_host=True, *, bool video_frames=True, "
      "Tensor? second_per_grid_ts=None, Scalar? tokens_per_second=None, int video_start_token_id=-1, "
      "int video_end_token_id=-1, bool packed=False, Tensor? cu_seqlens=None, bool strict=False, "
      "int temporal_merge_size=1, int num_axes=3, Tensor? audio_seqlens=None, int audio_token_id=-1, "
      "int audio_start_token_id=-1, bool use_audio_in_video=False, int tokens_per_chunk=0, int audio_n_window=0) -> "
      "(Tensor position_ids, Tensor deltas)");
  // For tests: one of rope_index's algorithms by name ("host", "reference": the ATen device algorithm, "kernel":
  // the fused device algorithm, serially on the CPU), on any device, so that they can be compared there.
  m.def(
      "_rope_index_algorithm(Tensor input_ids, Tensor? image_grid_thw, Tensor? video_grid_thw, "
      "Tensor? attention_mask, Tensor? mm_token_type_ids, int spatial_merge_size, int image_token_id, "
      "int video_token_id, int vision_start_token_id, str convention, *, bool video_frames=True, "
      "Tensor? second_per_grid_ts=None, Scalar? tokens_per_second=None, int video_start_token_id=-1, "
      "int video_end_token_id=-1, bool packed=False, Tensor? cu_seqlens=None, bool strict=False, "
      "int temporal_merge_size=1, int num_axes=3, Tensor? audio_seqlens=None, int audio_token_id=-1, "
      "int audio_start_token_id=-1, bool use_audio_in_video=False, int tokens_per_chunk=0, int audio_n_window=0, "
      "str algorithm) -> (Tensor position_ids, Tensor deltas)");
  // The vision towers' position inputs from grid_thw (vision_positions.h); integer results, not differentiable.
  m.def("vision_position_ids(Tensor grid_thw, int spatial_merge_size, int? num_tokens=None) -> Tensor");
  m.def(
      "vision_window_index(Tensor grid_thw, int spatial_merge_size, int window_size, int patch_size) -> "
      "(Tensor window_index, Tensor cu_window_seqlens)");
  m.def(
      "vision_pos_embed_interp(Tensor grid_thw, int num_grid_per_side, int spatial_merge_size) -> "
      "(Tensor indices, Tensor weights)");
  m.def(
      "qk_norm_rope(Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps, "
      "bool zero_centered=False, bool is_neox=True) -> (Tensor q_out, Tensor k_out)");
  m.def(
      "qk_norm_rope_backward(Tensor grad_q, Tensor grad_k, Tensor q, Tensor k, Tensor q_weight, Tensor k_weight, "
      "Tensor cos, Tensor sin, float eps, bool zero_centered, bool is_neox=True) -> (Tensor dq, Tensor dk, "
      "Tensor dq_weight, Tensor dk_weight)");
  // For tests and benchmarks: the CPU kernels' instruction set (cpu_isa.h); returns the previous one, sets `isa`
  // unless it is empty.
  m.def("_cpu_isa(str isa=\"\") -> str", &ropekit::cpu_isa_op);
  // For the GPU benchmark: the CUDA forward fast path's launch bounds for same-dtype bf16 / fp16 (qk_norm_rope.h);
  // returns the previous value, sets `blocks` (4 or 5) unless it is 0.
  m.def("_cuda_forward_min_blocks(int blocks=0) -> int", &ropekit::cuda_forward_min_blocks_op);
  m.def(
      "qk_norm_rope_qkv_(Tensor(a!) qkv, Tensor q_weight, Tensor k_weight, Tensor cos, Tensor sin, float eps, "
      "int num_q_heads, int num_kv_heads, bool zero_centered=False, bool is_neox=True) -> ()");
}

TORCH_LIBRARY_IMPL(ropekit, CPU, m) {
  m.impl("rope_cache", &ropekit::rope_cache);
  m.impl("rope_cos_sin", &ropekit::rope_cos_sin_impl<&ropekit::gather_cos_sin_cpu>);
  m.impl("mrope_cos_sin", &ropekit::mrope_cos_sin_impl<&ropekit::gather_cos_sin_cpu>);
  m.impl("apply_rope", &ropekit::apply_rope_cpu);
  m.impl("apply_rope_vision", &ropekit::apply_rope_vision_cpu);
  m.impl("apply_rope_backward", &ropekit::apply_rope_backward_cpu);
  m.impl("rope_index", &ropekit::rope_index);
  m.impl("_rope_index_algorithm", &ropekit::rope_index_algorithm_op);
  m.impl("vision_position_ids", &ropekit::vision_position_ids);
  m.impl("vision_window_index", &ropekit::vision_window_index);
  m.impl("vision_pos_embed_interp", &ropekit::vision_pos_embed_interp);
  m.impl("qk_norm_rope", &ropekit::qk_norm_rope_cpu);
  m.impl("qk_norm_rope_backward", &ropekit::qk_norm_rope_backward_cpu);
  m.impl("qk_norm_rope_qkv_", &ropekit::qk_norm_rope_qkv_cpu);
}

#ifdef ROPEKIT_WITH_CUDA
TORCH_LIBRARY_IMPL(ropekit, CUDA, m) {
  // The table is built with PyTorch's own CUDA cos/sin, which is what makes it bit-identical to transformers.
  m.impl("rope_cache", &ropekit::rope_cache);
  m.impl("rope_cos_sin", &ropekit::rope_cos_sin_impl<&ropekit::gather_cos_sin_cuda>);
  m.impl("mrope_cos_sin", &ropekit::mrope_cos_sin_impl<&ropekit::gather_cos_sin_cuda>);
  m.impl("apply_rope", &ropekit::apply_rope_cuda);
  m.impl("apply_rope_vision", &ropekit::apply_rope_vision_cuda);
  m.impl("apply_rope_backward", &ropekit::apply_rope_backward_cuda);
  // on_host=false: the fused kernel, zero host syncs; on_host=true: one pull, the host loop.
  m.impl("rope_index", &ropekit::rope_index);
  m.impl("_rope_index_algorithm", &ropekit::rope_index_algorithm_op);
  // grid_thw read once on the host (vision_position_ids with num_tokens: the sync-free device kernel)
  m.impl("vision_position_ids", &ropekit::vision_position_ids);
  m.impl("vision_window_index", &ropekit::vision_window_index);
  m.impl("vision_pos_embed_interp", &ropekit::vision_pos_embed_interp);
  m.impl("qk_norm_rope", &ropekit::qk_norm_rope_cuda);
  m.impl("qk_norm_rope_backward", &ropekit::qk_norm_rope_backward_cuda);
  m.impl("qk_norm_rope_qkv_", &ropekit::qk_norm_rope_qkv_cuda);
}
#endif

TORCH_LIBRARY_IMPL(ropekit, Autograd, m) {
  m.impl("rope_cache", &ropekit::rope_cache_autograd);
  m.impl("rope_cos_sin", &ropekit::rope_cos_sin_autograd);
  m.impl("mrope_cos_sin", &ropekit::mrope_cos_sin_autograd);
  m.impl("apply_rope", &ropekit::apply_rope_autograd);
  m.impl("apply_rope_vision", &ropekit::apply_rope_vision_autograd);
  m.impl("qk_norm_rope", &ropekit::qk_norm_rope_autograd);
  m.impl("qk_norm_rope_qkv_", &ropekit::qk_norm_rope_qkv_autograd);
  m.impl("apply_rope_backward", &ropekit::apply_rope_backward_autograd);
  m.impl("qk_norm_rope_backward", &ropekit::qk_norm_rope_backward_autograd);
}
