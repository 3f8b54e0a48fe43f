// Building blocks of the vectorised CUDA kernels (apply_rope, qk_norm_rope): 16-byte accesses, lane groups that
// share a row, the rotate-half partner across lanes, and the host-side test of whether a shape can take this path.
//
// Layout. A row (one head of one token) of head_dim D is split across a group of G = D / E lanes, lane `sub` holding
// elements [sub*E, sub*E + E). E is the number of elements that makes the narrowest dtype a row touches move 16
// bytes per lane (8 for bf16/fp16, 4 for fp32), or 8 bytes where 16 do not divide the row or its rotary halves (the
// vision towers' head dim 72 in bf16, whose halves are 36 elements); wider dtypes of the same row (fp32 cos under
// autocast, an fp32 output) move twice that per lane. A warp holds 32 / G rows side by side (D = 128 in bf16: half a warp per row).
// Where G is a power of two up to 32 the warp is full and the groups can reduce by butterfly (qk_norm_rope's RMS
// sum); apply_rope also takes any other G up to 32 (D = 80 in bf16: G = 10, three rows per warp, two lanes idle).
// The rotate-half partner of element j < R/2 is j + R/2, which lives in lane sub + (R/2)/E of the same group: it
// comes across by shuffle. GPT-J pairs (2i, 2i+1) sit in one lane.
#pragma once

#include "../rope_common.h"

#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace ropekit {
namespace vec {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kVecBytes = 16;

// E for a row whose narrowest dtype is T, at kLaneBytes (16, or 8) per lane.
template <typename T, int kLaneBytes = kVecBytes>
constexpr int elems_per_lane() {
  return kLaneBytes / static_cast<int>(sizeof(T));
}

template <typename A, typename B, int kLaneBytes = kVecBytes>
constexpr int elems_per_lane() {
  return elems_per_lane<std::conditional_t<(sizeof(A) < sizeof(B)), A, B>, kLaneBytes>();
}

template <typename A, typename B, typename C>
constexpr int elems_per_lane() {
  return elems_per_lane<std::conditional_t<(sizeof(A) < sizeof(B)), A, B>, C>();
}

// N elements of T moved as 16-byte units, or as one 8-byte unit (N * sizeof(T) is 8 or a multiple of 16 whenever N
// is an E above).
template <typename T, int N>
struct alignas(N * sizeof(T) >= kVecBytes ? kVecBytes : N * sizeof(T)) Vec {
  static_assert((N * sizeof(T)) % kVecBytes == 0 || N * sizeof(T) == 8, "a lane moves 8 bytes or whole 16-byte units");
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load(const T* p, T (&out)[N]) {
  const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = v.v[i];
}

// Loads N elements and widens them to the accumulation type.
template <typename acc, typename T, int N>
__device__ __forceinline__ void load_acc(const T* p, acc (&out)[N]) {
  T raw[N];
  load(p, raw);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<acc>(raw[i]);
}

// A 16-byte global store that the compiler cannot split (a plain struct store came out as four 4-byte stores
// when the same values were stored twice, in the gather). Weak (default) semantics, like a plain store.
__device__ __forceinline__ void store_16(void* p, const uint4& w) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(w.x), "r"(w.y), "r"(w.z), "r"(w.w)
               : "memory");
}

// An 8-byte global store, for lanes of 8 bytes.
__device__ __forceinline__ void store_8(void* p, const uint2& w) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};" ::"l"(p), "r"(w.x), "r"(w.y) : "memory");
}

// Rounds N accumulators to T and stores them as 16-byte words (or one 8-byte word).
template <typename T, typename acc, int N>
__device__ __forceinline__ void store_acc(T* p, const acc (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(in[i]);
  if constexpr (sizeof(v) == 8) {
    uint2 word;
    memcpy(&word, &v, sizeof(v));
    store_8(p, word);
  } else {
    constexpr int kWords = static_cast<int>(sizeof(v) / sizeof(uint4));
    uint4 words[kWords];
    memcpy(words, &v, sizeof(v));
#pragma unroll
    for (int i = 0; i < kWords; ++i) store_16(reinterpret_cast<uint4*>(p) + i, words[i]);
  }
}

// Sum over the G lanes of a group (G a power of two): xor offsets G/2 .. 1 stay inside the group. Every lane of the
// warp must call it (the rows of idle lanes contribute zeros). Branch-free: all five butterfly steps run and those
// at or past G add zero, so the shuffles need no divergence checks. The order is fixed: reproducible results.
template <typename acc>
__device__ __forceinline__ acc group_sum(acc v, int group) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const acc other = __shfl_xor_sync(kFullMask, v, offset);
    v += offset < group ? other : acc(0);
  }
  return v;
}

// Sum over the 32 / G row slots of a warp for each lane position in the group (xor offsets 16 .. G).
template <typename acc>
__device__ __forceinline__ acc slot_sum(acc v, int group) {
  for (int offset = 16; offset >= group; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Shuffles N values of T from src_lane as 32-bit words (two bf16 values per word).
template <typename T, int N>
__device__ __forceinline__ void shuffle(T (&v)[N], int src_lane) {
  static_assert((N * sizeof(T)) % 4 == 0, "whole 32-bit words");
  constexpr int kWords = static_cast<int>(N * sizeof(T) / 4);
  uint32_t w[kWords];
  memcpy(w, v, sizeof(w));
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_sync(kFullMask, w[i], src_lane);
  memcpy(v, w, sizeof(w));
}

// Where this lane sits: `sub` in its row group, `slot` = which of the warp's 32 / G rows, and (neox) the lane that
// holds its rotate-half partner. Lanes past the rotary channels get themselves as partner (value unused). When G
// does not divide 32 the last 32 % G lanes hold no row (`active` false): they take part in the shuffles only.
struct LaneGeometry {
  int group, sub, slot, rows_per_warp, j0, partner_lane;
  bool first_half, rotary, active;

  __device__ __forceinline__ LaneGeometry(int lane, int group_, int elems, int64_t rot_dim) {
    group = group_;
    slot = lane / group;
    sub = lane - slot * group;
    rows_per_warp = 32 / group;
    active = slot < rows_per_warp;
    j0 = sub * elems;
    const int half_lanes = static_cast<int>(rot_dim / 2) / elems;  // neox: rot_dim / 2 is a multiple of elems
    first_half = sub < half_lanes;
    rotary = j0 < rot_dim;
    const int partner = first_half ? sub + half_lanes : (rotary ? sub - half_lanes : sub);
    partner_lane = active ? slot * group + partner : lane;
  }
};

// A token's rows are its q heads, then its k heads; `row(r)` points at row r's first element of this lane in
// whichever of the two it falls. T is const-qualified for inputs.
template <typename T>
struct QkRows {
  T* q;
  int64_t q_stride;
  T* k;
  int64_t k_stride;
  int q_heads;

  __device__ __forceinline__ T* row(int r) const { return r < q_heads ? q + r * q_stride : k + (r - q_heads) * k_stride; }
};

// Loads this lane's E elements of the U rows that iterations [it, it + U) give its slot (row (it + u) *
// rows_per_warp + slot), with zeros for iterations at or past it_end and rows at or past `rows`: those lanes still
// take part in the shuffles and group sums. All U loads are issued before any is used.
template <int U, typename T, int E>
__device__ __forceinline__ void load_rows(const LaneGeometry& g, int it, int it_end, int rows,
                                          const QkRows<const T>& src, T (&out)[U][E]) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int row = (it + u) * g.rows_per_warp + g.slot;
    if (g.active && it + u < it_end && row < rows) {
      load(src.row(row), out[u]);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) out[u][e] = T(0);
    }
  }
}

// out = x*cos + rot(x)*sin (forward) or its transpose g*cos + rot^T(g*sin) (backward) for this lane's E elements,
// each product and the sum rounded once (rotate_pair). neox: the partner's value comes across by shuffle, and in
// the backward the partner sends its own product g*sin (the transpose reads the partner's sin). GPT-J: pairs
// (2i, 2i+1) are inside the lane; elements at or past rot_dim pass through. Every lane of the warp must call it.
// `Wire` is the type that crosses lanes: the forward's x may be exactly representable in a narrower type (a
// normalised bf16 value), which halves the shuffles; the backward's products need acc.
// The signs of rotate_half fold into the sin: with s' = -s in the first half and +s in the second, the forward is
// o = x c + x_partner s' (o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2) and the backward sends g s' to the partner, which
// adds it (o1 = g1 c1 + g2 s2, o2 = g2 c2 - g1 s1). Negating a factor negates the rounded product exactly.
template <typename acc>
__device__ __forceinline__ acc signed_sin(const LaneGeometry& g, acc s) {
  return g.first_half ? -s : s;
}

// rotate_lane_sent takes the values to send ready-made (the forward of qk_norm_rope has its normalised values
// packed as bf16 pairs already); rotate_lane makes them.
template <bool kBackward, bool kNeox, typename Wire, typename acc, int E>
__device__ __forceinline__ void rotate_lane_sent(const LaneGeometry& g, int64_t rot_dim, const acc (&x)[E],
                                                 const acc (&c)[E], const acc (&s)[E], Wire (&sent)[E],
                                                 acc (&out)[E]) {
  if constexpr (kNeox) {
    shuffle(sent, g.partner_lane);
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const acc term = kBackward ? static_cast<acc>(sent[e]) : mul_rn(static_cast<acc>(sent[e]), signed_sin(g, s[e]));
      const acc o = g.rotary ? add_rn(mul_rn(x[e], c[e]), term) : x[e];
      out[e] = kBackward ? as_accumulated(o) : o;
    }
  } else {
#pragma unroll
    for (int e = 0; e < E; e += 2) {
      if (g.j0 + e < rot_dim) {
        rotate_pair<kBackward, acc>(x[e], x[e + 1], c[e], c[e + 1], s[e], s[e + 1], out[e], out[e + 1]);
      } else {
        out[e] = kBackward ? as_accumulated(x[e]) : x[e];
        out[e + 1] = kBackward ? as_accumulated(x[e + 1]) : x[e + 1];
      }
    }
  }
}

template <bool kBackward, bool kNeox, typename Wire, typename acc, int E>
__device__ __forceinline__ void rotate_lane(const LaneGeometry& g, int64_t rot_dim, const acc (&x)[E],
                                            const acc (&c)[E], const acc (&s)[E], acc (&out)[E]) {
  Wire sent[E];
  if constexpr (kNeox) {
#pragma unroll
    for (int e = 0; e < E; ++e) sent[e] = static_cast<Wire>(kBackward ? mul_rn(x[e], signed_sin(g, s[e])) : x[e]);
  }
  rotate_lane_sent<kBackward, kNeox>(g, rot_dim, x, c, s, sent, out);
}

// How the rows of all tokens are dealt to warps (host-computed, passed by value).
struct Schedule {
  int group;            // G: lanes per row
  int iters_per_token;  // ceil(rows per token / (32 / G)): a token's rows are visited 32 / G at a time
  int iters_per_part;   // iterations per work item
  int parts;            // work items per token
  int64_t items;        // tokens * parts: one warp each
};

// Which rows a warp runs: work item w is part `w % parts` of token `w / parts`; a token's rows are its q heads then
// its k heads, visited 32 / G at a time ("iterations"); a part is a run of `iters_per_part` iterations.
struct WarpWork {
  int64_t token;
  int it_begin, it_end;
};

__device__ __forceinline__ WarpWork warp_work(int64_t item, int parts, int iters_per_part, int iters_per_token) {
  WarpWork w;
  w.token = item / parts;
  const int part = static_cast<int>(item - w.token * parts);
  w.it_begin = part * iters_per_part;
  w.it_end = min(iters_per_token, w.it_begin + iters_per_part);
  return w;
}

}  // namespace vec

// ---------------------------------------------------------------------------------------------------------------
// Host side: may a tensor be read / written with 16-byte accesses from its data pointer and these strides?

inline bool aligned_16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % vec::kVecBytes == 0; }

inline bool aligned_to(const void* ptr, int64_t bytes) { return reinterpret_cast<std::uintptr_t>(ptr) % bytes == 0; }

// Whether every stride (in elements of elem_size bytes) keeps `bytes`-byte alignment.
inline bool strides_aligned(std::initializer_list<int64_t> strides, int64_t elem_size, int64_t bytes) {
  for (int64_t s : strides) {
    if ((s * elem_size) % bytes != 0) return false;
  }
  return true;
}

inline bool strides_aligned_16(std::initializer_list<int64_t> strides, int64_t elem_size) {
  return strides_aligned(strides, elem_size, vec::kVecBytes);
}

// Lanes per row for head_dim d and E elements per lane: a power of two up to 32 (or, `any_group`, any count up to
// 32), or 0 when d does not split so.
inline int lanes_per_row(int64_t d, int elems, bool any_group = false) {
  if (d <= 0 || d % elems != 0) return 0;
  const int64_t g = d / elems;
  return (g <= 32 && (any_group || (g & (g - 1)) == 0)) ? static_cast<int>(g) : 0;
}

// The rotary layout the vector path handles: rot_dim a multiple of E (neox: R/2 too, so partners align by lane).
inline bool rotary_vectorizable(int64_t rot_dim, int elems, bool is_neox) {
  return is_neox ? (rot_dim / 2) % elems == 0 : rot_dim % elems == 0;
}

// A warp per token when there are enough tokens to fill the GPU (cos/sin and the norm weights are then read once
// per token); otherwise a token's rows are split into parts so that every SM gets warps (decode: B64 S1 has 64
// tokens, each 20 iterations with Qwen3-8B's 40 rows at D 128).
// sm_count 0 keeps whole tokens per warp.
inline vec::Schedule make_schedule(int64_t tokens, int64_t rows_per_token, int group, int sm_count) {
  vec::Schedule sch{};
  const int rows_per_warp = 32 / group;
  sch.group = group;
  sch.iters_per_token = static_cast<int>((rows_per_token + rows_per_warp - 1) / rows_per_warp);
  int64_t per_part = sch.iters_per_token;  // sm_count 0: whole tokens
  if (sm_count > 0) {
    const int64_t target_warps = int64_t(sm_count) * 32, total_iters = tokens * sch.iters_per_token;
    per_part = std::min<int64_t>(per_part, std::max<int64_t>(1, (total_iters + target_warps - 1) / target_warps));
  }
  sch.iters_per_part = static_cast<int>(per_part);
  sch.parts = (sch.iters_per_token + sch.iters_per_part - 1) / sch.iters_per_part;
  sch.items = tokens * sch.parts;
  return sch;
}

}  // namespace ropekit
