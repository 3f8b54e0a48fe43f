// apply_rope on CUDA, forward and backward (the backward is the transposed rotation of the output gradients).
//
// Fast path (rows that split into 16-byte lanes, or 8-byte lanes where 16 bytes do not divide the row or its
// halves; see rope_vec.cuh): G = D / E lanes per row, any G up to 32 (the vision towers' D = 80 in bf16 is G = 10);
// a warp takes one token (or a part of its rows when there are few tokens), loads its lanes' cos/sin once, then
// walks the token's q and k rows 32 / G at a time with kUnroll iterations of loads in flight. The rotate-half
// partner comes across by shuffle; GPT-J pairs sit inside a lane.
// Generic path (fp64, head_dim or rotary dim that split into neither 16- nor 8-byte lanes, unaligned views): one thread
// per rotary pair or pass-through element, cos/sin read from global memory (no shared memory, so any rotary dim works).
// The host picks the path once per call.
#include "../apply_rope.h"
#include "rope_vec.cuh"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

namespace ropekit {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kUnroll = 4;
constexpr int kGenericThreads = 256;

struct Operand {
  const void* in;
  void* out;
  int heads;
  int64_t in_sb, in_ss, in_sh;
  int64_t out_sb, out_ss, out_sh;
};

struct Params {
  Operand q, k;
  const void* cos;
  const void* sin;
  int64_t seq, tokens, cos_sb, cos_ss;
  int head_dim, rot_dim;
};

Operand make_operand(const RopeOperand& op) {
  return {op.in_ptr,       op.out_ptr,      static_cast<int>(op.heads), op.in_stride_b, op.in_stride_s,
          op.in_stride_h,  op.out_stride_b, op.out_stride_s,            op.out_stride_h};
}

Params make_params(const RopeArgs& a) {
  return {make_operand(a.q),  make_operand(a.k), a.cos.data_ptr(), a.sin.data_ptr(), a.seq, a.batch * a.seq,
          a.cos_stride_b,     a.cos_stride_s,    static_cast<int>(a.head_dim), static_cast<int>(a.rot_dim)};
}

template <typename Types, bool kBackward, bool kNeox, int kLaneBytes>
__global__ void __launch_bounds__(kThreads, 4) apply_rope_vec_kernel(const Params p, const vec::Schedule sch) {
  using in_t = typename Types::in_t;
  using cs_t = typename Types::cs_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  constexpr int E = vec::elems_per_lane<in_t, out_t, kLaneBytes>();
  // The forward sends x across lanes, exact in its own dtype; the backward sends products g*sin, which need acc.
  using Wire = std::conditional_t<kBackward, acc, in_t>;

  const int64_t item = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  if (item >= sch.items) return;  // warp-uniform
  const vec::LaneGeometry g(threadIdx.x % 32, sch.group, E, p.rot_dim);
  const vec::WarpWork w = vec::warp_work(item, sch.parts, sch.iters_per_part, sch.iters_per_token);
  const int64_t b = w.token / p.seq, s = w.token - b * p.seq;

  cs_t c_raw[E] = {}, s_raw[E] = {};
  if (g.rotary) {
    const int64_t cos_row = b * p.cos_sb + s * p.cos_ss + g.j0;
    vec::load(static_cast<const cs_t*>(p.cos) + cos_row, c_raw);
    vec::load(static_cast<const cs_t*>(p.sin) + cos_row, s_raw);
  }
  const vec::QkRows<const in_t> in{static_cast<const in_t*>(p.q.in) + b * p.q.in_sb + s * p.q.in_ss + g.j0,
                                   p.q.in_sh,
                                   static_cast<const in_t*>(p.k.in) + b * p.k.in_sb + s * p.k.in_ss + g.j0,
                                   p.k.in_sh, p.q.heads};
  const vec::QkRows<out_t> out{static_cast<out_t*>(p.q.out) + b * p.q.out_sb + s * p.q.out_ss + g.j0, p.q.out_sh,
                               static_cast<out_t*>(p.k.out) + b * p.k.out_sb + s * p.k.out_ss + g.j0, p.k.out_sh,
                               p.q.heads};
  const int rows = p.q.heads + p.k.heads;

  for (int it = w.it_begin; it < w.it_end; it += kUnroll) {
    in_t x_raw[kUnroll][E];
    vec::load_rows(g, it, w.it_end, rows, in, x_raw);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = (it + u) * g.rows_per_warp + g.slot;
      acc x[E], c[E], sn[E], o[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        x[e] = static_cast<acc>(x_raw[u][e]);
        c[e] = static_cast<acc>(c_raw[e]);
        sn[e] = static_cast<acc>(s_raw[e]);
      }
      vec::rotate_lane<kBackward, kNeox, Wire>(g, p.rot_dim, x, c, sn, o);
      if (g.active && it + u < w.it_end && row < rows) {
        vec::store_acc(out.row(row), o);
      }
    }
  }
}

// Generic path: thread i handles item i % items_per_head of row i / items_per_head, an item being a rotary pair
// (first R/2 items) or a pass-through element.
template <typename Types, bool kBackward, bool kNeox>
__global__ void apply_rope_generic_kernel(const Params p, int64_t total_items) {
  using in_t = typename Types::in_t;
  using cs_t = typename Types::cs_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  const int half = p.rot_dim / 2;
  const int items_per_head = half + (p.head_dim - p.rot_dim);
  const int rows = p.q.heads + p.k.heads;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total_items;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / items_per_head;
    const int item = static_cast<int>(i - row * items_per_head);
    const int64_t token = row / rows;
    const int h = static_cast<int>(row - token * rows);
    const int64_t b = token / p.seq, s = token - b * p.seq;
    const bool is_q = h < p.q.heads;
    const Operand& op = is_q ? p.q : p.k;
    const int head = is_q ? h : h - p.q.heads;
    const in_t* x = static_cast<const in_t*>(op.in) + b * op.in_sb + s * op.in_ss + head * op.in_sh;
    out_t* y = static_cast<out_t*>(op.out) + b * op.out_sb + s * op.out_ss + head * op.out_sh;
    if (item < half) {
      const int64_t cos_row = b * p.cos_sb + s * p.cos_ss;
      const cs_t* c = static_cast<const cs_t*>(p.cos) + cos_row;
      const cs_t* sn = static_cast<const cs_t*>(p.sin) + cos_row;
      const int j1 = pair_first<kNeox>(item, half), j2 = pair_second<kNeox>(item, half);
      acc o1, o2;
      rotate_pair<kBackward, acc>(static_cast<acc>(x[j1]), static_cast<acc>(x[j2]), static_cast<acc>(c[j1]),
                                  static_cast<acc>(c[j2]), static_cast<acc>(sn[j1]), static_cast<acc>(sn[j2]), o1,
                                  o2);
      y[j1] = static_cast<out_t>(o1);
      y[j2] = static_cast<out_t>(o2);
    } else {
      const int j = p.rot_dim + (item - half);
      const acc v = static_cast<acc>(x[j]);
      y[j] = static_cast<out_t>(kBackward ? as_accumulated(v) : v);
    }
  }
}

bool operand_aligned(const RopeOperand& op, int64_t in_size, int64_t out_size, int64_t lane_bytes) {
  // a lane's bytes of the wider dtype of a row are one access of up to 16 bytes, or several of 16
  const auto bytes = [lane_bytes](int64_t size, int64_t narrow) {
    return std::min<int64_t>(lane_bytes * size / narrow, vec::kVecBytes);
  };
  const int64_t narrow = std::min(in_size, out_size), in_b = bytes(in_size, narrow), out_b = bytes(out_size, narrow);
  return aligned_to(op.in_ptr, in_b) && strides_aligned({op.in_stride_b, op.in_stride_s, op.in_stride_h}, in_size, in_b) &&
         aligned_to(op.out_ptr, out_b) &&
         strides_aligned({op.out_stride_b, op.out_stride_s, op.out_stride_h}, out_size, out_b);
}

// The fast path's lanes: G lanes per row of `bytes` bytes each (16, or 8 where 16 does not divide the row, its
// rotary halves or the alignment of the views), or G = 0 for the generic path.
struct LaneChoice {
  int group = 0, bytes = 0;
};

LaneChoice vector_lanes(const RopeArgs& a, at::ScalarType in_dtype, at::ScalarType out_dtype) {
  if (in_dtype == at::kDouble || out_dtype == at::kDouble) return {};
  const int64_t in_size = c10::elementSize(in_dtype), out_size = c10::elementSize(out_dtype);
  const int64_t cs_size = a.cos.element_size(), narrow = std::min(in_size, out_size);
  for (const int bytes : {vec::kVecBytes, vec::kVecBytes / 2}) {
    const int elems = static_cast<int>(bytes / narrow);
    const int group = lanes_per_row(a.head_dim, elems, /*any_group=*/true);
    if (group == 0 || !rotary_vectorizable(a.rot_dim, elems, a.is_neox)) continue;
    const int64_t cs_bytes = std::min<int64_t>(bytes * cs_size / narrow, vec::kVecBytes);
    if (!aligned_to(a.cos.data_ptr(), cs_bytes) || !aligned_to(a.sin.data_ptr(), cs_bytes) ||
        !strides_aligned({a.cos_stride_b, a.cos_stride_s}, cs_size, cs_bytes)) {
      continue;
    }
    if (operand_aligned(a.q, in_size, out_size, bytes) && operand_aligned(a.k, in_size, out_size, bytes)) {
      return {group, bytes};
    }
  }
  return {};
}

template <bool kBackward>
void launch_apply_rope(const RopeArgs& a) {
  const int64_t tokens = a.batch * a.seq, rows = tokens * (a.q.heads + a.k.heads);
  if (rows == 0 || a.head_dim == 0) return;
  const c10::cuda::CUDAGuard guard(a.cos.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const Params p = make_params(a);
  const LaneChoice lanes = vector_lanes(a, a.q.in.scalar_type(), a.q.out.scalar_type());
  dispatch_rope_types<kBackward>(a.q.in.scalar_type(), a.cos.scalar_type(), a.q.out.scalar_type(), [&](auto types) {
    dispatch_rope_style(a.is_neox, [&](auto neox) {
      using Types = decltype(types);
      constexpr bool kNeox = decltype(neox)::value;
      if constexpr (!std::is_same_v<typename Types::acc, double>) {
        if (lanes.group > 0) {
          const vec::Schedule sch = make_schedule(tokens, a.q.heads + a.k.heads, lanes.group,
                                                  at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
          const int64_t blocks = (sch.items + kWarps - 1) / kWarps;
          if (lanes.bytes == vec::kVecBytes) {
            apply_rope_vec_kernel<Types, kBackward, kNeox, vec::kVecBytes><<<blocks, kThreads, 0, stream>>>(p, sch);
          } else {
            apply_rope_vec_kernel<Types, kBackward, kNeox, vec::kVecBytes / 2><<<blocks, kThreads, 0, stream>>>(p,
                                                                                                            sch);
          }
          return;
        }
      }
      const int64_t items = rows * (a.rot_dim / 2 + a.head_dim - a.rot_dim);
      const int64_t blocks = std::min<int64_t>((items + kGenericThreads - 1) / kGenericThreads, int64_t{1} << 20);
      apply_rope_generic_kernel<Types, kBackward, kNeox><<<blocks, kGenericThreads, 0, stream>>>(p, items);
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
  launch_apply_rope<false>(a);
  return {a.q.out, a.k.out};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_vision_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& cos, const at::Tensor& sin,
                                                          bool is_neox) {
  RopeArgs a = prepare_apply_rope_vision(q, k, cos, sin, is_neox);
  launch_apply_rope<false>(a);
  return {a.q.out.squeeze(0), a.k.out.squeeze(0)};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cuda(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                                            bool is_neox) {
  RopeArgs a = prepare_apply_rope_backward(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, is_neox);
  launch_apply_rope<true>(a);
  return {a.q.out, a.k.out};
}

}  // namespace ropekit
