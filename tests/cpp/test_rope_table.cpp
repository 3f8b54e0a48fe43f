// The table builder and the cos/sin gather against a scalar C++ reference, through the dispatcher as a LibTorch
// user would call them.
#include "rope_common.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace {

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

TensorPair rope_cache(const at::Tensor& inv_freq, int64_t rows, double scaling) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ropekit::rope_cache", "")
                       .typed<TensorPair(const at::Tensor&, int64_t, double)>();
  return op.call(inv_freq, rows, scaling);
}

TensorPair rope_cos_sin(const at::Tensor& c, const at::Tensor& s, const at::Tensor& pos, at::ScalarType dtype,
                        const std::optional<at::Tensor>& inv_freq, double scaling) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ropekit::rope_cos_sin", "")
                       .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                                         const std::optional<at::Tensor>&, double,
                                         const std::optional<at::Tensor>&, bool)>();
  return op.call(c, s, pos, dtype, inv_freq, scaling, std::nullopt, true);
}

TensorPair mrope_cos_sin(const at::Tensor& c, const at::Tensor& s, const at::Tensor& pos,
                         std::vector<int64_t> section, at::ScalarType dtype, bool interleaved = true,
                         bool is_neox = true) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ropekit::mrope_cos_sin", "")
                       .typed<TensorPair(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                                         at::ScalarType, const std::optional<at::Tensor>&, double,
                                         const std::optional<at::Tensor>&, bool, bool)>();
  return op.call(c, s, pos, section, dtype, std::nullopt, 1.0, std::nullopt, interleaved, is_neox);
}

std::vector<float> inv_freq_values(int64_t half, double base) {
  std::vector<float> v(half);
  for (int64_t j = 0; j < half; ++j) v[j] = static_cast<float>(1.0 / std::pow(base, 2.0 * j / (2.0 * half)));
  return v;
}

at::Tensor to_tensor(const std::vector<float>& v) { return at::tensor(v, at::kFloat); }

// The scalar reference: one rounded fp32 product, then cos/sin, then the scaling multiply. std::cos and
// PyTorch's vectorised cos may differ in the last bit, so the table is compared to within 1 ulp here; the Python
// suite proves bit-identity against transformers itself.
float ref_cos(float inv, int64_t p, float scale) { return std::cos(inv * static_cast<float>(p)) * scale; }
float ref_sin(float inv, int64_t p, float scale) { return std::sin(inv * static_cast<float>(p)) * scale; }

void expect_ulp_close(float actual, float expected) {
  EXPECT_LE(std::fabs(actual - expected), 2.0f * std::numeric_limits<float>::epsilon() * std::fabs(expected) + 1e-30f)
      << "actual " << actual << " expected " << expected;
}

TEST(RopeCache, MatchesScalarReference) {
  const auto inv = inv_freq_values(16, 1e6);
  auto [cos, sin] = rope_cache(to_tensor(inv), 300, 0.5);
  ASSERT_EQ(cos.sizes(), (std::vector<int64_t>{300, 16}));
  ASSERT_EQ(cos.scalar_type(), at::kFloat);
  auto c = cos.accessor<float, 2>();
  auto s = sin.accessor<float, 2>();
  for (int64_t p = 0; p < 300; ++p) {
    for (int64_t j = 0; j < 16; ++j) {
      expect_ulp_close(c[p][j], ref_cos(inv[j], p, 0.5f));
      expect_ulp_close(s[p][j], ref_sin(inv[j], p, 0.5f));
    }
  }
}

TEST(RopeCosSin, GatherDuplicatesHalvesAndCasts) {
  const auto inv = inv_freq_values(8, 1e4);
  auto [cos_t, sin_t] = rope_cache(to_tensor(inv), 64, 1.0);
  const at::Tensor pos = at::tensor(std::vector<int64_t>{0, 5, 63, 17, 2, 40}, at::kLong).view({2, 3});
  auto [cos, sin] = rope_cos_sin(cos_t, sin_t, pos, at::kBFloat16, std::nullopt, 1.0);
  ASSERT_EQ(cos.sizes(), (std::vector<int64_t>{2, 3, 16}));
  ASSERT_EQ(cos.scalar_type(), at::kBFloat16);
  auto pa = pos.accessor<int64_t, 2>();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t s = 0; s < 3; ++s)
      for (int64_t j = 0; j < 8; ++j) {
        const float tc = cos_t[pa[b][s]][j].item<float>();
        const float ts = sin_t[pa[b][s]][j].item<float>();
        for (int64_t half : {0, 8}) {
          EXPECT_EQ(cos[b][s][j + half].item<c10::BFloat16>(), c10::BFloat16(tc));
          EXPECT_EQ(sin[b][s][j + half].item<c10::BFloat16>(), c10::BFloat16(ts));
        }
      }
}

TEST(RopeCosSin, RowsPastTheTableEqualAGrownTable) {
  const at::Tensor inv = to_tensor(inv_freq_values(8, 1e4));
  auto [small_cos, small_sin] = rope_cache(inv, 16, 1.25);
  auto [big_cos, big_sin] = rope_cache(inv, 1000, 1.25);
  const at::Tensor pos = at::tensor(std::vector<int64_t>{3, 15, 16, 999, 500, 16}, at::kLong).view({1, 6});
  auto [c1, s1] = rope_cos_sin(small_cos, small_sin, pos, at::kFloat, inv, 1.25);
  auto [c2, s2] = rope_cos_sin(big_cos, big_sin, pos, at::kFloat, std::nullopt, 1.0);
  EXPECT_TRUE(at::equal(c1, c2));
  EXPECT_TRUE(at::equal(s1, s2));
}

TEST(RopeCosSin, RejectsBadPositions) {
  auto [cos_t, sin_t] = rope_cache(to_tensor(inv_freq_values(4, 1e4)), 8, 1.0);
  const at::Tensor negative = at::tensor(std::vector<int64_t>{1, -2}, at::kLong).view({1, 2});
  EXPECT_THROW(rope_cos_sin(cos_t, sin_t, negative, at::kFloat, std::nullopt, 1.0), c10::Error);
  const at::Tensor past = at::tensor(std::vector<int64_t>{1, 8}, at::kLong).view({1, 2});
  EXPECT_THROW(rope_cos_sin(cos_t, sin_t, past, at::kFloat, std::nullopt, 1.0), c10::Error);
  EXPECT_THROW(rope_cos_sin(cos_t, sin_t, past.to(at::kFloat), at::kFloat, std::nullopt, 1.0), c10::Error);
}

TEST(MropeCosSin, InterleavedAxesMatchScalarRule) {
  const int64_t half = 16;
  auto [cos_t, sin_t] = rope_cache(to_tensor(inv_freq_values(half, 5e6)), 50, 1.0);
  const at::Tensor pos = at::randint(0, 50, {3, 2, 7}, at::kLong);
  const std::vector<int64_t> section{6, 5, 5};
  auto [cos, sin] = mrope_cos_sin(cos_t, sin_t, pos, section, at::kFloat);
  auto pa = pos.accessor<int64_t, 3>();
  auto ct = cos_t.accessor<float, 2>();
  auto co = cos.accessor<float, 3>();
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t s = 0; s < 7; ++s)
      for (int64_t j = 0; j < half; ++j) {
        const int64_t axis = (j % 3 == 1 && j < 3 * section[1]) ? 1 : (j % 3 == 2 && j < 3 * section[2]) ? 2 : 0;
        EXPECT_EQ(axis, ropekit::mrope_axis(j, ropekit::MropeLayout{section[0], section[1], section[2], true}));
        EXPECT_EQ(co[b][s][j], ct[pa[axis][b][s]][j]);
        EXPECT_EQ(co[b][s][j + half], ct[pa[axis][b][s]][j]);
      }
  // Text-only (B, S) positions are plain 1-D RoPE.
  const at::Tensor text = pos[0];
  auto [c3, s3] = mrope_cos_sin(cos_t, sin_t, text, section, at::kFloat);
  auto [c1, s1] = rope_cos_sin(cos_t, sin_t, text, at::kFloat, std::nullopt, 1.0);
  EXPECT_TRUE(at::equal(c3, c1));
  EXPECT_TRUE(at::equal(s3, s1));
}

}  // namespace

namespace {

TEST(MropeCosSin, SectionedAxesAndGptjLayout) {
  // Qwen2-VL / GLM-4V sections: frequency j < t reads axis 0, j < t + h axis 1, the rest axis 2; GPT-J layout puts
  // frequency j at columns 2j and 2j + 1.
  const int64_t half = 16;
  auto [cos_t, sin_t] = rope_cache(to_tensor(inv_freq_values(half, 1e4)), 40, 1.0);
  const at::Tensor pos = at::randint(0, 40, {3, 2, 5}, at::kLong);
  const std::vector<int64_t> section{8, 4, 4};
  for (const bool is_neox : {true, false}) {
    auto [cos, sin] = mrope_cos_sin(cos_t, sin_t, pos, section, at::kFloat, /*interleaved=*/false, is_neox);
    auto pa = pos.accessor<int64_t, 3>();
    auto ct = cos_t.accessor<float, 2>();
    auto st = sin_t.accessor<float, 2>();
    auto co = cos.accessor<float, 3>();
    auto so = sin.accessor<float, 3>();
    for (int64_t b = 0; b < 2; ++b)
      for (int64_t s = 0; s < 5; ++s)
        for (int64_t j = 0; j < half; ++j) {
          const int64_t axis = j < 8 ? 0 : (j < 12 ? 1 : 2);
          EXPECT_EQ(axis, ropekit::mrope_axis(j, ropekit::MropeLayout{8, 4, 4, false}));
          const int64_t c0 = is_neox ? j : 2 * j, c1 = is_neox ? j + half : 2 * j + 1;
          EXPECT_EQ(co[b][s][c0], ct[pa[axis][b][s]][j]);
          EXPECT_EQ(co[b][s][c1], ct[pa[axis][b][s]][j]);
          EXPECT_EQ(so[b][s][c0], st[pa[axis][b][s]][j]);
          EXPECT_EQ(so[b][s][c1], st[pa[axis][b][s]][j]);
        }
  }
  // Sections that do not cover the frequencies are an error in sectioned mode.
  EXPECT_THROW(mrope_cos_sin(cos_t, sin_t, pos, {6, 5, 4}, at::kFloat, false), c10::Error);
}

}  // namespace
