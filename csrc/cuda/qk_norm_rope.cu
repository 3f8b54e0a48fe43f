// qk_norm_rope on CUDA: per-head RMSNorm + RoPE of q and k in one pass, forward and backward.
//
// Fast path (bf16 / fp16 / fp32 rows that split into 16-byte lanes, see rope_vec.cuh): G = D / E lanes per row
// (D = 128 bf16: half a warp), E elements per lane held in registers.
//   forward: a warp takes one token (or a part of its rows when there are few tokens, as at decode). It loads its
//     lanes' cos/sin and both norm weights once, then walks the token's q and k rows 32 / G at a time with kUnroll
//     iterations of 16-byte loads in flight; the sum of squares is reduced across the row's lanes by shuffles, the
//     rotate-half partner comes across by shuffle. One launch covers q and k (the decode path).
//   backward: the same layout; x and the incoming gradient are loaded together. Each lane sums its E weight-gradient
//     entries (q and k) over its tokens in registers; the block reduces them over row slots (shuffles) and warps
//     (shared memory) in a fixed order into one partial per kTokensPerBlock tokens.
// Generic path (fp64, a head_dim that does not split into 16-byte lanes, unaligned views): a warp per row, scalar
//   accesses, no shared memory. Rows are processed pair by pair, so each element is read and written by one lane
//   (in-place safe). Weight-gradient partials are one row per warp, accumulated in a fixed order.
// The weight gradients finish in sum_partials_kernel: a parallel fixed-order sum of the partials (two levels, the
// last block to finish adds the second). No float atomics anywhere: two runs give the same bits.
// The host picks the path once per call (can_vectorize); both paths compute the same function.
#include "../qk_norm_rope.h"
#include "rope_vec.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace ropekit {
namespace {

constexpr int kWarps = 4;  // warps per block, fast path (small blocks pack the register file tightly)
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;  // forward: row iterations with loads in flight per lane
constexpr int kBackwardUnroll = 2;  // backward: two loads per row, so half the iterations
constexpr int kTokensPerWarp = 4;  // backward: tokens a warp sums into its block's partial
constexpr int kTokensPerBlock = kWarps * kTokensPerWarp;
constexpr int kGenericWarps = 4;  // generic path
constexpr int64_t kMaxGenericBlocks = 1024;  // fixed, so the generic backward's partials do not depend on the GPU

struct Operand {
  const void* in;  // rows (B, S, H, D) through strides; in elements
  void* out;
  int heads;
  int64_t in_sb, in_ss, in_sh;
  int64_t out_sb, out_ss, out_sh;
};

struct Params {
  Operand q, k;
  const void* q_weight;
  const void* k_weight;
  const void* cos;
  const void* sin;
  int64_t seq, tokens, cos_sb, cos_ss;
  int head_dim, rot_dim;
  double eps, inv_head_dim;  // mean(x^2) = sum * (1 / head_dim), as PyTorch's CUDA mean scales its sum
};

Operand make_operand(const RopeOperand& op) {
  return {op.in_ptr,        op.out_ptr,       static_cast<int>(op.heads), op.in_stride_b, op.in_stride_s,
          op.in_stride_h,   op.out_stride_b,  op.out_stride_s,            op.out_stride_h};
}

Params make_params(const NormRopeArgs& a, const NormRopeArgs* grads = nullptr) {
  const NormRopeArgs& src = grads ? *grads : a;
  return {make_operand(src.q), make_operand(src.k), a.q_weight.data_ptr(), a.k_weight.data_ptr(),
          a.cos.data_ptr(),    a.sin.data_ptr(),    a.seq,    a.batch * a.seq, a.cos_stride_b,
          a.cos_stride_s,      static_cast<int>(a.head_dim), static_cast<int>(a.rot_dim), a.eps,
          a.head_dim > 0 ? 1.0 / static_cast<double>(a.head_dim) : 0.0};
}

template <typename T>
__device__ __forceinline__ const T* row_ptr(const Operand& op, int64_t b, int64_t s) {
  return static_cast<const T*>(op.in) + b * op.in_sb + s * op.in_ss;
}

template <typename T>
__device__ __forceinline__ T* out_row_ptr(const Operand& op, int64_t b, int64_t s) {
  return static_cast<T*>(op.out) + b * op.out_sb + s * op.out_ss;
}

// mean(x^2) + eps with eager's two roundings (PyTorch's mean scales its sum, then `+ eps` is its own kernel): the
// intrinsics keep nvcc from contracting them into one FMA, which would round once and differ from eager by an ulp.
__device__ __forceinline__ float mean_plus_eps(float sumsq, double inv_n, double eps) {
  return __fadd_rn(__fmul_rn(sumsq, static_cast<float>(inv_n)), static_cast<float>(eps));
}
__device__ __forceinline__ double mean_plus_eps(double sumsq, double inv_n, double eps) {
  return __dadd_rn(__dmul_rn(sumsq, inv_n), eps);
}

template <typename acc>
__device__ __forceinline__ acc rstd_of(acc sumsq, const Params& p) {
  return rsqrt(mean_plus_eps(sumsq, p.inv_head_dim, p.eps));  // rsqrtf for fp32, as torch.rsqrt on CUDA
}

// Qwen3's normalisation of a pair of 16-bit activations with 16-bit weights, y = rd16(w * rd16(x * rstd)), with the
// weight product as one bf16x2 / half2 multiply: the fp32 product of two 16-bit values is exact, so rounding it
// (eager's fp32 multiply, then cast) equals the packed multiply's round-to-nearest. The packed result is also the
// value the rotate-half partner receives.
template <typename T>
struct Pair16;
template <>
struct Pair16<c10::BFloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type pack(float a, float b) { return __floats2bfloat162_rn(a, b); }
  static __device__ __forceinline__ float2 unpack(type v) { return __bfloat1622float2(v); }
};
template <>
struct Pair16<c10::Half> {
  using type = __half2;
  static __device__ __forceinline__ type pack(float a, float b) { return __floats2half2_rn(a, b); }
  static __device__ __forceinline__ float2 unpack(type v) { return __half22float2(v); }
};

template <typename Types>
constexpr bool kPackedNorm = !Types::zero_centered && std::is_same_v<typename Types::w_t, typename Types::in_t> &&
                             (std::is_same_v<typename Types::in_t, c10::BFloat16> ||
                              std::is_same_v<typename Types::in_t, c10::Half>);

// ---------------------------------------------------------------------------------------------------------------
// Fast path

using VecSchedule = vec::Schedule;

// kMinBlocks: __launch_bounds__' minimum resident blocks per SM (4 or 5 for same-dtype bf16 / fp16, chosen at run
// time by cuda_forward_min_blocks(); 4 otherwise). Register allocation only: both give the same bits.
template <typename Types, bool kNeox, int kMinBlocks = 4>
__global__ void __launch_bounds__(kThreads, kMinBlocks) qk_norm_rope_vec_kernel(const Params p,
                                                                                const VecSchedule sch) {
  using in_t = typename Types::in_t;
  using w_t = typename Types::w_t;
  using cs_t = typename Types::cs_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  constexpr int E = vec::elems_per_lane<in_t, out_t>();

  const int64_t item = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  if (item >= sch.items) return;  // warp-uniform
  const vec::LaneGeometry g(threadIdx.x % 32, sch.group, E, p.rot_dim);
  const vec::WarpWork w = vec::warp_work(item, sch.parts, sch.iters_per_part, sch.iters_per_token);
  const int64_t b = w.token / p.seq, s = w.token - b * p.seq;

  // cos/sin widened once per token; the norm weights kept in their own dtype (as packed pairs on the packed path).
  acc c[E] = {}, sn[E] = {};
  if (g.rotary) {
    const int64_t cos_row = b * p.cos_sb + s * p.cos_ss + g.j0;
    vec::load_acc(static_cast<const cs_t*>(p.cos) + cos_row, c);
    vec::load_acc(static_cast<const cs_t*>(p.sin) + cos_row, sn);
  }
  w_t wq_raw[E], wk_raw[E];
  vec::load(static_cast<const w_t*>(p.q_weight) + g.j0, wq_raw);
  vec::load(static_cast<const w_t*>(p.k_weight) + g.j0, wk_raw);
  const vec::QkRows<const in_t> in{row_ptr<in_t>(p.q, b, s) + g.j0, p.q.in_sh, row_ptr<in_t>(p.k, b, s) + g.j0,
                                   p.k.in_sh, p.q.heads};
  // `out` may alias `in` (in-place qkv): each lane reads its own elements before it writes them, nothing else.
  const vec::QkRows<out_t> out{out_row_ptr<out_t>(p.q, b, s) + g.j0, p.q.out_sh, out_row_ptr<out_t>(p.k, b, s) + g.j0,
                               p.k.out_sh, p.q.heads};
  const int rows = p.q.heads + p.k.heads;

  for (int it = w.it_begin; it < w.it_end; it += kUnroll) {
    in_t x_raw[kUnroll][E];
    vec::load_rows(g, it, w.it_end, rows, in, x_raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = (it + u) * g.rows_per_warp + g.slot;
      const bool valid = it + u < w.it_end && row < rows, is_q = row < p.q.heads;
      acc x[E], sumsq = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        x[e] = static_cast<acc>(x_raw[u][e]);
        sumsq += mul_rn(x[e], x[e]);
      }
      const acc rstd = rstd_of(vec::group_sum(sumsq, g.group), p);
      acc y[E], o[E];
      if constexpr (kPackedNorm<Types>) {
        using P = Pair16<in_t>;
        typename P::type wire[E / 2];
#pragma unroll
        for (int e = 0; e < E; e += 2) {
          typename P::type wq2, wk2;
          memcpy(&wq2, &wq_raw[e], sizeof(wq2));
          memcpy(&wk2, &wk_raw[e], sizeof(wk2));
          wire[e / 2] = __hmul2(P::pack(mul_rn(x[e], rstd), mul_rn(x[e + 1], rstd)), is_q ? wq2 : wk2);
          const float2 yy = P::unpack(wire[e / 2]);
          y[e] = yy.x;
          y[e + 1] = yy.y;
        }
        in_t sent[E];
        memcpy(sent, wire, sizeof(sent));
        vec::rotate_lane_sent<false, kNeox>(g, p.rot_dim, y, c, sn, sent, o);
      } else {
#pragma unroll
        for (int e = 0; e < E; ++e) {
          // Select values, not arrays: a conditional lvalue of two register arrays sends them to local memory.
          y[e] = normed<Types>(x[e], rstd, is_q ? static_cast<acc>(wq_raw[e]) : static_cast<acc>(wk_raw[e]));
        }
        vec::rotate_lane<false, kNeox, typename Types::norm_t>(g, p.rot_dim, y, c, sn, o);  // y is norm_t-valued
      }
      if (valid) {
        vec::store_acc(out.row(row), o);
      }
    }
  }
}

// Backward, fast path. p: q / k rows (x); grad: incoming gradients as `in`, dq / dk as `out`. Block b sums the
// weight gradients of tokens [b * kTokensPerBlock, (b + 1) * kTokensPerBlock) into partials[b] = [dwq | dwk].
template <typename Types, bool kNeox>
__global__ void __launch_bounds__(kThreads, 4) qk_norm_rope_backward_vec_kernel(
    const Params p, const Params grad, const VecSchedule sch, typename Types::acc* __restrict__ partials,
    unsigned int* __restrict__ done_counter) {
  using in_t = typename Types::in_t;
  using w_t = typename Types::w_t;
  using cs_t = typename Types::cs_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  constexpr int E = vec::elems_per_lane<in_t, out_t>();
  // Weight-gradient sums, one [dwq | dwk] row per (warp, row slot): every lane owns its own E entries of its slot,
  // so the per-row accumulation needs no synchronisation. 32 / G slots of 2 * G * E entries: 64 * E per warp.
  __shared__ acc block_dw[kWarps][64 * E];

  if (blockIdx.x == 0 && threadIdx.x == 0) *done_counter = 0;  // for sum_partials_kernel, which runs next
  const int warp = threadIdx.x / 32;
  const vec::LaneGeometry g(threadIdx.x % 32, sch.group, E, p.rot_dim);
  const int rows = p.q.heads + p.k.heads, d = p.head_dim;
  w_t wq_raw[E], wk_raw[E];
  vec::load(static_cast<const w_t*>(p.q_weight) + g.j0, wq_raw);
  vec::load(static_cast<const w_t*>(p.k_weight) + g.j0, wk_raw);
  acc* my_dw = block_dw[warp] + g.slot * 2 * d + g.j0;  // [dwq | dwk] of this lane's slot, from its first element
#pragma unroll
  for (int e = 0; e < E; ++e) my_dw[e] = my_dw[d + e] = acc(0);

#pragma unroll 1
  for (int t = 0; t < kTokensPerWarp; ++t) {
    const int64_t token = int64_t(blockIdx.x) * kTokensPerBlock + t * kWarps + warp;
    if (token >= p.tokens) break;  // warp-uniform
    const int64_t b = token / p.seq, s = token - b * p.seq;
    cs_t c_raw[E] = {}, s_raw[E] = {};
    if (g.rotary) {
      const int64_t cos_row = b * p.cos_sb + s * p.cos_ss + g.j0;
      vec::load(static_cast<const cs_t*>(p.cos) + cos_row, c_raw);
      vec::load(static_cast<const cs_t*>(p.sin) + cos_row, s_raw);
    }
    const vec::QkRows<const in_t> x_in{row_ptr<in_t>(p.q, b, s) + g.j0, p.q.in_sh, row_ptr<in_t>(p.k, b, s) + g.j0,
                                       p.k.in_sh, p.q.heads};
    const vec::QkRows<const out_t> g_in{row_ptr<out_t>(grad.q, b, s) + g.j0, grad.q.in_sh,
                                        row_ptr<out_t>(grad.k, b, s) + g.j0, grad.k.in_sh, p.q.heads};
    const vec::QkRows<in_t> dx_out{out_row_ptr<in_t>(grad.q, b, s) + g.j0, grad.q.out_sh,
                                   out_row_ptr<in_t>(grad.k, b, s) + g.j0, grad.k.out_sh, p.q.heads};

    for (int it = 0; it < sch.iters_per_token; it += kBackwardUnroll) {
      in_t x_raw[kBackwardUnroll][E];
      out_t g_raw[kBackwardUnroll][E];
      vec::load_rows(g, it, sch.iters_per_token, rows, x_in, x_raw);  // x and the incoming gradient together
      vec::load_rows(g, it, sch.iters_per_token, rows, g_in, g_raw);
#pragma unroll
      for (int u = 0; u < kBackwardUnroll; ++u) {
        const int row = (it + u) * g.rows_per_warp + g.slot;
        const bool valid = row < rows, is_q = row < p.q.heads;
        acc x[E], gr[E], c[E], sn[E], sumsq = 0;
#pragma unroll
        for (int e = 0; e < E; ++e) {
          x[e] = static_cast<acc>(x_raw[u][e]);
          gr[e] = static_cast<acc>(g_raw[u][e]);
          c[e] = static_cast<acc>(c_raw[e]);
          sn[e] = static_cast<acc>(s_raw[e]);
          sumsq += mul_rn(x[e], x[e]);
        }
        const acc rstd = rstd_of(vec::group_sum(sumsq, g.group), p);
        acc gy[E], n[E], dw[E], dot = 0;
        vec::rotate_lane<true, kNeox, acc>(g, p.rot_dim, gr, c, sn, gy);  // gy = rope^T(g)
#pragma unroll
        for (int e = 0; e < E; ++e) {
          n[e] = mul_rn(x[e], rstd);
          const acc wj = is_q ? static_cast<acc>(wq_raw[e]) : static_cast<acc>(wk_raw[e]);
          if constexpr (Types::zero_centered) {
            dw[e] = gy[e] * n[e];
            gy[e] = gy[e] * (acc(1) + wj);
          } else {
            dw[e] = gy[e] * round_to<in_t, acc>(n[e]);
            gy[e] = gy[e] * wj;
          }
          dot += gy[e] * n[e];
        }
        if (valid) {
          acc* sums = my_dw + (is_q ? 0 : d);
#pragma unroll
          for (int e = 0; e < E; ++e) sums[e] += dw[e];
        }
        const acc mean = vec::group_sum(dot, g.group) / acc(d);
        acc dx[E];
#pragma unroll
        for (int e = 0; e < E; ++e) dx[e] = rstd * (gy[e] - n[e] * mean);
        if (valid) vec::store_acc(dx_out.row(row), dx);
      }
    }
  }

  // Fixed-order reduction over the block's warps and row slots.
  __syncthreads();
  acc* out = partials + int64_t(blockIdx.x) * 2 * d;
  for (int j = threadIdx.x; j < 2 * d; j += kThreads) {
    acc total = 0;
    for (int wi = 0; wi < kWarps; ++wi) {
      for (int slot = 0; slot < g.rows_per_warp; ++slot) total += block_dw[wi][slot * 2 * d + j];
    }
    out[j] = total;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Generic path: a warp per row, scalar accesses, no shared memory.

template <typename acc>
__device__ __forceinline__ acc warp_sum(acc v) {
  return vec::group_sum(v, 32);
}

struct GenericRow {
  const Operand* op;
  const void* weight;
  int64_t b, s, head, cos_row;
  int64_t dw_offset;  // 0 for q, head_dim for k
};

__device__ __forceinline__ GenericRow locate(const Params& p, const Params& rows_of, int64_t row) {
  const int rows = p.q.heads + p.k.heads;
  const int64_t token = row / rows;
  const int h = static_cast<int>(row - token * rows);
  const int64_t b = token / p.seq, s = token - b * p.seq;
  const bool is_q = h < p.q.heads;
  return {is_q ? &rows_of.q : &rows_of.k, is_q ? p.q_weight : p.k_weight, b, s, is_q ? h : h - p.q.heads,
          b * p.cos_sb + s * p.cos_ss, is_q ? 0 : p.head_dim};
}

template <typename T>
__device__ __forceinline__ const T* in_of(const GenericRow& r) {
  return static_cast<const T*>(r.op->in) + r.b * r.op->in_sb + r.s * r.op->in_ss + r.head * r.op->in_sh;
}

template <typename T>
__device__ __forceinline__ T* out_of(const GenericRow& r) {
  return static_cast<T*>(r.op->out) + r.b * r.op->out_sb + r.s * r.op->out_ss + r.head * r.op->out_sh;
}

template <typename Types>
__device__ __forceinline__ typename Types::acc generic_rstd(const Params& p, const typename Types::in_t* x,
                                                             int lane) {
  using acc = typename Types::acc;
  acc sumsq = 0;
  for (int j = lane; j < p.head_dim; j += 32) {
    const acc v = static_cast<acc>(x[j]);
    sumsq += mul_rn(v, v);
  }
  return rstd_of(warp_sum(sumsq), p);
}

template <typename Types, bool kNeox>
__global__ void qk_norm_rope_generic_kernel(const Params p) {
  using in_t = typename Types::in_t;
  using w_t = typename Types::w_t;
  using cs_t = typename Types::cs_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  const int lane = threadIdx.x % 32, half = p.rot_dim / 2;
  const int64_t rows = p.tokens * (p.q.heads + p.k.heads);
  const int64_t warps = int64_t(gridDim.x) * kGenericWarps;
  for (int64_t row = int64_t(blockIdx.x) * kGenericWarps + threadIdx.x / 32; row < rows; row += warps) {
    const GenericRow r = locate(p, p, row);
    const in_t* x = in_of<in_t>(r);
    const w_t* w = static_cast<const w_t*>(r.weight);
    const cs_t* c = static_cast<const cs_t*>(p.cos) + r.cos_row;
    const cs_t* sn = static_cast<const cs_t*>(p.sin) + r.cos_row;
    out_t* o = out_of<out_t>(r);  // may alias x (in-place qkv): each pair is read and written by one lane
    const acc rstd = generic_rstd<Types>(p, x, lane);
    __syncwarp();
    for (int i = lane; i < half; i += 32) {
      const int j1 = pair_first<kNeox>(i, half), j2 = pair_second<kNeox>(i, half);
      const acc y1 = normed<Types>(static_cast<acc>(x[j1]), rstd, static_cast<acc>(w[j1]));
      const acc y2 = normed<Types>(static_cast<acc>(x[j2]), rstd, static_cast<acc>(w[j2]));
      acc o1, o2;
      rotate_pair<false, acc>(y1, y2, static_cast<acc>(c[j1]), static_cast<acc>(c[j2]), static_cast<acc>(sn[j1]),
                              static_cast<acc>(sn[j2]), o1, o2);
      o[j1] = static_cast<out_t>(o1);
      o[j2] = static_cast<out_t>(o2);
    }
    for (int j = p.rot_dim + lane; j < p.head_dim; j += 32) {
      o[j] = static_cast<out_t>(normed<Types>(static_cast<acc>(x[j]), rstd, static_cast<acc>(w[j])));
    }
    __syncwarp();
  }
}

// One element of the backward, given gy = rope^T(g): n, the weight-gradient term and gn.
template <typename Types, bool kNeox>
__device__ __forceinline__ void generic_backward_element(typename Types::acc x, typename Types::acc gy,
                                                         typename Types::acc w, typename Types::acc rstd,
                                                         typename Types::acc& n, typename Types::acc& gn,
                                                         typename Types::acc& dw) {
  using acc = typename Types::acc;
  n = mul_rn(x, rstd);
  if constexpr (Types::zero_centered) {
    dw = gy * n;
    gn = gy * (acc(1) + w);
  } else {
    dw = gy * round_to<typename Types::in_t, acc>(n);
    gn = gy * w;
  }
}

// Backward, generic path: warp `wi` owns partials[wi] (zero-initialised) and adds its rows into it in order.
template <typename Types, bool kNeox>
__global__ void qk_norm_rope_backward_generic_kernel(const Params p, const Params grad,
                                                     typename Types::acc* __restrict__ partials) {
  using in_t = typename Types::in_t;
  using w_t = typename Types::w_t;
  using cs_t = typename Types::cs_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  const int lane = threadIdx.x % 32, half = p.rot_dim / 2, d = p.head_dim;
  const int64_t rows = p.tokens * (p.q.heads + p.k.heads);
  const int64_t warp = int64_t(blockIdx.x) * kGenericWarps + threadIdx.x / 32;
  const int64_t warps = int64_t(gridDim.x) * kGenericWarps;
  acc* dw_row = partials + warp * 2 * d;
  for (int64_t row = warp; row < rows; row += warps) {
    const GenericRow r = locate(p, p, row), gr = locate(p, grad, row);
    const in_t* x = in_of<in_t>(r);
    const out_t* g = in_of<out_t>(gr);
    in_t* dx = out_of<in_t>(gr);
    const w_t* w = static_cast<const w_t*>(r.weight);
    const cs_t* c = static_cast<const cs_t*>(p.cos) + r.cos_row;
    const cs_t* sn = static_cast<const cs_t*>(p.sin) + r.cos_row;
    acc* dw = dw_row + r.dw_offset;
    const acc rstd = generic_rstd<Types>(p, x, lane);
    // Pass 1: weight gradients and sum(gn * n). Each element always belongs to the same lane, so the lane's
    // read-modify-write of dw is private and ordered.
    auto pair_grads = [&](int i, acc& n1, acc& n2, acc& gn1, acc& gn2, acc& dw1, acc& dw2) {
      const int j1 = pair_first<kNeox>(i, half), j2 = pair_second<kNeox>(i, half);
      acc gy1, gy2;
      rotate_pair<true, acc>(static_cast<acc>(g[j1]), static_cast<acc>(g[j2]), static_cast<acc>(c[j1]),
                             static_cast<acc>(c[j2]), static_cast<acc>(sn[j1]), static_cast<acc>(sn[j2]), gy1, gy2);
      generic_backward_element<Types, kNeox>(static_cast<acc>(x[j1]), gy1, static_cast<acc>(w[j1]), rstd, n1, gn1,
                                             dw1);
      generic_backward_element<Types, kNeox>(static_cast<acc>(x[j2]), gy2, static_cast<acc>(w[j2]), rstd, n2, gn2,
                                             dw2);
    };
    acc dot = 0;
    for (int i = lane; i < half; i += 32) {
      acc n1, n2, gn1, gn2, dw1, dw2;
      pair_grads(i, n1, n2, gn1, gn2, dw1, dw2);
      dw[pair_first<kNeox>(i, half)] += dw1;
      dw[pair_second<kNeox>(i, half)] += dw2;
      dot += gn1 * n1 + gn2 * n2;
    }
    for (int j = p.rot_dim + lane; j < d; j += 32) {
      acc n, gn, dwj;
      generic_backward_element<Types, kNeox>(static_cast<acc>(x[j]), static_cast<acc>(g[j]),
                                             static_cast<acc>(w[j]), rstd, n, gn, dwj);
      dw[j] += dwj;
      dot += gn * n;
    }
    const acc mean = warp_sum(dot) / acc(d);
    // Pass 2: dx = rstd * (gn - n * mean), recomputing n and gn.
    for (int i = lane; i < half; i += 32) {
      acc n1, n2, gn1, gn2, dw1, dw2;
      pair_grads(i, n1, n2, gn1, gn2, dw1, dw2);
      dx[pair_first<kNeox>(i, half)] = static_cast<in_t>(rstd * (gn1 - n1 * mean));
      dx[pair_second<kNeox>(i, half)] = static_cast<in_t>(rstd * (gn2 - n2 * mean));
    }
    for (int j = p.rot_dim + lane; j < d; j += 32) {
      acc n, gn, dwj;
      generic_backward_element<Types, kNeox>(static_cast<acc>(x[j]), static_cast<acc>(g[j]),
                                             static_cast<acc>(w[j]), rstd, n, gn, dwj);
      dx[j] = static_cast<in_t>(rstd * (gn - n * mean));
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradients: dw[j] = sum over partial rows of partials[row][j], in row order, in two parallel levels.
// Block (cx, cy) sums rows [cy * kRowsPerBlock, ...) of columns [cx * 32, cx * 32 + 32) into level2[cy]; the last
// block to finish (an integer ticket, zeroed by the kernel that wrote the partials) sums level2 in order.

constexpr int kSumRowGroups = 16;
constexpr int kSumRowsPerThread = 8;
constexpr int kSumRowsPerBlock = kSumRowGroups * kSumRowsPerThread;

template <typename acc, typename w_t>
__global__ void __launch_bounds__(32 * kSumRowGroups) sum_partials_kernel(
    const acc* __restrict__ partials, int64_t num_rows, int64_t row_blocks, int cols, acc* __restrict__ level2,
    unsigned int* __restrict__ done_counter, w_t* __restrict__ dwq, w_t* __restrict__ dwk) {
  __shared__ acc part[kSumRowGroups][32];
  __shared__ bool is_last;
  const int c = threadIdx.x, rg = threadIdx.y;
  const int col = blockIdx.x * 32 + c;
  // row blocks by grid stride (gridDim.y is capped at 65,535): each level-2 entry is the same fixed-order sum
  // whichever block computes it, so the result does not depend on the grid
  for (int64_t rb = blockIdx.y; rb < row_blocks; rb += gridDim.y) {
    const int64_t row0 = rb * kSumRowsPerBlock + rg;
    acc v[kSumRowsPerThread];
#pragma unroll
    for (int i = 0; i < kSumRowsPerThread; ++i) {
      const int64_t row = row0 + i * kSumRowGroups;
      v[i] = (col < cols && row < num_rows) ? partials[row * cols + col] : acc(0);
    }
    acc sum = 0;
#pragma unroll
    for (int i = 0; i < kSumRowsPerThread; ++i) sum += v[i];
    part[rg][c] = sum;
    __syncthreads();
    if (rg == 0 && col < cols) {
      acc total = 0;
#pragma unroll
      for (int r = 0; r < kSumRowGroups; ++r) total += part[r][c];
      level2[rb * cols + col] = total;
    }
    __syncthreads();  // part is reused by the next row block
  }
  if (rg == 0 && col < cols) __threadfence();  // this block's level-2 sums visible to the last block
  __syncthreads();
  if (c == 0 && rg == 0) is_last = atomicAdd(done_counter, 1u) == gridDim.x * gridDim.y - 1;
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  const int d = cols / 2;
  for (int j = rg * 32 + c; j < cols; j += 32 * kSumRowGroups) {
    acc total = 0;
    for (int64_t rb = 0; rb < row_blocks; ++rb) total += __ldcg(level2 + rb * cols + j);
    if (j < d) {
      dwq[j] = static_cast<w_t>(total);
    } else {
      dwk[j - d] = static_cast<w_t>(total);
    }
  }
}

// Partials workspace: [num_rows][2d] partials, [row blocks][2d] level-2 sums, the done counter.
struct Workspace {
  at::Tensor storage;
  void* partials;
  void* level2;
  unsigned int* counter;
  int64_t num_rows;
};

Workspace make_workspace(int64_t num_rows, int64_t d, size_t acc_size, const at::TensorOptions& opts, bool zeroed) {
  const int64_t row_blocks = (num_rows + kSumRowsPerBlock - 1) / kSumRowsPerBlock;
  const int64_t partial_bytes = num_rows * 2 * d * static_cast<int64_t>(acc_size);
  const int64_t level2_bytes = row_blocks * 2 * d * static_cast<int64_t>(acc_size);
  const int64_t bytes = partial_bytes + level2_bytes + 16;
  Workspace w;
  w.storage = zeroed ? at::zeros({bytes}, opts.dtype(at::kByte)) : at::empty({bytes}, opts.dtype(at::kByte));
  auto* base = static_cast<unsigned char*>(w.storage.data_ptr());
  w.partials = base;
  w.level2 = base + partial_bytes;
  w.counter = reinterpret_cast<unsigned int*>(base + partial_bytes + level2_bytes);
  w.num_rows = num_rows;
  return w;
}

template <typename acc, typename w_t>
void launch_sum_partials(const Workspace& ws, int64_t d, at::Tensor& dwq, at::Tensor& dwk, cudaStream_t stream) {
  const int cols = static_cast<int>(2 * d);
  const int64_t row_blocks = (ws.num_rows + kSumRowsPerBlock - 1) / kSumRowsPerBlock;
  const dim3 grid((cols + 31) / 32, static_cast<unsigned>(std::min<int64_t>(row_blocks, 65535)));
  sum_partials_kernel<acc, w_t><<<grid, dim3(32, kSumRowGroups), 0, stream>>>(
      static_cast<const acc*>(ws.partials), ws.num_rows, row_blocks, cols, static_cast<acc*>(ws.level2), ws.counter,
      dwq.data_ptr<w_t>(), dwk.data_ptr<w_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------------
// Host: path choice and launches.

// The fast path's E for these dtypes, or 0 when they have none (fp64 runs the generic path).
int vector_elems(at::ScalarType x, at::ScalarType out) {
  if (x == at::kDouble || out == at::kDouble) return 0;
  const int64_t narrow = std::min(c10::elementSize(x), c10::elementSize(out));
  return static_cast<int>(vec::kVecBytes / narrow);
}

bool operand_aligned(const RopeOperand& op, bool with_out, int64_t in_size, int64_t out_size) {
  if (!aligned_16(op.in_ptr) || !strides_aligned_16({op.in_stride_b, op.in_stride_s, op.in_stride_h}, in_size)) {
    return false;
  }
  return !with_out ||
         (aligned_16(op.out_ptr) && strides_aligned_16({op.out_stride_b, op.out_stride_s, op.out_stride_h}, out_size));
}

// Lanes per row of the fast path for these arguments, or 0 for the generic path. `grads` (backward) adds the
// incoming gradients and dq / dk to what must be aligned.
int vector_group(const NormRopeArgs& a, const NormRopeArgs* grads) {
  const auto x_dtype = a.q.in.scalar_type();
  const int elems = vector_elems(x_dtype, a.out_dtype);
  if (elems == 0) return 0;
  const int group = lanes_per_row(a.head_dim, elems);
  if (group == 0 || !rotary_vectorizable(a.rot_dim, elems, a.is_neox)) return 0;
  const int64_t x_size = c10::elementSize(x_dtype), out_size = c10::elementSize(a.out_dtype);
  const int64_t cs_size = a.cos.element_size();
  if (!aligned_16(a.q_weight.data_ptr()) || !aligned_16(a.k_weight.data_ptr())) return 0;
  if (!aligned_16(a.cos.data_ptr()) || !aligned_16(a.sin.data_ptr()) ||
      !strides_aligned_16({a.cos_stride_b, a.cos_stride_s}, cs_size)) {
    return 0;
  }
  if (grads == nullptr) {
    return operand_aligned(a.q, true, x_size, out_size) && operand_aligned(a.k, true, x_size, out_size) ? group : 0;
  }
  const bool ok = operand_aligned(a.q, false, x_size, 0) && operand_aligned(a.k, false, x_size, 0) &&
                  operand_aligned(grads->q, true, out_size, x_size) && operand_aligned(grads->k, true, out_size, x_size);
  return ok ? group : 0;
}

VecSchedule forward_schedule(const NormRopeArgs& a, int group) {
  return make_schedule(a.batch * a.seq, a.q.heads + a.k.heads, group,
                       at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

int64_t generic_blocks(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>((rows + kGenericWarps - 1) / kGenericWarps, kMaxGenericBlocks));
}

void launch_forward(const NormRopeArgs& a) {
  const int64_t tokens = a.batch * a.seq, rows = tokens * (a.q.heads + a.k.heads);
  if (rows == 0 || a.head_dim == 0) return;
  const c10::cuda::CUDAGuard guard(a.cos.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const Params p = make_params(a);
  const int group = vector_group(a, nullptr);
  dispatch_norm_rope_types(a.q.in.scalar_type(), a.q_weight.scalar_type(), a.cos.scalar_type(), a.zero_centered,
                           [&](auto types) {
    dispatch_rope_style(a.is_neox, [&](auto neox) {
      using Types = decltype(types);
      constexpr bool kNeox = decltype(neox)::value;
      if constexpr (!std::is_same_v<typename Types::acc, double>) {
        if (group > 0) {
          const VecSchedule sch = forward_schedule(a, group);
          const int64_t blocks = (sch.items + kWarps - 1) / kWarps;
          if constexpr (kPackedNorm<Types>) {  // same-dtype bf16 / fp16: the launch-bounds knob
            if (cuda_forward_min_blocks() == 5) {
              qk_norm_rope_vec_kernel<Types, kNeox, 5><<<blocks, kThreads, 0, stream>>>(p, sch);
              return;
            }
          }
          qk_norm_rope_vec_kernel<Types, kNeox><<<blocks, kThreads, 0, stream>>>(p, sch);
          return;
        }
      }
      qk_norm_rope_generic_kernel<Types, kNeox><<<generic_blocks(rows), kGenericWarps * 32, 0, stream>>>(p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                     const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                     bool zero_centered, bool is_neox) {
  NormRopeArgs a = prepare_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox, true);
  launch_forward(a);
  return {a.q.out.transpose(1, 2), a.k.out.transpose(1, 2)};
}

void qk_norm_rope_qkv_cuda(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                           const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t num_q_heads,
                           int64_t num_kv_heads, bool zero_centered, bool is_neox) {
  launch_forward(prepare_qk_norm_rope_qkv(qkv, q_weight, k_weight, cos, sin, eps, num_q_heads, num_kv_heads,
                                          zero_centered, is_neox));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_cuda(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin, double eps,
    bool zero_centered, bool is_neox) {
  const NormRopeArgs a =
      prepare_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox, /*with_outputs=*/false);
  const NormRopeArgs g = prepare_qk_norm_rope_backward_grads(a, grad_q, grad_k);
  const int64_t tokens = a.batch * a.seq, rows = tokens * (a.q.heads + a.k.heads), d = a.head_dim;
  at::Tensor dwq = at::empty_like(a.q_weight), dwk = at::empty_like(a.k_weight);
  if (rows == 0 || d == 0) {  // nothing to reduce: zero weight gradients (head_dim 0: empty ones)
    dwq.zero_();
    dwk.zero_();
    return {g.q.out.view(q.sizes()), g.k.out.view(k.sizes()), dwq, dwk};
  }
  const c10::cuda::CUDAGuard guard(a.cos.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const Params p = make_params(a), pg = make_params(a, &g);
  const int group = vector_group(a, &g);
  dispatch_norm_rope_types(q.scalar_type(), q_weight.scalar_type(), cos.scalar_type(), zero_centered,
                           [&](auto types) {
    dispatch_rope_style(is_neox, [&](auto neox) {
      using Types = decltype(types);
      using acc = typename Types::acc;
      using w_t = typename Types::w_t;
      constexpr bool kNeox = decltype(neox)::value;
      if constexpr (!std::is_same_v<acc, double>) {
        if (group > 0) {
          const int64_t blocks = (tokens + kTokensPerBlock - 1) / kTokensPerBlock;
          const Workspace ws = make_workspace(blocks, d, sizeof(acc), q.options(), /*zeroed=*/false);
          // The backward runs whole tokens per warp (its weight-gradient sums are per block of tokens).
          const VecSchedule sch = make_schedule(tokens, a.q.heads + a.k.heads, group, /*sm_count=*/0);
          qk_norm_rope_backward_vec_kernel<Types, kNeox><<<blocks, kThreads, 0, stream>>>(
              p, pg, sch, static_cast<acc*>(ws.partials), ws.counter);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          launch_sum_partials<acc, w_t>(ws, d, dwq, dwk, stream);
          return;
        }
      }
      const int64_t blocks = generic_blocks(rows);
      const Workspace ws = make_workspace(blocks * kGenericWarps, d, sizeof(acc), q.options(), /*zeroed=*/true);
      qk_norm_rope_backward_generic_kernel<Types, kNeox><<<blocks, kGenericWarps * 32, 0, stream>>>(
          p, pg, static_cast<acc*>(ws.partials));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_sum_partials<acc, w_t>(ws, d, dwq, dwk, stream);
    });
  });
  return {g.q.out.view(q.sizes()), g.k.out.view(k.sizes()), dwq, dwk};
}

}  // namespace ropekit
