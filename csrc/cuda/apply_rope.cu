// apply_rope on CUDA: one block per token. The block stages the token's cos/sin row in shared memory once and
// reuses it for every q and k head, so cos/sin are read once per token rather than once per head.
#include "../apply_rope.h"
#include "../rope_common.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace ropekit {
namespace {

struct OperandParams {
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_stride_b, in_stride_s, in_stride_h;
  int64_t out_stride_b, out_stride_s, out_stride_h;
};

struct RopeParams {
  OperandParams q, k;
  int64_t batch, seq, head_dim, rot_dim;
  int64_t cos_stride_b, cos_stride_s;
};

OperandParams to_params(const RopeOperand& op) {
  return {op.in_ptr,       op.out_ptr,      op.heads,        op.in_stride_b, op.in_stride_s,
          op.in_stride_h,  op.out_stride_b, op.out_stride_s, op.out_stride_h};
}

// Work items per head: rot_dim/2 rotary pairs, then head_dim - rot_dim pass-through elements.
template <typename Types, bool kBackward, bool kNeox>
__device__ __forceinline__ void rope_item(const OperandParams& op, int64_t b, int64_t s, int64_t head,
                                          int64_t item, int64_t half, int64_t rot_dim,
                                          const typename Types::acc* c, const typename Types::acc* sn) {
  using in_t = typename Types::in_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  const in_t* x = static_cast<const in_t*>(op.in) + b * op.in_stride_b + s * op.in_stride_s + head * op.in_stride_h;
  out_t* y = static_cast<out_t*>(op.out) + b * op.out_stride_b + s * op.out_stride_s + head * op.out_stride_h;
  if (item < half) {
    const int64_t j1 = pair_first<kNeox>(item, half), j2 = pair_second<kNeox>(item, half);
    acc o1, o2;
    rotate_pair<kBackward, acc>(static_cast<acc>(x[j1]), static_cast<acc>(x[j2]), c[j1], c[j2], sn[j1], sn[j2], o1,
                                o2);
    y[j1] = static_cast<out_t>(o1);
    y[j2] = static_cast<out_t>(o2);
  } else {
    const int64_t j = rot_dim + (item - half);
    y[j] = static_cast<out_t>(static_cast<acc>(x[j]));
  }
}

template <typename Types, bool kBackward, bool kNeox>
__global__ void apply_rope_kernel(RopeParams p, const typename Types::cs_t* __restrict__ cos,
                                  const typename Types::cs_t* __restrict__ sin) {
  using acc = typename Types::acc;
  extern __shared__ unsigned char smem_raw[];
  acc* c = reinterpret_cast<acc*>(smem_raw);
  acc* sn = c + p.rot_dim;
  const int64_t half = p.rot_dim / 2;
  const int64_t items_per_head = half + (p.head_dim - p.rot_dim);
  const int64_t q_items = p.q.heads * items_per_head;
  const int64_t total_items = (p.q.heads + p.k.heads) * items_per_head;

  for (int64_t token = blockIdx.x; token < p.batch * p.seq; token += gridDim.x) {
    const int64_t b = token / p.seq, s = token % p.seq;
    const int64_t row = b * p.cos_stride_b + s * p.cos_stride_s;
    for (int64_t j = threadIdx.x; j < p.rot_dim; j += blockDim.x) {
      c[j] = static_cast<acc>(cos[row + j]);
      sn[j] = static_cast<acc>(sin[row + j]);
    }
    __syncthreads();
    for (int64_t i = threadIdx.x; i < total_items; i += blockDim.x) {
      const bool is_q = i < q_items;
      const int64_t local = is_q ? i : i - q_items;
      rope_item<Types, kBackward, kNeox>(is_q ? p.q : p.k, b, s, local / items_per_head, local % items_per_head, half,
                                  p.rot_dim, c, sn);
    }
    __syncthreads();  // the next token overwrites the staged row
  }
}

template <bool kBackward>
void launch_apply_rope(const RopeArgs& a, at::ScalarType x_dtype) {
  const int64_t tokens = a.batch * a.seq;
  if (tokens == 0) return;
  const c10::cuda::CUDAGuard guard(a.cos.device());
  RopeParams p{to_params(a.q), to_params(a.k), a.batch, a.seq, a.head_dim, a.rot_dim, a.cos_stride_b,
               a.cos_stride_s};
  const int64_t items = (a.q.heads + a.k.heads) * (a.rot_dim / 2 + a.head_dim - a.rot_dim);
  const int threads = static_cast<int>(std::min<int64_t>(256, std::max<int64_t>(32, (items + 31) / 32 * 32)));
  const int64_t blocks = std::min<int64_t>(tokens, int64_t{1} << 20);
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_rope_types<kBackward>(x_dtype, a.cos.scalar_type(), [&](auto types) {
    dispatch_rope_style(a.is_neox, [&](auto neox) {
      using Types = decltype(types);
      using cs_t = typename Types::cs_t;
      const size_t smem = 2 * a.rot_dim * sizeof(typename Types::acc);
      apply_rope_kernel<Types, kBackward, decltype(neox)::value><<<blocks, threads, smem, stream>>>(
          p, a.cos.template data_ptr<cs_t>(), a.sin.template data_ptr<cs_t>());
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rope_cuda(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   int64_t unsqueeze_dim, bool is_neox) {
  RopeArgs a = prepare_apply_rope(q, k, cos, sin, unsqueeze_dim,
                                  apply_rope_out_dtype(q.scalar_type(), cos.scalar_type()), is_neox);
  launch_apply_rope<false>(a, q.scalar_type());
  return {a.q.out, a.k.out};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                                            bool is_neox) {
  RopeArgs a = prepare_apply_rope_backward(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, is_neox);
  launch_apply_rope<true>(a, q_dtype);
  return {a.q.out, a.k.out};
}

}  // namespace ropekit
