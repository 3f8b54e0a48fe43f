// apply_rope: transformers' apply_rotary_pos_emb as one out-of-place pass over q and k, with its backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>

#include <tuple>
#include <type_traits>

namespace ropekit {

// q or k seen as (batch, seq, heads, head_dim) through strides; head_dim is contiguous.
struct RopeOperand {
  at::Tensor in, out;  // `out` is what the op returns; both are viewed canonically below
  const void* in_ptr = nullptr;
  void* out_ptr = nullptr;
  int64_t heads = 0;
  int64_t in_stride_b = 0, in_stride_s = 0, in_stride_h = 0;
  int64_t out_stride_b = 0, out_stride_s = 0, out_stride_h = 0;
};

// An operand whose rows are the (B, S, H, D) views `in_rows` / `out_rows` of `in` / `out`; an undefined `out`
// makes a read-only operand (out_ptr null).
RopeOperand rope_operand(const at::Tensor& in, const at::Tensor& out, const at::Tensor& in_rows,
                         const at::Tensor& out_rows);

struct RopeArgs {
  RopeOperand q, k;
  at::Tensor cos, sin;  // (1 or batch, seq, rot_dim), rot_dim contiguous
  int64_t batch = 0, seq = 0, head_dim = 0, rot_dim = 0;
  int64_t cos_stride_b = 0, cos_stride_s = 0;  // cos_stride_b == 0 when cos broadcasts over the batch
  bool is_neox = true;  // rotate_half (Qwen) or GPT-J pairs (GLM-4V); see rope_common.h
};

// Validates apply_rope's arguments and allocates outputs of `out_dtype` in the layout of the inputs, or contiguous
// (`contiguous_out`, the backward: the layout of autograd's gradient of transformers' rotation).
// `x_q`/`x_k` are q/k for the forward and the output gradients for the backward.
RopeArgs prepare_apply_rope(const at::Tensor& x_q, const at::Tensor& x_k, const at::Tensor& cos,
                            const at::Tensor& sin, int64_t unsqueeze_dim, at::ScalarType out_dtype, bool is_neox,
                            bool contiguous_out = false);

// apply_rope_vision's (tokens, heads, head_dim) q/k and (tokens, rotary_dim) cos/sin, as the batch-1 (B, S, H, D)
// layout of the above; the outputs keep q's dtype.
RopeArgs prepare_apply_rope_vision(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                   const at::Tensor& sin, bool is_neox);

// The backward's grad_q/grad_k have the forward output dtype (promote(q, cos), or q's dtype for the vision op); its
// outputs have q's dtype.
RopeArgs prepare_apply_rope_backward(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
                                     const at::Tensor& sin, int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                     bool is_neox);

std::tuple<at::Tensor, at::Tensor> apply_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, int64_t unsqueeze_dim, bool is_neox = true);
std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                           const at::Tensor& cos, const at::Tensor& sin,
                                                           int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                                           bool is_neox = true);
// The vision towers' apply_rotary_pos_emb_vision: float32 math, outputs in q's dtype.
std::tuple<at::Tensor, at::Tensor> apply_rope_vision_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         bool is_neox = true);
#ifdef ROPEKIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> apply_rope_vision_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& cos, const at::Tensor& sin,
                                                          bool is_neox = true);
std::tuple<at::Tensor, at::Tensor> apply_rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   int64_t unsqueeze_dim, bool is_neox = true);
std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                                            bool is_neox = true);
#endif

// Autograd kernel: differentiable in q, k, cos and sin.
std::tuple<at::Tensor, at::Tensor> apply_rope_autograd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& cos, const at::Tensor& sin,
                                                       int64_t unsqueeze_dim, bool is_neox = true);

std::tuple<at::Tensor, at::Tensor> apply_rope_vision_autograd(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& cos, const at::Tensor& sin,
                                                              bool is_neox = true);

at::ScalarType apply_rope_out_dtype(at::ScalarType x_dtype, at::ScalarType cos_dtype);

template <typename In, typename Cs, typename Out>
struct RopeTypes {
  using in_t = In;
  using cs_t = Cs;
  using out_t = Out;
  using acc = std::conditional_t<std::is_same_v<In, double> || std::is_same_v<Out, double>, double, float>;
};

// Calls f(RopeTypes<in, cos, out>{}) for the supported dtype combinations, T being the narrower of the input and
// output dtypes: cos has T's dtype (T, T, T); or cos is float32 and
//   - the output is promoted (the forward of `apply_rotary_pos_emb` on bf16 q with fp32 cos: (T, float, float)),
//     whose backward reads fp32 gradients and writes T: (float, float, T);
//   - the output keeps T (the vision towers' `apply_rotary_pos_emb_vision`, forward and backward): (T, float, T).
// kBackward selects which of the two promoted forms can occur, so each direction instantiates three combinations.
template <bool kBackward, typename F>
void dispatch_rope_types(at::ScalarType in_dtype, at::ScalarType cos_dtype, at::ScalarType out_dtype, F&& f) {
  const at::ScalarType narrow = kBackward ? out_dtype : in_dtype;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, narrow, "ropekit_apply_rope", [&] {
    using T = scalar_t;
    using Wide = std::conditional_t<std::is_same_v<T, double>, double, float>;  // promote(T, float32)
    if (cos_dtype == narrow) {
      f(RopeTypes<T, T, T>{});
    } else if (in_dtype == out_dtype) {
      f(RopeTypes<T, float, T>{});
    } else if constexpr (kBackward) {
      f(RopeTypes<Wide, float, T>{});
    } else {
      f(RopeTypes<T, float, Wide>{});
    }
  });
}

}  // namespace ropekit
