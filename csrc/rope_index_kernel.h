// rope_index's fused device algorithm, written once over an execution policy X: CUDA instantiates it with one
// block per row and cub block scans (cuda/rope_index.cu); the CPU instantiates it serially (one "thread", trivial
// scans), which is how the tests run this very code without a GPU. Per row:
//   1. the row's attended tokens are compacted, padding slots written, samples delimited;
//   2. per sample, runs of equal kind (or, for 4.57 Qwen-VL, next-token lookups and vision_start pairs) are found
//      with scans; thread 0 walks them into parts exactly as the host loop does (rope_index_walk.h);
//   3. every thread writes the positions of its tokens from the parts (binary search).
// A first pass (count) only counts the images and video entries each row consumes; the second starts each row's grid
// cursor at the sum over the rows before it (grids are consumed in order across the batch). The omni conventions'
// counts are what transformers' token scan announces, which a valid input can consume otherwise (Qwen3-Omni takes a
// clip's video and audio whatever use_audio_in_video says): such a row flags kOmniCounts, and a third pass (repair),
// which does nothing unless a row flagged it, walks every row again one after another, carrying the cursor.
#pragma once

#include "rope_index_walk.h"

#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define ROPEKIT_ROW_FN __device__ __forceinline__
#else
#define ROPEKIT_ROW_FN inline
#endif

namespace ropekit {
namespace rope_index_detail {

struct KernelParams {
  int64_t B = 0, S = 0;
  const int64_t* att = nullptr;  // (B, S): attended flag, or the segment id (packed mask)
  const int64_t* tok = nullptr;  // (B, S): mm_token_type_ids (5.x) or input_ids (4.57)
  const int64_t* cu = nullptr;   // cu_seqlens, or nullptr
  int64_t n_cu = 0;
  bool packed_mask = false;      // samples are runs of equal segment id
  Rules rules;
  GridLists grids;
  int64_t image_id = -1, video_id = -1, vision_start_id = -1, video_start_id = -1, video_end_id = -1;
  int64_t audio_id = -1, audio_start_id = -1;  // omni
  int64_t pad = 0;                 // padding slots: 0 (5.x) or 1 (4.57)
  int64_t axes = 3;                // rows of pos: xdrope's leading axes - 3 rows hold each token's sample index
  bool delta_vs_attended = true;   // 5.x: deltas against the attended tokens; 4.57: against S (unpacked rows)
  // per-row scratch: (B, S + 1) int64 each, and (B, 2S + 1) parts
  int64_t *cols = nullptr, *vals = nullptr, *kinds = nullptr, *run_start = nullptr, *run_len = nullptr,
          *run_kind = nullptr, *next_img = nullptr, *next_vid = nullptr, *run_len_at = nullptr,
          *sample_start = nullptr;
  Part* parts = nullptr;
  int64_t* counts = nullptr;  // (B, 3): images, video entries and audios each row consumes
  int64_t* pos = nullptr;     // (axes, B, S) int64
  int64_t* deltas = nullptr;  // (B,): int64, or (Qwen3-Omni) a float32's bits
  int32_t* error = nullptr;   // (B,): each row's ErrorCode (0 when it has a result)
};

// What a row's threads share (CUDA: __shared__).
struct RowState {
  int64_t n_runs, n_img, n_vid, n_aud, vision_runs;
  bool has_img, has_vid, has_aud;  // omni: the image / video / audio token occurs in the sample
  int64_t n_parts, total, top;
  Cursor cursor;
  int32_t error;
};

// --- scans over index ranges, in tiles of X::kThreads -------------------------------------------------------

// Calls emit(i, k) for the k-th index i in [0, n) (in order) whose flag is set; returns how many (every thread).
template <class X, typename Flag, typename Emit>
ROPEKIT_ROW_FN int64_t compact(X& x, int64_t n, Flag flag, Emit emit) {
  int64_t total = 0;
  for (int64_t tile = 0; tile < n; tile += X::kThreads) {
    const int64_t i = tile + x.tid();
    const int64_t f = (i < n && flag(i)) ? 1 : 0;
    int64_t aggregate;
    const int64_t offset = x.exclusive_sum(f, aggregate);
    if (f) emit(i, total + offset);
    total += aggregate;
  }
  x.sync();  // what emit wrote is visible to every thread
  return total;
}

// out[i] = max(init, value(0), ..., value(i)) for i in [0, n).
template <class X, typename Value>
ROPEKIT_ROW_FN void running_max(X& x, int64_t n, int64_t init, Value value, int64_t* out) {
  int64_t carry = init;
  for (int64_t tile = 0; tile < n; tile += X::kThreads) {
    const int64_t i = tile + x.tid();
    int64_t aggregate;
    const int64_t r = x.inclusive_max(i < n ? value(i) : std::numeric_limits<int64_t>::min(), aggregate);
    if (i < n) out[i] = r > carry ? r : carry;
    carry = aggregate > carry ? aggregate : carry;
  }
  x.sync();
}

// out[i] = the first j >= i in [0, n) with pred(j), or n, for i in [0, n]: tiles from the end, lanes reversed.
template <class X, typename Pred>
ROPEKIT_ROW_FN void next_index(X& x, int64_t n, Pred pred, int64_t* out) {
  constexpr int64_t kNone = std::numeric_limits<int64_t>::max();
  int64_t carry = n;
  for (int64_t end = n; end > 0; end -= X::kThreads) {
    const int64_t i = end - 1 - x.tid();
    int64_t aggregate;
    const int64_t r = x.inclusive_min(i >= 0 && pred(i) ? i : kNone, aggregate);
    if (i >= 0) out[i] = r < carry ? r : carry;
    carry = aggregate < carry ? aggregate : carry;
  }
  if (x.tid() == 0) out[n] = n;
  x.sync();
}

// The sum of value(i) over [0, n); valid in thread 0.
template <class X, typename Value>
ROPEKIT_ROW_FN int64_t sum_over(X& x, int64_t n, Value value) {
  int64_t total = 0;
  for (int64_t tile = 0; tile < n; tile += X::kThreads) {
    const int64_t i = tile + x.tid();
    total += x.sum(i < n ? value(i) : 0);
  }
  return total;
}

ROPEKIT_ROW_FN void set_error(RowState& st, int32_t code) {
  if (st.error == kOk) st.error = code;
}

// Runs of equal kind among kind[0..n) (sample-local): run_start / run_len / run_kind, st.n_runs.
template <class X>
ROPEKIT_ROW_FN void find_runs(X& x, RowState& st, int64_t* kind, int64_t* start, int64_t* len, int64_t* run_kind,
                              int64_t n) {
  const int64_t runs = compact(
      x, n, [&](int64_t i) { return i == 0 || kind[i] != kind[i - 1]; }, [&](int64_t i, int64_t k) { start[k] = i; });
  for (int64_t r = x.tid(); r < runs; r += X::kThreads) {
    len[r] = (r + 1 < runs ? start[r + 1] : n) - start[r];
    run_kind[r] = kind[start[r]];
  }
  if (x.tid() == 0) st.n_runs = runs;
  x.sync();
}

// Whether a cumulative length of cu (sorted) equals `flat`.
ROPEKIT_ROW_FN bool in_sorted(const int64_t* cu, int64_t n, int64_t flat) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (cu[mid] < flat) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo < n && cu[lo] == flat;
}

// kPassCount only records what a row consumes (p.counts); kPassIndex writes its positions, deltas and p.error[b],
// its cursor starting from the counts of the rows before it; kPassRepair (omni) the same with the cursor carried
// over from the row walked before.
enum Pass : int32_t { kPassCount = 0, kPassIndex = 1, kPassRepair = 2 };

// One row b. Omni: the instantiation for the omni conventions (and only them): the other conventions' kernel then
// carries none of the omni walk's registers, and the omni one runs with fewer threads and more registers a thread.

template <class X, bool Omni = false>
ROPEKIT_ROW_FN void index_row(X& x, RowState& st, const KernelParams& p, int64_t b, int32_t pass) {
  const bool count = pass == kPassCount;
  const int64_t S = p.S, B = p.B;
  const int64_t row = b * S, row1 = b * (S + 1);
  const int64_t* att = p.att + row;
  const int64_t* tok = p.tok + row;
  int64_t* cols = p.cols + row1;
  int64_t* vals = p.vals + row1;
  int64_t* kind = p.kinds + row1;
  int64_t* run_start = p.run_start + row1;
  int64_t* run_len = p.run_len + row1;
  int64_t* run_kind = p.run_kind + row1;
  int64_t* sample_start = p.sample_start + row1;
  Part* parts = p.parts + b * (2 * S + 1);
  if (x.tid() == 0) {
    st.error = kOk;
    st.vision_runs = 0;
    if (pass != kPassRepair) st.cursor = Cursor{};  // repair: carried over from the row before (row 0: zero)
    if (pass == kPassIndex) {
      for (int64_t r = 0; r < b; ++r) {  // grids (and audios) the rows before this one consume
        st.cursor.image += p.counts[3 * r];
        st.cursor.video += p.counts[3 * r + 1];
        st.cursor.audio += p.counts[3 * r + 2];
      }
    }
  }
  x.sync();

  // 1. attended tokens, in order; padding slots; samples (the row's attended tokens, or each packed segment)
  const int64_t L = compact(
      x, S, [&](int64_t s) { return att[s] != 0; },
      [&](int64_t s, int64_t k) {
        cols[k] = s;
        vals[k] = tok[s];
      });
  if (!count) {
    for (int64_t s = x.tid(); s < S; s += X::kThreads) {
      if (att[s] != 0) continue;
      for (int64_t axis = 0; axis < p.axes; ++axis) p.pos[axis * B * S + row + s] = p.pad;
    }
  }
  const int64_t n_samples = compact(
      x, L,
      [&](int64_t i) {
        if (i == 0) return true;
        if (p.packed_mask) return att[cols[i]] != att[cols[i - 1]] || cols[i] != cols[i - 1] + 1;
        if (p.cu != nullptr) return in_sorted(p.cu, p.n_cu, row + cols[i]);  // a cumulative length points here
        return false;
      },
      [&](int64_t i, int64_t k) { sample_start[k] = i; });
  if (x.tid() == 0) {
    if (n_samples == 0) set_error(st, kEmptySample);
    // a packed sample must not run on from the previous row
    if (p.cu != nullptr && L > 0 && cols[0] == 0 && !in_sorted(p.cu, p.n_cu, row)) set_error(st, kEmptySample);
  }
  x.sync();

  const Rules& r = p.rules;
  int64_t counted_images = 0, counted_videos = 0, counted_audios = 0;  // thread 0
  for (int64_t q = 0; q < n_samples && st.error == kOk; ++q) {
    const int64_t lo = sample_start[q], hi = q + 1 < n_samples ? sample_start[q + 1] : L, n = hi - lo;
    const int64_t* v = vals + lo;
    // 2. the sample's runs (or the 4.57 / Omni scans' lookups)
    if constexpr (Omni) {
      // next_img / next_vid / run_len_at: the next image / video / audio token (Qwen3-Omni: vision_start, -,
      // audio_start) at or after each index
      const bool q3 = r.convention == kOmni3;
      const int64_t a_id = q3 ? p.vision_start_id : p.image_id, c_id = q3 ? p.audio_start_id : p.audio_id;
      next_index(x, n, [&](int64_t i) { return v[i] == a_id; }, p.next_img + row1);
      next_index(x, n, [&](int64_t i) { return v[i] == p.video_id; }, p.next_vid + row1);
      next_index(x, n, [&](int64_t i) { return v[i] == c_id; }, p.run_len_at + row1);
      for (int64_t i = x.tid(); i < n; i += X::kThreads) {
        if (v[i] == p.vision_start_id && i + 1 >= n) set_error(st, kVisionStartAtEnd);
      }
      x.sync();
      const int64_t follow = r.audio_in_video ? p.audio_start_id : p.video_id;
      const auto after_start = [&](int64_t i, int64_t id) {
        return v[i] == p.vision_start_id && i + 1 < n && v[i + 1] == id ? 1 : 0;
      };
      const int64_t n_img = sum_over(x, n, [&](int64_t i) { return after_start(i, p.image_id); });
      const int64_t n_vid = sum_over(x, n, [&](int64_t i) { return after_start(i, follow); });
      const int64_t n_aud = sum_over(x, n, [&](int64_t i) { return v[i] == p.audio_start_id ? 1 : 0; });
      const int64_t any_img = sum_over(x, n, [&](int64_t i) { return v[i] == p.image_id ? 1 : 0; });
      const int64_t any_vid = sum_over(x, n, [&](int64_t i) { return v[i] == p.video_id ? 1 : 0; });
      const int64_t any_aud = sum_over(x, n, [&](int64_t i) { return v[i] == p.audio_id ? 1 : 0; });
      if (x.tid() == 0) {
        st.n_img = n_img;
        st.n_vid = n_vid;
        st.n_aud = n_aud;
        st.has_img = any_img > 0;
        st.has_vid = any_vid > 0;
        st.has_aud = any_aud > 0;
      }
    } else if (r.convention == kVisionStart) {
      next_index(x, n, [&](int64_t i) { return v[i] == p.image_id; }, p.next_img + row1);
      next_index(x, n, [&](int64_t i) { return v[i] == p.video_id; }, p.next_vid + row1);
      for (int64_t i = x.tid(); i < n; i += X::kThreads) {
        kind[i] = v[i] == p.video_id ? 2 : v[i] == p.image_id ? 1 : 0;
        if (v[i] == p.vision_start_id && i + 1 >= n) set_error(st, kVisionStartAtEnd);
      }
      x.sync();
      const int64_t n_img = sum_over(x, n, [&](int64_t i) {
        return v[i] == p.vision_start_id && i + 1 < n && v[i + 1] == p.image_id ? 1 : 0;
      });
      const int64_t n_vid = sum_over(x, n, [&](int64_t i) {
        return v[i] == p.vision_start_id && i + 1 < n && v[i + 1] == p.video_id ? 1 : 0;
      });
      if (x.tid() == 0) {
        st.n_img = n_img;
        st.n_vid = n_vid;
      }
      if (r.strict) {  // vision runs, for the comparison with the scan's blocks
        find_runs(x, st, kind, run_start, run_len, run_kind, n);
        for (int64_t i = x.tid(); i <= n; i += X::kThreads) p.run_len_at[row1 + i] = 0;
        x.sync();
        for (int64_t k = x.tid(); k < st.n_runs; k += X::kThreads) {
          if (run_kind[k] != 0) p.run_len_at[row1 + run_start[k]] = run_len[k];
        }
        const int64_t vision_runs = sum_over(x, st.n_runs, [&](int64_t k) { return run_kind[k] != 0 ? 1 : 0; });
        if (x.tid() == 0) st.vision_runs = vision_runs;
      }
    } else {
      if (r.convention == kVideoBrackets) {  // inside [video_start, video_end], start winning a tie
        running_max(x, n, int64_t{-1}, [&](int64_t i) { return v[i] == p.video_start_id ? i : int64_t{-1}; },
                    run_len);
        running_max(x, n, int64_t{-1}, [&](int64_t i) { return v[i] == p.video_end_id ? i : int64_t{-1}; },
                    run_kind);
        for (int64_t i = x.tid(); i < n; i += X::kThreads) {
          const bool in_video = run_len[i] >= 0 && run_len[i] >= run_kind[i];
          kind[i] = v[i] == p.image_id ? (in_video ? 2 : 1) : 0;
        }
      } else {
        for (int64_t i = x.tid(); i < n; i += X::kThreads) kind[i] = v[i];
      }
      x.sync();
      find_runs(x, st, kind, run_start, run_len, run_kind, n);
      const int64_t runs = st.n_runs;
      const int64_t n_img = sum_over(x, runs, [&](int64_t k) { return run_kind[k] == 1 ? 1 : 0; });
      const int64_t n_vid = sum_over(x, runs, [&](int64_t k) { return run_kind[k] == 2 ? 1 : 0; });
      if (x.tid() == 0) {
        st.n_img = n_img;
        st.n_vid = n_vid;
      }
    }
    x.sync();
    if (count) {
      if (x.tid() == 0) {
        counted_images += st.n_img;
        counted_videos += st.n_vid;
        if constexpr (Omni) counted_audios += st.n_aud;
      }
      continue;
    }

    // 3. thread 0 walks the sample into parts, as the host loop does
    if (x.tid() == 0) {
      ErrorInfo e;
      st.n_parts = st.total = st.top = 0;
      bool ok;
      int64_t omni_delta = 0;
      if constexpr (Omni) {
        OmniScan sc;
        sc.tokens = v;
        sc.next_a = p.next_img + row1;
        sc.next_b = p.next_vid + row1;
        sc.next_c = p.run_len_at + row1;
        sc.image_id = p.image_id;
        sc.video_id = p.video_id;
        sc.has_img = st.has_img;
        sc.has_vid = st.has_vid;
        sc.has_aud = st.has_aud;
        sc.n_img = st.n_img;
        sc.n_vid = st.n_vid;
        sc.n_aud = st.n_aud;
        const Cursor before = st.cursor;
        ok = walk_omni(r, p.grids, st.cursor, sc, n, parts, 2 * S + 1, st.n_parts, st.total, omni_delta, e);
        // each row's cursor starts where the counts of the rows before it say: they must be what it consumes
        if (ok && pass == kPassIndex &&
            (st.cursor.image - before.image != st.n_img || st.cursor.video - before.video != st.n_vid ||
             st.cursor.audio - before.audio != st.n_aud)) {
          ok = fail(e, kOmniCounts, -1);
        }
      } else if (r.convention == kVisionStart) {
        ok = walk_vision_start(r, p.grids, st.cursor, n, p.next_img + row1, p.next_vid + row1, p.run_len_at + row1,
                               st.vision_runs, st.n_img, st.n_vid, parts, st.n_parts, st.total, e);
      } else if (r.convention == kXdRope) {
        ok = walk_xd(r, p.grids, st.cursor, run_start, run_len, run_kind, st.n_runs, parts, st.n_parts, st.total, e);
      } else {
        ok = walk_runs(r, p.grids, st.cursor, run_start, run_len, run_kind, st.n_runs, parts, st.n_parts, st.total,
                       e);
      }
      if (!Omni && ok) ok = finish_sample(r, p.grids, parts, st.n_parts, st.total, n, st.top, e);
      if (ok && p.axes > 3 && n - 1 > st.top) st.top = n - 1;  // the leading rows' sample indices
      if (!ok) {
        set_error(st, e.code);
      } else if (Omni) {
        p.deltas[b] = omni_delta;  // against the sample's own length (the row's last sample's, when packed)
      } else if (p.cu != nullptr || p.packed_mask) {
        p.deltas[b] = st.top + 1 - n;  // the row's last sample's
      } else {
        p.deltas[b] = st.top + 1 - (p.delta_vs_attended ? n : S);
      }
    }
    x.sync();
    if (st.error != kOk) break;
    // 4. positions of the sample's tokens
    for (int64_t i = x.tid(); i < n; i += X::kThreads) {
      const int64_t key = st.total == 1 ? 0 : i;
      const Part& part = parts[find_part(parts, st.n_parts, key)];
      int64_t pt, ph, pw;
      if constexpr (Omni) {
        omni_position(r, p.grids, part, key - part.start, pt, ph, pw);
      } else {
        part_position(r, p.grids, part, key - part.start, pt, ph, pw);
      }
      const int64_t s = cols[lo + i];
      const int64_t lead_axes = p.axes - 3;
      for (int64_t axis = 0; axis < lead_axes; ++axis) p.pos[axis * B * S + row + s] = i;
      p.pos[lead_axes * B * S + row + s] = pt;
      p.pos[(lead_axes + 1) * B * S + row + s] = ph;
      p.pos[(lead_axes + 2) * B * S + row + s] = pw;
    }
    x.sync();
  }
  if (x.tid() == 0) {
    if (count) {
      p.counts[3 * b] = counted_images;
      p.counts[3 * b + 1] = counted_videos;
      p.counts[3 * b + 2] = counted_audios;
    }
    p.error[b] = st.error;
  }
}

// The omni repair pass over the whole batch (one block): nothing unless a row flagged kOmniCounts; then every row
// again, in order, the grid cursor carried from row to row.
template <class X>
ROPEKIT_ROW_FN void repair_rows(X& x, RowState& st, const KernelParams& p, bool& needed) {
  if (x.tid() == 0) {
    needed = false;
    for (int64_t b = 0; b < p.B; ++b) needed = needed || p.error[b] == kOmniCounts;
    st.cursor = Cursor{};
  }
  x.sync();
  if (!needed) return;
  for (int64_t b = 0; b < p.B; ++b) index_row<X, true>(x, st, p, b, kPassRepair);
}

}  // namespace rope_index_detail
}  // namespace ropekit
