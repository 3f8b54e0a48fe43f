#include "qk_norm_rope.h"

#include "cpu_isa.h"
#include "double_backward.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <ATen/MemoryOverlap.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <utility>
#include <vector>

namespace ropekit {

namespace {
std::atomic<int>& forward_min_blocks() {
  static std::atomic<int> value{4};
  return value;
}
}  // namespace

int cuda_forward_min_blocks() { return forward_min_blocks().load(std::memory_order_relaxed); }

int64_t cuda_forward_min_blocks_op(int64_t blocks) {
  const int previous = cuda_forward_min_blocks();
  TORCH_CHECK_VALUE(blocks == 0 || blocks == 4 || blocks == 5,
                    "blocks: expected 4 or 5 (or 0 to only read the setting), got ", blocks);
  if (blocks != 0) forward_min_blocks().store(static_cast<int>(blocks), std::memory_order_relaxed);
  return previous;
}
namespace {

bool is_norm_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// (B, S, H*D) or (B, S, H, D) -> (B, S, H, D) view; head_dim contiguous (copied once otherwise).
at::Tensor as_heads(const at::Tensor& x, int64_t head_dim, const char* name) {
  TORCH_CHECK(x.dim() == 3 || x.dim() == 4, name, ": expected (batch, seq, heads*head_dim) or (batch, seq, heads, "
              "head_dim), got shape ", x.sizes());
  at::Tensor v = x;
  if (x.dim() == 3) {
    TORCH_CHECK(head_dim > 0, name, ": head_dim is 0 (the norm weights are empty), so a flat (batch, seq, "
                "heads*head_dim) tensor does not say how many heads it has; pass (batch, seq, heads, 0)");
    TORCH_CHECK(x.size(2) % head_dim == 0, name, ": last dimension ", x.size(2),
                " is not a multiple of head_dim ", head_dim, " (the norm weight's length)");
    v = x.stride(2) == 1 ? x.unflatten(2, {x.size(2) / head_dim, head_dim})
                         : x.contiguous().unflatten(2, {x.size(2) / head_dim, head_dim});
  }
  TORCH_CHECK(v.size(3) == head_dim, name, ": expected head_dim ", head_dim, " (the norm weight's length), got ",
              v.size(3));
  return v.stride(3) == 1 ? v : v.contiguous();
}

// `out_heads` may be undefined (the backward's view of q / k, which writes nothing there).
RopeOperand make_norm_operand(const at::Tensor& x_heads, const at::Tensor& out_heads) {
  return rope_operand(x_heads, out_heads, x_heads, out_heads);
}

// True when no two indices of `t` address one element: with the dims of size > 1 ordered by stride, each stride
// passes the farthest offset the smaller dims reach. (Sufficient; every real qkv buffer, dense or a slice of a
// wider one, satisfies it. An expanded tensor, with a 0 stride, does not.)
bool non_overlapping(const at::Tensor& t) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) return false;
    reach += (size - 1) * stride;
  }
  return true;
}

void check_common(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight, const at::Tensor& k_weight,
                  const at::Tensor& cos, const at::Tensor& sin, double eps) {
  TORCH_CHECK(is_norm_float(q.scalar_type()), "q: expected float32, float16, bfloat16 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k: expected the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(q_weight.dim() == 1, "q_weight: expected a 1-D [head_dim] tensor, got shape ", q_weight.sizes());
  TORCH_CHECK(k_weight.sizes() == q_weight.sizes(), "k_weight: expected shape ", q_weight.sizes(),
              " (that of q_weight: q and k share head_dim), got ", k_weight.sizes());
  for (const auto& [name, w] : {std::pair<const char*, const at::Tensor&>{"q_weight", q_weight}, {"k_weight", k_weight}}) {
    TORCH_CHECK(w.scalar_type() == q.scalar_type() || w.scalar_type() == at::kFloat, name,
                ": expected the dtype of q (", q.scalar_type(), ") or float32, got ", w.scalar_type());
  }
  TORCH_CHECK(k_weight.scalar_type() == q_weight.scalar_type(), "k_weight: expected the dtype of q_weight (",
              q_weight.scalar_type(), "), got ", k_weight.scalar_type());
  TORCH_CHECK(cos.dim() == 3, "cos: expected a 3-D (batch or 1, seq, rotary_dim) tensor, got shape ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin: expected the shape of cos ", cos.sizes(), ", got ", sin.sizes());
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat,
              "cos: expected the dtype of q (", q.scalar_type(), ") or float32, got ", cos.scalar_type());
  TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), "sin: expected the dtype of cos (", cos.scalar_type(),
              "), got ", sin.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"k", k}, {"q_weight", q_weight},
                                {"k_weight", k_weight}, {"cos", cos}, {"sin", sin}}) {
    TORCH_CHECK(t.device() == q.device(), name, ": expected device ", q.device(), " (that of q), got ", t.device());
  }
  TORCH_CHECK(eps >= 0, "eps: expected >= 0, got ", eps);
}

void set_cos_sin(NormRopeArgs& a, const at::Tensor& cos, const at::Tensor& sin, int64_t batch, int64_t seq,
                 int64_t head_dim) {
  const int64_t rot_dim = cos.size(2);
  TORCH_CHECK(rot_dim % 2 == 0, "cos: expected an even rotary dim (last dimension), got ", rot_dim);
  TORCH_CHECK(rot_dim <= head_dim, "cos: rotary dim ", rot_dim, " exceeds head_dim ", head_dim);
  TORCH_CHECK(cos.size(1) == seq, "cos: expected seq ", seq, " (that of q), got shape ", cos.sizes());
  TORCH_CHECK(cos.size(0) == batch || cos.size(0) == 1, "cos: expected batch 1 or ", batch, ", got shape ",
              cos.sizes());
  a.cos = cos.stride(-1) == 1 ? cos : cos.contiguous();
  a.sin = sin.stride(-1) == 1 ? sin : sin.contiguous();
  if (a.cos.strides() != a.sin.strides()) {  // the kernels index both with one set of strides
    a.cos = a.cos.contiguous();
    a.sin = a.sin.contiguous();
  }
  a.rot_dim = rot_dim;
  a.cos_stride_b = cos.size(0) == 1 ? 0 : a.cos.stride(0);
  a.cos_stride_s = a.cos.stride(1);
}

}  // namespace

at::ScalarType qk_norm_dtype(at::ScalarType x, at::ScalarType weight, bool zero_centered) {
  return zero_centered ? x : at::promote_types(x, weight);
}

at::ScalarType qk_norm_rope_out_dtype(at::ScalarType x, at::ScalarType weight, at::ScalarType cos,
                                      bool zero_centered) {
  return at::promote_types(qk_norm_dtype(x, weight, zero_centered), cos);
}

NormRopeArgs prepare_qk_norm_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& q_weight,
                                  const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin,
                                  double eps, bool zero_centered, bool is_neox, bool with_outputs) {
  check_common(q, k, q_weight, k_weight, cos, sin, eps);
  const int64_t head_dim = q_weight.size(0);
  const at::Tensor qh = as_heads(q, head_dim, "q"), kh = as_heads(k, head_dim, "k");
  const int64_t batch = qh.size(0), seq = qh.size(1);
  TORCH_CHECK(kh.size(0) == batch && kh.size(1) == seq, "k: expected batch ", batch, " and seq ", seq,
              " like q, got shape ", k.sizes());
  NormRopeArgs a;
  a.batch = batch;
  a.seq = seq;
  a.head_dim = head_dim;
  a.eps = eps;
  a.zero_centered = zero_centered;
  a.is_neox = is_neox;
  set_cos_sin(a, cos, sin, batch, seq, head_dim);
  a.out_dtype = qk_norm_rope_out_dtype(q.scalar_type(), q_weight.scalar_type(), cos.scalar_type(), zero_centered);
  const auto out_opts = qh.options().dtype(a.out_dtype);
  auto outputs = [&](const at::Tensor& rows) {
    return with_outputs ? at::empty({batch, seq, rows.size(2), head_dim}, out_opts) : at::Tensor();
  };
  a.q = make_norm_operand(qh, outputs(qh));
  a.k = make_norm_operand(kh, outputs(kh));
  a.q_weight = q_weight.contiguous();
  a.k_weight = k_weight.contiguous();
  return a;
}

NormRopeArgs prepare_qk_norm_rope_qkv(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                                      const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t num_q_heads,
                                      int64_t num_kv_heads, bool zero_centered, bool is_neox) {
  TORCH_CHECK(qkv.dim() == 3, "qkv: expected a packed (batch, seq, (q_heads + 2*kv_heads) * head_dim) tensor, got "
              "shape ", qkv.sizes());
  check_common(qkv, qkv, q_weight, k_weight, cos, sin, eps);
  TORCH_CHECK(num_q_heads > 0 && num_kv_heads > 0, "num_q_heads / num_kv_heads: expected positive, got ",
              num_q_heads, " / ", num_kv_heads);
  const int64_t head_dim = q_weight.size(0);
  const int64_t width = qkv.size(2), rows = head_dim == 0 ? 0 : width / head_dim;  // no product can overflow
  TORCH_CHECK(head_dim == 0 ? width == 0
                            : width % head_dim == 0 && num_q_heads <= rows && num_kv_heads <= rows &&
                                  num_q_heads + 2 * num_kv_heads == rows,
              "qkv: last dimension ", width, " != (num_q_heads + 2*num_kv_heads) * head_dim with num_q_heads ",
              num_q_heads, ", num_kv_heads ", num_kv_heads, " and head_dim ", head_dim);
  TORCH_CHECK(qkv.stride(2) == 1 || qkv.numel() == 0, "qkv: expected a contiguous last dimension to rotate in place");
  TORCH_CHECK(non_overlapping(qkv), "qkv: the in-place op writes every element once, so qkv must not overlap "
              "itself, but its strides ", qkv.strides(), " for shape ", qkv.sizes(), " map several indices to one "
              "element (an expanded or overlapping view?); pass a tensor with its own storage, e.g. qkv.contiguous()");
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q_weight", q_weight},
                                {"k_weight", k_weight}, {"cos", cos}, {"sin", sin}}) {
    const auto status = at::get_overlap_status(qkv, t);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, "qkv: shares memory "
                "with ", name, ", which the in-place op would overwrite while reading it; pass a copy of ", name);
  }
  TORCH_CHECK(q_weight.scalar_type() == qkv.scalar_type() && cos.scalar_type() == qkv.scalar_type(),
              "qkv: the in-place op needs q_weight, k_weight, cos and sin in qkv's dtype (", qkv.scalar_type(),
              ") so the result fits back in place; got weight ", q_weight.scalar_type(), " and cos ",
              cos.scalar_type());
  const at::Tensor heads = qkv.unflatten(2, {num_q_heads + 2 * num_kv_heads, head_dim});
  const at::Tensor qh = heads.narrow(2, 0, num_q_heads), kh = heads.narrow(2, num_q_heads, num_kv_heads);
  NormRopeArgs a;
  a.batch = qkv.size(0);
  a.seq = qkv.size(1);
  a.head_dim = head_dim;
  a.eps = eps;
  a.zero_centered = zero_centered;
  a.is_neox = is_neox;
  a.out_dtype = qkv.scalar_type();
  set_cos_sin(a, cos, sin, a.batch, a.seq, head_dim);
  a.q = make_norm_operand(qh, qh);
  a.k = make_norm_operand(kh, kh);
  a.q_weight = q_weight.contiguous();
  a.k_weight = k_weight.contiguous();
  return a;
}

NormRopeArgs prepare_qk_norm_rope_backward_grads(const NormRopeArgs& fwd, const at::Tensor& grad_q,
                                                const at::Tensor& grad_k) {
  const auto out_dtype = fwd.out_dtype;
  NormRopeArgs g = fwd;
  auto operand = [&](const at::Tensor& grad, const RopeOperand& x_op, const char* name) {
    TORCH_CHECK(grad.scalar_type() == out_dtype, name, ": expected the forward output dtype ", out_dtype, ", got ",
                grad.scalar_type());
    TORCH_CHECK(grad.device() == x_op.in.device(), name, ": expected device ", x_op.in.device(), ", got ",
                grad.device());
    TORCH_CHECK(grad.dim() == 4 && grad.size(0) == fwd.batch && grad.size(1) == x_op.heads &&
                    grad.size(2) == fwd.seq && grad.size(3) == fwd.head_dim,
                name, ": expected shape (", fwd.batch, ", ", x_op.heads, ", ", fwd.seq, ", ", fwd.head_dim, "), got ",
                grad.sizes());
    at::Tensor rows = grad.transpose(1, 2);  // (B, S, H, D) rows, as the forward read q / k
    rows = rows.stride(3) == 1 ? rows : rows.contiguous();
    return make_norm_operand(rows, at::empty(x_op.in.sizes(), x_op.in.options()));
  };
  g.q = operand(grad_q, fwd.q, "grad_q");
  g.k = operand(grad_k, fwd.k, "grad_k");
  return g;
}

// ---------------------------------------------------------------------------------------------------------------
// CPU kernels (qk_norm_rope_cpu.h), compiled for the build's baseline and, where cpu_isa.h can, for AVX2; run with
// the instruction set cpu_isa() names. The weight gradient is reduced over fixed chunks of tokens in a fixed order:
// the same bits on every run and with either instruction set.

namespace {

constexpr int64_t kWeightGradChunk = 64;  // tokens per partial weight-gradient sum

namespace cpu_baseline {
#include "qk_norm_rope_cpu.h"
}  // namespace cpu_baseline

#if ROPEKIT_CPU_AVX2
#pragma GCC push_options
#pragma GCC target("avx2")
namespace cpu_avx2 {
#include "qk_norm_rope_cpu.h"
}  // namespace cpu_avx2
#pragma GCC pop_options
#endif

// Calls f(types, neox): the dtype combination (dispatch_norm_rope_types) and the rotation style as tag values.
template <typename F>
void dispatch_cpu_kernels(const NormRopeArgs& a, at::ScalarType x, at::ScalarType w, at::ScalarType c, F&& f) {
  dispatch_norm_rope_types(x, w, c, a.zero_centered, [&](auto types) {
    dispatch_rope_style(a.is_neox, [&](auto neox) { f(types, neox); });
  });
}

void qk_norm_rope_cpu_impl(const NormRopeArgs& a) {
  dispatch_cpu_kernels(a, a.q.in.scalar_type(), a.q_weight.scalar_type(), a.cos.scalar_type(), [&](auto types,
                                                                                                    auto neox) {
    using Types = decltype(types);
    constexpr bool kNeox = decltype(neox)::value;
#if ROPEKIT_CPU_AVX2
    if (cpu_isa() == CpuIsa::kAvx2) return cpu_avx2::forward<Types, kNeox>(a);
#endif
    cpu_baseline::forward<Types, kNeox>(a);
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_cpu(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                    const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                    bool zero_centered, bool is_neox) {
  NormRopeArgs a = prepare_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox, true);
  qk_norm_rope_cpu_impl(a);
  return {a.q.out.transpose(1, 2), a.k.out.transpose(1, 2)};
}

void qk_norm_rope_qkv_cpu(const at::Tensor& qkv, const at::Tensor& q_weight, const at::Tensor& k_weight,
                          const at::Tensor& cos, const at::Tensor& sin, double eps, int64_t num_q_heads,
                          int64_t num_kv_heads, bool zero_centered, bool is_neox) {
  qk_norm_rope_cpu_impl(prepare_qk_norm_rope_qkv(qkv, q_weight, k_weight, cos, sin, eps, num_q_heads, num_kv_heads,
                                                 zero_centered, is_neox));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> qk_norm_rope_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& q_weight, const at::Tensor& k_weight, const at::Tensor& cos, const at::Tensor& sin, double eps,
    bool zero_centered, bool is_neox) {
  // Reads q and k as the forward did; allocates only dq, dk and the weight-gradient partials.
  NormRopeArgs a = prepare_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox, false);
  const NormRopeArgs g = prepare_qk_norm_rope_backward_grads(a, grad_q, grad_k);
  const int64_t tokens = a.batch * a.seq, d = a.head_dim;
  const int64_t chunks = (tokens + kWeightGradChunk - 1) / kWeightGradChunk;
  const auto acc_dtype = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor dwq_parts = at::zeros({std::max<int64_t>(chunks, 1), d}, q.options().dtype(acc_dtype));
  at::Tensor dwk_parts = at::zeros_like(dwq_parts);
  if (d > 0 && a.q.heads + a.k.heads > 0) {
    dispatch_cpu_kernels(a, q.scalar_type(), q_weight.scalar_type(), cos.scalar_type(), [&](auto types, auto neox) {
      using Types = decltype(types);
      constexpr bool kNeox = decltype(neox)::value;
#if ROPEKIT_CPU_AVX2
      if (cpu_isa() == CpuIsa::kAvx2) return cpu_avx2::backward<Types, kNeox>(a, g, dwq_parts, dwk_parts);
#endif
      cpu_baseline::backward<Types, kNeox>(a, g, dwq_parts, dwk_parts);
    });
  }
  // Ordered sum over chunks (sum over dim 0 of a contiguous tensor reduces in a fixed order on CPU).
  auto finish = [&](const at::Tensor& parts, const at::Tensor& w) { return parts.sum(0).to(w.scalar_type()); };
  auto as_input_shape = [](const at::Tensor& dx_heads, const at::Tensor& x) { return dx_heads.view(x.sizes()); };
  return {as_input_shape(g.q.out, q), as_input_shape(g.k.out, k), finish(dwq_parts, q_weight),
          finish(dwk_parts, k_weight)};
}

// ---------------------------------------------------------------------------------------------------------------
// Autograd

namespace {

using FourTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The fused op in ATen ops (float32, float64 for float64): per-head RMSNorm over the weight's length, times w (or
// 1 + w, zero_centered), as (B, H, S, D), then the rotation. The double-backward reference; its values match the
// kernel's up to rounding.
at::Tensor norm_rope_reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& cos, const at::Tensor& sin,
                               double eps, bool zero_centered, bool is_neox) {
  const auto acc = at::promote_types(x.scalar_type(), at::kFloat);
  const at::Tensor x4 = x.reshape({x.size(0), x.size(1), -1, w.size(0)}).to(acc);
  const at::Tensor w_acc = w.to(acc);
  const at::Tensor y = x4 * at::rsqrt(x4.pow(2).mean(-1, /*keepdim=*/true) + eps) *
                       (zero_centered ? w_acc + 1 : w_acc);
  return rope_reference(y.transpose(1, 2), cos, sin, /*unsqueeze_dim=*/1, is_neox);
}

class QkNormRopeFunction : public torch::autograd::Function<QkNormRopeFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& q_weight,
                                                const at::Tensor& k_weight, const at::Tensor& cos,
                                                const at::Tensor& sin, double eps, bool zero_centered, bool is_neox) {
    TORCH_CHECK(!(cos.requires_grad() || sin.requires_grad()),
                "ropekit.qk_norm_rope: cos/sin require grad, but the fused op differentiates q, k and the norm "
                "weights only (transformers builds cos/sin under no_grad); use norm + apply_rope for cos/sin grads");
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ropekit::qk_norm_rope", "")
                         .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&,
                                                                   const at::Tensor&, const at::Tensor&, double,
                                                                   bool, bool)>();
    auto [q_out, k_out] = op.call(q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox);
    // An output none of whose inputs requires grad carries none, as transformers' q_norm(q) of a frozen q and
    // q_norm next to a trainable k does not.
    torch::autograd::variable_list frozen;
    if (!q.requires_grad() && !q_weight.requires_grad()) frozen.push_back(q_out);
    if (!k.requires_grad() && !k_weight.requires_grad()) frozen.push_back(k_out);
    if (!frozen.empty()) ctx->mark_non_differentiable(frozen);
    // Saves the raw inputs (the op never mutates them); the norm statistics are recomputed in the backward.
    ctx->save_for_backward({q, k, q_weight, k_weight, cos, sin});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["zero_centered"] = zero_centered;
    ctx->saved_data["is_neox"] = is_neox;
    return {q_out, k_out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto s = ctx->get_saved_variables();
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("ropekit::qk_norm_rope_backward", "")
                         .typed<FourTensors(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, double, bool, bool)>();
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool zero_centered = ctx->saved_data["zero_centered"].toBool();
    const bool is_neox = ctx->saved_data["is_neox"].toBool();
    if (!building_graph({grads[0], grads[1], s[0], s[1], s[2], s[3]})) {
      auto [dq, dk, dwq, dwk] = op.call(grads[0], grads[1], s[0], s[1], s[2], s[3], s[4], s[5], eps, zero_centered,
                                        is_neox);
      return {dq, dk, dwq, dwk, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    // create_graph: the kernel's values, and the graph of autograd through the reference forward
    std::vector<at::Tensor> exact(4);
    {
      at::NoGradGuard values_only;
      std::tie(exact[0], exact[1], exact[2], exact[3]) =
          op.call(grads[0].detach(), grads[1].detach(), s[0].detach(), s[1].detach(), s[2].detach(), s[3].detach(),
                  s[4], s[5], eps, zero_centered, is_neox);
    }
    // The reference runs on views of the saved inputs, and autograd.grad stops at those views: the inputs' own
    // tensor hooks (gradient clipping, scaling) run once, in the outer backward, as without create_graph.
    std::vector<at::Tensor> in(4), inputs;
    std::vector<size_t> slots;
    for (size_t i = 0; i < 4; ++i) {
      in[i] = s[i].requires_grad() ? s[i].view_as(s[i]) : s[i];
      if (s[i].requires_grad()) {
        inputs.push_back(in[i]);
        slots.push_back(i);
      }
    }
    // only the sides with something trainable (a frozen q and q_norm give a reference without a graph)
    std::vector<at::Tensor> outputs, output_grads;
    for (int side = 0; side < 2; ++side) {
      if (!(s[side].requires_grad() || s[side + 2].requires_grad())) continue;
      outputs.push_back(norm_rope_reference(in[side], in[side + 2], s[4], s[5], eps, zero_centered, is_neox)
                            .to(grads[side].scalar_type()));
      output_grads.push_back(grads[side]);
    }
    if (!inputs.empty() && !outputs.empty()) {
      const auto refs = torch::autograd::grad(outputs, inputs, output_grads, /*retain_graph=*/true,
                                              /*create_graph=*/true, /*allow_unused=*/true);
      for (size_t j = 0; j < slots.size(); ++j) exact[slots[j]] = with_graph_of(exact[slots[j]], refs[j]);
    }
    return {exact[0], exact[1], exact[2], exact[3], at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> qk_norm_rope_autograd(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& q_weight, const at::Tensor& k_weight,
                                                         const at::Tensor& cos, const at::Tensor& sin, double eps,
                                                         bool zero_centered, bool is_neox) {
  auto out = QkNormRopeFunction::apply(q, k, q_weight, k_weight, cos, sin, eps, zero_centered, is_neox);
  return {out[0], out[1]};
}

}  // namespace ropekit
