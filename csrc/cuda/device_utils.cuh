// Device-side helpers shared by the torch-free kernel files (include after kernels.cuh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

// A device-side check that survives NDEBUG (like torch's CUDA_KERNEL_ASSERT).
#define MOE_DEVICE_CHECK(cond)                                 \
  do {                                                         \
    if (!(cond)) __assert_fail(#cond, __FILE__, __LINE__, ""); \
  } while (0)

namespace moe {
namespace gpu {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Grid-stride kernels never launch more blocks than this; larger inputs loop.
constexpr int64_t kMaxBlocks = 8192;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
struct Float {
  __device__ static float load(T v) { return static_cast<float>(v); }
  __device__ static T store(float v) { return static_cast<T>(v); }
};
template <>
struct Float<double> {
  __device__ static double load(double v) { return v; }
  __device__ static double store(double v) { return v; }
};
template <>
struct Float<__half> {
  __device__ static float load(__half v) { return __half2float(v); }
  __device__ static __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Float<__nv_bfloat16> {
  __device__ static float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// VEC elements loaded / stored as one aligned transaction.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// Exclusive scan of one int64 per thread across the block (blockDim.x a multiple of 32, <= 1024);
// returns the block total in *total. Uses 32 int64 of the caller's shared memory.
__device__ inline int64_t block_exclusive_scan(int64_t value, int64_t* warp_sums, int64_t* total) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp, num_warps = blockDim.x / kWarp;
  int64_t inclusive = value;
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const int64_t other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive += other;
  }
  if (lane == kWarp - 1) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int64_t s = lane < num_warps ? warp_sums[lane] : 0;
    for (int offset = 1; offset < kWarp; offset *= 2) {
      const int64_t other = __shfl_up_sync(kFullMask, s, offset);
      if (lane >= offset) s += other;
    }
    warp_sums[lane] = s;  // inclusive scan of the warp totals
  }
  __syncthreads();
  const int64_t before = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[num_warps - 1];
  __syncthreads();  // warp_sums may be reused by the caller's next call
  return before + inclusive - value;
}

}  // namespace gpu
}  // namespace moe
