// cos/sin gather on CUDA.
//
// Fast path (bf16 / fp16 / fp32 output, half a multiple of E = 16 / sizeof(out)): a thread takes E consecutive
// frequencies of one token. It reads the token's positions once and, for a token whose axes agree (every text
// token, every 1-D gather), E values of each table row with 16-byte loads; it writes them to both places of
// transformers' duplicated layout with 16-byte stores (neox: columns [j0, j0 + E) and [j0 + half, ...); GPT-J:
// [2 j0, 2 j0 + 2E) as two vectors). An mRoPE vision token reads its E values element by element (each frequency
// takes its own axis). This kernel never evaluates cos/sin itself, so it has no trigonometric slow path and no
// local memory.
// Exact rows (a position outside the table, negative, or a frequency that differs bitwise from the one the table
// was built from) are computed in the same kernel, one launch at any position: the thread calls exact_cos_sin, a
// cold, non-inlined function with the same libdevice cosf / sinf and rounding points as PyTorch's elementwise
// kernels, so the fast path keeps no trigonometric code and no local memory of its own (cosf's slow-path argument
// reduction keeps a stack array in the callee's frame). No host sync; without inv_freq such a position trips a
// device-side assert.
// Generic path (fp64 output, other widths, unaligned tables): gather_cos_sin_scalar_kernel writes every element.
#include "../rope_common.h"
#include "../rope_table.h"
#include "rope_vec.cuh"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace ropekit {
namespace {

constexpr int kThreads = 256;

struct GatherParams {
  const float* cos_tab;
  const float* sin_tab;
  const float* inv_freq;        // nullptr: positions must lie inside the table; else rows outside it are computed
  const float* table_inv_freq;  // nullptr, or the frequencies the table was built from: a column whose current
                                // frequency differs (bitwise) is computed from inv_freq for every position
  int64_t rows, half;
  int64_t tokens, seq;
  int64_t stride_axis, stride_batch, stride_seq;
  int axes;
  MropeLayout mrope;
  float attention_scaling;
};

// The token's three positions (all equal for 1-D positions).
template <typename index_t>
__device__ __forceinline__ void token_positions(const GatherParams& p, const index_t* __restrict__ positions,
                                                int64_t n, int64_t (&pos)[3]) {
  const int64_t b = n / p.seq, s = n - b * p.seq;
  const index_t* tok = positions + b * p.stride_batch + s * p.stride_seq;
  pos[0] = tok[0];
  pos[1] = p.axes == 3 ? int64_t(tok[p.stride_axis]) : pos[0];
  pos[2] = p.axes == 3 ? int64_t(tok[2 * p.stride_axis]) : pos[0];
}

// Comparing the bits here, not on the host, keeps the check free of syncs: an in-place change of inv_freq that the
// caller could not see (through .data, an inference tensor, a numpy view) is never served stale.
__device__ __forceinline__ bool column_current(const GatherParams& p, int64_t j) {
  return p.table_inv_freq == nullptr || __float_as_uint(p.table_inv_freq[j]) == __float_as_uint(p.inv_freq[j]);
}

__device__ __forceinline__ bool needs_exact(const GatherParams& p, int64_t j, int64_t pos) {
  return pos < 0 || pos >= p.rows || !column_current(p, j);
}

// cos / sin of frequency j at position pos computed from inv_freq: the same libdevice cosf / sinf (no fast math) and
// rounding points as PyTorch's elementwise kernels, so the value equals the one a table built from the current
// inv_freq would hold. Not inlined: the rare rows pay a call, the fast path carries none of cosf's slow path.
// Returned by value (x: cos, y: sin), so the caller's per-lane arrays stay in registers.
__device__ __noinline__ float2 exact_cos_sin(const float* inv_freq, float attention_scaling, int64_t j, int64_t pos) {
  CUDA_KERNEL_ASSERT(inv_freq != nullptr && "ropekit: position id outside the cos/sin table (pass inv_freq)");
  const float freq = mul_rn(inv_freq != nullptr ? inv_freq[j] : 0.f, static_cast<float>(pos));
  return make_float2(mul_rn(cosf(freq), attention_scaling), mul_rn(sinf(freq), attention_scaling));
}

template <typename out_t, bool kNeox>
__device__ __forceinline__ void put(out_t* cos_row, out_t* sin_row, int64_t half, int64_t j, float c, float s) {
#pragma unroll
  for (int copy = 0; copy < 2; ++copy) {
    cos_row[freq_column<kNeox>(j, half, copy)] = static_cast<out_t>(c);
    sin_row[freq_column<kNeox>(j, half, copy)] = static_cast<out_t>(s);
  }
}

template <typename out_t, typename index_t, bool kNeox>
__global__ void __launch_bounds__(kThreads) gather_cos_sin_vec_kernel(GatherParams p,
                                                                       const index_t* __restrict__ positions,
                                                                       out_t* __restrict__ cos_out,
                                                                       out_t* __restrict__ sin_out) {
  constexpr int E = vec::elems_per_lane<out_t>();
  const int64_t chunks = p.half / E, total = p.tokens * chunks;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t n = i / chunks;
    const int64_t j0 = (i - n * chunks) * E;
    int64_t pos[3];
    token_positions(p, positions, n, pos);
    bool current[E];
    bool all_current = true;
#pragma unroll
    for (int e = 0; e < E; ++e) current[e] = true;
    if (p.table_inv_freq != nullptr) {
      float built[E], now[E];
      vec::load(p.table_inv_freq + j0, built);
      vec::load(p.inv_freq + j0, now);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        current[e] = __float_as_uint(built[e]) == __float_as_uint(now[e]);
        all_current = all_current && current[e];
      }
    }
    float c[E], s[E];
    if (pos[0] == pos[1] && pos[0] == pos[2] && pos[0] >= 0 && pos[0] < p.rows && all_current) {
      vec::load(p.cos_tab + pos[0] * p.half + j0, c);  // one table row: 16-byte loads
      vec::load(p.sin_tab + pos[0] * p.half + j0, s);
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int axis = mrope_axis(j0 + e, p.mrope);
        const int64_t pe = axis == 0 ? pos[0] : (axis == 1 ? pos[1] : pos[2]);
        if (pe >= 0 && pe < p.rows && current[e]) {
          c[e] = p.cos_tab[pe * p.half + j0 + e];
          s[e] = p.sin_tab[pe * p.half + j0 + e];
        } else {  // the cold path: a row the table cannot serve
          const float2 cs = exact_cos_sin(p.inv_freq, p.attention_scaling, j0 + e, pe);
          c[e] = cs.x;
          s[e] = cs.y;
        }
      }
    }
    out_t* cos_row = cos_out + n * 2 * p.half;
    out_t* sin_row = sin_out + n * 2 * p.half;
    if constexpr (kNeox) {
      vec::store_acc(cos_row + j0, c);
      vec::store_acc(cos_row + p.half + j0, c);
      vec::store_acc(sin_row + j0, s);
      vec::store_acc(sin_row + p.half + j0, s);
    } else {
#pragma unroll
      for (int part = 0; part < 2; ++part) {  // columns [2 j0 + part E, ...) hold frequencies j0 + part E/2 + e/2
        float cp[E], sp[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
          cp[e] = c[part * (E / 2) + e / 2];
          sp[e] = s[part * (E / 2) + e / 2];
        }
        vec::store_acc(cos_row + 2 * j0 + part * E, cp);
        vec::store_acc(sin_row + 2 * j0 + part * E, sp);
      }
    }
  }
}

// One thread per (token, frequency): the generic path, every element.
template <typename out_t, typename index_t, bool kNeox>
__global__ void __launch_bounds__(kThreads) gather_cos_sin_scalar_kernel(GatherParams p,
                                                                          const index_t* __restrict__ positions,
                                                                          out_t* __restrict__ cos_out,
                                                                          out_t* __restrict__ sin_out) {
  const int64_t total = p.tokens * p.half;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total; i += int64_t(gridDim.x) * kThreads) {
    const int64_t n = i / p.half, j = i - n * p.half;
    int64_t pos3[3];
    token_positions(p, positions, n, pos3);
    const int axis = mrope_axis(j, p.mrope);
    const int64_t pos = axis == 0 ? pos3[0] : (axis == 1 ? pos3[1] : pos3[2]);
    float c, s;
    if (!needs_exact(p, j, pos)) {
      c = p.cos_tab[pos * p.half + j];
      s = p.sin_tab[pos * p.half + j];
    } else {
      const float2 cs = exact_cos_sin(p.inv_freq, p.attention_scaling, j, pos);
      c = cs.x;
      s = cs.y;
    }
    put<out_t, kNeox>(cos_out + n * 2 * p.half, sin_out + n * 2 * p.half, p.half, j, c, s);
  }
}

int64_t blocks_for(int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>((threads + kThreads - 1) / kThreads, int64_t{1} << 20));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_cos_sin_cuda(const GatherArgs& a) {
  const c10::cuda::CUDAGuard guard(a.cos_cache.device());
  const int64_t half = a.half();
  auto out_opts = a.cos_cache.options().dtype(a.dtype);
  at::Tensor cos_out = at::empty({a.batch, a.seq, 2 * half}, out_opts);
  at::Tensor sin_out = at::empty({a.batch, a.seq, 2 * half}, out_opts);
  if (cos_out.numel() == 0) return {cos_out, sin_out};

  GatherParams p;
  p.cos_tab = a.cos_cache.data_ptr<float>();
  p.sin_tab = a.sin_cache.data_ptr<float>();
  p.inv_freq = a.inv_freq.defined() ? a.inv_freq.data_ptr<float>() : nullptr;
  p.table_inv_freq = a.table_inv_freq.defined() ? a.table_inv_freq.data_ptr<float>() : nullptr;
  p.rows = a.rows();
  p.half = half;
  p.tokens = a.batch * a.seq;
  p.seq = a.seq;
  p.stride_axis = a.stride_axis;
  p.stride_batch = a.stride_batch;
  p.stride_seq = a.stride_seq;
  p.axes = static_cast<int>(a.axes);
  p.mrope = a.mrope;
  p.attention_scaling = static_cast<float>(a.attention_scaling);

  // The fast path reads the tables (and the two frequency vectors) 16 bytes at a time.
  const int64_t elems = a.dtype == at::kDouble ? 0 : vec::kVecBytes / c10::elementSize(a.dtype);
  const bool vector = elems > 0 && half % elems == 0 && aligned_16(p.cos_tab) && aligned_16(p.sin_tab) &&
                      (p.inv_freq == nullptr || aligned_16(p.inv_freq)) &&
                      (p.table_inv_freq == nullptr || aligned_16(p.table_inv_freq));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "ropekit_gather_cos_sin_cuda", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(a.positions.scalar_type(), "ropekit_gather_cos_sin_cuda", [&] {
      dispatch_rope_style(a.is_neox, [&](auto neox) {
        constexpr bool kNeox = decltype(neox)::value;
        const index_t* pos = a.positions.data_ptr<index_t>();
        out_t* co = cos_out.data_ptr<out_t>();
        out_t* so = sin_out.data_ptr<out_t>();
        if constexpr (!std::is_same_v<out_t, double>) {
          if (vector) {
            // one launch: rows the table cannot serve, if any, are computed exactly inside it
            gather_cos_sin_vec_kernel<out_t, index_t, kNeox>
                <<<blocks_for(p.tokens * (half / elems)), kThreads, 0, stream>>>(p, pos, co, so);
            C10_CUDA_KERNEL_LAUNCH_CHECK();
            return;
          }
        }
        gather_cos_sin_scalar_kernel<out_t, index_t, kNeox>
            <<<blocks_for(p.tokens * half), kThreads, 0, stream>>>(p, pos, co, so);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return {cos_out, sin_out};
}

}  // namespace ropekit
