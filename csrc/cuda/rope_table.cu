// cos/sin gather on CUDA: one thread per (token, frequency), writing both duplicated halves.
#include "../rope_common.h"
#include "../rope_table.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace ropekit {
namespace {

struct GatherParams {
  const float* cos_tab;
  const float* sin_tab;
  const float* inv_freq;  // nullptr: positions must lie inside the table; else rows outside it are computed
  const float* table_inv_freq;  // nullptr, or the frequencies the table was built from: a column whose current
                                // frequency differs (bitwise) is computed from inv_freq for every position
  int64_t rows, half;
  int64_t batch, seq;
  int64_t stride_axis, stride_batch, stride_seq;
  int64_t section_h, section_w;
  float attention_scaling;
};

template <typename out_t, typename index_t>
__global__ void gather_cos_sin_kernel(GatherParams p, const index_t* __restrict__ positions,
                                      out_t* __restrict__ cos_out, out_t* __restrict__ sin_out) {
  const int64_t total = p.batch * p.seq * p.half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i % p.half;
    const int64_t n = i / p.half;
    const int64_t b = n / p.seq, s = n % p.seq;
    const int axis = mrope_axis(j, p.section_h, p.section_w);
    const int64_t pos = positions[axis * p.stride_axis + b * p.stride_batch + s * p.stride_seq];
    // Comparing the bits here, not on the host, keeps the check free of syncs: an in-place change of inv_freq that
    // the caller could not see (through .data, an inference tensor, a numpy view) is never served stale.
    const bool current =
        p.table_inv_freq == nullptr || __float_as_uint(p.table_inv_freq[j]) == __float_as_uint(p.inv_freq[j]);
    float c, sn;
    if (current && pos >= 0 && pos < p.rows) {
      c = p.cos_tab[pos * p.half + j];
      sn = p.sin_tab[pos * p.half + j];
    } else {
      CUDA_KERNEL_ASSERT(p.inv_freq != nullptr && "ropekit: position id outside the cos/sin table (pass inv_freq)");
      // Same libdevice cosf/sinf (no fast math) and rounding points as PyTorch's elementwise kernels, so a row
      // computed here equals the row a grown table would hold.
      const float freq = mul_rn(p.inv_freq[j], static_cast<float>(pos));
      c = mul_rn(cosf(freq), p.attention_scaling);
      sn = mul_rn(sinf(freq), p.attention_scaling);
    }
    const int64_t o = n * 2 * p.half + j;
    cos_out[o] = cos_out[o + p.half] = static_cast<out_t>(c);
    sin_out[o] = sin_out[o + p.half] = static_cast<out_t>(sn);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_cos_sin_cuda(const GatherArgs& a) {
  const c10::cuda::CUDAGuard guard(a.cos_cache.device());
  const int64_t half = a.half();
  auto out_opts = a.cos_cache.options().dtype(a.dtype);
  at::Tensor cos_out = at::empty({a.batch, a.seq, 2 * half}, out_opts);
  at::Tensor sin_out = at::empty({a.batch, a.seq, 2 * half}, out_opts);
  const int64_t total = a.batch * a.seq * half;
  if (total == 0) return {cos_out, sin_out};

  GatherParams p;
  p.cos_tab = a.cos_cache.data_ptr<float>();
  p.sin_tab = a.sin_cache.data_ptr<float>();
  p.inv_freq = a.inv_freq.defined() ? a.inv_freq.data_ptr<float>() : nullptr;
  p.table_inv_freq = a.table_inv_freq.defined() ? a.table_inv_freq.data_ptr<float>() : nullptr;
  p.rows = a.rows();
  p.half = half;
  p.batch = a.batch;
  p.seq = a.seq;
  p.stride_axis = a.stride_axis;
  p.stride_batch = a.stride_batch;
  p.stride_seq = a.stride_seq;
  p.section_h = a.section_h;
  p.section_w = a.section_w;
  p.attention_scaling = static_cast<float>(a.attention_scaling);

  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t{1} << 20);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "ropekit_gather_cos_sin_cuda", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(a.positions.scalar_type(), "ropekit_gather_cos_sin_cuda", [&] {
      gather_cos_sin_kernel<out_t, index_t><<<blocks, kThreads, 0, stream>>>(
          p, a.positions.data_ptr<index_t>(), cos_out.data_ptr<out_t>(), sin_out.data_ptr<out_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {cos_out, sin_out};
}

}  // namespace ropekit
