// rope_index on CUDA: the fused device algorithm of rope_index_kernel.h, one block per row and cub block scans, in
// two launches (count, then index) with no host sync. The same row code runs serially on the CPU in the tests.
#include "../rope_index.h"
#include "../rope_index_kernel.h"

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

namespace ropekit {

using namespace rope_index_detail;

namespace {

struct MaxOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};
struct MinOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a < b ? a : b; }
};

// One block of Threads threads per row; every scan ends with a barrier, so its temp storage can be reused.
template <int Threads>
struct BlockExec {
  static constexpr int kThreads = Threads;
  using Scan = cub::BlockScan<int64_t, kThreads>;
  using Reduce = cub::BlockReduce<int64_t, kThreads>;
  union Temp {
    typename Scan::TempStorage scan;
    typename Reduce::TempStorage reduce;
  };
  Temp& temp;

  __device__ int64_t tid() const { return threadIdx.x; }
  __device__ void sync() const { __syncthreads(); }
  __device__ int64_t exclusive_sum(int64_t v, int64_t& aggregate) {
    int64_t out;
    Scan(temp.scan).ExclusiveSum(v, out, aggregate);
    __syncthreads();
    return out;
  }
  __device__ int64_t inclusive_max(int64_t v, int64_t& aggregate) {
    int64_t out;
    Scan(temp.scan).InclusiveScan(v, out, MaxOp(), aggregate);
    __syncthreads();
    return out;
  }
  __device__ int64_t inclusive_min(int64_t v, int64_t& aggregate) {
    int64_t out;
    Scan(temp.scan).InclusiveScan(v, out, MinOp(), aggregate);
    __syncthreads();
    return out;
  }
  __device__ int64_t sum(int64_t v) {  // valid in thread 0
    const int64_t out = Reduce(temp.reduce).Sum(v);
    __syncthreads();
    return out;
  }
};

template <int Threads, bool Omni>
__device__ __forceinline__ void row(KernelParams& p, int32_t pass) {
  __shared__ typename BlockExec<Threads>::Temp temp;
  __shared__ RowState state;
  BlockExec<Threads> x{temp};
  index_row<BlockExec<Threads>, Omni>(x, state, p, blockIdx.x, pass);
}

constexpr int kThreads = 512, kOmniThreads = 128;

__global__ void __launch_bounds__(kThreads) rope_index_kernel(KernelParams p, int32_t pass) {
  row<kThreads, false>(p, pass);
}

// The omni conventions: the serial walk in thread 0 needs more registers than a 512-thread block leaves a thread
// (it spilled there); 128 threads (scans of four times the tiles) and up to 255 registers, no spills. __maxnreg__
// needs nvcc 12.4; older toolkits get the launch bound alone (ptxas's own register choice).
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define ROPEKIT_OMNI_KERNEL_BOUNDS __maxnreg__(255)
#else
#define ROPEKIT_OMNI_KERNEL_BOUNDS __launch_bounds__(kOmniThreads)
#endif
__global__ void ROPEKIT_OMNI_KERNEL_BOUNDS rope_index_omni_kernel(KernelParams p, int32_t pass) {
  row<kOmniThreads, true>(p, pass);
}

// One block: the omni repair pass (rope_index_kernel.h), a no-op unless a row flagged kOmniCounts.
__global__ void ROPEKIT_OMNI_KERNEL_BOUNDS rope_index_omni_repair_kernel(KernelParams p) {
  __shared__ BlockExec<kOmniThreads>::Temp temp;
  __shared__ RowState state;
  __shared__ bool needed;
  BlockExec<kOmniThreads> x{temp};
  repair_rows(x, state, p, needed);
}

}  // namespace

void launch_rope_index_kernel(const KernelParams& p) {
  auto stream = at::cuda::getCurrentCUDAStream();
  const bool omni = is_omni(p.rules.convention);
  for (const int32_t pass : {kPassCount, kPassIndex}) {
    if (omni) {
      rope_index_omni_kernel<<<p.B, kOmniThreads, 0, stream>>>(p, pass);
    } else {
      rope_index_kernel<<<p.B, kThreads, 0, stream>>>(p, pass);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (omni) {
    rope_index_omni_repair_kernel<<<1, kOmniThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace ropekit
