// Device-agnostic helpers shared by the CPU and CUDA kernels, so both backends round at the same points.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace ropekit {

// Accumulation type: fp32 for every activation dtype, fp64 only for fp64 (gradcheck).
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

// Round-to-nearest products and sums with no FMA contraction, so an fp32 kernel reproduces PyTorch eager's
// `q*c + rotate_half(q)*s` bit for bit (nvcc contracts a*b+c*d into an FMA unless told not to).
C10_HOST_DEVICE inline float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
C10_HOST_DEVICE inline double mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
C10_HOST_DEVICE inline double add_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// mRoPE: which position axis (0 = T, 1 = H, 2 = W) frequency j of `half` takes, for mrope_section = [t, h, w].
// Interleaved (Qwen3-VL, Qwen3.5): axis 1 if j % 3 == 1 and j < 3h, axis 2 if j % 3 == 2 and j < 3w, else axis 0.
// Sectioned (Qwen2-VL, Qwen2.5-VL, GLM-4V: transformers' `cat([m[i % 3] for i, m in enumerate(freq.split(
// mrope_section, -1))])`): axis 0 for j < t, axis 1 for j < t + h, else axis 2. 1-D RoPE is the interleaved layout
// with h = w = 0 (every frequency on axis 0).
struct MropeLayout {
  int64_t t = 0, h = 0, w = 0;
  bool interleaved = true;
};

C10_HOST_DEVICE inline int mrope_axis(int64_t j, const MropeLayout& m) {
  if (m.interleaved) {
    const int64_t r = j % 3;
    if (r == 1 && j / 3 < m.h) return 1;  // j < 3h, written so that no section size can overflow it
    if (r == 2 && j / 3 < m.w) return 2;
    return 0;
  }
  if (j < m.t) return 0;
  if (j - m.t < m.h) return 1;  // j < t + h
  return 2;
}

// Output columns of frequency j in transformers' duplicated cos/sin layout of width 2 * half: neox `cat((f, f))`
// puts it at j and j + half; GPT-J (GLM-4V) `repeat_interleave(2)` at 2j and 2j + 1.
template <bool kNeox>
C10_HOST_DEVICE inline int64_t freq_column(int64_t j, int64_t half, int copy) {
  return kNeox ? j + copy * half : 2 * j + copy;
}

// Rotation styles. neox (Qwen, Llama: `rotate_half`) pairs channel j with j + R/2; GPT-J (GLM-4V:
// `rotate_half_llm(x) = stack((-x[1::2], x[0::2]), -1).flatten(-2)`) pairs 2i with 2i + 1. Either way pair i of a
// rotary dim R (i < R/2) rotates (x1, x2) with x1 at pair_first and x2 at pair_second, and the formulas below are
// the same, so every kernel takes the style as one template parameter.
template <bool kNeox>
C10_HOST_DEVICE inline int64_t pair_first(int64_t i, int64_t half) {
  return kNeox ? i : 2 * i;
}
template <bool kNeox>
C10_HOST_DEVICE inline int64_t pair_second(int64_t i, int64_t half) {
  return kNeox ? i + half : 2 * i + 1;
}

// A gradient as autograd's accumulation leaves it: transformers' rotate_half (and the partial-rotary split) slice
// their input, and each slice's backward is zero-padded, so autograd adds +0 to every element's gradient sum. That is
// exact for every value but -0, which becomes +0; adding +0 here gives the same bits (IEEE arithmetic without fast
// math cannot drop it).
template <typename acc>
C10_HOST_DEVICE inline acc as_accumulated(acc v) {
  return add_rn(v, acc(0));
}

// One rotary pair. Forward: out = x*cos + rot(x)*sin with rot(x)[first] = -x2 and rot(x)[second] = x1 (true of
// both rotate_half and rotate_half_llm). Backward is its transpose: g*cos + rot^T(g*sin), which reads the
// partner's sin. Each product and the sum round once, as in eager.
template <bool kBackward, typename acc>
C10_HOST_DEVICE inline void rotate_pair(acc x1, acc x2, acc c1, acc c2, acc s1, acc s2, acc& o1, acc& o2) {
  if (kBackward) {
    o1 = as_accumulated(add_rn(mul_rn(x1, c1), mul_rn(x2, s2)));
    o2 = as_accumulated(add_rn(mul_rn(x2, c2), -mul_rn(x1, s1)));
  } else {
    o1 = add_rn(mul_rn(x1, c1), -mul_rn(x2, s1));
    o2 = add_rn(mul_rn(x2, c2), mul_rn(x1, s2));
  }
}

// Calls f(std::true_type{}) for neox, f(std::false_type{}) for GPT-J: the style becomes a compile-time constant.
template <typename F>
void dispatch_rope_style(bool is_neox, F&& f) {
  if (is_neox) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace ropekit
