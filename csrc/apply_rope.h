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

// Validates apply_rope's arguments and allocates outputs of `out_dtype` in the layout of the inputs.
// `x_q`/`x_k` are q/k for the forward and the output gradients for the backward.
RopeArgs prepare_apply_rope(const at::Tensor& x_q, const at::Tensor& x_k, const at::Tensor& cos,
                            const at::Tensor& sin, int64_t unsqueeze_dim, at::ScalarType out_dtype, bool is_neox);

// The backward's grad_q/grad_k have the forward output dtype; its outputs have q's dtype.
RopeArgs prepare_apply_rope_backward(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
                                     const at::Tensor& sin, int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                     bool is_neox);

std::tuple<at::Tensor, at::Tensor> apply_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, int64_t unsqueeze_dim, bool is_neox = true);
std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                           const at::Tensor& cos, const at::Tensor& sin,
                                                           int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                                           bool is_neox = true);
#ifdef ROPEKIT_WITH_CUDA
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

at::ScalarType apply_rope_out_dtype(at::ScalarType x_dtype, at::ScalarType cos_dtype);

template <typename In, typename Cs, typename Out>
struct RopeTypes {
  using in_t = In;
  using cs_t = Cs;
  using out_t = Out;
  using acc = std::conditional_t<std::is_same_v<In, double> || std::is_same_v<Out, double>, double, float>;
};

// Calls f(RopeTypes<in, cos, out>{}) for the supported dtype combinations: cos has q's dtype, or cos is float32
// and the forward output is promoted (bf16 q, fp32 cos -> fp32 out, as in eager).
template <bool kBackward, typename F>
void dispatch_rope_types(at::ScalarType q_dtype, at::ScalarType cos_dtype, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q_dtype, "ropekit_apply_rope", [&] {
    using T = scalar_t;
    using Wide = std::conditional_t<std::is_same_v<T, double>, double, float>;  // promote(T, float32)
    if (cos_dtype == q_dtype) {
      f(RopeTypes<T, T, T>{});
    } else if constexpr (kBackward) {
      f(RopeTypes<Wide, float, T>{});
    } else {
      f(RopeTypes<T, float, Wide>{});
    }
  });
}

}  // namespace ropekit
