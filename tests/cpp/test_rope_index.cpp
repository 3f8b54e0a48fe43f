// rope_index's host and device algorithms on hand-written layouts.
#include "rope_index.h"

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <vector>

namespace {

constexpr int64_t kImage = 9, kVideo = 8, kStart = 7, kEnd = 6;

at::Tensor longs(std::vector<int64_t> v, std::vector<int64_t> shape) {
  return at::tensor(v, at::kLong).view(shape);
}

std::tuple<at::Tensor, at::Tensor> index(const at::Tensor& ids, const std::optional<at::Tensor>& images,
                                         const std::optional<at::Tensor>& videos,
                                         const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& types,
                                         const char* convention, bool on_host, bool strict = false) {
  return ropekit::rope_index(ids, images, videos, mask, types, 2, kImage, kVideo, kStart, convention, on_host,
                             /*video_frames=*/true, /*second_per_grid_ts=*/std::nullopt,
                             /*tokens_per_second=*/std::nullopt, /*video_start_token_id=*/-1,
                             /*video_end_token_id=*/-1, /*packed=*/false, /*cu_seqlens=*/std::nullopt, strict);
}

// Row 0: text text [image 1x4x4 -> 2x2 tokens] text.   Row 1: left padding, text, [video frame 1x4x4], text.
struct Layout {
  at::Tensor ids = longs({1, kStart, kImage, kImage, kImage, kImage, kEnd,  //
                          0, 0, kStart, kVideo, kVideo, kVideo, kVideo},
                         {2, 7});
  at::Tensor mask = longs({1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1}, {2, 7});
  at::Tensor types = longs({0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 2, 2}, {2, 7});
  at::Tensor images = longs({1, 4, 4}, {1, 3});
  at::Tensor videos = longs({1, 4, 4}, {1, 3});
};

TEST(RopeIndex, TokenTypesHandWritten) {
  Layout l;
  // Row 0: text 0, 1; image at 2 over (t, h, w) offsets; text continues at 2 + max(4, 4) / 2 = 4.
  // Row 1: two padding slots (0), text 0; video frame at 1; deltas against attended tokens.
  const at::Tensor expected = longs({0, 1, 2, 2, 2, 2, 4, /**/ 0, 0, 0, 1, 1, 1, 1,     // t
                                     0, 1, 2, 2, 3, 3, 4, /**/ 0, 0, 0, 1, 1, 2, 2,     // h
                                     0, 1, 2, 3, 2, 3, 4, /**/ 0, 0, 0, 1, 2, 1, 2},    // w
                                    {3, 2, 7});
  for (bool on_host : {true, false}) {
    auto [pos, deltas] = index(l.ids, l.images, l.videos, l.mask, l.types, "token_types", on_host);
    EXPECT_TRUE(at::equal(pos, expected)) << "on_host=" << on_host << "\n" << pos;
    EXPECT_TRUE(at::equal(deltas, longs({4 + 1 - 7, 2 + 1 - 5}, {2, 1}))) << deltas;
  }
}

TEST(RopeIndex, VisionStartHandWritten) {
  Layout l;
  // 4.57: padding slots hold 1 and deltas are taken against the padded length 7.
  const at::Tensor expected = longs({0, 1, 2, 2, 2, 2, 4, /**/ 1, 1, 0, 1, 1, 1, 1,
                                     0, 1, 2, 2, 3, 3, 4, /**/ 1, 1, 0, 1, 1, 2, 2,
                                     0, 1, 2, 3, 2, 3, 4, /**/ 1, 1, 0, 1, 2, 1, 2},
                                    {3, 2, 7});
  for (bool on_host : {true, false}) {
    auto [pos, deltas] = index(l.ids, l.images, l.videos, l.mask, std::nullopt, "vision_start", on_host);
    EXPECT_TRUE(at::equal(pos, expected)) << "on_host=" << on_host << "\n" << pos;
    EXPECT_TRUE(at::equal(deltas, longs({4 + 1 - 7, 2 + 1 - 7}, {2, 1}))) << deltas;
  }
}

TEST(RopeIndex, HostRaisesWhereTransformersFails) {
  Layout l;
  // A grid whose t*(h/m)*(w/m) = 6 does not fit the 4-token image span: the positions do not fit the row.
  EXPECT_THROW(index(l.ids, longs({1, 4, 6}, {1, 3}), l.videos, l.mask, l.types, "token_types", true), c10::ValueError);
  // A video span but no video grid.
  EXPECT_THROW(index(l.ids, l.images, std::nullopt, l.mask, l.types, "token_types", true), c10::ValueError);
  // An unknown token type.
  EXPECT_THROW(index(l.ids, l.images, l.videos, l.mask, l.types + 3, "token_types", true), c10::ValueError);
  EXPECT_THROW(index(l.ids, l.images, l.videos, l.mask, l.types, "qwen", true), c10::ValueError);
}

TEST(RopeIndex, LeftoverGridsAreIgnoredUnlessStrict) {
  Layout l;
  const at::Tensor two_images = longs({1, 4, 4, 1, 4, 4}, {2, 3});
  auto [pos, deltas] = index(l.ids, l.images, l.videos, l.mask, l.types, "token_types", true);
  for (bool on_host : {true, false}) {
    auto [pos2, deltas2] = index(l.ids, two_images, l.videos, l.mask, l.types, "token_types", on_host);
    EXPECT_TRUE(at::equal(pos, pos2) && at::equal(deltas, deltas2)) << "on_host=" << on_host;
  }
  EXPECT_THROW(index(l.ids, two_images, l.videos, l.mask, l.types, "token_types", true, /*strict=*/true),
               c10::ValueError);
  // h not divisible by the merge size: transformers floors it; strict rejects it.
  EXPECT_NO_THROW(index(l.ids, longs({1, 5, 4}, {1, 3}), l.videos, l.mask, l.types, "token_types", true));
  EXPECT_THROW(index(l.ids, longs({1, 5, 4}, {1, 3}), l.videos, l.mask, l.types, "token_types", true, true),
               c10::ValueError);
}

TEST(RopeIndex, VisionStartWithoutGridsUsesTheMask) {
  Layout l;
  auto [pos, deltas] = index(l.ids, std::nullopt, std::nullopt, l.mask, std::nullopt, "vision_start", true);
  const at::Tensor row = longs({0, 1, 2, 3, 4, 5, 6, 1, 1, 0, 1, 2, 3, 4}, {2, 7});
  EXPECT_TRUE(at::equal(pos, row.unsqueeze(0).expand({3, 2, 7})));
  EXPECT_TRUE(at::equal(deltas, longs({0, -2}, {2, 1})));
}

}  // namespace
