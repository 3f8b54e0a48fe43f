// rope_index: the per-sample rules of every transformers get_rope_index, written once for the host loop and the
// fused CUDA kernel (C10_HOST_DEVICE, no ATen).
//
// A "sample" is a row's attended tokens in order (or one segment of a packed row). Walking it yields "parts", each
// exactly one tensor transformers appends to its llm_pos_ids_list: a run of consecutive text positions, or one
// vision grid. The sample's tokens then take their positions from the concatenated parts in order, as
// transformers' final index_put does: the lengths must add up to the sample's length (or to 1, which broadcasts).
#pragma once

#include "rope_common.h"  // mul_rn / add_rn: float32 steps rounded as torch rounds them, never an FMA

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
  kOmni25 = 4,         // Qwen2.5-Omni (4.57 and 5.x): token-id scan with audio; audio in video by chunks
  kOmni3 = 5,          // Qwen3-Omni-MoE (4.57 and 5.x): as kOmni25 with float32 positions; audio in video by token
  kFrameBlocks = 6,    // 5.x HY-V4-VL: runs of mm_token_type_ids; grids of frames with a newline column, each frame a
                       // block of max(h // m, w // m + 1) positions; text resumes at the grid's largest position + 1
};

C10_HOST_DEVICE inline bool is_omni(int32_t convention) { return convention == kOmni25 || convention == kOmni3; }

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
  // Omni kinds (4: a run of positions base + o; 5: elements [off, off + len) of a vision grid placed at base). The
  // base is cur, or fcur where it is a float32 (Qwen3-Omni, once a vision piece has made it one).
  int32_t fbase = 0;
  float fcur = 0.f;
  int64_t off = 0;
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
  kNegativeLength,       // omni: a negative text or audio length: torch.arange fails
  kNoAudio,              // omni: an audio span past the last audio_seqlens entry (or none given)
  kEmptyPiece,           // omni: the max of an empty piece (an audio or grid of no tokens) starts the next piece
  kTimeRange,            // Qwen2.5-Omni: a temporal position (t * s * position_id_per_seconds) outside int64
  kOmniCounts,           // omni, fused algorithm: spans consumed differ from the spans the token scan counts
  kNoRoom,               // omni, internal: the parts outgrew the room given (the host loop grows it and walks again)
  kEmptyGrid,            // frame_blocks: a vision grid of no tokens: transformers' .max() of its empty positions
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
  // omni
  int64_t pps = 1;               // position_id_per_seconds
  int64_t tokens_per_chunk = 0;  // Qwen2.5-Omni: int(position_id_per_seconds * seconds_per_chunk)
  int64_t n_window = 1;          // Qwen3-Omni: audio_config.n_window
  bool audio_in_video = false;   // use_audio_in_video
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
  // omni: each audio's feature length (audio_seqlens), consumed in order like the grids
  const int64_t* audio_lens = nullptr;
  int64_t n_audios = 0;

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
  int64_t image, video, audio;  // no member initialisers: it lives in CUDA __shared__ memory
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

// frame_blocks: the positions one frame of part p spans, max(h // m, w // m + 1) (frame f starts at f times it).
C10_HOST_DEVICE inline int64_t frame_block(const Part& p) { return p.hg > p.wg + 1 ? p.hg : p.wg + 1; }

// Largest position offset of a non-empty part from its cur. tpos is monotone in t.
C10_HOST_DEVICE inline int64_t part_extent(const Rules& r, const GridLists& g, const Part& p) {
  if (p.kind == 0) return p.len - 1;
  if (p.kind == 3) return xd_top(p) - p.cur;
  if (r.convention == kFrameBlocks) {  // the last frame's block ends at its last row or its newline column: t * B - 1
    return p.t * frame_block(p) - 1;
  }
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
  if (r.convention == kFrameBlocks) {  // frame f, row y, column x (the last column the newline): f * block + (0, y, x)
    const int64_t cols = p.wg + 1, plane = p.hg * cols, in_frame = o % plane;
    const int64_t base = p.cur + (o / plane) * frame_block(p);
    pt = base;
    ph = base + in_frame / cols;
    pw = base + in_frame % cols;
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
  // frame_blocks: each row of a frame holds wg + 1 tokens (its newline column), and that width is what is bounded
  const int64_t cols = r.convention == kFrameBlocks ? p.wg + 1 : p.wg;
  if (p.t > kMaxGridTokens || p.hg > kMaxGridTokens || cols > kMaxGridTokens ||
      (p.t > 0 && p.hg > 0 && cols > 0 && (p.hg > kMaxGridTokens / p.t || cols > kMaxGridTokens / (p.t * p.hg)))) {
    return fail(e, kGridTooLarge, token, index, kind);
  }
  if (r.strict && (grid.t < 1 || grid.h < r.merge || grid.w < r.merge || grid.h % r.merge != 0 ||
                   grid.w % r.merge != 0)) {
    return fail(e, kStrictNotDivisible, token, index, kind);
  }
  p.len = p.t * p.hg * cols;
  return true;
}

C10_HOST_DEVICE inline void append(Part* parts, int64_t& n_parts, int64_t& total, Part p) {
  p.start = total;
  total += p.len;
  parts[n_parts++] = p;
}

// Runs model (5.x token types, every family; 4.57 GLM-4V; HY-V4-VL's frame blocks): each maximal run of equal kind
// is one part, and a vision run takes the next grid of its kind whatever its length. 5.x resumes text at
// cur + max(h, w) // m; 4.57 and frame_blocks at the part's largest position + 1 (4.57 fails when an empty part is
// followed by more, frame_blocks at once: it takes the max right after building the grid). Room for `runs` parts.
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
    if (r.convention == kFrameBlocks && p.len == 0) {
      return fail(e, kEmptyGrid, token, kind == 1 ? c.image - 1 : c.video - 1, kind);
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

// ---------------------------------------------------------------------------------------------------------------
// The Omni thinkers' get_rope_index (Qwen2.5-Omni: kOmni25; Qwen3-Omni-MoE, thinker and talker: kOmni3), a
// transcription of transformers' loop: per span, the 4.57-style list.index scan from st (Qwen2.5-Omni for the first
// image / video / audio token, Qwen3-Omni for the next vision_start / audio_start), text before it, its bos piece(s),
// the span, its eos piece(s); st jumps by the lengths transformers adds up. Every piece starts at the largest
// position of the piece appended last, + 1. Audio spans are 1-D; vision grids (t, h // m, w // m) take temporal
// positions scaled by position_id_per_seconds (videos also by second_per_grids[v], in float32). With
// use_audio_in_video a clip's video grid and audio share a start and interleave: Qwen2.5-Omni chunk by chunk of
// tokens_per_chunk temporal positions (transformers' get_chunked_index), Qwen3-Omni token by token by temporal
// value, video first on ties. Qwen3-Omni's positions are float32: they stay exact integers until a vision piece
// makes a start float, and every later step rounds to float32 as torch's arithmetic does (OmniNum).

C10_HOST_DEVICE inline bool f32_isnan(float x) { return x != x; }

// max as torch's reductions take it: NaN wins.
C10_HOST_DEVICE inline float f32_max(float a, float b) { return f32_isnan(a) || f32_isnan(b) ? (a + b) : (a > b ? a : b); }

// A float32's bits, sign-extended: how the int64 position buffers carry Qwen3-Omni's float positions.
C10_HOST_DEVICE inline int64_t float_bits(float x) {
#ifdef __CUDA_ARCH__
  return __float_as_int(x);
#else
  int32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

// A value of Qwen3-Omni's loop: a Python int / int64 tensor, or a float32 tensor. Qwen2.5-Omni's are all int64.
struct OmniNum {
  bool is_float = false;
  int64_t i = 0;
  float f = 0.f;
};

C10_HOST_DEVICE inline float omni_float(const OmniNum& a) { return a.is_float ? a.f : static_cast<float>(a.i); }

// a + k (k an int: arange(k)[o] + a, st_idx += k, max + 1): exact on ints, one float32 rounding on floats.
C10_HOST_DEVICE inline OmniNum omni_add(OmniNum a, int64_t k) {
  if (a.is_float) {
    a.f = add_rn(static_cast<float>(k), a.f);
  } else {
    a.i += k;
  }
  return a;
}

C10_HOST_DEVICE inline OmniNum omni_base(const Part& p) {
  OmniNum n;
  n.is_float = p.fbase != 0;
  n.i = p.cur;
  n.f = p.fcur;
  return n;
}

// Frame f's temporal index as transformers computes it: images arange(t) * 1 * pps (int64); videos arange(t) *
// second_per_grids[v].float() * pps (float32, two roundings; Qwen2.5-Omni then truncates it with .long()).
C10_HOST_DEVICE inline float omni_video_time(const Rules& r, const GridLists& g, int64_t video, int64_t f) {
  const float s = static_cast<float>(GridLists::bits_to_double(g.time_interval[video]));
  return mul_rn(mul_rn(static_cast<float>(f), s), static_cast<float>(r.pps));
}

C10_HOST_DEVICE inline int64_t omni_time_int(const Rules& r, const GridLists& g, const Part& p, int64_t f) {
  return p.video >= 0 ? static_cast<int64_t>(omni_video_time(r, g, p.video, f)) : f * r.pps;
}

C10_HOST_DEVICE inline float omni_time_float(const Rules& r, const GridLists& g, const Part& p, int64_t f) {
  return p.video >= 0 ? omni_video_time(r, g, p.video, f) : static_cast<float>(f * r.pps);
}

// Positions (t, h, w) of token o of an omni part: int64 (kOmni25) or float32 bits (kOmni3).
C10_HOST_DEVICE inline void omni_position(const Rules& r, const GridLists& g, const Part& p, int64_t o, int64_t& pt,
                                          int64_t& ph, int64_t& pw) {
  const bool flt = r.convention == kOmni3;
  if (p.kind == 4) {
    const OmniNum v = omni_add(omni_base(p), o);
    pt = ph = pw = flt ? float_bits(omni_float(v)) : v.i;
    return;
  }
  const int64_t e = p.off + o, plane = p.hg * p.wg;
  const int64_t f = e / plane, hh = (e % plane) / p.wg, ww = e % p.wg;
  if (flt) {
    const float base = omni_float(omni_base(p));
    pt = float_bits(add_rn(omni_time_float(r, g, p, f), base));
    ph = float_bits(add_rn(static_cast<float>(hh), base));
    pw = float_bits(add_rn(static_cast<float>(ww), base));
  } else {
    pt = p.cur + omni_time_int(r, g, p, f);
    ph = p.cur + hh;
    pw = p.cur + ww;
  }
}

// The largest position of a non-empty omni part (torch's .max() of its tensor: a float part's NaN wins). Temporal
// indices are monotone in the frame, so a slice's extremes sit at its first and last frames.
C10_HOST_DEVICE inline OmniNum omni_part_max(const Rules& r, const GridLists& g, const Part& p) {
  if (p.kind == 4) return omni_add(omni_base(p), p.len - 1);
  const int64_t plane = p.hg * p.wg, a = p.off, b = p.off + p.len - 1;
  const int64_t f0 = a / plane, f1 = b / plane;
  int64_t hmax, wmax;
  if (f0 == f1) {
    const int64_t r0 = (a % plane) / p.wg, r1 = (b % plane) / p.wg;
    hmax = r1;
    wmax = r1 > r0 ? p.wg - 1 : b % p.wg;
  } else {  // the slice runs to the end of frame f0: its last row, whole
    hmax = p.hg - 1;
    wmax = p.wg - 1;
  }
  OmniNum m;
  if (r.convention == kOmni3) {
    const float base = omni_float(omni_base(p));
    m.is_float = true;
    m.f = f32_max(f32_max(add_rn(omni_time_float(r, g, p, f0), base), add_rn(omni_time_float(r, g, p, f1), base)),
                  f32_max(add_rn(static_cast<float>(hmax), base), add_rn(static_cast<float>(wmax), base)));
  } else {
    int64_t x = omni_time_int(r, g, p, f0);
    const int64_t t1 = omni_time_int(r, g, p, f1);
    if (t1 > x) x = t1;
    if (hmax > x) x = hmax;
    if (wmax > x) x = wmax;
    m.i = p.cur + x;
  }
  return m;
}

// transformers' get_chunked_index over one clip's temporal indices (value(i) - remove_index): a split before element
// i whenever its value >= chunk * tokens_per_chunk, chunk advancing by one per split; yields (start, end) in order,
// the last one always. Elements come in frames of `size` equal values (one value per video frame, one per audio
// token), so a frame without a split at its first element is skipped whole.
struct OmniChunker {
  int64_t len = 0, size = 1, chunk = 1, start = 0, i = 0;
  int64_t video = -1;  // the clip's video (values: its frames' int64 temporal indices), or -1 (audio: the index)
  bool done = false;

  C10_HOST_DEVICE bool next(const Rules& r, const GridLists& g, int64_t& a, int64_t& b) {
    if (done) return false;
    while (i < len) {
      const int64_t f = i / size;
      const int64_t value = video >= 0 ? static_cast<int64_t>(omni_video_time(r, g, video, f)) : f;
      if (value >= chunk * r.tokens_per_chunk) {
        a = start;
        b = i;
        start = i++;
        ++chunk;
        return true;
      }
      i = (f + 1) * size;  // value and chunk stay as they are to the frame's end
    }
    a = start;
    b = len;
    done = true;
    return true;
  }
};

// The token scan of one sample, as transformers counts and searches it. 2.5: next_a / next_b / next_c find the next
// image / video / audio token at or after an index (L where none); 3: next_a the next vision_start, next_c the next
// audio_start. Counts: vision_start followed by an image token (n_img), by a video token (n_vid; with
// use_audio_in_video, by audio_start), and audio_start tokens (n_aud).
struct OmniScan {
  const int64_t *tokens = nullptr, *next_a = nullptr, *next_b = nullptr, *next_c = nullptr;
  int64_t image_id = -1, video_id = -1;
  bool has_img = false, has_vid = false, has_aud = false;  // the image / video / audio token occurs in the sample
  int64_t n_img = 0, n_vid = 0, n_aud = 0;
};

// The walk's state: the parts (non-empty pieces), the piece appended last and the sample's largest position.
struct OmniState {
  Part* parts;
  int64_t room, n_parts, total, L;
  bool any, last_empty, any_max;
  OmniNum last, top;
};

// Appends one of transformers' pieces. Empty pieces take no part but are still the piece appended last.
C10_HOST_DEVICE inline bool omni_push(const Rules& r, const GridLists& g, OmniState& s, Part p, int64_t token,
                                      ErrorInfo& e) {
  s.any = true;
  s.last_empty = p.len == 0;
  if (p.len == 0) return true;
  const int64_t room = s.L > 1 ? s.L : 1;  // the pieces must add up to L (or to 1, broadcast)
  if (s.total + p.len > room) return fail(e, kLengthMismatch, token, -1, s.total + p.len, s.L);
  s.last = omni_part_max(r, g, p);
  if (!s.any_max) {
    s.top = s.last;
    s.any_max = true;
  } else if (r.convention == kOmni3) {
    s.top.f = f32_max(s.top.f, omni_float(s.last));
  } else if (s.last.i > s.top.i) {
    s.top.i = s.last.i;
  }
  if (r.convention == kOmni3) {  // the sample's max is taken over llm_positions.float()
    s.top.f = omni_float(s.top);
    s.top.is_float = true;
  }
  if (s.n_parts == s.room) return fail(e, kNoRoom, token);
  p.start = s.total;
  s.total += p.len;
  s.parts[s.n_parts++] = p;
  return true;
}

// st_idx = llm_pos_ids_list[-1].max() + 1 (0 before any piece); false where that piece is empty (max() fails).
C10_HOST_DEVICE inline bool omni_next_start(const OmniState& s, int64_t token, OmniNum& out, ErrorInfo& e) {
  out = OmniNum{};
  if (!s.any) return true;
  if (s.last_empty) return fail(e, kEmptyPiece, token);
  out = omni_add(s.last, 1);
  return true;
}

C10_HOST_DEVICE inline Part omni_run(const OmniNum& base, int64_t len) {
  Part p;
  p.kind = 4;
  p.len = len;
  p.cur = base.i;
  p.fcur = base.f;
  p.fbase = base.is_float ? 1 : 0;
  return p;
}

// list.index(token, st): the first index >= st holding it; false (ValueError) where there is none.
C10_HOST_DEVICE inline bool omni_find(const int64_t* next, int64_t L, int64_t st, int32_t kind, int64_t& out,
                                      ErrorInfo& e) {
  out = st < L ? next[st] : L;
  if (out >= L) return fail(e, kNotFound, st < L ? st : -1, -1, kind);
  return true;
}

// An audio span's token count from its feature length: Qwen2.5-Omni ((n - 1) // 2 + 1 - 2) // 2 + 1; Qwen3-Omni
// _get_feat_extract_output_lengths(n, n_window).
C10_HOST_DEVICE inline bool omni_audio_len(const Rules& r, const GridLists& g, Cursor& c, int64_t token, int64_t& n,
                                           ErrorInfo& e) {
  if (c.audio >= g.n_audios) return fail(e, kNoAudio, token, c.audio, g.n_audios);
  const int64_t x = g.audio_lens[c.audio];
  if (r.convention == kOmni25) {
    n = floor_div(floor_div(x - 1, 2) + 1 - 2, 2) + 1;
  } else {
    const int64_t chunk = r.n_window * 2;
    const int64_t leave = x - floor_div(x, chunk) * chunk;
    const int64_t feat = floor_div(leave - 1, 2) + 1;
    n = floor_div(floor_div(feat - 1, 2) + 1 - 1, 2) + 1 + floor_div(x, chunk) * 13;
  }
  if (n < 0) return fail(e, kNegativeLength, token, c.audio, n);
  return true;
}

// The next image (kind 1) or video (kind 2) grid into an omni grid part at `base`, and the st advance
// transformers adds for it: t * h * w // m^2 (not the positions' count where h or w is not a multiple of m).
C10_HOST_DEVICE inline bool omni_grid(const Rules& r, const GridLists& g, Cursor& c, int32_t kind, int64_t token,
                                      const OmniNum& base, Part& p, int64_t& advance, ErrorInfo& e) {
  if (!take_grid(r, g, c, kind, token, p, e)) return false;
  const int64_t index = kind == 1 ? c.image - 1 : c.video - 1;
  const int64_t m2 = r.merge * r.merge;
  if (p.t > 0 && p.h > 0 && p.w > 0 && (p.h > INT64_MAX / p.t || p.w > INT64_MAX / (p.t * p.h))) {
    return fail(e, kGridTooLarge, token, index, kind);
  }
  advance = floor_div(p.t * p.h * p.w, m2);
  p.kind = 5;
  p.off = 0;
  p.cur = base.i;
  p.fcur = base.f;
  p.fbase = base.is_float ? 1 : 0;
  if (r.convention == kOmni25 && p.video >= 0 && p.len > 0) {  // .long() of the float32 product: in range
    constexpr float kLimit = 9.223372e18f;  // 2^63, exactly: [-2^63, 2^63) converts
    const float t0 = omni_video_time(r, g, p.video, 0), t1 = omni_video_time(r, g, p.video, p.t - 1);
    if (!(t0 >= -kLimit && t0 < kLimit && t1 >= -kLimit && t1 < kLimit)) return fail(e, kTimeRange, token, index, 2);
  }
  return true;
}

// Text before a span (len transformers computed; an arange of it, skipped when 0).
C10_HOST_DEVICE inline bool omni_text(const Rules& r, const GridLists& g, OmniState& s, int64_t len, int64_t token,
                                      ErrorInfo& e) {
  if (len == 0) return true;
  if (len < 0) return fail(e, kNegativeLength, token, -1, len);
  OmniNum start;
  if (!omni_next_start(s, token, start, e)) return false;
  return omni_push(r, g, s, omni_run(start, len), token, e);
}

// A bos / eos piece of `count` pieces of `len` tokens, all at one start (Qwen2.5-Omni's audio in video: two pieces
// of one token at the same position; Qwen3-Omni: one piece of two).
C10_HOST_DEVICE inline bool omni_marks(const Rules& r, const GridLists& g, OmniState& s, int64_t count, int64_t len,
                                       int64_t token, ErrorInfo& e) {
  OmniNum start;
  if (!omni_next_start(s, token, start, e)) return false;
  for (int64_t k = 0; k < count; ++k) {
    if (!omni_push(r, g, s, omni_run(start, len), token, e)) return false;
  }
  return true;
}

C10_HOST_DEVICE inline Part omni_slice(const Part& grid, int64_t a, int64_t b) {
  Part p = grid;
  p.off = a;
  p.len = b - a;
  return p;
}

// Qwen2.5-Omni's audio in video: video chunk j, then audio chunk j, for every j.
// A clip pushes all its video and audio tokens: where they cannot fit the sample, fail before walking them (a clip
// of 10^13 audio tokens must not take 10^13 steps; transformers fails allocating its positions).
C10_HOST_DEVICE inline bool omni_clip_fits(const OmniState& s, const Part& video, int64_t audio_len, int64_t token,
                                           ErrorInfo& e) {
  const int64_t room = (s.L > 1 ? s.L : 1) - s.total;
  if (audio_len > room || video.len > room - audio_len) {
    return fail(e, kLengthMismatch, token, -1, s.total + audio_len + video.len, s.L);
  }
  return true;
}

C10_HOST_DEVICE inline bool omni_chunks(const Rules& r, const GridLists& g, OmniState& s, const Part& video,
                                        const OmniNum& base, int64_t audio_len, int64_t token, ErrorInfo& e) {
  if (!omni_clip_fits(s, video, audio_len, token, e)) return false;
  OmniChunker vc, ac;
  vc.len = video.len;
  vc.size = video.hg * video.wg;
  vc.video = video.video;
  ac.len = audio_len;
  while (!vc.done || !ac.done) {
    int64_t a, b;
    if (vc.next(r, g, a, b) && !omni_push(r, g, s, omni_slice(video, a, b), token, e)) return false;
    if (ac.next(r, g, a, b) && !omni_push(r, g, s, omni_run(omni_add(base, a), b - a), token, e)) return false;
  }
  return true;
}

// Qwen3-Omni's audio in video: transformers' merge, one token per piece, video first while its temporal position
// <= the audio token's. A frame's positions share one temporal value, so a frame goes whole; then the remainder.
C10_HOST_DEVICE inline bool omni_merge(const Rules& r, const GridLists& g, OmniState& s, const Part& video,
                                       const OmniNum& base, int64_t audio_len, int64_t token, ErrorInfo& e) {
  if (!omni_clip_fits(s, video, audio_len, token, e)) return false;
  const int64_t plane = video.hg * video.wg, nv = video.len;
  const float fbase = omni_float(base);
  int64_t vi = 0, ai = 0;
  while (vi < nv && ai < audio_len) {
    const int64_t f = vi / plane;
    const float v = add_rn(omni_time_float(r, g, video, f), fbase);
    if (v <= omni_float(omni_add(base, ai))) {
      const int64_t end = (f + 1) * plane;
      if (!omni_push(r, g, s, omni_slice(video, vi, end), token, e)) return false;
      s.last = omni_part_max(r, g, omni_slice(video, end - 1, end));  // the piece appended last: one token
      vi = end;
    } else {
      const int64_t a0 = ai;
      while (ai < audio_len && !(v <= omni_float(omni_add(base, ai)))) ++ai;
      if (!omni_push(r, g, s, omni_run(omni_add(base, a0), ai - a0), token, e)) return false;
      s.last = omni_add(base, ai - 1);
    }
  }
  if (vi < nv && !omni_push(r, g, s, omni_slice(video, vi, nv), token, e)) return false;
  if (ai < audio_len && !omni_push(r, g, s, omni_run(omni_add(base, ai), audio_len - ai), token, e)) return false;
  return true;
}

// One sample, into at most `room` parts (max(L, 1) always suffice: the parts are non-empty and fit the L tokens;
// with less, kNoRoom where they do not fit). delta: the sample's largest position + 1 - L (int64, or the float32's
// bits).
C10_HOST_DEVICE inline bool walk_omni(const Rules& r, const GridLists& g, Cursor& c, const OmniScan& sc, int64_t L,
                                      Part* parts, int64_t room, int64_t& n_parts, int64_t& total, int64_t& delta,
                                      ErrorInfo& e) {
  OmniState s;
  s.parts = parts;
  s.room = room;
  s.n_parts = 0;
  s.total = 0;
  s.L = L;
  s.any = s.last_empty = s.any_max = false;
  const bool q3 = r.convention == kOmni3, aiv = r.audio_in_video;
  const int64_t spans = aiv ? sc.n_img + sc.n_aud : sc.n_img + sc.n_vid + sc.n_aud;
  int64_t remain_img = sc.n_img, remain_vid = sc.n_vid, remain_aud = sc.n_aud, st = 0;
  for (int64_t k = 0; k < spans; ++k) {
    OmniNum start;
    if (!omni_next_start(s, st, start, e)) return false;
    if (!q3) {  // Qwen2.5-Omni: the first image / video / audio token from st
      int64_t ed_img = L + 1, ed_vid = L + 1, ed_aud = L + 1;
      if (sc.has_img && remain_img > 0 && !omni_find(sc.next_a, L, st, 1, ed_img, e)) return false;
      if (sc.has_vid && remain_vid > 0 && !omni_find(sc.next_b, L, st, 2, ed_vid, e)) return false;
      if (sc.has_aud && remain_aud > 0 && !omni_find(sc.next_c, L, st, 3, ed_aud, e)) return false;
      const int64_t ed = ed_img < ed_vid ? (ed_img < ed_aud ? ed_img : ed_aud) : (ed_vid < ed_aud ? ed_vid : ed_aud);
      // transformers' branch order: audio, image, video, audio in video
      const bool with_audio = ed == ed_aud || (ed != ed_img && aiv);
      const bool with_video = ed != ed_aud && ed != ed_img;
      const int64_t marks = with_audio && with_video ? 2 : 1;  // bos / eos pieces of one token each
      const int64_t text_len = ed - st - marks;
      if (!omni_text(r, g, s, text_len, ed, e)) return false;
      if (!omni_marks(r, g, s, marks, 1, ed, e)) return false;
      if (!omni_next_start(s, ed, start, e)) return false;
      int64_t audio_len = 0, advance = 0;
      if (with_audio && !omni_audio_len(r, g, c, ed, audio_len, e)) return false;
      if (with_audio && !with_video) {
        if (!omni_push(r, g, s, omni_run(start, audio_len), ed, e)) return false;
      } else {
        Part grid;
        if (!omni_grid(r, g, c, with_video ? 2 : 1, ed, start, grid, advance, e)) return false;
        if (with_audio) {
          if (!omni_chunks(r, g, s, grid, start, audio_len, ed, e)) return false;
        } else if (!omni_push(r, g, s, grid, ed, e)) {
          return false;
        }
        remain_vid -= with_video ? 1 : 0;  // (not a conditional lvalue: that would put both in local memory)
        remain_img -= with_video ? 0 : 1;
      }
      if (with_audio) {
        ++c.audio;
        --remain_aud;
      }
      if (!omni_marks(r, g, s, marks, 1, ed, e)) return false;
      st += text_len + 2 * marks + audio_len + advance;
      continue;
    }
    // Qwen3-Omni: the next vision_start / audio_start from st
    int64_t ed_vs = L + 1, ed_as = L + 1;
    if ((sc.has_img || sc.has_vid) && (remain_vid > 0 || remain_img > 0) && !omni_find(sc.next_a, L, st, 1, ed_vs, e)) {
      return false;
    }
    if (sc.has_aud && remain_aud > 0 && !omni_find(sc.next_c, L, st, 3, ed_as, e)) return false;
    const int64_t ed = ed_vs < ed_as ? ed_vs : ed_as;
    const int64_t text_len = ed - st;
    if (text_len < 0) return fail(e, kNegativeLength, ed, -1, text_len);
    if (text_len != 0) {
      if (!omni_push(r, g, s, omni_run(start, text_len), ed, e)) return false;
      start = omni_add(start, text_len);
    }
    const bool clip = ed == ed_vs && ed_vs + 1 == ed_as;  // vision_start then audio_start: audio in video
    const int64_t marks = clip ? 2 : 1;
    if (!omni_push(r, g, s, omni_run(start, marks), ed, e)) return false;
    start = omni_add(start, marks);
    int64_t audio_len = 0, advance = 0;
    const bool vision = ed == ed_vs && ed != ed_as;
    int64_t next_token = -1;
    if (vision) {
      if (ed_vs + 1 >= L) return fail(e, kVisionStartAtEnd, ed);
      next_token = sc.tokens[ed_vs + 1];
    }
    if (!vision) {  // audio only
      if (!omni_audio_len(r, g, c, ed, audio_len, e)) return false;
      if (!omni_push(r, g, s, omni_run(start, audio_len), ed, e)) return false;
      ++c.audio;
      --remain_aud;
    } else if (next_token == sc.image_id || next_token == sc.video_id) {
      const int32_t kind = next_token == sc.image_id ? 1 : 2;
      Part grid;
      if (!omni_grid(r, g, c, kind, ed, start, grid, advance, e)) return false;
      if (!omni_push(r, g, s, grid, ed, e)) return false;
      remain_img -= kind == 1 ? 1 : 0;
      remain_vid -= kind == 1 ? 0 : 1;
    } else if (clip) {
      if (!omni_audio_len(r, g, c, ed, audio_len, e)) return false;
      Part grid;
      if (!omni_grid(r, g, c, 2, ed, start, grid, advance, e)) return false;
      if (!omni_merge(r, g, s, grid, start, audio_len, ed, e)) return false;
      ++c.audio;
      --remain_aud;
      --remain_vid;
    }
    if (!vision || next_token == sc.image_id || next_token == sc.video_id || clip) {
      st += text_len + 2 * marks + audio_len + advance;
    }
    if (!omni_marks(r, g, s, 1, marks, ed, e)) return false;
  }
  if (st < L) {
    OmniNum start;
    if (!omni_next_start(s, st, start, e)) return false;
    if (!omni_push(r, g, s, omni_run(start, L - st), st, e)) return false;
  }
  if (L == 0 || s.total == 0) return fail(e, kEmptySample, -1);
  if (s.total != L && s.total != 1) return fail(e, kLengthMismatch, -1, -1, s.total, L);
  n_parts = s.n_parts;
  total = s.total;
  if (q3) {
    delta = float_bits(add_rn(add_rn(s.top.f, 1.f), -static_cast<float>(L)));
  } else {
    delta = s.top.i + 1 - L;
  }
  return true;
}

// Positions of token o of any part (the omni kinds, or part_position's).
C10_HOST_DEVICE inline void any_position(const Rules& r, const GridLists& g, const Part& p, int64_t o, int64_t& pt,
                                         int64_t& ph, int64_t& pw) {
  if (p.kind >= 4) {
    omni_position(r, g, p, o, pt, ph, pw);
  } else {
    part_position(r, g, p, o, pt, ph, pw);
  }
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
