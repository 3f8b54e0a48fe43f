// vision_position_ids on CUDA with the token count known (the device path): no host sync. One block scans the grids'
// patch counts (checking each grid, and that they add up to the count given), then one thread per patch finds its
// grid by binary search and decodes its (h, w) position in merge-block order.
#include "../rope_index_walk.h"  // kMaxGridTokens
#include "../vision_positions.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>

#include <cub/block/block_scan.cuh>

namespace ropekit {
namespace {

constexpr int kScanThreads = 256;
constexpr int kThreads = 256;

// ends[g] = patches of grids 0..g (inclusive). Grids that a host path would reject trip a device-side assert.
__global__ void __launch_bounds__(kScanThreads)
    grid_ends_kernel(const int64_t* __restrict__ grid, int64_t n, int64_t m, int64_t num_tokens,
                     int64_t* __restrict__ ends) {
  using Scan = cub::BlockScan<int64_t, kScanThreads>;
  __shared__ typename Scan::TempStorage temp;
  int64_t carry = 0;
  for (int64_t base = 0; base < n; base += kScanThreads) {
    const int64_t g = base + threadIdx.x;
    int64_t count = 0;
    if (g < n) {
      const int64_t t = grid[3 * g], h = grid[3 * g + 1], w = grid[3 * g + 2];
      const int64_t cap = rope_index_detail::kMaxGridTokens;
      CUDA_KERNEL_ASSERT(t >= 0 && h >= 0 && w >= 0 && "vision_position_ids: a grid has a negative extent");
      CUDA_KERNEL_ASSERT(t <= cap && h <= cap && w <= cap && (h == 0 || w <= cap / h) &&
                         (h == 0 || w == 0 || t <= cap / h / w) &&
                         "vision_position_ids: a grid has more than 2^40 patches");
      CUDA_KERNEL_ASSERT(h % m == 0 && w % m == 0 &&
                         "vision_position_ids: h and w must be multiples of spatial_merge_size");
      count = t * h * w;
    }
    int64_t inclusive, aggregate;
    Scan(temp).InclusiveSum(count, inclusive, aggregate);
    __syncthreads();
    if (g < n) ends[g] = carry + inclusive;
    carry += aggregate;  // at most 256 * 2^40 a step: checked before it could overflow
    CUDA_KERNEL_ASSERT(carry <= (int64_t(1) << 62) && "vision_position_ids: the grids have more than 2^62 patches");
  }
  if (threadIdx.x == 0) {
    CUDA_KERNEL_ASSERT(carry == num_tokens && "vision_position_ids: num_tokens differs from the grids' patch count");
  }
}

__global__ void __launch_bounds__(kThreads)
    position_ids_kernel(const int64_t* __restrict__ grid, const int64_t* __restrict__ ends, int64_t n, int64_t m,
                        int64_t num_tokens, int64_t* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < num_tokens;
       i += int64_t(gridDim.x) * kThreads) {
    int64_t lo = 0, hi = n;  // the first grid whose end is past i
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ends[mid] > i) {
        hi = mid;
      } else {
        lo = mid + 1;
      }
    }
    if (lo >= n) return;  // counts disagree: grid_ends_kernel asserts
    const int64_t h = grid[3 * lo + 1], w = grid[3 * lo + 2];
    const int64_t local = i - (lo > 0 ? ends[lo - 1] : 0);
    const int64_t within = local % (h * w);  // the patch inside its frame, in merge-block order
    const int64_t in_c = within % m, in_r = (within / m) % m;
    const int64_t block = within / (m * m), blocks_w = w / m;
    out[2 * i] = (block / blocks_w) * m + in_r;
    out[2 * i + 1] = (block % blocks_w) * m + in_c;
  }
}

}  // namespace

at::Tensor vision_position_ids_cuda_kernel(const at::Tensor& grid, int64_t spatial_merge_size, int64_t num_tokens) {
  const c10::cuda::CUDAGuard guard(grid.device());
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = grid.size(0);
  at::Tensor out = at::empty({num_tokens, 2}, grid.options().dtype(at::kLong));
  at::Tensor ends = at::empty({n}, grid.options().dtype(at::kLong));
  grid_ends_kernel<<<1, kScanThreads, 0, stream>>>(grid.data_ptr<int64_t>(), n, spatial_merge_size, num_tokens,
                                                   ends.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_tokens > 0) {
    const int64_t blocks = std::min<int64_t>((num_tokens + kThreads - 1) / kThreads, int64_t{1} << 16);
    position_ids_kernel<<<blocks, kThreads, 0, stream>>>(grid.data_ptr<int64_t>(), ends.data_ptr<int64_t>(), n,
                                                         spatial_merge_size, num_tokens, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace ropekit
