// Double backward (create_graph=True: gradient penalties, Hessian-vector products) for the differentiable ops.
//
// The first-order gradients always come from the backward kernels, so their bits do not depend on create_graph.
// Under create_graph each one also needs a graph: a reference computation of the same gradient in differentiable
// ATen ops (whose values match the kernel's up to rounding). with_graph_of joins the two: the kernel's values, the
// reference's derivatives.
#pragma once

#include <ATen/ATen.h>
#include <torch/autograd.h>

namespace ropekit {

// Whether a backward must build a graph: create_graph is on (autograd runs the backward in grad mode) and one of
// the tensors it reads requires grad.
inline bool building_graph(std::initializer_list<at::Tensor> read) {
  if (!at::GradMode::is_enabled()) return false;
  for (const auto& t : read) {
    if (t.defined() && t.requires_grad()) return true;
  }
  return false;
}

// `exact`'s values with `reference`'s derivative: exact - (reference.detach() - reference). The subtracted term is
// +0 where the reference is finite, and x - (+0) is x for every x, -0 included (x + (+0) would turn -0 into +0); it
// is dropped where the reference is not finite (inf - inf would be NaN). So the values are the kernel's everywhere.
inline at::Tensor with_graph_of(const at::Tensor& exact, const at::Tensor& reference) {
  if (!exact.defined() || !reference.defined() || !reference.requires_grad()) return exact;
  const at::Tensor ref = reference.to(exact.scalar_type());
  const at::Tensor zero = ref.detach() - ref;
  return exact.detach() - at::where(at::isfinite(ref.detach()), zero, at::zeros_like(zero));
}

// The rotation in ATen ops, as transformers writes it: x * cos + rot(x) * sin on the first R = cos.size(-1)
// channels (rot(x) = (-x2, x1) per pair: rotate_half for neox, rotate_half_llm for gptj), the rest passed through.
// cos/sin are (B or 1, S, R), unsqueezed at unsqueeze_dim against x. Computed in float32 (float64 for float64).
inline at::Tensor rope_reference(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 int64_t unsqueeze_dim, bool is_neox, bool transpose = false) {
  const int64_t rot = cos.size(-1), half = rot / 2;
  const auto acc = at::promote_types(at::promote_types(x.scalar_type(), cos.scalar_type()), at::kFloat);
  const at::Tensor c = cos.unsqueeze(unsqueeze_dim).to(acc), s = sin.unsqueeze(unsqueeze_dim).to(acc);
  const at::Tensor xr = x.narrow(-1, 0, rot).to(acc);
  // forward: rot(x) * sin; transpose (the backward): rot^T(x * sin), rot^T(y) = (y2, -y1) per pair
  const at::Tensor y = transpose ? xr * s : xr;
  const int64_t sign_first = transpose ? 1 : -1;
  const at::Tensor turned =
      is_neox ? at::cat({y.narrow(-1, half, half) * sign_first, y.narrow(-1, 0, half) * -sign_first}, -1)
              : at::stack({y.slice(-1, 1, rot, 2) * sign_first, y.slice(-1, 0, rot, 2) * -sign_first}, -1)
                    .flatten(-2);
  const at::Tensor out = transpose ? xr * c + turned : xr * c + turned * s;
  const int64_t rest = x.size(-1) - rot;
  return rest == 0 ? out : at::cat({out, x.narrow(-1, rot, rest).to(acc)}, -1);
}

}  // namespace ropekit
