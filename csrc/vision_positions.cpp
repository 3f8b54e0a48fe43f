#include "vision_positions.h"

#include "host_transfer.h"
#include "rope_index_walk.h"  // kMaxGridTokens

#include <ATen/ATen.h>
#include <c10/core/DefaultDtype.h>
#include <c10/util/safe_numerics.h>

#include <map>

namespace ropekit {
namespace {

using rope_index_detail::kMaxGridTokens;

// 2^20: a merge block of m * m patches, and every product with it, stays far inside int64.
void check_merge(int64_t spatial_merge_size) {
  TORCH_CHECK_VALUE(spatial_merge_size >= 1 && spatial_merge_size <= (int64_t(1) << 20),
                    "spatial_merge_size: expected 1 to 2^20, got ", spatial_merge_size);
}

void check_grid_tensor(const at::Tensor& grid_thw, const char* what) {
  TORCH_CHECK_VALUE(grid_thw.dim() == 2 && grid_thw.size(1) == 3, what,
                    ": grid_thw: expected shape (num_grids, 3) of (t, h, w), got ", grid_thw.sizes());
  TORCH_CHECK_VALUE(at::isIntegralType(grid_thw.scalar_type(), /*includeBool=*/false), what,
                    ": grid_thw: expected an integer dtype, got ", grid_thw.scalar_type());
}

// transformers' window count along an axis of `extent` merged patches: it pads by win - extent % win, so an extent
// that divides evenly gets a whole empty window more.
int64_t windows_along(int64_t extent, int64_t win) { return extent / win + 1; }  // (e + win - e % win) / win

// t, h, w non-negative and small enough that no sum of tokens overflows (t * h * w and one frame's h * w at most
// 2^40); h and w multiples of the merge size where the tower's reshape needs it (transformers fails there: a
// ValueError here instead).
void check_grid(const VisionGrid& g, size_t i, int64_t merge, bool divisible, const char* what) {
  TORCH_CHECK_VALUE(g.t >= 0 && g.h >= 0 && g.w >= 0, what, ": grid_thw[", i, "] = (", g.t, ", ", g.h, ", ", g.w,
                    ") has a negative extent");
  TORCH_CHECK_VALUE(g.t <= kMaxGridTokens && g.h <= kMaxGridTokens && g.w <= kMaxGridTokens &&
                        (g.h == 0 || g.w <= kMaxGridTokens / g.h) &&
                        (g.h == 0 || g.w == 0 || g.t <= kMaxGridTokens / g.h / g.w),
                    what, ": grid_thw[", i, "] = (", g.t, ", ", g.h, ", ", g.w, ") has more than 2^40 patches");
  TORCH_CHECK_VALUE(!divisible || (g.h % merge == 0 && g.w % merge == 0), what, ": grid_thw[", i, "] = (", g.t,
                    ", ", g.h, ", ", g.w, "): h and w must be multiples of spatial_merge_size ", merge,
                    " (the tower's merge-block reshape fails otherwise)");
}

// Patches of all grids, checked against 2^62 so that every offset fits.
int64_t total_patches(const std::vector<VisionGrid>& grids, int64_t merge, bool divisible, const char* what) {
  int64_t total = 0;
  for (size_t i = 0; i < grids.size(); ++i) {
    check_grid(grids[i], i, merge, divisible, what);
    total += grids[i].t * grids[i].h * grids[i].w;
    TORCH_CHECK_VALUE(total <= (int64_t(1) << 62), what, ": the grids have more than 2^62 patches in total");
  }
  return total;
}

// Calls f(frame, row, col, source) for every patch of grid g in the tower's order: frame, merge-block row, block
// column, row and column inside the block; `source` is the patch's raster index h * w within its frame.
template <typename F>
void for_each_merged_patch(const VisionGrid& g, int64_t m, F&& f) {
  for (int64_t frame = 0; frame < g.t; ++frame) {
    for (int64_t br = 0; br < g.h / m; ++br) {
      for (int64_t bc = 0; bc < g.w / m; ++bc) {
        for (int64_t r = 0; r < m; ++r) {
          for (int64_t c = 0; c < m; ++c) {
            const int64_t row = br * m + r, col = bc * m + c;
            f(frame, row, col, row * g.w + col);
          }
        }
      }
    }
  }
}

}  // namespace

std::vector<VisionGrid> read_vision_grids(const at::Tensor& grid_thw, const char* what) {
  check_grid_tensor(grid_thw, what);
  std::vector<VisionGrid> grids(grid_thw.size(0));
  if (grids.empty()) return grids;
  const HostInputs host({grid_thw.to(at::kLong).reshape(-1)});
  const int64_t* v = host[0];
  for (size_t i = 0; i < grids.size(); ++i) grids[i] = {v[3 * i], v[3 * i + 1], v[3 * i + 2]};
  return grids;
}

at::Tensor vision_position_ids(const at::Tensor& grid_thw, int64_t spatial_merge_size,
                               std::optional<int64_t> num_tokens) {
  check_merge(spatial_merge_size);
  const int64_t m = spatial_merge_size;
#ifdef ROPEKIT_WITH_CUDA
  if (num_tokens.has_value() && grid_thw.is_cuda()) {
    check_grid_tensor(grid_thw, "vision_position_ids");
    const int64_t n = *num_tokens;
    TORCH_CHECK_VALUE(n >= 0, "vision_position_ids: num_tokens: expected >= 0, got ", n);
    return vision_position_ids_cuda_kernel(grid_thw.to(at::kLong).contiguous(), m, n);
  }
#endif
  const auto grids = read_vision_grids(grid_thw, "vision_position_ids");
  const int64_t total = total_patches(grids, m, /*divisible=*/true, "vision_position_ids");
  if (num_tokens.has_value()) {
    const int64_t n = *num_tokens;
    TORCH_CHECK_VALUE(n == total, "vision_position_ids: num_tokens is ", n, " but the grids have ", total,
                      " patches");
  }
  at::Tensor out = at::empty({total, 2}, at::TensorOptions().dtype(at::kLong));
  int64_t* p = out.data_ptr<int64_t>();
  for (const auto& g : grids) {
    for_each_merged_patch(g, m, [&](int64_t, int64_t row, int64_t col, int64_t) {
      *p++ = row;
      *p++ = col;
    });
  }
  return push_to_device(out, grid_thw.device());
}

std::tuple<at::Tensor, at::Tensor> vision_window_index(const at::Tensor& grid_thw, int64_t spatial_merge_size,
                                                       int64_t window_size, int64_t patch_size) {
  check_merge(spatial_merge_size);
  TORCH_CHECK_VALUE(patch_size >= 1, "vision_window_index: patch_size: expected >= 1, got ", patch_size);
  TORCH_CHECK_VALUE(window_size >= 0, "vision_window_index: window_size: expected >= 0, got ", window_size);
  const int64_t m = spatial_merge_size, win = window_size / m / patch_size, unit = m * m;
  TORCH_CHECK_VALUE(win >= 1, "vision_window_index: window_size // spatial_merge_size // patch_size is 0 (",
                    window_size, " // ", m, " // ", patch_size, "): no window holds a merged patch");
  const auto grids = read_vision_grids(grid_thw, "vision_window_index");
  int64_t merged = 0, windows = 0;
  for (size_t i = 0; i < grids.size(); ++i) {
    const auto& g = grids[i];
    check_grid(g, i, m, /*divisible=*/false, "vision_window_index");
    const int64_t lh = g.h / m, lw = g.w / m;
    merged += g.t * lh * lw;  // <= 2^40 each (check_grid)
    // windows of a frame: at most (lh + 1) * (lw + 1), which with lh or lw 0 can exceed t * lh * lw's bound
    int64_t frame_windows = 0, grid_windows = 0;
    const bool overflow = c10::mul_overflows(windows_along(lh, win), windows_along(lw, win), &frame_windows) ||
                          c10::mul_overflows(g.t, frame_windows, &grid_windows);
    windows += overflow ? (int64_t(1) << 41) : grid_windows;
    TORCH_CHECK_VALUE(merged <= (int64_t(1) << 62) && windows <= (int64_t(1) << 40),
                      "vision_window_index: the grids have too many patches or windows");
  }
  at::Tensor index = at::empty({merged}, at::TensorOptions().dtype(at::kLong));
  at::Tensor cu = at::empty({windows + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* ip = index.data_ptr<int64_t>();
  int64_t* cp = cu.data_ptr<int64_t>();
  *cp++ = 0;
  int64_t offset = 0, bound = 0;
  for (const auto& g : grids) {
    const int64_t lh = g.h / m, lw = g.w / m;
    const int64_t nwh = windows_along(lh, win), nww = windows_along(lw, win);
    for (int64_t frame = 0; frame < g.t; ++frame) {
      for (int64_t wi = 0; wi < nwh; ++wi) {
        for (int64_t wj = 0; wj < nww; ++wj) {
          int64_t count = 0;
          for (int64_t r = wi * win; r < std::min((wi + 1) * win, lh); ++r) {
            for (int64_t c = wj * win; c < std::min((wj + 1) * win, lw); ++c) {
              *ip++ = offset + (frame * lh + r) * lw + c;
              ++count;
            }
          }
          bound += count * unit;
          *cp++ = bound;
        }
      }
    }
    offset += g.t * lh * lw;
  }
  return {push_to_device(index, grid_thw.device()), push_to_device(cu, grid_thw.device())};
}

namespace {

// transformers 4.57's per-axis taps for an axis of `size` patches: floor = int(linspace(0, n - 1, size)), ceil =
// min(floor + 1, n - 1), frac = linspace - floor, all in T (the default float dtype transformers' linspace gets).
template <typename T>
struct AxisTaps {
  std::vector<int64_t> floor, ceil;
  std::vector<T> frac, one_minus;

  AxisTaps(int64_t size, int64_t n) : floor(size), ceil(size), frac(size), one_minus(size) {
    // torch's own CPU linspace: its values depend on its vectorised kernel, so they are taken from it, not redone
    const at::Tensor lin = at::linspace(0, n - 1, size, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    const T* v = lin.data_ptr<T>();
    for (int64_t i = 0; i < size; ++i) {
      const int32_t f = static_cast<int32_t>(v[i]);  // Tensor.int(): truncation (the values are >= 0)
      floor[i] = f;
      ceil[i] = std::min<int64_t>(int64_t(f) + 1, n - 1);
      frac[i] = v[i] - static_cast<T>(f);
      one_minus[i] = T(1) - frac[i];
    }
  }
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> interp_taps(const std::vector<VisionGrid>& grids, int64_t total, int64_t n,
                                               int64_t m) {
  at::Tensor indices = at::empty({4, total}, at::TensorOptions().dtype(at::kLong));
  at::Tensor weights = at::empty({4, total}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  int64_t* ix[4];
  T* wx[4];
  for (int k = 0; k < 4; ++k) {
    ix[k] = indices[k].data_ptr<int64_t>();
    wx[k] = weights[k].data_ptr<T>();
  }
  std::map<int64_t, AxisTaps<T>> axes;  // images share sizes: one linspace per distinct extent
  const auto taps = [&](int64_t size) -> const AxisTaps<T>& {
    auto it = axes.find(size);
    if (it == axes.end()) it = axes.emplace(size, AxisTaps<T>(size, n)).first;
    return it->second;
  };
  int64_t i = 0;
  for (const auto& g : grids) {
    const AxisTaps<T>& hs = taps(g.h);
    const AxisTaps<T>& ws = taps(g.w);
    for (int64_t row = 0; row < g.h; ++row) {  // raster order, one frame: the tower repeats and reorders them
      for (int64_t col = 0; col < g.w; ++col, ++i) {
        const int64_t base_floor = hs.floor[row] * n, base_ceil = hs.ceil[row] * n;
        ix[0][i] = base_floor + ws.floor[col];
        ix[1][i] = base_floor + ws.ceil[col];
        ix[2][i] = base_ceil + ws.floor[col];
        ix[3][i] = base_ceil + ws.ceil[col];
        wx[0][i] = hs.one_minus[row] * ws.one_minus[col];
        wx[1][i] = hs.one_minus[row] * ws.frac[col];
        wx[2][i] = hs.frac[row] * ws.one_minus[col];
        wx[3][i] = hs.frac[row] * ws.frac[col];
      }
    }
  }
  return {indices, weights};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> vision_pos_embed_interp(const at::Tensor& grid_thw, int64_t num_grid_per_side,
                                                           int64_t spatial_merge_size) {
  check_merge(spatial_merge_size);
  // 2^20: the tap indices (up to num_grid_per_side^2) and transformers' .int() of the linspace stay exact
  TORCH_CHECK_VALUE(num_grid_per_side >= 1 && num_grid_per_side <= (int64_t(1) << 20),
                    "vision_pos_embed_interp: num_grid_per_side: expected 1 to 2^20, got ", num_grid_per_side);
  const auto grids = read_vision_grids(grid_thw, "vision_pos_embed_interp");
  total_patches(grids, spatial_merge_size, /*divisible=*/true, "vision_pos_embed_interp");
  int64_t total = 0;  // one frame per grid
  for (const auto& g : grids) {
    total += g.h * g.w;  // <= 2^40 each (check_grid)
    TORCH_CHECK_VALUE(total <= (int64_t(1) << 62), "vision_pos_embed_interp: the grids have more than 2^62 patches");
  }
  const auto dtype = c10::typeMetaToScalarType(c10::get_default_dtype());
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, "vision_pos_embed_interp: the default dtype is ",
                    dtype, "; transformers' linspace then runs in it, which ropekit reproduces for float32 and float64");
  auto [indices, weights] = dtype == at::kFloat
                                ? interp_taps<float>(grids, total, num_grid_per_side, spatial_merge_size)
                                : interp_taps<double>(grids, total, num_grid_per_side, spatial_merge_size);
  return {push_to_device(indices, grid_thw.device()), push_to_device(weights, grid_thw.device())};
}

}  // namespace ropekit
