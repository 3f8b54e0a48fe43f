#include "apply_rope.h"

#include "double_backward.h"

#include "rope_common.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <vector>

namespace ropekit {
namespace {

bool is_rope_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Views a 4-D q/k as (batch, seq, heads, head_dim): the head axis is where cos is unsqueezed.
at::Tensor canonical(const at::Tensor& x, int64_t unsqueeze_dim) {
  return unsqueeze_dim == 1 ? x.transpose(1, 2) : x;
}

RopeOperand make_operand(const at::Tensor& x, int64_t unsqueeze_dim, at::ScalarType out_dtype, bool contiguous_out) {
  // A strided head_dim would defeat vector loads; copy once in that rare case (never more than once).
  const at::Tensor in = x.stride(-1) == 1 ? x : x.contiguous();
  // Forward: empty_like keeps a transposed (B,H,S,D) view's (B,S,H,D) storage order, like eager's elementwise ops
  // do. Backward (contiguous_out): autograd's gradient of transformers' rotation is contiguous whatever the incoming
  // gradient's order (its first contribution comes from the slice backward of rotate_half, a new_zeros buffer the
  // others are added into), and reductions downstream (a norm weight's gradient) sum in the order of that layout.
  const at::Tensor out = contiguous_out ? at::empty(in.sizes(), in.options().dtype(out_dtype))
                                        : at::empty_like(in, in.options().dtype(out_dtype));
  return rope_operand(in, out, canonical(in, unsqueeze_dim), canonical(out, unsqueeze_dim));
}

}  // namespace

RopeOperand rope_operand(const at::Tensor& in, const at::Tensor& out, const at::Tensor& in_rows,
                         const at::Tensor& out_rows) {
  RopeOperand op;
  op.in = in;
  op.out = out;
  op.heads = in_rows.size(2);
  op.in_ptr = in_rows.data_ptr();
  op.in_stride_b = in_rows.stride(0);
  op.in_stride_s = in_rows.stride(1);
  op.in_stride_h = in_rows.stride(2);
  if (!out_rows.defined()) return op;  // read-only operand (out_ptr stays null)
  op.out_ptr = out_rows.data_ptr();
  op.out_stride_b = out_rows.stride(0);
  op.out_stride_s = out_rows.stride(1);
  op.out_stride_h = out_rows.stride(2);
  return op;
}

at::ScalarType apply_rope_out_dtype(at::ScalarType x_dtype, at::ScalarType cos_dtype) {
  return at::promote_types(x_dtype, cos_dtype);
}

RopeArgs prepare_apply_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                            int64_t unsqueeze_dim, at::ScalarType out_dtype, bool is_neox, bool contiguous_out) {
  TORCH_CHECK(q.dim() == 4, "q: expected a 4-D tensor (batch, heads, seq, head_dim) or (batch, seq, heads, "
              "head_dim), got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "k: expected a 4-D tensor like q, got shape ", k.sizes());
  TORCH_CHECK(cos.dim() == 3, "cos: expected a 3-D (batch or 1, seq, rotary_dim) tensor, got shape ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin: expected the shape of cos ", cos.sizes(), ", got ", sin.sizes());
  if (unsqueeze_dim < 0) unsqueeze_dim += 4;  // unsqueeze on a 3-D tensor: -3 -> 1, -2 -> 2
  TORCH_CHECK(unsqueeze_dim == 1 || unsqueeze_dim == 2,
              "unsqueeze_dim: expected 1 (q is batch, heads, seq, dim) or 2 (batch, seq, heads, dim), got ",
              unsqueeze_dim);
  TORCH_CHECK(is_rope_float(q.scalar_type()), "q: expected float32, float16, bfloat16 or float64, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), "k: expected the dtype of q (", q.scalar_type(), "), got ",
              k.scalar_type());
  TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), "sin: expected the dtype of cos (", cos.scalar_type(),
              "), got ", sin.scalar_type());
  TORCH_CHECK(cos.scalar_type() == q.scalar_type() || cos.scalar_type() == at::kFloat,
              "cos: expected the dtype of q (", q.scalar_type(), ") or float32, got ", cos.scalar_type());
  TORCH_CHECK(k.device() == q.device(), "k: expected device ", q.device(), " (that of q), got ", k.device());
  TORCH_CHECK(cos.device() == q.device(), "cos: expected device ", q.device(), " (that of q), got ", cos.device());
  TORCH_CHECK(sin.device() == q.device(), "sin: expected device ", q.device(), " (that of q), got ", sin.device());

  const at::Tensor qc = canonical(q, unsqueeze_dim), kc = canonical(k, unsqueeze_dim);
  const int64_t batch = qc.size(0), seq = qc.size(1), head_dim = qc.size(3), rot_dim = cos.size(2);
  TORCH_CHECK(kc.size(0) == batch && kc.size(1) == seq, "k: expected batch ", batch, " and seq ", seq,
              " like q, got shape ", k.sizes());
  TORCH_CHECK(kc.size(3) == head_dim, "k: expected head_dim ", head_dim, " like q, got ", kc.size(3));
  TORCH_CHECK(rot_dim % 2 == 0, "cos: expected an even rotary dim (last dimension), got ", rot_dim);
  TORCH_CHECK(rot_dim <= head_dim, "cos: rotary dim ", rot_dim, " exceeds head_dim ", head_dim);
  TORCH_CHECK(cos.size(1) == seq, "cos: expected seq ", seq, " (that of q), got shape ", cos.sizes());
  TORCH_CHECK(cos.size(0) == batch || cos.size(0) == 1, "cos: expected batch 1 or ", batch, ", got shape ",
              cos.sizes());

  RopeArgs a;
  a.batch = batch;
  a.seq = seq;
  a.head_dim = head_dim;
  a.rot_dim = rot_dim;
  a.is_neox = is_neox;
  a.cos = cos.stride(-1) == 1 ? cos : cos.contiguous();
  a.sin = sin.stride(-1) == 1 ? sin : sin.contiguous();
  if (a.cos.strides() != a.sin.strides()) {  // the kernels index both with one set of strides
    a.cos = a.cos.contiguous();
    a.sin = a.sin.contiguous();
  }
  a.cos_stride_b = cos.size(0) == 1 ? 0 : a.cos.stride(0);
  a.cos_stride_s = a.cos.stride(1);
  a.q = make_operand(q, unsqueeze_dim, out_dtype, contiguous_out);
  a.k = make_operand(k, unsqueeze_dim, out_dtype, contiguous_out);
  return a;
}

RopeArgs prepare_apply_rope_backward(const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& cos,
                                     const at::Tensor& sin, int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                     bool is_neox) {
  TORCH_CHECK(is_rope_float(q_dtype), "q_dtype: expected float32, float16, bfloat16 or float64, got ", q_dtype);
  // The forward's output dtype: promote(q, cos) for apply_rope, q's own for apply_rope_vision.
  const auto promoted = apply_rope_out_dtype(q_dtype, cos.scalar_type());
  TORCH_CHECK(grad_q.scalar_type() == promoted || grad_q.scalar_type() == q_dtype, "grad_q: expected dtype ",
              promoted, " (apply_rope) or ", q_dtype, " (apply_rope_vision), got ", grad_q.scalar_type());
  TORCH_CHECK(grad_k.scalar_type() == grad_q.scalar_type(), "grad_k: expected the dtype of grad_q (",
              grad_q.scalar_type(), "), got ", grad_k.scalar_type());
  TORCH_CHECK(cos.scalar_type() == q_dtype || cos.scalar_type() == at::kFloat, "cos: expected dtype ", q_dtype,
              " or float32, got ", cos.scalar_type());
  return prepare_apply_rope(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, is_neox, /*contiguous_out=*/true);
}

RopeArgs prepare_apply_rope_vision(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                   const at::Tensor& sin, bool is_neox) {
  TORCH_CHECK(q.dim() == 3, "q: expected a 3-D (tokens, heads, head_dim) tensor, got shape ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "k: expected a 3-D (tokens, heads, head_dim) tensor like q, got shape ", k.sizes());
  TORCH_CHECK(cos.dim() == 2, "cos: expected a 2-D (tokens, rotary_dim) tensor, got shape ", cos.sizes());
  TORCH_CHECK(k.size(0) == q.size(0), "k: expected ", q.size(0), " tokens like q, got shape ", k.sizes());
  TORCH_CHECK(cos.size(0) == q.size(0), "cos: expected ", q.size(0), " tokens like q, got shape ", cos.sizes());
  // (tokens, heads, dim) is a batch-1 (batch, seq, heads, dim) with cos/sin broadcast over the heads; the output
  // keeps q's dtype (transformers computes in float32 and casts back).
  return prepare_apply_rope(q.unsqueeze(0), k.unsqueeze(0), cos.unsqueeze(0), sin.unsqueeze(0), /*unsqueeze_dim=*/2,
                            q.scalar_type(), is_neox);
}

namespace {

template <typename Types, bool kBackward, bool kNeox>
void rotate_operand_row(const RopeOperand& op, int64_t b, int64_t s, const RopeArgs& a,
                        const typename Types::acc* c, const typename Types::acc* sn) {
  using in_t = typename Types::in_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  const int64_t half = a.rot_dim / 2;
  const in_t* in_base = static_cast<const in_t*>(op.in_ptr) + b * op.in_stride_b + s * op.in_stride_s;
  out_t* out_base = static_cast<out_t*>(op.out_ptr) + b * op.out_stride_b + s * op.out_stride_s;
  for (int64_t h = 0; h < op.heads; ++h) {
    const in_t* x = in_base + h * op.in_stride_h;
    out_t* y = out_base + h * op.out_stride_h;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t j1 = pair_first<kNeox>(i, half), j2 = pair_second<kNeox>(i, half);
      acc o1, o2;
      rotate_pair<kBackward, acc>(static_cast<acc>(x[j1]), static_cast<acc>(x[j2]), c[j1], c[j2], sn[j1], sn[j2],
                                  o1, o2);
      y[j1] = static_cast<out_t>(o1);
      y[j2] = static_cast<out_t>(o2);
    }
    for (int64_t j = a.rot_dim; j < a.head_dim; ++j) {
      const acc v = static_cast<acc>(x[j]);
      y[j] = static_cast<out_t>(kBackward ? as_accumulated(v) : v);
    }
  }
}

template <bool kBackward>
void apply_rope_cpu_impl(const RopeArgs& a) {
  if (a.batch * a.seq * (a.q.heads + a.k.heads) * a.head_dim == 0) return;
  dispatch_rope_types<kBackward>(a.q.in.scalar_type(), a.cos.scalar_type(), a.q.out.scalar_type(), [&](auto types) {
   dispatch_rope_style(a.is_neox, [&](auto neox) {
    constexpr bool kNeox = decltype(neox)::value;
    using Types = decltype(types);
    using cs_t = typename Types::cs_t;
    using acc = typename Types::acc;
    const cs_t* cos_ptr = a.cos.template data_ptr<cs_t>();
    const cs_t* sin_ptr = a.sin.template data_ptr<cs_t>();
    const int64_t work_per_token = (a.q.heads + a.k.heads) * a.head_dim;
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_token, 1));
    at::parallel_for(0, a.batch * a.seq, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc> c(a.rot_dim), sn(a.rot_dim);
      for (int64_t n = begin; n < end; ++n) {
        const int64_t b = n / a.seq, s = n % a.seq;
        const cs_t* cr = cos_ptr + b * a.cos_stride_b + s * a.cos_stride_s;
        const cs_t* sr = sin_ptr + b * a.cos_stride_b + s * a.cos_stride_s;
        for (int64_t j = 0; j < a.rot_dim; ++j) {
          c[j] = static_cast<acc>(cr[j]);
          sn[j] = static_cast<acc>(sr[j]);
        }
        rotate_operand_row<Types, kBackward, kNeox>(a.q, b, s, a, c.data(), sn.data());
        rotate_operand_row<Types, kBackward, kNeox>(a.k, b, s, a, c.data(), sn.data());
      }
    });
   });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rope_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                  const at::Tensor& sin, int64_t unsqueeze_dim, bool is_neox) {
  RopeArgs a = prepare_apply_rope(q, k, cos, sin, unsqueeze_dim,
                                  apply_rope_out_dtype(q.scalar_type(), cos.scalar_type()), is_neox);
  apply_rope_cpu_impl<false>(a);
  return {a.q.out, a.k.out};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                           const at::Tensor& cos, const at::Tensor& sin,
                                                           int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                                           bool is_neox) {
  RopeArgs a = prepare_apply_rope_backward(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, is_neox);
  apply_rope_cpu_impl<true>(a);
  return {a.q.out, a.k.out};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_vision_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& cos, const at::Tensor& sin, bool is_neox) {
  RopeArgs a = prepare_apply_rope_vision(q, k, cos, sin, is_neox);
  apply_rope_cpu_impl<false>(a);
  return {a.q.out.squeeze(0), a.k.out.squeeze(0)};
}

// ---------------------------------------------------------------------------------------------------------------
// Autograd

namespace {

std::tuple<at::Tensor, at::Tensor> call_apply_rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                   const at::Tensor& sin, int64_t unsqueeze_dim, bool is_neox) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ropekit::apply_rope", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, int64_t,
                                                                 bool)>();
  return op.call(q, k, cos, sin, unsqueeze_dim, is_neox);
}

std::tuple<at::Tensor, at::Tensor> call_apply_rope_backward(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            int64_t unsqueeze_dim, at::ScalarType q_dtype,
                                                            bool is_neox) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ropekit::apply_rope_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, int64_t,
                                                                 at::ScalarType, bool)>();
  return op.call(grad_q, grad_k, cos, sin, unsqueeze_dim, q_dtype, is_neox);
}

// d(out)/d(cos) and d(out)/d(sin), reduced over heads (and over the batch when cos broadcasts). Only runs when
// cos/sin require grad, which transformers' no_grad rotary embedding never does.
std::tuple<at::Tensor, at::Tensor> cos_sin_grads(const at::Tensor& x, const at::Tensor& g, const at::Tensor& cos,
                                                 int64_t unsqueeze_dim, bool is_neox) {
  const int64_t rot = cos.size(-1), half = rot / 2;
  const auto acc_dtype = at::promote_types(g.scalar_type(), at::kFloat);
  const at::Tensor xr = x.narrow(-1, 0, rot).to(acc_dtype);
  const at::Tensor gr = g.narrow(-1, 0, rot).to(acc_dtype);
  // rotate_half(x) = cat(-x2, x1) (neox) or rotate_half_llm(x) = stack((-x[1::2], x[0::2]), -1).flatten(-2)
  const at::Tensor rotated =
      is_neox ? at::cat({-xr.narrow(-1, half, half), xr.narrow(-1, 0, half)}, -1)
              : at::stack({-xr.slice(-1, 1, rot, 2), xr.slice(-1, 0, rot, 2)}, -1).flatten(-2);
  at::Tensor gc = (gr * xr).sum(unsqueeze_dim);
  at::Tensor gs = (gr * rotated).sum(unsqueeze_dim);
  if (cos.size(0) == 1 && gc.size(0) != 1) {
    gc = gc.sum(0, /*keepdim=*/true);
    gs = gs.sum(0, /*keepdim=*/true);
  }
  return {gc, gs};
}

std::tuple<at::Tensor, at::Tensor> call_apply_rope_vision(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& cos, const at::Tensor& sin,
                                                          bool is_neox) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("ropekit::apply_rope_vision", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                 const at::Tensor&, const at::Tensor&, bool)>();
  return op.call(q, k, cos, sin, is_neox);
}

// One Function for both layouts: apply_rope's (batch, heads|seq, ...) with cos (B or 1, S, R), and
// apply_rope_vision's (tokens, heads, dim) with cos (tokens, R), whose gradients are the batch-1 case of the first
// (unsqueeze_dim 2) in q's dtype.
class ApplyRopeFunction : public torch::autograd::Function<ApplyRopeFunction> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                                                int64_t unsqueeze_dim, bool is_neox, bool vision) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [q_out, k_out] = vision ? call_apply_rope_vision(q, k, cos, sin, is_neox)
                                 : call_apply_rope(q, k, cos, sin, unsqueeze_dim, is_neox);
    const bool need_table_grad = cos.requires_grad() || sin.requires_grad();
    // An output none of whose inputs requires grad carries none, as in transformers' q * cos + rotate_half(q) * sin
    // (q_embed of a frozen q next to a trainable k); its gradient then arrives as zeros, unused.
    if (!need_table_grad) {
      torch::autograd::variable_list frozen;
      if (!q.requires_grad()) frozen.push_back(q_out);
      if (!k.requires_grad()) frozen.push_back(k_out);
      if (!frozen.empty()) ctx->mark_non_differentiable(frozen);
    }
    // q and k are saved only for cos/sin gradients; out-of-place, so nothing saved is ever mutated here.
    ctx->save_for_backward({cos, sin, need_table_grad ? q : at::Tensor(), need_table_grad ? k : at::Tensor()});
    ctx->saved_data["unsqueeze_dim"] = vision ? 2 : (unsqueeze_dim < 0 ? unsqueeze_dim + 4 : unsqueeze_dim);
    ctx->saved_data["q_dtype"] = static_cast<int64_t>(q.scalar_type());
    ctx->saved_data["is_neox"] = is_neox;
    ctx->saved_data["vision"] = vision;
    return {q_out, k_out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool vision = ctx->saved_data["vision"].toBool();
    // the vision layout as its batch-1 (1, tokens, heads, dim) view
    const auto view = [vision](const at::Tensor& t) { return vision && t.defined() ? t.unsqueeze(0) : t; };
    const auto unview = [vision](const at::Tensor& t) { return vision && t.defined() ? t.squeeze(0) : t; };
    const at::Tensor cos = view(saved[0]), sin = view(saved[1]), q = view(saved[2]), k = view(saved[3]);
    const int64_t unsqueeze_dim = ctx->saved_data["unsqueeze_dim"].toInt();
    const auto q_dtype = static_cast<at::ScalarType>(ctx->saved_data["q_dtype"].toInt());
    const bool is_neox = ctx->saved_data["is_neox"].toBool();
    // Undefined output gradients arrive materialised as zeros (the Function default).
    const at::Tensor gq = view(grads[0]), gk = view(grads[1]);
    at::Tensor dq, dk, dcos, dsin;
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      if (building_graph({gq, gk, cos, sin})) {  // create_graph: the kernel's values, the reference's graph
        {
          at::NoGradGuard values_only;
          std::tie(dq, dk) = call_apply_rope_backward(gq.detach(), gk.detach(), cos.detach(), sin.detach(),
                                                      unsqueeze_dim, q_dtype, is_neox);
        }
        dq = with_graph_of(dq, rope_reference(gq, cos, sin, unsqueeze_dim, is_neox, /*transpose=*/true));
        dk = with_graph_of(dk, rope_reference(gk, cos, sin, unsqueeze_dim, is_neox, /*transpose=*/true));
      } else {
        std::tie(dq, dk) = call_apply_rope_backward(gq, gk, cos, sin, unsqueeze_dim, q_dtype, is_neox);
      }
    }
    if (ctx->needs_input_grad(2) || ctx->needs_input_grad(3)) {
      auto [cq, sq] = cos_sin_grads(q, gq, cos, unsqueeze_dim, is_neox);
      auto [ck, sk] = cos_sin_grads(k, gk, cos, unsqueeze_dim, is_neox);
      dcos = (cq + ck).to(cos.scalar_type());
      dsin = (sq + sk).to(sin.scalar_type());
    }
    return {unview(dq), unview(dk), unview(dcos), unview(dsin), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> apply_rope_autograd(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& cos, const at::Tensor& sin,
                                                       int64_t unsqueeze_dim, bool is_neox) {
  auto out = ApplyRopeFunction::apply(q, k, cos, sin, unsqueeze_dim, is_neox, /*vision=*/false);
  return {out[0], out[1]};
}

std::tuple<at::Tensor, at::Tensor> apply_rope_vision_autograd(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& cos, const at::Tensor& sin,
                                                              bool is_neox) {
  auto out = ApplyRopeFunction::apply(q, k, cos, sin, /*unsqueeze_dim=*/2, is_neox, /*vision=*/true);
  return {out[0], out[1]};
}

}  // namespace ropekit
