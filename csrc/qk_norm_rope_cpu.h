// CPU kernels of qk_norm_rope, forward and backward. A row is one (token, head) of head_dim elements, computed whole
// in registers/buffers before it is written, so the in-place qkv variant is safe.
//
// No include guard, on purpose: qk_norm_rope.cpp includes this file once per instruction set, each time inside its
// own namespace (cpu_baseline, cpu_avx2; see cpu_isa.h), after every header it needs. Nothing here may include a
// header or define anything outside those namespaces.

// Sum of a[j] * b[j] over 8 interleaved partial sums: breaks the add dependency chain so it vectorises (the order
// differs from PyTorch's reduction anyway; it is fixed, the same for every instruction set, so results are
// reproducible).
template <typename acc>
acc dot(const acc* a, const acc* b, int64_t d) {
  constexpr int kLanes = 8;
  acc part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= d; j += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += mul_rn(a[j + l], b[j + l]);
  for (; j < d; ++j) part[0] += mul_rn(a[j], b[j]);
  acc total = 0;
  for (int l = 0; l < kLanes; ++l) total += part[l];
  return total;
}

template <typename acc>
acc rstd_of(const acc* x, int64_t d, double eps) {
  return acc(1) / std::sqrt(dot(x, x, d) / acc(d) + acc(eps));
}

// cos/sin of token (b, s), widened to acc.
template <typename acc, typename cs_t>
void load_cos_sin(const NormRopeArgs& a, int64_t b, int64_t s, acc* c, acc* sn) {
  const cs_t* cos = a.cos.data_ptr<cs_t>();
  const cs_t* sin = a.sin.data_ptr<cs_t>();
  const int64_t row = b * a.cos_stride_b + s * a.cos_stride_s;
  for (int64_t j = 0; j < a.rot_dim; ++j) {
    c[j] = static_cast<acc>(cos[row + j]);
    sn[j] = static_cast<acc>(sin[row + j]);
  }
}

// The rows of token (b, s) in `op`: normalise then rotate; `out_t` results written to the operand's output.
template <typename Types, bool kNeox>
void norm_rope_rows(const NormRopeArgs& a, const RopeOperand& op, const at::Tensor& weight, int64_t b, int64_t s,
                    const typename Types::acc* c, const typename Types::acc* sn, typename Types::acc* y) {
  using in_t = typename Types::in_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  const auto* w = weight.data_ptr<typename Types::w_t>();
  const int64_t d = a.head_dim, half = a.rot_dim / 2;
  for (int64_t h = 0; h < op.heads; ++h) {
    const in_t* x = static_cast<const in_t*>(op.in_ptr) + b * op.in_stride_b + s * op.in_stride_s + h * op.in_stride_h;
    out_t* o = static_cast<out_t*>(op.out_ptr) + b * op.out_stride_b + s * op.out_stride_s + h * op.out_stride_h;
    for (int64_t j = 0; j < d; ++j) y[j] = static_cast<acc>(x[j]);
    const acc r = rstd_of(y, d, a.eps);
    for (int64_t j = 0; j < d; ++j) y[j] = normed<Types>(y[j], r, static_cast<acc>(w[j]));
    for (int64_t i = 0; i < half; ++i) {
      const int64_t j1 = pair_first<kNeox>(i, half), j2 = pair_second<kNeox>(i, half);
      acc o1, o2;
      rotate_pair<false, acc>(y[j1], y[j2], c[j1], c[j2], sn[j1], sn[j2], o1, o2);
      o[j1] = static_cast<out_t>(o1);
      o[j2] = static_cast<out_t>(o2);
    }
    for (int64_t j = a.rot_dim; j < d; ++j) o[j] = static_cast<out_t>(y[j]);
  }
}

template <typename Types, bool kNeox>
void forward(const NormRopeArgs& a) {
  using acc = typename Types::acc;
  const int64_t tokens = a.batch * a.seq;
  if (tokens * (a.q.heads + a.k.heads) * a.head_dim == 0) return;
  const int64_t work = (a.q.heads + a.k.heads) * a.head_dim;
  at::parallel_for(0, tokens, std::max<int64_t>(1, 16384 / std::max<int64_t>(work, 1)), [&](int64_t lo, int64_t hi) {
    std::vector<acc> c(a.rot_dim), sn(a.rot_dim), y(a.head_dim);
    for (int64_t n = lo; n < hi; ++n) {
      const int64_t b = n / a.seq, s = n % a.seq;
      load_cos_sin<acc, typename Types::cs_t>(a, b, s, c.data(), sn.data());
      norm_rope_rows<Types, kNeox>(a, a.q, a.q_weight, b, s, c.data(), sn.data(), y.data());
      norm_rope_rows<Types, kNeox>(a, a.k, a.k_weight, b, s, c.data(), sn.data(), y.data());
    }
  });
}

// Backward of the rows of token (b, s) in `x_op`, given g = d(out) in `grad`: gy = rope^T(g); Qwen3: gn = gy * w,
// dw += gy * round(n); Qwen3.5: gn = gy * (1 + w), dw += gy * n; then dx = rstd * (gn - n * mean(gn * n)).
template <typename Types, bool kNeox>
void norm_rope_backward_rows(const NormRopeArgs& a, const RopeOperand& grad, const RopeOperand& x_op,
                             const at::Tensor& weight, int64_t b, int64_t s, const typename Types::acc* c,
                             const typename Types::acc* sn, typename Types::acc* buf, typename Types::acc* dw) {
  using in_t = typename Types::in_t;
  using out_t = typename Types::out_t;
  using acc = typename Types::acc;
  const auto* w = weight.data_ptr<typename Types::w_t>();
  const int64_t d = a.head_dim, half = a.rot_dim / 2;
  acc* n = buf;
  acc* gy = buf + d;
  for (int64_t h = 0; h < x_op.heads; ++h) {
    const in_t* x = static_cast<const in_t*>(x_op.in_ptr) + b * x_op.in_stride_b + s * x_op.in_stride_s +
                    h * x_op.in_stride_h;
    const out_t* g = static_cast<const out_t*>(grad.in_ptr) + b * grad.in_stride_b + s * grad.in_stride_s +
                     h * grad.in_stride_h;
    in_t* dx = static_cast<in_t*>(grad.out_ptr) + b * grad.out_stride_b + s * grad.out_stride_s + h * grad.out_stride_h;
    for (int64_t j = 0; j < d; ++j) n[j] = static_cast<acc>(x[j]);
    const acc r = rstd_of(n, d, a.eps);
    for (int64_t j = 0; j < d; ++j) n[j] = mul_rn(n[j], r);
    for (int64_t i = 0; i < half; ++i) {
      const int64_t j1 = pair_first<kNeox>(i, half), j2 = pair_second<kNeox>(i, half);
      rotate_pair<true, acc>(static_cast<acc>(g[j1]), static_cast<acc>(g[j2]), c[j1], c[j2], sn[j1], sn[j2], gy[j1],
                             gy[j2]);
    }
    for (int64_t j = a.rot_dim; j < d; ++j) gy[j] = static_cast<acc>(g[j]);
    for (int64_t j = 0; j < d; ++j) {
      const acc wj = static_cast<acc>(w[j]);
      if constexpr (Types::zero_centered) {
        dw[j] += gy[j] * n[j];
        gy[j] = gy[j] * (acc(1) + wj);
      } else {
        dw[j] += gy[j] * round_to<in_t, acc>(n[j]);
        gy[j] = gy[j] * wj;
      }
    }
    const acc mean = dot(gy, n, d) / acc(d);
    for (int64_t j = 0; j < d; ++j) dx[j] = static_cast<in_t>(r * (gy[j] - n[j] * mean));
  }
}

// dq, dk into g's outputs; the weight gradients of token chunk i (kWeightGradChunk tokens) into row i of dwq_parts
// / dwk_parts (zero-filled, [chunks, head_dim], acc).
template <typename Types, bool kNeox>
void backward(const NormRopeArgs& a, const NormRopeArgs& g, const at::Tensor& dwq_parts, const at::Tensor& dwk_parts) {
  using acc = typename Types::acc;
  const int64_t tokens = a.batch * a.seq, d = a.head_dim;
  const int64_t chunks = (tokens + kWeightGradChunk - 1) / kWeightGradChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t lo, int64_t hi) {
    std::vector<acc> c(a.rot_dim), sn(a.rot_dim), buf(2 * d);
    for (int64_t chunk = lo; chunk < hi; ++chunk) {
      acc* dwq = dwq_parts.data_ptr<acc>() + chunk * d;
      acc* dwk = dwk_parts.data_ptr<acc>() + chunk * d;
      for (int64_t n = chunk * kWeightGradChunk; n < std::min(tokens, (chunk + 1) * kWeightGradChunk); ++n) {
        const int64_t b = n / a.seq, s = n % a.seq;
        load_cos_sin<acc, typename Types::cs_t>(a, b, s, c.data(), sn.data());
        norm_rope_backward_rows<Types, kNeox>(a, g.q, a.q, a.q_weight, b, s, c.data(), sn.data(), buf.data(), dwq);
        norm_rope_backward_rows<Types, kNeox>(a, g.k, a.k, a.k_weight, b, s, c.data(), sn.data(), buf.data(), dwk);
      }
    }
  });
}
