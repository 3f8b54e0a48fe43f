#include "rope_index.h"

#include <ATen/ATen.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

namespace ropekit {
namespace {

at::Tensor defined_or_empty(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? *t : at::Tensor();
}

void check_grid(const at::Tensor& grid, const char* name, const at::Tensor& input_ids) {
  if (!grid.defined()) return;
  TORCH_CHECK_VALUE(grid.dim() == 2 && grid.size(1) == 3, name, ": expected shape (num_grids, 3) of (t, h, w), got ",
                    grid.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(grid.scalar_type(), /*includeBool=*/false), name,
                    ": expected an integer dtype, got ", grid.scalar_type());
  TORCH_CHECK_VALUE(grid.device() == input_ids.device(), name, ": expected device ", input_ids.device(),
                    " (that of input_ids), got ", grid.device());
}

void check_per_token(const at::Tensor& t, const char* name, const at::Tensor& input_ids, bool allow_float) {
  if (!t.defined()) return;
  TORCH_CHECK_VALUE(t.sizes() == input_ids.sizes(), name, ": expected the shape of input_ids ", input_ids.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_VALUE(allow_float || at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name,
                    ": expected an integer dtype, got ", t.scalar_type());
  TORCH_CHECK_VALUE(!at::isComplexType(t.scalar_type()), name, ": expected a real dtype, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == input_ids.device(), name, ": expected device ", input_ids.device(),
                    " (that of input_ids), got ", t.device());
}

bool token_types(const RopeIndexArgs& a) { return a.convention == RopeIndexConvention::kTokenTypes; }

// Which tokens count: 5.x attends where mask.bool(), 4.57 where mask == 1.
at::Tensor attended(const RopeIndexArgs& a) {
  if (!a.attention_mask.defined()) return at::ones(a.input_ids.sizes(), a.input_ids.options().dtype(at::kBool));
  return token_types(a) ? a.attention_mask != 0 : a.attention_mask == 1;
}

// Modality per token: 0 text, 1 image, 2 video.
at::Tensor token_kinds(const RopeIndexArgs& a) {
  if (token_types(a)) return a.mm_token_type_ids.to(at::kLong);
  const at::Tensor zero = at::zeros({}, a.input_ids.options().dtype(at::kLong));
  return at::where(a.input_ids == a.image_token_id, 1, at::where(a.input_ids == a.video_token_id, 2, zero));
}

// transformers 4.57 without any grid: positions from the mask's cumulative sum, no vision at all.
std::tuple<at::Tensor, at::Tensor> vision_start_text_only(const RopeIndexArgs& a) {
  const int64_t B = a.input_ids.size(0), S = a.input_ids.size(1);
  if (!a.attention_mask.defined()) {
    at::Tensor pos = at::arange(S, a.input_ids.options().dtype(at::kLong)).view({1, 1, S}).expand({3, B, S});
    return {pos.contiguous(), at::zeros({B, 1}, a.input_ids.options())};
  }
  at::Tensor p = a.attention_mask.to(at::kLong).cumsum(-1) - 1;
  p.masked_fill_(a.attention_mask == 0, 1);
  at::Tensor pos = p.unsqueeze(0).expand({3, B, S}).contiguous();
  at::Tensor deltas = std::get<0>(p.max(-1, /*keepdim=*/true)) + 1 - S;
  return {pos, deltas};
}

// ---------------------------------------------------------------------------------------------------------------
// Host algorithm

struct Grid {
  int64_t t, h, w;
};

std::vector<Grid> read_grids(const int64_t* p, int64_t n) {
  std::vector<Grid> g(n);
  for (int64_t i = 0; i < n; ++i) g[i] = {p[3 * i], p[3 * i + 1], p[3 * i + 2]};
  return g;
}

class HostIndexer {
 public:
  HostIndexer(const RopeIndexArgs& a, const int64_t* att, const int64_t* kinds, const int64_t* ids,
              std::vector<Grid> images, std::vector<Grid> videos)
      : a_(a), att_(att), kinds_(kinds), ids_(ids), images_(std::move(images)) {
    // transformers splits each video into one grid per frame (repeat_interleave by t, then t = 1).
    for (size_t v = 0; v < videos.size(); ++v) {
      TORCH_CHECK_VALUE(videos[v].t >= 1, "video_grid_thw: video ", v, " has t = ", videos[v].t,
                        "; expected at least one frame");
      for (int64_t f = 0; f < videos[v].t; ++f) frames_.push_back({1, videos[v].h, videos[v].w});
    }
  }

  // Fills pos (3, B, S) and deltas (B) as int64.
  void run(int64_t* pos, int64_t* deltas) {
    const int64_t B = a_.input_ids.size(0), S = a_.input_ids.size(1);
    const int64_t pad = token_types(a_) ? 0 : 1;
    std::fill(pos, pos + 3 * B * S, pad);
    std::vector<int64_t> keep;
    keep.reserve(S);
    for (int64_t b = 0; b < B; ++b) {
      keep.clear();
      for (int64_t s = 0; s < S; ++s)
        if (att_[b * S + s]) keep.push_back(s);
      TORCH_CHECK_VALUE(!keep.empty(), "attention_mask: row ", b, " attends to no token");
      const int64_t row_max = index_row(b, keep, pos);
      deltas[b] = row_max + 1 - (token_types(a_) ? static_cast<int64_t>(keep.size()) : S);
    }
    TORCH_CHECK_VALUE(next_image_ == static_cast<int64_t>(images_.size()), "image_grid_thw: ", images_.size(),
                      " grids but the input has only ", next_image_, " image spans");
    TORCH_CHECK_VALUE(next_frame_ == static_cast<int64_t>(frames_.size()), "video_grid_thw: ", frames_.size(),
                      " frames but the input has only ", next_frame_, " video frame spans");
  }

 private:
  int64_t kind_at(int64_t b, int64_t s) const {
    const int64_t k = kinds_[b * a_.input_ids.size(1) + s];
    TORCH_CHECK_VALUE(k >= 0 && k <= 2, "mm_token_type_ids: expected 0 (text), 1 (image) or 2 (video), got ", k,
                      " at row ", b, ", token ", s);
    return k;
  }

  const Grid& next_grid(int64_t kind, int64_t b, int64_t s) {
    if (kind == 1) {
      TORCH_CHECK_VALUE(next_image_ < static_cast<int64_t>(images_.size()), "image_grid_thw: the input has more "
                        "image spans than the ", images_.size(), " grids given (row ", b, ", token ", s, ")");
      return images_[next_image_++];
    }
    TORCH_CHECK_VALUE(next_frame_ < static_cast<int64_t>(frames_.size()), "video_grid_thw: the input has more "
                      "video frame spans than the ", frames_.size(), " frames given (row ", b, ", token ", s, ")");
    return frames_[next_frame_++];
  }

  // Positions of row b's attended tokens `keep`; returns the row's largest position.
  int64_t index_row(int64_t b, const std::vector<int64_t>& keep, int64_t* pos) {
    const int64_t B = a_.input_ids.size(0), S = a_.input_ids.size(1), L = keep.size(), m = a_.merge;
    kind_.resize(L);
    for (int64_t i = 0; i < L; ++i) kind_[i] = kind_at(b, keep[i]);
    int64_t* pt = pos + b * S;
    int64_t* ph = pt + B * S;
    int64_t* pw = ph + B * S;
    int64_t cur = 0, row_max = std::numeric_limits<int64_t>::min();
    int64_t image_spans = 0, video_spans = 0;
    for (int64_t i = 0; i < L;) {
      const int64_t kind = kind_[i];
      int64_t j = i + 1;
      while (j < L && kind_[j] == kind) ++j;
      const int64_t len = j - i;
      if (kind == 0) {
        for (int64_t o = 0; o < len; ++o) {
          const int64_t s = keep[i + o];
          pt[s] = ph[s] = pw[s] = cur + o;
        }
        row_max = std::max(row_max, cur + len - 1);
        cur += len;
      } else {
        (kind == 1 ? image_spans : video_spans)++;
        const Grid g = next_grid(kind, b, keep[i]);
        const char* name = kind == 1 ? "image_grid_thw" : "video_grid_thw";
        TORCH_CHECK_VALUE(g.t >= 1 && g.h >= m && g.w >= m && g.h % m == 0 && g.w % m == 0, name, ": grid (t, h, w) = (",
                          g.t, ", ", g.h, ", ", g.w, ") must have t >= 1 and h, w positive multiples of "
                          "spatial_merge_size ", m);
        const int64_t hg = g.h / m, wg = g.w / m;
        TORCH_CHECK_VALUE(len == g.t * hg * wg, kind == 1 ? "image" : "video", " span at row ", b, ", token ",
                          keep[i], " has ", len, " tokens but its grid (", g.t, ", ", g.h, ", ", g.w,
                          ") with spatial_merge_size ", m, " needs t*(h/m)*(w/m) = ", g.t * hg * wg);
        const int64_t* span = keep.data() + i;  // row-major (t, h, w) offsets from cur
        for (int64_t t = 0; t < g.t; ++t)
          for (int64_t h = 0; h < hg; ++h)
            for (int64_t w = 0; w < wg; ++w, ++span) {
              pt[*span] = cur + t;
              ph[*span] = cur + h;
              pw[*span] = cur + w;
            }
        row_max = std::max(row_max, cur + std::max({g.t, hg, wg}) - 1);
        // 5.x continues at cur + max(h, w) / m; 4.57 at the span's largest position + 1.
        cur += token_types(a_) ? std::max(g.h, g.w) / m : std::max({g.t, hg, wg});
      }
      i = j;
    }
    if (!token_types(a_)) check_vision_starts(b, keep, image_spans, video_spans);
    return row_max;
  }

  // 4.57 counts spans as vision_start tokens followed by an image / video token; the spans it then walks are the
  // token runs. Both counts must agree, or the layout is inconsistent.
  void check_vision_starts(int64_t b, const std::vector<int64_t>& keep, int64_t image_spans, int64_t video_spans) {
    const int64_t S = a_.input_ids.size(1);
    int64_t images = 0, videos = 0;
    for (size_t i = 0; i + 1 < keep.size(); ++i) {
      if (ids_[b * S + keep[i]] != a_.vision_start_token_id) continue;
      const int64_t next = kinds_[b * S + keep[i + 1]];
      images += next == 1;
      videos += next == 2;
    }
    TORCH_CHECK_VALUE(images == image_spans && videos == video_spans, "input_ids: row ", b, " has ", images,
                      " image and ", videos, " video spans after vision_start_token_id but ", image_spans,
                      " image and ", video_spans, " video token runs");
  }

  const RopeIndexArgs& a_;
  const int64_t *att_, *kinds_, *ids_;
  std::vector<Grid> images_, frames_;
  std::vector<int64_t> kind_;  // kinds of the current row's attended tokens
  int64_t next_image_ = 0, next_frame_ = 0;
};

// Host-side int64 views of the inputs. For GPU inputs they are packed on the device and brought over in a single
// transfer through pinned memory (one sync in total); CPU inputs are read in place.
class HostInputs {
 public:
  explicit HostInputs(std::vector<at::Tensor> parts) {
    const bool on_cpu = parts.front().device().is_cpu();
    if (on_cpu) {
      for (auto& t : parts) parts_.push_back(t.to(at::kLong).contiguous());
    } else {
      at::Tensor packed = at::cat(parts);
      at::Tensor host = at::empty(packed.sizes(), packed.options().device(at::kCPU).pinned_memory(true));
      host.copy_(packed, /*non_blocking=*/true);
      c10::impl::VirtualGuardImpl impl(packed.device().type());
      impl.getStream(packed.device()).synchronize();
      int64_t offset = 0;
      for (const auto& t : parts) {
        parts_.push_back(host.narrow(0, offset, t.numel()));
        offset += t.numel();
      }
    }
  }
  const int64_t* operator[](size_t i) const { return parts_[i].data_ptr<int64_t>(); }

 private:
  std::vector<at::Tensor> parts_;
};

at::Tensor push_to_device(const at::Tensor& host, const at::Device& device) {
  if (device.is_cpu()) return host;
  // Pinned source + non_blocking: no sync; the caching host allocator keeps the buffer until the copy is done.
  at::Tensor pinned = at::empty(host.sizes(), host.options().pinned_memory(true));
  pinned.copy_(host);
  return pinned.to(device, /*non_blocking=*/true);
}

}  // namespace

RopeIndexArgs check_rope_index(const at::Tensor& input_ids, const std::optional<at::Tensor>& image_grid_thw,
                               const std::optional<at::Tensor>& video_grid_thw,
                               const std::optional<at::Tensor>& attention_mask,
                               const std::optional<at::Tensor>& mm_token_type_ids, int64_t spatial_merge_size,
                               int64_t image_token_id, int64_t video_token_id, int64_t vision_start_token_id,
                               std::string_view convention) {
  RopeIndexArgs a;
  if (convention == "token_types") {
    a.convention = RopeIndexConvention::kTokenTypes;
  } else if (convention == "vision_start") {
    a.convention = RopeIndexConvention::kVisionStart;
  } else {
    TORCH_CHECK_VALUE(false, "convention: expected 'token_types' (transformers 5.x) or 'vision_start' "
                      "(transformers 4.57), got '", convention, "'");
  }
  TORCH_CHECK_VALUE(input_ids.dim() == 2, "input_ids: expected a 2-D (batch, seq) tensor, got shape ",
                    input_ids.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(input_ids.scalar_type(), /*includeBool=*/false),
                    "input_ids: expected an integer dtype, got ", input_ids.scalar_type());
  TORCH_CHECK_VALUE(spatial_merge_size >= 1, "spatial_merge_size: expected >= 1, got ", spatial_merge_size);
  a.input_ids = input_ids;
  a.image_grid_thw = defined_or_empty(image_grid_thw);
  a.video_grid_thw = defined_or_empty(video_grid_thw);
  a.attention_mask = defined_or_empty(attention_mask);
  a.mm_token_type_ids = defined_or_empty(mm_token_type_ids);
  check_grid(a.image_grid_thw, "image_grid_thw", input_ids);
  check_grid(a.video_grid_thw, "video_grid_thw", input_ids);
  check_per_token(a.attention_mask, "attention_mask", input_ids, /*allow_float=*/true);
  check_per_token(a.mm_token_type_ids, "mm_token_type_ids", input_ids, /*allow_float=*/false);
  TORCH_CHECK_VALUE(a.convention != RopeIndexConvention::kTokenTypes || a.mm_token_type_ids.defined(),
                    "mm_token_type_ids: required by convention 'token_types' (transformers 5.x)");
  a.merge = spatial_merge_size;
  a.image_token_id = image_token_id;
  a.video_token_id = video_token_id;
  a.vision_start_token_id = vision_start_token_id;
  return a;
}

std::tuple<at::Tensor, at::Tensor> rope_index_host(const RopeIndexArgs& a) {
  if (!token_types(a) && !a.image_grid_thw.defined() && !a.video_grid_thw.defined()) {
    return vision_start_text_only(a);
  }
  const int64_t B = a.input_ids.size(0), S = a.input_ids.size(1);
  const auto long_opts = a.input_ids.options().dtype(at::kLong);
  const at::Tensor none = at::empty({0}, long_opts);
  const at::Tensor images = a.image_grid_thw.defined() ? a.image_grid_thw.to(at::kLong) : none.view({0, 3});
  const at::Tensor videos = a.video_grid_thw.defined() ? a.video_grid_thw.to(at::kLong) : none.view({0, 3});
  // Attended flags, token kinds, token ids (4.57 only), image grids, video grids.
  const at::Tensor ids = token_types(a) ? none : a.input_ids.to(at::kLong).reshape(-1);
  const HostInputs host({attended(a).to(at::kLong).reshape(-1), token_kinds(a).reshape(-1), ids,
                         images.reshape(-1), videos.reshape(-1)});
  at::Tensor pos = at::empty({3, B, S}, at::TensorOptions().dtype(at::kLong));
  at::Tensor deltas = at::empty({B, 1}, at::TensorOptions().dtype(at::kLong));
  HostIndexer(a, host[0], host[1], host[2], read_grids(host[3], images.size(0)), read_grids(host[4], videos.size(0)))
      .run(pos.data_ptr<int64_t>(), deltas.data_ptr<int64_t>());
  const auto device = a.input_ids.device();
  return {push_to_device(pos.to(a.input_ids.scalar_type()), device), push_to_device(deltas, device)};
}

std::tuple<at::Tensor, at::Tensor> rope_index_device(const RopeIndexArgs& a) {
  if (!token_types(a) && !a.image_grid_thw.defined() && !a.video_grid_thw.defined()) {
    return vision_start_text_only(a);
  }
  const int64_t B = a.input_ids.size(0), S = a.input_ids.size(1), m = a.merge;
  const auto L = a.input_ids.options().dtype(at::kLong);
  if (B == 0 || S == 0) {
    TORCH_CHECK_VALUE(B == 0, "input_ids: expected at least one token per row, got shape ", a.input_ids.sizes());
    return {at::empty({3, 0, S}, a.input_ids.options()), at::empty({0, 1}, L)};
  }
  const bool v5 = token_types(a);
  std::vector<at::Tensor> ok;  // every consistency condition, checked by one asynchronous assert at the end

  const at::Tensor att = attended(a);
  at::Tensor kind = token_kinds(a);
  if (v5) ok.push_back((att.logical_not() | ((kind >= 0) & (kind <= 2))).all());
  kind = kind.clamp(0, 2);
  const at::Tensor length = att.sum(1);  // attended tokens per row
  ok.push_back((length > 0).all());

  // Runs of equal modality among attended tokens: a run starts where the kind differs from the previous attended
  // token's (found with a running max of attended indices).
  const at::Tensor col = at::arange(S, L).expand({B, S});
  const at::Tensor rank = att.cumsum(1) - 1;  // index of each token among its row's attended tokens
  const at::Tensor last_att = std::get<0>(at::where(att, col, -1).cummax(1));
  const at::Tensor prev_att = at::cat({at::full({B, 1}, -1, L), last_att.narrow(1, 0, S - 1)}, 1);
  const at::Tensor prev_kind = at::where(prev_att >= 0, kind.gather(1, prev_att.clamp_min(0)), -1);
  const at::Tensor run_start = att & (kind != prev_kind);
  const at::Tensor run = run_start.cumsum(1) - 1;  // run id of each attended token
  const at::Tensor runs = run_start.sum(1, /*keepdim=*/true);

  // Per-run table (B, S): slot S collects the writes of tokens that start no run and is dropped.
  const at::Tensor slot = at::where(run_start, run, S);
  const at::Tensor run_kind = at::zeros({B, S + 1}, L).scatter_(1, slot, kind).narrow(1, 0, S);
  const at::Tensor run_first = at::zeros({B, S + 1}, L).scatter_(1, slot, rank).narrow(1, 0, S);
  const at::Tensor run_valid = col < runs;
  const at::Tensor next_first = at::cat({run_first.narrow(1, 1, S - 1), at::zeros({B, 1}, L)}, 1);
  const at::Tensor run_len =
      at::where(run_valid, at::where(col + 1 < runs, next_first, length.unsqueeze(1)) - run_first, 0);

  // Grids are consumed in row-major order of the runs across the whole batch.
  const at::Tensor is_image = run_valid & (run_kind == 1);
  const at::Tensor is_video = run_valid & (run_kind == 2);
  const at::Tensor image_rank = is_image.reshape(-1).cumsum(0).reshape({B, S}) - 1;
  const at::Tensor frame_rank = is_video.reshape(-1).cumsum(0).reshape({B, S}) - 1;
  // A (1, m, m) grid that keeps clamped lookups in range; filled on the device (at::tensor would copy from the host).
  const at::Tensor dummy = at::full({1, 3}, m, L);
  dummy.select(1, 0).fill_(1);
  const at::Tensor images = a.image_grid_thw.defined() ? a.image_grid_thw.to(at::kLong) : at::empty({0, 3}, L);
  const at::Tensor videos = a.video_grid_thw.defined() ? a.video_grid_thw.to(at::kLong) : at::empty({0, 3}, L);
  const int64_t n_images = images.size(0), n_videos = videos.size(0);
  const at::Tensor image_grid =
      at::cat({images, dummy}).index_select(0, image_rank.clamp(0, n_images).reshape(-1)).view({B, S, 3});
  const at::Tensor frames_per_video = videos.select(1, 0);
  const at::Tensor video_of_frame =
      at::searchsorted(frames_per_video.cumsum(0), frame_rank.clamp_min(0), /*out_int32=*/false, /*right=*/true)
          .clamp_max(n_videos);
  const at::Tensor video_grid = at::cat({videos, dummy}).index_select(0, video_of_frame.reshape(-1)).view({B, S, 3});
  ok.push_back(is_image.sum() == n_images);
  ok.push_back(is_video.sum() == frames_per_video.sum());
  ok.push_back((frames_per_video >= 1).all());

  const at::Tensor vision = is_image | is_video;
  const at::Tensor gt = at::where(is_image, image_grid.select(2, 0), 1);  // videos are split into t = 1 frames
  const at::Tensor gh = at::where(is_image, image_grid.select(2, 1), at::where(is_video, video_grid.select(2, 1), m));
  const at::Tensor gw = at::where(is_image, image_grid.select(2, 2), at::where(is_video, video_grid.select(2, 2), m));
  const at::Tensor hg = gh.div(m, "floor"), wg = gw.div(m, "floor");
  ok.push_back((vision.logical_not() | ((gt >= 1) & (gh >= m) & (gw >= m) & (gh.remainder(m) == 0) &
                                        (gw.remainder(m) == 0) & (run_len == gt * hg * wg)))
                   .all());

  const at::Tensor vision_advance =
      v5 ? at::maximum(gh, gw).div(m, "floor") : at::maximum(gt, at::maximum(hg, wg));
  const at::Tensor advance = at::where(vision, vision_advance, run_len);
  const at::Tensor run_pos = advance.cumsum(1) - advance;  // first position of each run

  // Per token: its run's start position plus its offset, unravelled over (t, h, w) inside vision runs.
  const at::Tensor tok_run = run.clamp(0, S - 1);
  const at::Tensor cur = run_pos.gather(1, tok_run);
  const at::Tensor offset = rank - run_first.gather(1, tok_run);
  const at::Tensor tok_vision = vision.gather(1, tok_run);
  const at::Tensor tok_hg = hg.gather(1, tok_run).clamp_min(1), tok_wg = wg.gather(1, tok_run).clamp_min(1);
  const at::Tensor t_off = at::where(tok_vision, offset.div(tok_hg * tok_wg, "floor"), offset);
  const at::Tensor h_off = at::where(tok_vision, offset.div(tok_wg, "floor").remainder(tok_hg), offset);
  const at::Tensor w_off = at::where(tok_vision, offset.remainder(tok_wg), offset);
  at::Tensor pos = at::stack({cur + t_off, cur + h_off, cur + w_off});
  pos = at::where(att.unsqueeze(0), pos, v5 ? 0 : 1);

  const at::Tensor row_max =
      std::get<0>(at::where(att, std::get<0>(pos.max(0)), std::numeric_limits<int64_t>::min()).max(1));
  const at::Tensor deltas = (row_max + 1 - (v5 ? length : at::full_like(length, S))).unsqueeze(1);

  if (!v5) {  // vision_start + image/video pairs must match the token runs, row by row
    const at::Tensor first_after =
        std::get<0>(at::where(att, col, S).flip(1).cummin(1)).flip(1);  // first attended index >= s
    const at::Tensor next_att = at::cat({first_after.narrow(1, 1, S - 1), at::full({B, 1}, S, L)}, 1);
    const at::Tensor next_kind = at::where(next_att < S, kind.gather(1, next_att.clamp_max(S - 1)), 0);
    const at::Tensor starts = att & (a.input_ids == a.vision_start_token_id);
    ok.push_back(((starts & (next_kind == 1)).sum(1) == is_image.sum(1)).all());
    ok.push_back(((starts & (next_kind == 2)).sum(1) == is_video.sum(1)).all());
  }
  at::_assert_async(at::stack(ok).all(),
                    "ropekit.rope_index: inconsistent inputs (vision spans vs grids, span length vs t*(h/m)*(w/m), "
                    "grid sizes, token types or an empty row); run with on_host=True for a precise error");
  return {pos.to(a.input_ids.scalar_type()), deltas};
}

std::tuple<at::Tensor, at::Tensor> rope_index(const at::Tensor& input_ids,
                                              const std::optional<at::Tensor>& image_grid_thw,
                                              const std::optional<at::Tensor>& video_grid_thw,
                                              const std::optional<at::Tensor>& attention_mask,
                                              const std::optional<at::Tensor>& mm_token_type_ids,
                                              int64_t spatial_merge_size, int64_t image_token_id,
                                              int64_t video_token_id, int64_t vision_start_token_id,
                                              c10::string_view convention, bool on_host) {
  const RopeIndexArgs a =
      check_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask, mm_token_type_ids,
                       spatial_merge_size, image_token_id, video_token_id, vision_start_token_id,
                       std::string_view(convention.data(), convention.size()));
  return on_host ? rope_index_host(a) : rope_index_device(a);
}

}  // namespace ropekit
