// rope_index: the per-sample rules of every transformers get_rope_index, written once for the host loop and the
// fused CUDA kernel (C10_HOST_DEVICE, no ATen).
//
// A "sample" is a row's attended tokens in order (or one segment of a packed row). Walking it yields "parts", each
// exactly one tensor transformers appends to its llm_pos_ids_list: a run of consecutive text positions, or one
// vision grid. The sample's tokens then take their positions from the concatenated parts in order, as
// transformers' final index_put does: the lengths must add up to the sample's length (or to 1, which broadcasts).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace ropekit {
namespace rope_index_detail {

// Which transformers get_rope_index is reproduced.
enum Convention : int32_t {
  kTokenTypes = 0,     // 5.x, every family: runs of mm_token_type_ids; text resumes at cur + max(h, w) // m
  kVisionStart = 1,    // 4.57 Qwen2-VL / Qwen2.5-VL / Qwen3-VL: spans found by vision_start + list.index scans
  kVideoBrackets = 2,  // 4.57 GLM-4V: image tokens between video_start and video_end are video frames
  kXdRope = 3,         // 5.x HunYuan-VL: every token keeps its index; an image's tokens take (column, row, image)
};

// tpos(t), the temporal position of frame t of a grid: (t * pre) * interval in the arithmetic of `code`, then
// truncated toward zero (torch's .long()).
enum TimeCode : int32_t { kTimeInt = 0, kTimeF64 = 1, kTimeF32 = 2, kTimeBF16 = 3, kTimeF16 = 4 };

struct TimeScale {
  int64_t pre = 1;           // integer factor applied first (4.57 Qwen2.5-VL: int(second_per_grid_t); 0 for images)
  int64_t interval_int = 1;  // kTimeInt
  double interval = 1.0;     // floating codes: the exact value of the interval in that type
  int32_t code = kTimeInt;
};

struct Grid {
  int64_t t = 1, h = 1, w = 1;
  int64_t video = -1;  // source video (for its time scale and second_per_grid_ts entry); -1 for images
};

// One entry of llm_pos_ids_list. kind 0: `len` text positions cur, cur + 1, ...; kind 1 / 2: the vision grid
// (t, hg, wg) (hg = h // m, wg = w // m) placed at cur, len = t * hg * wg tokens. kind 3 (xdrope): an image span of
// `len` tokens from sample index cur whose grid tokens (hg rows of wg = w // m + 1 columns, from `lead` on) take
// (column, row, image ordinal t); its other tokens (the lead and the last, when lead is 1) keep cur + offset.
struct Part {
  int64_t start = 0;  // sample index of its first token (the parts' lengths summed before it)
  int64_t len = 0;
  int64_t cur = 0;
  int64_t t = 0, hg = 0, wg = 0;
  int64_t h = 0, w = 0;  // the grid's raw h and w (5.x resumes text at cur + max(h, w) // m)
  int64_t video = -1;
  int64_t lead = 0;  // kind 3: 1 when the span's first and last tokens are outside the grid
  int32_t kind = 0;
};

// Why a sample has no result: a case where transformers itself raises, or (strict) an input ropekit rejects.
enum ErrorCode : int32_t {
  kOk = 0,
  kEmptySample,          // a row (or segment) attends to no token: torch.cat of an empty list
  kBadTokenType,         // mm_token_type_ids value not 0 / 1 / 2: KeyError
  kNoImageGrid,          // an image span past the last image grid: StopIteration / IndexError / TypeError
  kNoVideoGrid,          // a video span past the last video grid (or frame)
  kNegativeGrid,         // t, h // m or w // m negative: torch.arange fails
  kGridTooLarge,         // an extent or t * (h // m) * (w // m) > kMaxGridTokens: no positions can be allocated
  kEmptyBeforeMore,      // 4.57: .max() of an empty grid's positions, taken for the part after it
  kLengthMismatch,       // positions built != attended tokens (and != 1): index_put shape mismatch
  kVisionStartAtEnd,     // 4.57: vision_start_token_id is the sample's last token: IndexError
  kNotFound,             // 4.57: list.index finds no image / video token from st on: ValueError
  kNoSecondPerGrid,      // second_per_grid_ts has no entry for this video
  kStrictSpanLength,     // strict: a span's length != t * (h / m) * (w / m)
  kStrictNotDivisible,   // strict: h or w not a positive multiple of m, or t < 1
  kStrictSpansVsStarts,  // strict, 4.57: vision_start pairs do not match the vision token runs
  kXdSpanLength,         // xdrope: an image span's length is neither its grid's tokens nor those + 2: ValueError
};

// The most tokens one vision grid may have, and the largest extent t, h // m, w // m: 2^40 (a grid's positions
// alone would take 24 TiB in transformers, which fails to allocate them). Bounding each extent and their product
// keeps every position and sum of positions below 2^63, so no grid makes the integer arithmetic overflow. An
// extent past it is refused even in a grid of no tokens (t = 0), whose text advance would still add it.
constexpr int64_t kMaxGridTokens = int64_t(1) << 40;

struct ErrorInfo {
  int32_t code = kOk;
  int64_t token = -1;    // sample index where it happened (-1: the sample as a whole)
  int64_t grid = -1;     // image grid / video entry involved
  int64_t a = 0, b = 0;  // code-specific numbers
};

struct Rules {
  int32_t convention = kTokenTypes;
  int64_t merge = 2;
  bool strict = false;
  bool scale_time = false;  // Qwen2.5-VL temporal scaling (video_scales given)
  // second_per_grid_ts entries available (videos past them fail: 5.x next() on the iterator, 4.57 indexing);
  // -1 = unlimited
  int64_t second_per_grid_count = -1;
  bool image_grids = true;  // xdrope: image_grid_thw was given (without it, image spans keep text positions)
  bool sample_ordinals = false;  // xdrope, packed: each sample numbers its images from 0, as it would alone
};

// The grids transformers iterates, read from the raw (N, 3) int64 arrays on either side: images in order; videos
// as "entries", whole videos or single (1, h, w) frames. frames_end[v] = entries of videos 0..v (an inclusive
// cumulative sum of each video's entry count), so entry e belongs to the first video v with frames_end[v] > e.
struct GridLists {
  const int64_t* images = nullptr;  // (n_images, 3)
  int64_t n_images = 0;
  const int64_t* videos = nullptr;  // (n_videos, 3)
  const int64_t* frames_end = nullptr;  // (n_videos,)
  int64_t n_videos = 0;
  bool frames = true;  // entries are single frames (t = 1)
  // time scales per source video (Rules::scale_time): pre (int64) and the interval's bits (int64, or a double's)
  const int64_t* time_pre = nullptr;
  const int64_t* time_interval = nullptr;
  int32_t time_code = kTimeInt;

  C10_HOST_DEVICE int64_t n_entries() const { return n_videos > 0 ? frames_end[n_videos - 1] : 0; }

  C10_HOST_DEVICE Grid image(int64_t i) const {
    Grid g;
    g.t = images[3 * i];
    g.h = images[3 * i + 1];
    g.w = images[3 * i + 2];
    return g;
  }

  C10_HOST_DEVICE Grid entry(int64_t e) const {
    int64_t lo = 0, hi = n_videos - 1;  // the first v with frames_end[v] > e
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (frames_end[mid] > e) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    Grid g;
    g.video = lo;
    g.t = frames ? 1 : videos[3 * lo];
    g.h = videos[3 * lo + 1];
    g.w = videos[3 * lo + 2];
    return g;
  }

  C10_HOST_DEVICE TimeScale scale(int64_t v) const {
    TimeScale s;
    s.pre = time_pre[v];
    s.code = time_code;
    if (time_code == kTimeInt) {
      s.interval_int = time_interval[v];
    } else {
      s.interval = bits_to_double(time_interval[v]);
    }
    return s;
  }

  C10_HOST_DEVICE static double bits_to_double(int64_t bits) {
#ifdef __CUDA_ARCH__
    return __longlong_as_double(bits);
#else
    double d;
    std::memcpy(&d, &bits, sizeof(double));
    return d;
#endif
  }
};

struct Cursor {  // grids are consumed in order across the whole batch; value-initialise (Cursor{}) to start
  int64_t image, video;  // no member initialisers: it lives in CUDA __shared__ memory
};

C10_HOST_DEVICE inline int64_t floor_div(int64_t a, int64_t b) {
  const int64_t q = a / b;
  return (a % b != 0 && ((a < 0) != (b < 0))) ? q - 1 : q;
}

// tpos(t) for one scale, with torch's rounding points (see TimeCode). No FMA: each step rounds as torch does.
C10_HOST_DEVICE inline int64_t time_position(const TimeScale& s, int64_t t) {
  const int64_t x = t * s.pre;
  switch (s.code) {
    case kTimeF64: {
      const double product = static_cast<double>(x) * s.interval;
      return static_cast<int64_t>(product);
    }
    case kTimeF32: {
      const float product = static_cast<float>(x) * static_cast<float>(s.interval);
      return static_cast<int64_t>(product);
    }
    case kTimeBF16: {
      const float xv = static_cast<float>(c10::BFloat16(static_cast<float>(x)));
      const float iv = static_cast<float>(c10::BFloat16(static_cast<float>(s.interval)));
      return static_cast<int64_t>(static_cast<float>(c10::BFloat16(xv * iv)));
    }
    case kTimeF16: {
      const float xv = static_cast<float>(c10::Half(static_cast<float>(x)));
      const float iv = static_cast<float>(c10::Half(static_cast<float>(s.interval)));
      return static_cast<int64_t>(static_cast<float>(c10::Half(xv * iv)));
    }
    default:
      return x * s.interval_int;
  }
}

C10_HOST_DEVICE inline TimeScale scale_of(const Rules& r, const GridLists& g, const Part& p) {
  TimeScale s;
  if (!r.scale_time) return s;
  if (p.video >= 0) return g.scale(p.video);
  // images: 5.x time_interval = 1; 4.57 Qwen2.5-VL multiplies by second_per_grid_t = 0
  s.pre = r.convention == kTokenTypes ? 1 : 0;
  return s;
}

// Largest position of a non-empty xdrope image part: its grid's largest column, row or ordinal, and the index of
// its last token when that one is outside the grid.
C10_HOST_DEVICE inline int64_t xd_top(const Part& p) {
  int64_t m = p.hg * p.wg > 0 ? (p.wg - 1 > p.hg - 1 ? p.wg - 1 : p.hg - 1) : 0;
  if (p.hg * p.wg > 0 && p.t > m) m = p.t;
  if (p.lead && p.cur + p.len - 1 > m) m = p.cur + p.len - 1;
  return m;
}

// Largest position offset of a non-empty part from its cur. tpos is monotone in t.
C10_HOST_DEVICE inline int64_t part_extent(const Rules& r, const GridLists& g, const Part& p) {
  if (p.kind == 0) return p.len - 1;
  if (p.kind == 3) return xd_top(p) - p.cur;
  const TimeScale s = scale_of(r, g, p);
  const int64_t t0 = time_position(s, 0), t1 = time_position(s, p.t - 1);
  int64_t m = t0 > t1 ? t0 : t1;
  if (p.hg - 1 > m) m = p.hg - 1;
  if (p.wg - 1 > m) m = p.wg - 1;
  return m;
}

// Positions (t, h, w) of token `o` (0 <= o < len) of part p.
C10_HOST_DEVICE inline void part_position(const Rules& r, const GridLists& g, const Part& p, int64_t o,
                                          int64_t& pt, int64_t& ph, int64_t& pw) {
  if (p.kind == 0 || (p.kind == 3 && p.lead && (o == 0 || o == p.len - 1))) {
    pt = ph = pw = p.cur + o;
    return;
  }
  if (p.kind == 3) {
    const int64_t q = o - p.lead;
    pt = q % p.wg;  // the width axis comes first in HunYuan-VL's (width, height, image) rows
    ph = q / p.wg;
    pw = p.t;
    return;
  }
  const int64_t plane = p.hg * p.wg;
  pt = p.cur + time_position(scale_of(r, g, p), o / plane);
  ph = p.cur + (o % plane) / p.wg;
  pw = p.cur + o % p.wg;
}

// The part holding sample token i: the last part whose start is <= i (empty parts share their successor's start
// and come before it, so the last one is the non-empty one).
C10_HOST_DEVICE inline int64_t find_part(const Part* parts, int64_t n_parts, int64_t i) {
  int64_t lo = 0, hi = n_parts - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (parts[mid].start <= i) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

C10_HOST_DEVICE inline bool fail(ErrorInfo& e, int32_t code, int64_t token, int64_t grid = -1, int64_t a = 0,
                                 int64_t b = 0) {
  e.code = code;
  e.token = token;
  e.grid = grid;
  e.a = a;
  e.b = b;
  return false;
}

// The next grid of `kind` (1 image, 2 video) into part p (kind, grid shape, len). false (e set) where transformers
// fails: no grid left, a negative extent, no second_per_grid_ts entry; or (strict) an indivisible grid.
C10_HOST_DEVICE inline bool take_grid(const Rules& r, const GridLists& g, Cursor& c, int32_t kind, int64_t token,
                                      Part& p, ErrorInfo& e) {
  Grid grid;
  int64_t index;
  if (kind == 1) {
    if (c.image >= g.n_images) return fail(e, kNoImageGrid, token, c.image, g.n_images);
    index = c.image++;
    grid = g.image(index);
  } else {
    const int64_t n_entries = g.n_entries();
    if (c.video >= n_entries) return fail(e, kNoVideoGrid, token, c.video, n_entries);
    index = c.video++;
    grid = g.entry(index);
    if (r.scale_time && r.second_per_grid_count >= 0 && grid.video >= r.second_per_grid_count) {
      return fail(e, kNoSecondPerGrid, token, grid.video, r.second_per_grid_count);
    }
  }
  p.kind = kind;
  p.video = grid.video;
  p.h = grid.h;
  p.w = grid.w;
  p.t = grid.t;
  p.hg = floor_div(grid.h, r.merge);
  p.wg = floor_div(grid.w, r.merge);
  if (p.t < 0 || p.hg < 0 || p.wg < 0) return fail(e, kNegativeGrid, token, index, kind);
  if (p.t > kMaxGridTokens || p.hg > kMaxGridTokens || p.wg > kMaxGridTokens ||
      (p.t > 0 && p.hg > 0 && p.wg > 0 && (p.hg > kMaxGridTokens / p.t || p.wg > kMaxGridTokens / (p.t * p.hg)))) {
    return fail(e, kGridTooLarge, token, index, kind);
  }
  if (r.strict && (grid.t < 1 || grid.h < r.merge || grid.w < r.merge || grid.h % r.merge != 0 ||
                   grid.w % r.merge != 0)) {
    return fail(e, kStrictNotDivisible, token, index, kind);
  }
  p.len = p.t * p.hg * p.wg;
  return true;
}

C10_HOST_DEVICE inline void append(Part* parts, int64_t& n_parts, int64_t& total, Part p) {
  p.start = total;
  total += p.len;
  parts[n_parts++] = p;
}

// Runs model (5.x token types, every family; 4.57 GLM-4V): each maximal run of equal kind is one part, and a vision
// run takes the next grid of its kind whatever its length. 5.x resumes text at cur + max(h, w) // m; 4.57 at the
// part's largest position + 1 (and fails when that part is empty). Room for `runs` parts.
C10_HOST_DEVICE inline bool walk_runs(const Rules& r, const GridLists& g, Cursor& c, const int64_t* run_start,
                                      const int64_t* run_len, const int64_t* run_kind, int64_t runs, Part* parts,
                                      int64_t& n_parts, int64_t& total, ErrorInfo& e) {
  const bool max_plus_one = r.convention != kTokenTypes;
  int64_t cur = 0;
  bool empty_before = false;
  for (int64_t k = 0; k < runs; ++k) {
    const int64_t kind = run_kind[k], len = run_len[k], token = run_start[k];
    if (max_plus_one && empty_before) return fail(e, kEmptyBeforeMore, token);
    Part p;
    p.cur = cur;
    if (kind == 0) {
      p.len = len;
      append(parts, n_parts, total, p);
      cur += len;
      continue;
    }
    if (kind != 1 && kind != 2) return fail(e, kBadTokenType, token, -1, kind);
    if (!take_grid(r, g, c, static_cast<int32_t>(kind), token, p, e)) return false;
    if (r.strict && len != p.len) {
      return fail(e, kStrictSpanLength, token, kind == 1 ? c.image - 1 : c.video - 1, len, p.len);
    }
    append(parts, n_parts, total, p);
    if (max_plus_one) {
      if (p.len > 0) {
        cur += part_extent(r, g, p) + 1;
      } else {
        empty_before = true;
      }
    } else {
      cur += floor_div(p.h > p.w ? p.h : p.w, r.merge);  // current_pos += max(h, w) // m, the raw h and w
    }
  }
  return true;
}

// 4.57 Qwen-VL scan: n_img + n_vid blocks, each at the first image (video) token at or after st while images
// (videos) remain, whichever comes first; the text before it, the grid from there on; st jumps past the grid. Then
// the text after the last block. next_img[i] / next_vid[i] (0 <= i <= L): the first index >= i holding the image
// (video) token, or L. run_len_at[i]: for strict mode, the length of the vision run starting at i (0 if none).
// Room for 2 * (n_img + n_vid) + 1 parts.
C10_HOST_DEVICE inline bool walk_vision_start(const Rules& r, const GridLists& g, Cursor& c, int64_t L,
                                              const int64_t* next_img, const int64_t* next_vid,
                                              const int64_t* run_len_at, int64_t vision_runs, int64_t n_img,
                                              int64_t n_vid, Part* parts, int64_t& n_parts, int64_t& total,
                                              ErrorInfo& e) {
  const bool has_img = next_img[0] < L, has_vid = next_vid[0] < L;
  int64_t st = 0, cur = 0, remain_img = n_img, remain_vid = n_vid;
  bool empty_before = false;
  for (int64_t k = 0; k < n_img + n_vid; ++k) {
    int64_t ed_img = L + 1, ed_vid = L + 1;
    if (has_img && remain_img > 0) {
      ed_img = st < L ? next_img[st] : L;
      if (ed_img >= L) return fail(e, kNotFound, st, -1, 1);
    }
    if (has_vid && remain_vid > 0) {
      ed_vid = st < L ? next_vid[st] : L;
      if (ed_vid >= L) return fail(e, kNotFound, st, -1, 2);
    }
    const int32_t kind = ed_img < ed_vid ? 1 : 2;
    const int64_t ed = kind == 1 ? ed_img : ed_vid;
    (kind == 1 ? remain_img : remain_vid) -= 1;
    Part v;
    if (!take_grid(r, g, c, kind, ed, v, e)) return false;
    if (k > 0 && empty_before) return fail(e, kEmptyBeforeMore, ed);
    Part text;
    text.cur = cur;
    text.len = ed - st;
    append(parts, n_parts, total, text);
    v.cur = cur + text.len;
    if (r.strict && (ed >= L || run_len_at[ed] != v.len)) {
      return fail(e, kStrictSpanLength, ed, kind == 1 ? c.image - 1 : c.video - 1, ed < L ? run_len_at[ed] : 0,
                  v.len);
    }
    append(parts, n_parts, total, v);
    st = ed + v.len;
    if (v.len > 0) {
      cur = v.cur + part_extent(r, g, v) + 1;
      empty_before = false;
    } else {
      empty_before = true;
    }
  }
  if (st < L) {
    if (n_img + n_vid > 0 && empty_before) return fail(e, kEmptyBeforeMore, st);
    Part text;
    text.cur = cur;
    text.len = L - st;
    append(parts, n_parts, total, text);
  }
  if (r.strict && n_img + n_vid != vision_runs) return fail(e, kStrictSpansVsStarts, -1, -1, n_img + n_vid, vision_runs);
  return true;
}

// 5.x HunYuan-VL (xdrope): each maximal run of image tokens (mm_token_type_ids 1) takes the next image grid (with
// no image_grid_thw, none: every token is text); its grid tokens number (h // m) * (w // m + 1) (a newline column
// per row) and the span holds those or those + 2 (its first and last tokens are then outside the grid); any other
// length fails as in transformers. Tokens of any other type are text. Every token outside a grid keeps its sample
// index. Room for `runs` parts.
C10_HOST_DEVICE inline bool walk_xd(const Rules& r, const GridLists& g, Cursor& c, const int64_t* run_start,
                                    const int64_t* run_len, const int64_t* run_kind, int64_t runs, Part* parts,
                                    int64_t& n_parts, int64_t& total, ErrorInfo& e) {
  const int64_t first_image = r.sample_ordinals ? c.image : 0;  // transformers numbers images over the batch
  for (int64_t k = 0; k < runs; ++k) {
    const int64_t len = run_len[k], token = run_start[k];
    Part p;
    p.cur = token;  // a sample index: runs tile the sample
    p.len = len;
    if (run_kind[k] == 1 && r.image_grids) {
      if (c.image >= g.n_images) return fail(e, kNoImageGrid, token, c.image, g.n_images);
      const int64_t index = c.image++;
      const Grid grid = g.image(index);
      const int64_t rows = floor_div(grid.h, r.merge), cols = floor_div(grid.w, r.merge) + 1;
      if (rows < 0 || cols < 0) return fail(e, kNegativeGrid, token, index, 1);  // torch.arange of a negative end
      if (rows > kMaxGridTokens || cols > kMaxGridTokens || (rows > 0 && cols > kMaxGridTokens / rows)) {
        return fail(e, kGridTooLarge, token, index, 1);
      }
      const int64_t n = rows * cols;
      if (len == n + 2) {
        p.lead = 1;
      } else if (len != n) {
        return fail(e, kXdSpanLength, token, index, len, n);
      }
      p.kind = 3;
      p.hg = rows;
      p.wg = cols;
      p.t = index - first_image;  // the image's ordinal
    }
    append(parts, n_parts, total, p);
  }
  return true;
}

// After a walk: the sample's largest position (for its delta), and whether its parts fit its L tokens (their
// lengths add up to L, or to 1, which broadcasts as index_put does).
C10_HOST_DEVICE inline bool finish_sample(const Rules& r, const GridLists& g, const Part* parts, int64_t n_parts,
                                          int64_t total, int64_t L, int64_t& sample_max, ErrorInfo& e) {
  if (total != L && total != 1) return fail(e, kLengthMismatch, -1, -1, total, L);
  bool any = false;
  int64_t m = 0;
  for (int64_t k = 0; k < n_parts; ++k) {
    if (parts[k].len == 0) continue;
    const int64_t top = parts[k].cur + part_extent(r, g, parts[k]);
    m = any && m > top ? m : top;
    any = true;
  }
  sample_max = m;
  return true;
}

}  // namespace rope_index_detail
}  // namespace ropekit
