// qk_norm_rope on CUDA: one warp per (token, head) row. The warp stages the row in shared memory, reduces its sum
// of squares with shuffles, normalises, then rotates pairs (j, j + R/2) from shared memory. q and k rows of a token
// are neighbours, so cos/sin stay in L1 across a token's heads. One launch covers q and k (the decode path).
#include "../qk_norm_rope.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace ropekit {
namespace {

constexpr int kWarps = 4;                   // warps per block
constexpr int64_t kMaxBackwardBlocks = 1024;  // fixed, device-independent: deterministic weight-gradient partials
constexpr int64_t kMaxForwardBlocks = int64_t{1} << 20;

struct RowOperand {
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_stride_b, in_stride_s, in_stride_h;
  int64_t out_stride_b, out_stride_s, out_stride_h;
};

struct NormRopeParams {
  RowOperand q, k;
  const void* q_weight;
  const void* k_weight;
  int64_t batch, seq, head_dim, rot_dim, cos_stride_b, cos_stride_s;
  double eps;
};

RowOperand row_operand(const RopeOperand& op) {
  return {op.in_ptr,       op.out_ptr,      op.heads,        op.in_stride_b, op.in_stride_s,
          op.in_stride_h,  op.out_stride_b, op.out_stride_s, op.out_stride_h};
}

NormRopeParams make_params(const NormRopeArgs& a) {
  return {row_operand(a.q), row_operand(a.k), a.q_weight.data_ptr(), a.k_weight.data_ptr(), a.batch, a.seq,
          a.head_dim, a.rot_dim, a.cos_stride_b, a.cos_stride_s, a.eps};
}

template <typename acc>
__device__ __forceinline__ acc warp_sum(acc v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Which row a warp works on: rows are (token, head) with a token's q heads first, then its k heads.
struct RowRef {
  const RowOperand* op;
  const void* weight;
  int64_t b, s, head, cos_row;
};

__device__ __forceinline__ RowRef locate(const NormRopeParams& p, int64_t row) {
  const int64_t heads = p.q.heads + p.k.heads;
  const int64_t token = row / heads, h = row % heads;
  const int64_t b = token / p.seq, s = token % p.seq;
  const bool is_q = h < p.q.heads;
  return {is_q ? &p.q : &p.k, is_q ? p.q_weight : p.k_weight, b, s, is_q ? h : h - p.q.heads,
          b * p.cos_stride_b + s * p.cos_stride_s};
}

template <typename T>
__device__ __forceinline__ const T* in_row(const RowRef& r) {
  return static_cast<const T*>(r.op->in) + r.b * r.op->in_stride_b + r.s * r.op->in_stride_s +
         r.head * r.op->in_stride_h;
}

template <typename T>
__device__ __forceinline__ T* out_row(const RowRef& r) {
  return static_cast<T*>(r.op->out) + r.b * r.op->out_stride_b + r.s * r.op->out_stride_s +
         r.head * r.op->out_stride_h;
}

template <typename Types>
__device__ __forceinline__ typename Types::acc row_rstd(const typename Types::in_t* x, typename Types::acc* y,
                                                        int64_t d, double eps, int lane) {
  using acc = typename Types::acc;
  acc sumsq = 0;
  for (int64_t j = lane; j < d; j += 32) {
    const acc v = static_cast<acc>(x[j]);
    y[j] = v;
    sumsq += mul_rn(v, v);
  }
  sumsq = warp_sum(sumsq);
  return rsqrt(sumsq / acc(d) + acc(eps));  // rsqrtf for fp32, as torch.rsqrt on CUDA
}

template <typename Types, bool kNeox>
__global__ void qk_norm_rope_kernel(NormRopeParams p, const typename Types::cs_t* __restrict__ cos,
                                    const typename Types::cs_t* __restrict__ sin) {
  using in_t = typename Types::in_t;
  using w_t = typename Types::w_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  acc* y = reinterpret_cast<acc*>(smem_raw) + warp * p.head_dim;
  const int64_t rows = p.batch * p.seq * (p.q.heads + p.k.heads), half = p.rot_dim / 2;
  for (int64_t row = blockIdx.x * int64_t(kWarps) + warp; row < rows; row += int64_t(gridDim.x) * kWarps) {
    const RowRef r = locate(p, row);
    const acc rstd = row_rstd<Types>(in_row<in_t>(r), y, p.head_dim, p.eps, lane);
    const w_t* w = static_cast<const w_t*>(r.weight);
    for (int64_t j = lane; j < p.head_dim; j += 32) y[j] = normed<Types>(y[j], rstd, static_cast<acc>(w[j]));
    __syncwarp();
    out_t* o = out_row<out_t>(r);  // may alias the input (in-place qkv): every read above is done
    for (int64_t i = lane; i < half; i += 32) {
      const int64_t j1 = pair_first<kNeox>(i, half), j2 = pair_second<kNeox>(i, half);
      acc o1, o2;
      rotate_pair<false, acc>(y[j1], y[j2], static_cast<acc>(cos[r.cos_row + j1]),
                              static_cast<acc>(cos[r.cos_row + j2]), static_cast<acc>(sin[r.cos_row + j1]),
                              static_cast<acc>(sin[r.cos_row + j2]), o1, o2);
      o[j1] = static_cast<out_t>(o1);
      o[j2] = static_cast<out_t>(o2);
    }
    for (int64_t j = p.rot_dim + lane; j < p.head_dim; j += 32) o[j] = static_cast<out_t>(y[j]);
    __syncwarp();  // the next row overwrites y
  }
}

// Backward: per row gy = rope^T(g), gn from the weight, dx = rstd * (gn - n * mean(gn * n)). Each block sums its
// rows' weight gradients in a fixed order into partials[block]; a second kernel sums the partials in block order.
template <typename Types, bool kNeox>
__global__ void qk_norm_rope_backward_kernel(NormRopeParams p, NormRopeParams grad,
                                             const typename Types::cs_t* __restrict__ cos,
                                             const typename Types::cs_t* __restrict__ sin,
                                             typename Types::acc* __restrict__ dw_partials) {
  using in_t = typename Types::in_t;
  using w_t = typename Types::w_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  extern __shared__ unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t d = p.head_dim, half = p.rot_dim / 2;
  acc* n = reinterpret_cast<acc*>(smem_raw) + warp * 4 * d;
  acc* gy = n + d;
  acc* dwq = gy + d;  // this warp's running weight gradients
  acc* dwk = dwq + d;
  for (int64_t j = lane; j < d; j += 32) dwq[j] = dwk[j] = acc(0);
  const int64_t rows = p.batch * p.seq * (p.q.heads + p.k.heads);
  for (int64_t row = blockIdx.x * int64_t(kWarps) + warp; row < rows; row += int64_t(gridDim.x) * kWarps) {
    const RowRef r = locate(p, row);
    const RowRef gr = locate(grad, row);
    const acc rstd = row_rstd<Types>(in_row<in_t>(r), n, d, p.eps, lane);
    const out_t* g = in_row<out_t>(gr);
    for (int64_t i = lane; i < half; i += 32) {
      const int64_t j1 = pair_first<kNeox>(i, half), j2 = pair_second<kNeox>(i, half);
      rotate_pair<true, acc>(static_cast<acc>(g[j1]), static_cast<acc>(g[j2]), static_cast<acc>(cos[r.cos_row + j1]),
                             static_cast<acc>(cos[r.cos_row + j2]), static_cast<acc>(sin[r.cos_row + j1]),
                             static_cast<acc>(sin[r.cos_row + j2]), gy[j1], gy[j2]);
    }
    for (int64_t j = p.rot_dim + lane; j < d; j += 32) gy[j] = static_cast<acc>(g[j]);
    __syncwarp();
    const w_t* w = static_cast<const w_t*>(r.weight);
    acc* dw = r.op == &p.q ? dwq : dwk;
    acc dot = 0;
    for (int64_t j = lane; j < d; j += 32) {
      const acc nj = mul_rn(n[j], rstd), wj = static_cast<acc>(w[j]);
      acc gn;
      if constexpr (Types::zero_centered) {
        gn = gy[j] * (acc(1) + wj);
        dw[j] += gy[j] * nj;
      } else {
        gn = gy[j] * wj;
        dw[j] += gy[j] * round_to<in_t, acc>(nj);
      }
      n[j] = nj;
      gy[j] = gn;
      dot += gn * nj;
    }
    const acc mean = warp_sum(dot) / acc(d);
    in_t* dx = out_row<in_t>(gr);
    for (int64_t j = lane; j < d; j += 32) dx[j] = static_cast<in_t>(rstd * (gy[j] - n[j] * mean));
    __syncwarp();
  }
  __syncthreads();
  acc* block_dwq = dw_partials + int64_t(blockIdx.x) * 2 * d;
  acc* block_dwk = block_dwq + d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    acc sq = 0, sk = 0;
    for (int wi = 0; wi < kWarps; ++wi) {  // fixed warp order
      const acc* base = reinterpret_cast<acc*>(smem_raw) + wi * 4 * d;
      sq += base[2 * d + j];
      sk += base[3 * d + j];
    }
    block_dwq[j] = sq;
    block_dwk[j] = sk;
  }
}

template <typename acc, typename w_t>
__global__ void sum_weight_partials_kernel(const acc* __restrict__ partials, int64_t blocks, int64_t d,
                                           w_t* __restrict__ dwq, w_t* __restrict__ dwk) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < 2 * d; j += int64_t(gridDim.x) * blockDim.x) {
    acc s = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) s += partials[blk * 2 * d + j];  // fixed block order
    (j < d ? dwq[j] : dwk[j - d]) = static_cast<w_t>(s);
  }
}

int64_t grid_for(int64_t rows, int64_t max_blocks) {
  return std::max<int64_t>(1, std::min<int64_t>((rows + kWarps - 1) / kWarps, max_blocks));
}

// Dynamic shared memory past the default 48 KiB needs an explicit opt-in per kernel.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

void launch_forward(const NormRopeArgs& a) {
  const int64_t rows = a.batch * a.seq * (a.q.heads + a.k.heads);
  if (rows == 0) return;
  const c10::cuda::CUDAGuard guard(a.cos.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_norm_rope_types(a.q.in.scalar_type(), a.q_weight.scalar_type(), a.cos.scalar_type(), a.zero_centered,
                           [&](auto types) {
   dispatch_rope_style(a.is_neox, [&](auto neox) {
    using Types = decltype(types);
    using cs_t = typename Types::cs_t;
    constexpr bool kNeox = decltype(neox)::value;
    const size_t smem = kWarps * a.head_dim * sizeof(typename Types::acc);
    allow_shared_memory(qk_norm_rope_kernel<Types, kNeox>, smem);
    qk_norm_rope_kernel<Types, kNeox><<<grid_for(rows, kMaxForwardBlocks), kWarps * 32, smem, stream>>>(
        make_params(a), a.cos.data_ptr<cs_t>(), a.sin.data_ptr<cs_t>());
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
  NormRopeArgs a = prepare_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox, false);
  NormRopeArgs g = prepare_qk_norm_rope_backward_grads(a, grad_q, grad_k);
  const int64_t rows = a.batch * a.seq * (a.q.heads + a.k.heads), d = a.head_dim;
  at::Tensor dwq = at::empty_like(a.q_weight), dwk = at::empty_like(a.k_weight);
  if (rows == 0) {
    dwq.zero_();
    dwk.zero_();
  } else {
    const c10::cuda::CUDAGuard guard(a.cos.device());
    auto stream = at::cuda::getCurrentCUDAStream();
    const int64_t blocks = grid_for(rows, kMaxBackwardBlocks);
    dispatch_norm_rope_types(q.scalar_type(), q_weight.scalar_type(), cos.scalar_type(), zero_centered,
                             [&](auto types) {
     dispatch_rope_style(is_neox, [&](auto neox) {
      using Types = decltype(types);
      using acc = typename Types::acc;
      using cs_t = typename Types::cs_t;
      using w_t = typename Types::w_t;
      constexpr bool kNeox = decltype(neox)::value;
      at::Tensor partials = at::empty({blocks, 2 * d}, q.options().dtype(c10::CppTypeToScalarType<acc>::value));
      const size_t smem = kWarps * 4 * d * sizeof(acc);
      allow_shared_memory(qk_norm_rope_backward_kernel<Types, kNeox>, smem);
      qk_norm_rope_backward_kernel<Types, kNeox><<<blocks, kWarps * 32, smem, stream>>>(
          make_params(a), make_params(g), a.cos.data_ptr<cs_t>(), a.sin.data_ptr<cs_t>(), partials.data_ptr<acc>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int threads = 256;
      sum_weight_partials_kernel<acc, w_t><<<(2 * d + threads - 1) / threads, threads, 0, stream>>>(
          partials.data_ptr<acc>(), blocks, d, dwq.data_ptr<w_t>(), dwk.data_ptr<w_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
     });
    });
  }
  return {g.q.out.view(q.sizes()), g.k.out.view(k.sizes()), dwq, dwk};
}

}  // namespace ropekit
