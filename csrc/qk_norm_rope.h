// qk_norm_rope: Qwen3's per-head q_norm / k_norm (RMSNorm over head_dim) fused with RoPE, in one pass over q and k.
#pragma once

#include "apply_rope.h"
#include "rope_common.h"

#include <ATen/core/Tensor.h>
#include <ATen/Dispatch.h>

#include <tuple>
#include <type_traits>

namespace ropekit {

// q and k as (batch, seq, heads, head_dim) rows; the outputs are written in (B, S, H, D) storage and returned as
// (B, H, S, D) views, the layout attention takes, so no transpose pass is needed.
struct NormRopeArgs {
  RopeOperand q, k;      // `in` = raw projection, viewed (B, S, H, D); `out` = result storage (B, S, H, D)
  at::Tensor q_weight, k_weight;  // [head_dim], contiguous
  at::Tensor cos, sin;   // (1 or B, S, rot_dim), rot_dim contiguous
  int64_t batch = 0, seq = 0, head_dim = 0, rot_dim = 0;
  int64_t cos_stride_b = 0, cos_stride_s = 0;
  double eps = 1e-6;
  bool zero_centered = false;  // Qwen3.5: x * rstd * (1 + w), one rounding
  bool is_neox = true;         // rotate_half pairs (j, j + R/2), or GPT-J pairs (2i, 2i + 1)
  at::ScalarType out_dtype = at::kFloat;  // qk_norm_rope_out_dtype(...)
};

// dtype of the normalised activations: Qwen3 computes weight * norm(x).to(x.dtype) in promote(weight, x);
// Qwen3.5 rounds norm(x) * (1 + w) back to x's dtype.
at::ScalarType qk_norm_dtype(at::ScalarType x, at::ScalarType weight, bool zero_centered);
// dtype of the result: promote(norm dtype, cos dtype), as eager's rotary multiply promotes.
at::ScalarType qk_norm_rope_out_dtype(at::ScalarType x, at::ScalarType weight, at::ScalarType cos,
                                      bool zero_centered);

// Validates the arguments. With `with_outputs`, allocates the (B, S, H, D) result storage (the forward); without,
// the operands' `out` stays undefined (the backward reads q and k and never needs the forward's outputs).
NormRopeArgs prepare_qk_norm_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
                                  const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin,
                                  double eps, bool zero_centered, bool is_neox, bool with_outputs);

// The backward's operands: they read the output gradients (B, H, S, D) as (B, S, H, D) rows and write dq / dk in
// the (B, S, H, D) shape of q / k's rows.
NormRopeArgs prepare_qk_norm_rope_backward_grads(const NormRopeArgs& fwd, const at::Tensor& grad_q,
                                                const at::Tensor& grad_k);

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                    const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                    bool zero_centered, bool is_neox = true);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin, double eps,
    bool zero_centered, bool is_neox = true);
void qk_norm_rope_qkv_cpu(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                          const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t num_q_heads,
                          int64_t num_kv_heads, bool zero_centered, bool is_neox = true);
// The CUDA forward fast path's minimum resident blocks per SM for same-dtype bf16 / fp16 (its __launch_bounds__
// second argument: 4 caps registers at 128 per thread, 5 at 96; other dtype combinations always use 4). The
// `_cuda_forward_min_blocks(int blocks=0) -> int` op returns the current value and sets `blocks` (4 or 5) unless 0:
// a knob for the GPU benchmark to choose by measurement, without a rebuild. Both give the same bits.
int cuda_forward_min_blocks();
int64_t cuda_forward_min_blocks_op(int64_t blocks);

#ifdef ROPEKIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                     const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                     bool zero_centered, bool is_neox = true);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin, double eps,
    bool zero_centered, bool is_neox = true);
void qk_norm_rope_qkv_cuda(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                           const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t num_q_heads,
                           int64_t num_kv_heads, bool zero_centered, bool is_neox = true);
#endif

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_autograd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                         const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                         bool zero_centered, bool is_neox = true);

// In-place variant: the views of a packed (B, S, (Hq + 2*Hkv) * D) qkv buffer as q and k operands writing onto
// themselves. Requires the weights and cos/sin in qkv's dtype so the result fits back in place.
NormRopeArgs prepare_qk_norm_rope_qkv(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                                      const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t num_q_heads,
                                      int64_t num_kv_heads, bool zero_centered, bool is_neox);

// ---------------------------------------------------------------------------------------------------------------
// Types and per-element math shared by the CPU and CUDA kernels.

template <typename A, typename B>
using promote_t = std::conditional_t<
    std::is_same_v<A, B>, A,
    std::conditional_t<std::is_same_v<A, double> || std::is_same_v<B, double>, double, float>>;

template <typename X, typename W, typename C, bool kZeroCentered>
struct NormRopeTypes {
  using in_t = X;
  using w_t = W;
  using cs_t = C;
  using norm_t = std::conditional_t<kZeroCentered, X, promote_t<X, W>>;
  using out_t = promote_t<norm_t, C>;
  using acc = std::conditional_t<std::is_same_v<X, double> || std::is_same_v<out_t, double>, double, float>;
  static constexpr bool zero_centered = kZeroCentered;
};

template <typename T, typename acc>
C10_HOST_DEVICE inline acc round_to(acc v) {
  return static_cast<acc>(static_cast<T>(v));
}

// The normalised value at the same rounding points as transformers: Qwen3 `w * (x * rstd).to(x.dtype)` computed in
// promote(w, x); Qwen3.5 `(x * rstd * (1 + w)).to(x.dtype)` with one rounding.
template <typename Types>
C10_HOST_DEVICE inline typename Types::acc normed(typename Types::acc x, typename Types::acc rstd,
                                                   typename Types::acc w) {
  using acc = typename Types::acc;
  const acc n = mul_rn(x, rstd);
  if constexpr (Types::zero_centered) {
    return round_to<typename Types::in_t, acc>(mul_rn(n, add_rn(acc(1), w)));
  } else {
    return round_to<typename Types::norm_t, acc>(mul_rn(w, round_to<typename Types::in_t, acc>(n)));
  }
}

// Calls f(NormRopeTypes<...>{}) for the supported dtype combinations: weights and cos/sin each in x's dtype or
// float32 (fp32 master weights and fp32 cos/sin under autocast).
template <typename F>
void dispatch_norm_rope_types(at::ScalarType x, at::ScalarType w, at::ScalarType c, bool zero_centered, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x, "ropekit_qk_norm_rope", [&] {
    using X = scalar_t;
    auto with_zc = [&](auto w_tag, auto c_tag) {
      using W = decltype(w_tag);
      using C = decltype(c_tag);
      if (zero_centered) {
        f(NormRopeTypes<X, W, C, true>{});
      } else {
        f(NormRopeTypes<X, W, C, false>{});
      }
    };
    const bool w_same = w == x, c_same = c == x;
    if (w_same && c_same) with_zc(X{}, X{});
    else if (w_same) with_zc(X{}, float{});
    else if (c_same) with_zc(float{}, X{});
    else with_zc(float{}, float{});
  });
}

}  // namespace ropekit
