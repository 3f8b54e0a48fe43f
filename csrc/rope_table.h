// cos/sin tables: build once in fp32, gather by position (1-D RoPE and Qwen3-VL interleaved mRoPE).
#pragma once

#include "rope_common.h"

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <tuple>

namespace ropekit {

// Arguments of a cos/sin gather after validation. Positions are viewed as (axes, batch, seq) through strides,
// so expanded or sliced position tensors are read in place.
struct GatherArgs {
  at::Tensor cos_cache;  // [P, half] float32, contiguous
  at::Tensor sin_cache;
  at::Tensor positions;  // int32 or int64, any strides
  int64_t axes = 1, batch = 0, seq = 0;
  int64_t stride_axis = 0, stride_batch = 0, stride_seq = 0;
  MropeLayout mrope;     // which axis each frequency reads; the default (all on axis 0) is 1-D RoPE
  bool is_neox = true;   // output layout: cat((f, f)) (neox) or repeat_interleave(2) (GPT-J, GLM-4V)
  at::Tensor inv_freq;  // [half] float32 or undefined; defined => rows outside the table (past its end, or negative
                        // positions) are computed exactly; undefined => such positions are an error
  at::Tensor table_inv_freq;  // [half] float32 or undefined: the frequencies the table was built from. Where
                              // inv_freq[j] differs from it (bitwise), column j is computed from inv_freq for
                              // every position, so a table can never serve values of frequencies since changed.
  double attention_scaling = 1.0;
  at::ScalarType dtype = at::kFloat;

  int64_t rows() const { return cos_cache.size(0); }
  int64_t half() const { return cos_cache.size(1); }
};

GatherArgs check_rope_cos_sin(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                              const at::Tensor& position_ids, at::ScalarType dtype,
                              const std::optional<at::Tensor>& inv_freq, double attention_scaling,
                              const std::optional<at::Tensor>& table_inv_freq, bool is_neox);
// mrope_interleaved: Qwen3-VL's interleaved frequencies (true) or Qwen2-VL / GLM-4V's consecutive sections (false,
// which needs sum(mrope_section) == the table's columns).
GatherArgs check_mrope_cos_sin(const at::Tensor& cos_cache, const at::Tensor& sin_cache,
                               const at::Tensor& position_ids, c10::IntArrayRef mrope_section,
                               at::ScalarType dtype, const std::optional<at::Tensor>& inv_freq,
                               double attention_scaling, const std::optional<at::Tensor>& table_inv_freq,
                               bool mrope_interleaved, bool is_neox);

// Rows [start, end) of the table, with the same fp32 ops as transformers' rotary forward:
// cos[p, j] = cos(fl32(inv_freq[j] * float(p))) * attention_scaling. Runs on inv_freq's device.
std::tuple<at::Tensor, at::Tensor> build_rope_rows(const at::Tensor& inv_freq, int64_t start, int64_t end,
                                                   double attention_scaling);

// The same rows for arbitrary integer positions (negative ones included, as transformers computes them).
std::tuple<at::Tensor, at::Tensor> build_rope_rows_at(const at::Tensor& inv_freq, const at::Tensor& positions,
                                                      double attention_scaling);

// Op implementations (see registration.cpp for the schemas).
std::tuple<at::Tensor, at::Tensor> rope_cache(const at::Tensor& inv_freq, int64_t max_position,
                                              double attention_scaling);

std::tuple<at::Tensor, at::Tensor> gather_cos_sin_cpu(const GatherArgs& args);
#ifdef ROPEKIT_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> gather_cos_sin_cuda(const GatherArgs& args);
#endif

}  // namespace ropekit
