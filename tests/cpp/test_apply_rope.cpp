// apply_rope forward/backward against a scalar reference, and autograd through LibTorch.
#include "apply_rope.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

namespace {

// out_j = x_j c_j - x_{j+h} s_j and out_{j+h} = x_{j+h} c_{j+h} + x_j s_{j+h}; pass-through past rot_dim.
at::Tensor reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {  // x: (B,H,S,D)
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), D = x.size(3), R = cos.size(2), h = R / 2;
  at::Tensor out = x.clone();
  auto xa = x.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  auto ca = cos.accessor<double, 3>();
  auto sa = sin.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t cb = cos.size(0) == 1 ? 0 : b;
        for (int64_t j = 0; j < h; ++j) {
          oa[b][hd][s][j] = xa[b][hd][s][j] * ca[cb][s][j] - xa[b][hd][s][j + h] * sa[cb][s][j];
          oa[b][hd][s][j + h] = xa[b][hd][s][j + h] * ca[cb][s][j + h] + xa[b][hd][s][j] * sa[cb][s][j + h];
        }
        (void)D;
      }
  return out;
}

TEST(ApplyRope, ForwardMatchesScalarReference) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  // (B,S,H,D) storage viewed as (B,H,S,D), as transformers hands it over; partial rotary 6 of 8; one kv head.
  const at::Tensor q = at::randn({2, 5, 3, 8}, opts).transpose(1, 2);
  const at::Tensor k = at::randn({2, 5, 1, 8}, opts).transpose(1, 2);
  const at::Tensor cos = at::randn({1, 5, 6}, opts), sin = at::randn({1, 5, 6}, opts);
  auto [qo, ko] = ropekit::apply_rope_cpu(q, k, cos, sin, 1);
  EXPECT_TRUE(at::allclose(qo, reference(q, cos, sin), 0, 1e-12));
  EXPECT_TRUE(at::allclose(ko, reference(k, cos, sin), 0, 1e-12));
  EXPECT_EQ(qo.strides(), q.strides());
}

// GPT-J style (GLM-4V): out_{2i} = x_{2i} c_{2i} - x_{2i+1} s_{2i}, out_{2i+1} = x_{2i+1} c_{2i+1} + x_{2i} s_{2i+1}.
at::Tensor reference_gptj(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {  // x: (B,H,S,D)
  const int64_t B = x.size(0), H = x.size(1), S = x.size(2), R = cos.size(2);
  at::Tensor out = x.clone();
  auto xa = x.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  auto ca = cos.accessor<double, 3>();
  auto sa = sin.accessor<double, 3>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t s = 0; s < S; ++s) {
        const int64_t cb = cos.size(0) == 1 ? 0 : b;
        for (int64_t j = 0; j < R; j += 2) {
          oa[b][hd][s][j] = xa[b][hd][s][j] * ca[cb][s][j] - xa[b][hd][s][j + 1] * sa[cb][s][j];
          oa[b][hd][s][j + 1] = xa[b][hd][s][j + 1] * ca[cb][s][j + 1] + xa[b][hd][s][j] * sa[cb][s][j + 1];
        }
      }
  return out;
}

TEST(ApplyRope, GptjForwardMatchesScalarReference) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor q = at::randn({2, 5, 3, 8}, opts).transpose(1, 2);
  const at::Tensor k = at::randn({2, 5, 1, 8}, opts).transpose(1, 2);
  const at::Tensor cos = at::randn({2, 5, 6}, opts), sin = at::randn({2, 5, 6}, opts);
  auto [qo, ko] = ropekit::apply_rope_cpu(q, k, cos, sin, 1, /*is_neox=*/false);
  EXPECT_TRUE(at::allclose(qo, reference_gptj(q, cos, sin), 0, 1e-12));
  EXPECT_TRUE(at::allclose(ko, reference_gptj(k, cos, sin), 0, 1e-12));
  auto [gq, gk] = ropekit::apply_rope_backward_cpu(qo, ko, cos, sin, 1, at::kDouble, /*is_neox=*/false);
  // rope^T(rope(x)) = x when cos^2 + sin^2 = 1 per pair; with random cos/sin, check <rope(x), y> = <x, rope^T(y)>.
  const at::Tensor y = at::randn_like(q);
  const double lhs = (qo * y).sum().item<double>();
  auto [gy, unused] = ropekit::apply_rope_backward_cpu(y, ko, cos, sin, 1, at::kDouble, /*is_neox=*/false);
  EXPECT_NEAR(lhs, (q * gy).sum().item<double>(), 1e-9);
  (void)gq, (void)gk, (void)unused;
}

TEST(ApplyRope, AutogradBackwardIsTheTranspose) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor q = at::randn({1, 2, 4, 8}, opts).requires_grad_();
  const at::Tensor k = at::randn({1, 1, 4, 8}, opts).requires_grad_();
  const at::Tensor cos = at::randn({1, 4, 8}, opts), sin = at::randn({1, 4, 8}, opts);
  auto [qo, ko] = ropekit::apply_rope_autograd(q, k, cos, sin, 1);
  const at::Tensor gq = at::randn_like(qo), gk = at::randn_like(ko);
  torch::autograd::backward({qo, ko}, {gq, gk});
  // <g, rope(x)> = <rope^T(g), x> for every x, so the gradient is linear in g with the reference's transpose.
  const at::Tensor probe = at::randn_like(q);
  const double lhs = (gq * reference(probe.detach(), cos, sin)).sum().item<double>();
  const double rhs = (q.grad() * probe).sum().item<double>();
  EXPECT_NEAR(lhs, rhs, 1e-9);
}

TEST(ApplyRope, RejectsOddRotaryDim) {
  const at::Tensor q = at::randn({1, 2, 3, 8}), k = at::randn({1, 1, 3, 8});
  EXPECT_THROW(ropekit::apply_rope_cpu(q, k, at::randn({1, 3, 5}), at::randn({1, 3, 5}), 1), c10::Error);
  EXPECT_THROW(ropekit::apply_rope_cpu(q, k, at::randn({1, 3, 10}), at::randn({1, 3, 10}), 1), c10::Error);
}

}  // namespace
