#include "rope_table.h"

#include "rope_common.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>

namespace ropekit {
namespace {

void check_table(const at::Tensor& cos_cache, const at::Tensor& sin_cache) {
  TORCH_CHECK(cos_cache.dim() == 2, "cos_cache: expected a 2-D [max_position, rotary_dim/2] table, got shape ",
              cos_cache.sizes());
  TORCH_CHECK(cos_cache.scalar_type() == at::kFloat, "cos_cache: expected float32 (tables stay fp32), got ",
              cos_cache.scalar_type());
  TORCH_CHECK(sin_cache.sizes() == cos_cache.sizes(), "sin_cache: expected the shape of cos_cache ",
              cos_cache.sizes(), ", got ", sin_cache.sizes());
  TORCH_CHECK(sin_cache.scalar_type() == at::kFloat, "sin_cache: expected float32, got ", sin_cache.scalar_type());
  TORCH_CHECK(sin_cache.device() == cos_cache.device(), "sin_cache: expected device ", cos_cache.device(),
              " (that of cos_cache), got ", sin_cache.device());
}

void check_positions(const at::Tensor& position_ids, const at::Tensor& cos_cache) {
  TORCH_CHECK(position_ids.scalar_type() == at::kLong || position_ids.scalar_type() == at::kInt,
              "position_ids: expected int64 or int32, got ", position_ids.scalar_type());
  TORCH_CHECK(position_ids.device() == cos_cache.device(), "position_ids: expected device ", cos_cache.device(),
              " (that of cos_cache), got ", position_ids.device());
}

void check_output_dtype(at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "dtype: expected float32, float16, bfloat16 or float64, got ", dtype);
}

at::Tensor check_inv_freq(const std::optional<at::Tensor>& inv_freq, const at::Tensor& cos_cache) {
  if (!inv_freq.has_value() || !inv_freq->defined()) return at::Tensor();
  const at::Tensor& f = *inv_freq;
  TORCH_CHECK(f.dim() == 1 && f.size(0) == cos_cache.size(1), "inv_freq: expected shape [", cos_cache.size(1),
              "] to match the table's columns, got ", f.sizes());
  TORCH_CHECK(at::isFloatingType(f.scalar_type()), "inv_freq: expected a floating dtype, got ", f.scalar_type());
  TORCH_CHECK(f.device() == cos_cache.device(), "inv_freq: expected device ", cos_cache.device(), ", got ",
              f.device());
  // transformers reads inv_freq through .float(): a bf16 buffer (after model.to(bf16)) is widened, not recomputed.
  return f.to(at::kFloat).contiguous();
}

at::Tensor check_table_inv_freq(const std::optional<at::Tensor>& table_inv_freq, const at::Tensor& inv_freq,
                                const at::Tensor& cos_cache) {
  if (!table_inv_freq.has_value() || !table_inv_freq->defined()) return at::Tensor();
  const at::Tensor& f = *table_inv_freq;
  TORCH_CHECK(inv_freq.defined(), "table_inv_freq: given without inv_freq (the current frequencies to compare with)");
  TORCH_CHECK(f.dim() == 1 && f.size(0) == cos_cache.size(1), "table_inv_freq: expected shape [", cos_cache.size(1),
              "] to match the table's columns, got ", f.sizes());
  TORCH_CHECK(f.scalar_type() == at::kFloat, "table_inv_freq: expected float32 (what the table was built from), got ",
              f.scalar_type());
  TORCH_CHECK(f.device() == cos_cache.device(), "table_inv_freq: expected device ", cos_cache.device(), ", got ",
              f.device());
  return f.contiguous();
}

GatherArgs make_args(const at::Tensor& cos_cache, const at::Tensor& sin_cache, const at::Tensor& position_ids,
                     at::ScalarType dtype, const std::optional<at::Tensor>& inv_freq, double attention_scaling,
                     const std::optional<at::Tensor>& table_inv_freq) {
  check_table(cos_cache, sin_cache);
  check_positions(position_ids, cos_cache);
  check_output_dtype(dtype);
  GatherArgs a;
  a.cos_cache = cos_cache.contiguous();
  a.sin_cache = sin_cache.contiguous();
  a.positions = position_ids;
  a.inv_freq = check_inv_freq(inv_freq, cos_cache);
  a.table_inv_freq = check_table_inv_freq(table_inv_freq, a.inv_freq, cos_cache);
  a.attention_scaling = attention_scaling;
  a.dtype = dtype;
  return a;
}

void set_2d_positions(GatherArgs& a, const at::Tensor& p) {
  a.axes = 1;
  a.batch = p.size(0);
  a.seq = p.size(1);
  a.stride_axis = 0;
  a.stride_batch = p.stride(0);
  a.stride_seq = p.stride(1);
}

}  // namespace

GatherArgs check_rope_cos_sin(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                              const at::Tensor& position_ids, at::ScalarType dtype,
                              const std::optional<at::Tensor>& inv_freq, double attention_scaling,
                              const std::optional<at::Tensor>& table_inv_freq, bool is_neox) {
  GatherArgs a = make_args(cos_cache, sin_cache, position_ids, dtype, inv_freq, attention_scaling, table_inv_freq);
  a.is_neox = is_neox;
  TORCH_CHECK(position_ids.dim() == 2, "position_ids: expected a 2-D (batch, seq) tensor, got shape ",
              position_ids.sizes());
  set_2d_positions(a, position_ids);
  return a;
}

GatherArgs check_mrope_cos_sin(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                               const at::Tensor& position_ids, c10::IntArrayRef mrope_section,
                               at::ScalarType dtype, const std::optional<at::Tensor>& inv_freq,
                               double attention_scaling, const std::optional<at::Tensor>& table_inv_freq,
                               bool mrope_interleaved, bool is_neox) {
  GatherArgs a = make_args(cos_cache, sin_cache, position_ids, dtype, inv_freq, attention_scaling, table_inv_freq);
  a.is_neox = is_neox;
  TORCH_CHECK(mrope_section.size() == 3, "mrope_section: expected 3 entries [t, h, w], got ", mrope_section);
  for (int64_t s : mrope_section) {
    TORCH_CHECK(s >= 0, "mrope_section: expected non-negative entries, got ", mrope_section);
  }
  TORCH_CHECK(mrope_interleaved || (mrope_section[0] <= a.half() && mrope_section[1] <= a.half() &&
                                    mrope_section[2] <= a.half() &&
                                    mrope_section[0] + mrope_section[1] + mrope_section[2] == a.half()),
              "mrope_section: sectioned mRoPE (mrope_interleaved=False) splits the ", a.half(),
              " frequencies of the table into consecutive [t, h, w] chunks, so the entries must sum to ", a.half(),
              ", got ", mrope_section);
  if (position_ids.dim() == 2) {
    // (batch, seq): every axis is the text position, as 4.57 expands it. Plain 1-D RoPE.
    set_2d_positions(a, position_ids);
    return a;
  }
  TORCH_CHECK(position_ids.dim() == 3 && (position_ids.size(0) == 3 || position_ids.size(0) == 1),
              "position_ids: expected (3, batch, seq), (1, batch, seq) or (batch, seq), got shape ",
              position_ids.sizes());
  a.axes = position_ids.size(0);
  a.batch = position_ids.size(1);
  a.seq = position_ids.size(2);
  a.stride_axis = position_ids.stride(0);
  a.stride_batch = position_ids.stride(1);
  a.stride_seq = position_ids.stride(2);
  if (a.axes == 3) a.mrope = MropeLayout{mrope_section[0], mrope_section[1], mrope_section[2], mrope_interleaved};
  return a;
}

std::tuple<at::Tensor, at::Tensor> build_rope_rows(const at::Tensor& inv_freq, int64_t start, int64_t end,
                                                   double attention_scaling) {
  return build_rope_rows_at(inv_freq, at::arange(start, end, inv_freq.options().dtype(at::kLong)),
                            attention_scaling);
}

std::tuple<at::Tensor, at::Tensor> build_rope_rows_at(const at::Tensor& inv_freq, const at::Tensor& positions,
                                                      double attention_scaling) {
  // Same ops as transformers: positions as int64 -> float, one rounded fp32 product (its K=1 matmul), then
  // PyTorch's own cos/sin kernels on this device, so the table is bit-identical to what it computes per call.
  const auto f32 = inv_freq.options().dtype(at::kFloat);
  at::Tensor pos = positions.to(inv_freq.device(), at::kLong).to(at::kFloat);
  at::Tensor freqs = at::mul(pos.unsqueeze(1), inv_freq.to(f32).unsqueeze(0));
  at::Tensor cos = at::cos(freqs);
  at::Tensor sin = at::sin(freqs);
  if (attention_scaling != 1.0) {
    cos.mul_(attention_scaling);
    sin.mul_(attention_scaling);
  }
  return {cos, sin};
}

std::tuple<at::Tensor, at::Tensor> rope_cache(const at::Tensor& inv_freq, int64_t max_position,
                                              double attention_scaling) {
  TORCH_CHECK(inv_freq.dim() == 1, "inv_freq: expected a 1-D tensor of rotary_dim/2 frequencies, got shape ",
              inv_freq.sizes());
  TORCH_CHECK(at::isFloatingType(inv_freq.scalar_type()), "inv_freq: expected a floating dtype, got ",
              inv_freq.scalar_type());
  TORCH_CHECK(max_position >= 0, "max_position: expected >= 0, got ", max_position);
  TORCH_CHECK(max_position <= (int64_t{1} << 24),
              "max_position: expected <= 2^24 (positions past that are not exact in float32), got ", max_position);
  return build_rope_rows(inv_freq, 0, max_position, attention_scaling);
}

namespace {

// Rows for positions outside [0, rows): `extra` holds those positions sorted, `cos_ext` / `sin_ext` their rows.
struct ExtraRows {
  std::vector<int64_t> positions;
  at::Tensor cos, sin;
};

// Whether the table holds exactly the current frequencies (bitwise; no table_inv_freq given means the caller vouches).
bool table_is_current(const GatherArgs& a) {
  if (!a.table_inv_freq.defined()) return true;
  return std::memcmp(a.table_inv_freq.data_ptr<float>(), a.inv_freq.data_ptr<float>(),
                     sizeof(float) * a.half()) == 0;
}

// `rows`: how many table rows may be served (0 when the table is stale).
template <typename out_t, typename index_t, bool kNeox>
void gather_cpu_kernel(const GatherArgs& a, int64_t rows, const ExtraRows& extra, at::Tensor& cos_out,
                       at::Tensor& sin_out) {
  const int64_t half = a.half();
  const float* cos_tab = a.cos_cache.data_ptr<float>();
  const float* sin_tab = a.sin_cache.data_ptr<float>();
  const float* cos_ext = extra.cos.defined() ? extra.cos.data_ptr<float>() : nullptr;
  const float* sin_ext = extra.sin.defined() ? extra.sin.data_ptr<float>() : nullptr;
  const index_t* pos = a.positions.data_ptr<index_t>();
  out_t* cos_dst = cos_out.data_ptr<out_t>();
  out_t* sin_dst = sin_out.data_ptr<out_t>();

  auto row_of = [&](const float* table, const float* ext, int64_t p) {
    if (p >= 0 && p < rows) return table + p * half;
    const auto it = std::lower_bound(extra.positions.begin(), extra.positions.end(), p);
    return ext + (it - extra.positions.begin()) * half;
  };
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(half, 1));
  at::parallel_for(0, a.batch * a.seq, grain, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / a.seq, s = n % a.seq;
      const index_t* tok = pos + b * a.stride_batch + s * a.stride_seq;
      const int64_t p0 = tok[0];
      const int64_t p1 = a.axes == 3 ? int64_t(tok[a.stride_axis]) : p0;
      const int64_t p2 = a.axes == 3 ? int64_t(tok[2 * a.stride_axis]) : p0;
      out_t* c = cos_dst + n * 2 * half;
      out_t* sn = sin_dst + n * 2 * half;
      auto put = [&](int64_t j, float cv, float sv) {
        c[freq_column<kNeox>(j, half, 0)] = c[freq_column<kNeox>(j, half, 1)] = static_cast<out_t>(cv);
        sn[freq_column<kNeox>(j, half, 0)] = sn[freq_column<kNeox>(j, half, 1)] = static_cast<out_t>(sv);
      };
      if (p0 == p1 && p0 == p2) {  // text token: one table row
        const float* cr = row_of(cos_tab, cos_ext, p0);
        const float* sr = row_of(sin_tab, sin_ext, p0);
        for (int64_t j = 0; j < half; ++j) put(j, cr[j], sr[j]);
        continue;
      }
      const int64_t p[3] = {p0, p1, p2};
      for (int64_t j = 0; j < half; ++j) {
        const int64_t pj = p[mrope_axis(j, a.mrope)];
        put(j, row_of(cos_tab, cos_ext, pj)[j], row_of(sin_tab, sin_ext, pj)[j]);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gather_cos_sin_cpu(const GatherArgs& a) {
  const int64_t half = a.half();
  auto out_opts = a.cos_cache.options().dtype(a.dtype);
  at::Tensor cos_out = at::empty({a.batch, a.seq, 2 * half}, out_opts);
  at::Tensor sin_out = at::empty({a.batch, a.seq, 2 * half}, out_opts);
  if (cos_out.numel() == 0) return {cos_out, sin_out};

  // A table built from other frequencies than the current ones (an in-place change that left no trace the caller
  // could see) serves nothing: every row is then computed from inv_freq, as transformers would.
  const int64_t rows = table_is_current(a) ? a.rows() : 0;
  // Positions live on the host: collect those outside the table in one pass, so a bad position is an error,
  // never a wild read.
  ExtraRows extra;
  AT_DISPATCH_INDEX_TYPES(a.positions.scalar_type(), "ropekit_position_range", [&] {
    const index_t* pos = a.positions.data_ptr<index_t>();
    for (int64_t ax = 0; ax < a.axes; ++ax)
      for (int64_t b = 0; b < a.batch; ++b)
        for (int64_t s = 0; s < a.seq; ++s) {
          const int64_t p = pos[ax * a.stride_axis + b * a.stride_batch + s * a.stride_seq];
          if (p < 0 || p >= rows) extra.positions.push_back(p);
        }
  });
  if (!extra.positions.empty()) {
    std::sort(extra.positions.begin(), extra.positions.end());
    extra.positions.erase(std::unique(extra.positions.begin(), extra.positions.end()), extra.positions.end());
    TORCH_CHECK(a.inv_freq.defined(), "position_ids: position ",
                extra.positions.front() < 0 ? extra.positions.front() : extra.positions.back(),
                " is outside the cos/sin table (rows 0..", rows - 1,
                "); grow the table or pass inv_freq so such rows are computed");
    // Built by the same routine as the table, for exactly these positions: equal to a table that held them.
    std::tie(extra.cos, extra.sin) =
        build_rope_rows_at(a.inv_freq, at::tensor(extra.positions, at::kLong), a.attention_scaling);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.dtype, "ropekit_gather_cos_sin_cpu", [&] {
    using out_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(a.positions.scalar_type(), "ropekit_gather_cos_sin_cpu", [&] {
      dispatch_rope_style(a.is_neox, [&](auto neox) {
        gather_cpu_kernel<out_t, index_t, decltype(neox)::value>(a, rows, extra, cos_out, sin_out);
      });
    });
  });
  return {cos_out, sin_out};
}

}  // namespace ropekit
