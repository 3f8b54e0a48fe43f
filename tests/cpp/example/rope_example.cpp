// Using ropekit from C++ through LibTorch: build the cos/sin table once, gather it for some positions, rotate q/k
// and backpropagate. Ops are reached through the dispatcher, exactly as torch.ops.ropekit.* are from Python.
// Built and run by CMake's test suite (`ctest -R rope_example`).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <iostream>
#include <optional>

namespace {

using Pair = std::tuple<at::Tensor, at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> ropekit_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

int main() {
  const int64_t head_dim = 64, heads = 4, kv_heads = 1, seq = 16;
  const auto inv_freq = 1.0 / torch::pow(1e6, torch::arange(0, head_dim, 2, torch::kFloat) / head_dim);

  auto rope_cache = ropekit_op<Pair(const at::Tensor&, int64_t, double)>("ropekit::rope_cache");
  auto rope_cos_sin = ropekit_op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::ScalarType,
                                      const std::optional<at::Tensor>&, double,
                                      const std::optional<at::Tensor>&, bool)>("ropekit::rope_cos_sin");
  auto apply_rope = ropekit_op<Pair(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    int64_t, bool)>("ropekit::apply_rope");

  auto [cos_table, sin_table] = rope_cache.call(inv_freq, 4096, 1.0);
  const auto position_ids = torch::arange(seq, torch::kLong).unsqueeze(0);
  auto [cos, sin] = rope_cos_sin.call(cos_table, sin_table, position_ids, at::kFloat, std::nullopt, 1.0,
                                      std::nullopt, /*is_neox=*/true);

  auto q = torch::randn({1, seq, heads, head_dim}).transpose(1, 2).requires_grad_();
  auto k = torch::randn({1, seq, kv_heads, head_dim}).transpose(1, 2).requires_grad_();
  auto [q_rot, k_rot] = apply_rope.call(q, k, cos, sin, /*unsqueeze_dim=*/1, /*is_neox=*/true);
  (q_rot.square().sum() + k_rot.square().sum()).backward();

  // A rotation preserves each pair's norm, so |rope(q)| == |q| and d|rope(q)|^2/dq == 2q.
  const bool norms_kept = torch::allclose(q_rot.norm(), q.norm(), 1e-5, 1e-5);
  const bool grads_ok = torch::allclose(q.grad(), 2 * q.detach(), 1e-5, 1e-5) &&
                        torch::allclose(k.grad(), 2 * k.detach(), 1e-5, 1e-5);
  std::cout << "q_rot " << q_rot.sizes() << ", |q_rot| = " << q_rot.norm().item<float>()
            << ", |q| = " << q.norm().item<float>() << ", gradients " << (grads_ok ? "ok" : "WRONG") << "\n";
  return norms_kept && grads_ok ? 0 : 1;
}
