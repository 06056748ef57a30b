// permute (row gather), the deterministic weighted combine behind scatter_rows / unpermute, and
// unpermute's backward, on the GPU. No atomics on floats: the combine reads each token's rows
// through a CSR (rows grouped by token, ascending within a token) and sums them in order.
#include <initializer_list>

#include "device_utils.cuh"
#include "kernels.cuh"

namespace moe {
namespace gpu {
namespace {

constexpr int kThreads = 256;
constexpr int kPackBytes = 16;

int64_t grid_for(int64_t work_items, int64_t per_block) {
  const int64_t blocks = ceil_div(work_items, per_block);
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// One group of `group` threads (a power of two <= 32) copies one row at a time.
template <typename V>
__global__ void gather_kernel(const V* __restrict__ src, const int64_t* __restrict__ idx, int64_t n, int64_t src_rows,
                              int64_t vecs_per_row, int group_log2, V* __restrict__ dst) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t group = int64_t{1} << group_log2;
  const int64_t lane = thread & (group - 1);
  const int64_t num_groups = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> group_log2;
  for (int64_t row = thread >> group_log2; row < n; row += num_groups) {
    const int64_t s = idx[row];
    MOE_DEVICE_CHECK(s >= 0 && s < src_rows);  // token_idx out of range
    const V* from = src + s * vecs_per_row;
    V* to = dst + row * vecs_per_row;
#pragma unroll 4
    for (int64_t v = lane; v < vecs_per_row; v += group) to[v] = from[v];
  }
}

template <typename V>
cudaError_t launch_gather(const void* src, const int64_t* idx, int64_t n, int64_t src_rows, int64_t row_bytes,
                          void* dst, cudaStream_t stream) {
  const int64_t vecs = row_bytes / static_cast<int64_t>(sizeof(V));
  int group_log2 = 0;
  while (group_log2 < 5 && (int64_t{1} << group_log2) < vecs) ++group_log2;
  const int64_t rows_per_block = kThreads >> group_log2;
  gather_kernel<V><<<static_cast<unsigned>(grid_for(n, rows_per_block)), kThreads, 0, stream>>>(
      static_cast<const V*>(src), idx, n, src_rows, vecs, group_log2, static_cast<V*>(dst));
  return cudaGetLastError();
}

__global__ void token_keys_kernel(const int64_t* __restrict__ idx, int64_t n, int64_t num_tokens,
                                  int32_t* __restrict__ keys) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const int64_t t = idx[j];
    MOE_DEVICE_CHECK(t >= 0 && t < num_tokens);  // token_idx out of range
    keys[j] = static_cast<int32_t>(t);
  }
}

// start[t] = lower bound of t in sorted[0, n): a binary search per token, so no token (and no
// long run of empty tokens) serialises the work.
__global__ void segment_starts_kernel(const int32_t* __restrict__ sorted, int64_t n, int64_t num_tokens,
                                      int64_t* __restrict__ start) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t <= num_tokens; t += stride) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (sorted[mid] < t)
        lo = mid + 1;
      else
        hi = mid;
    }
    start[t] = lo;
  }
}

// One block per token (grid-stride); each thread owns VEC consecutive columns and sums the
// token's rows in CSR order, so every output element has one fixed summation order.
template <typename T, typename Acc, int VEC>
__global__ void combine_kernel(const T* __restrict__ y, const Acc* __restrict__ w, const int64_t* __restrict__ rows,
                               const int64_t* __restrict__ start, int64_t num_tokens, int64_t dim,
                               T* __restrict__ out) {
  using P = Pack<T, VEC>;
  const int64_t vecs = dim / VEC;
  for (int64_t t = blockIdx.x; t < num_tokens; t += gridDim.x) {
    const int64_t r0 = start[t], r1 = start[t + 1];
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
      Acc acc[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) acc[k] = Acc(0);
#pragma unroll 4
      for (int64_t r = r0; r < r1; ++r) {  // loads of later rows can issue before earlier adds
        const int64_t j = rows[r];
        const P p = reinterpret_cast<const P*>(y + j * dim)[v];
        if (w == nullptr) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += Float<T>::load(p.v[k]);
        } else {
          const Acc wj = w[j];
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc[k] += Float<T>::load(p.v[k]) * wj;
        }
      }
      P o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) o.v[k] = Float<T>::store(acc[k]);
      reinterpret_cast<P*>(out + t * dim)[v] = o;
    }
  }
}

// One warp per row (grid-stride): grad_y row and a warp-reduced dot for grad_w (fixed tree order).
template <typename T, typename Acc, int VEC>
__global__ void unpermute_backward_kernel(const T* __restrict__ g, const T* __restrict__ y,
                                          const int64_t* __restrict__ idx, const Acc* __restrict__ w, int64_t n,
                                          int64_t num_tokens, int64_t dim, T* __restrict__ gy, Acc* __restrict__ gw) {
  using P = Pack<T, VEC>;
  const int64_t vecs = dim / VEC;
  const int lane = threadIdx.x % kWarp;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; j < n;
       j += num_warps) {
    const int64_t t = idx[j];
    MOE_DEVICE_CHECK(t >= 0 && t < num_tokens);  // token_idx out of range
    const Acc wj = w[j];
    Acc dot = Acc(0);
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const P gp = reinterpret_cast<const P*>(g + t * dim)[v];
      const P yp = reinterpret_cast<const P*>(y + j * dim)[v];
      P o;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const Acc gd = Float<T>::load(gp.v[k]);
        o.v[k] = Float<T>::store(gd * wj);
        dot += gd * Float<T>::load(yp.v[k]);
      }
      reinterpret_cast<P*>(gy + j * dim)[v] = o;
    }
    for (int offset = kWarp / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);
    if (lane == 0) gw[j] = dot;
  }
}

// Elements per 16-byte pack when dim and every pointer allow it, else 1.
template <typename T>
int pack_width(int64_t dim, std::initializer_list<const void*> ptrs) {
  constexpr int vec = kPackBytes / static_cast<int>(sizeof(T));
  if (dim % vec != 0) return 1;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % kPackBytes != 0) return 1;
  return vec;
}

}  // namespace

cudaError_t gather_rows(const void* src, const int64_t* idx_N, int64_t n, int64_t src_rows, int64_t row_bytes,
                        void* dst, cudaStream_t stream) {
  if (n == 0 || row_bytes == 0) return cudaSuccess;
  const uintptr_t bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) |
                         static_cast<uintptr_t>(row_bytes);
  if (bits % 16 == 0) return launch_gather<uint4>(src, idx_N, n, src_rows, row_bytes, dst, stream);
  if (bits % 8 == 0) return launch_gather<uint2>(src, idx_N, n, src_rows, row_bytes, dst, stream);
  if (bits % 4 == 0) return launch_gather<uint32_t>(src, idx_N, n, src_rows, row_bytes, dst, stream);
  if (bits % 2 == 0) return launch_gather<uint16_t>(src, idx_N, n, src_rows, row_bytes, dst, stream);
  return launch_gather<uint8_t>(src, idx_N, n, src_rows, row_bytes, dst, stream);
}

cudaError_t token_keys(const int64_t* idx_N, int64_t n, int64_t num_tokens, int32_t* keys_N, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  token_keys_kernel<<<static_cast<unsigned>(grid_for(n, kThreads)), kThreads, 0, stream>>>(idx_N, n, num_tokens,
                                                                                          keys_N);
  return cudaGetLastError();
}

cudaError_t segment_starts(const int32_t* sorted_N, int64_t n, int64_t num_tokens, int64_t* start_T1,
                           cudaStream_t stream) {
  segment_starts_kernel<<<static_cast<unsigned>(grid_for(num_tokens + 1, kThreads)), kThreads, 0, stream>>>(
      sorted_N, n, num_tokens, start_T1);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t combine_rows(const T* y_ND, const Acc* w_N, const int64_t* rows_N, const int64_t* start_T1,
                         int64_t num_tokens, int64_t dim, T* out_TD, cudaStream_t stream) {
  if (num_tokens == 0 || dim == 0) return cudaSuccess;
  const int vec = pack_width<T>(dim, {y_ND, out_TD});
  const int64_t vecs = dim / vec;
  const int threads = vecs >= kThreads ? kThreads : static_cast<int>(ceil_div(vecs, kWarp) * kWarp);
  const unsigned blocks = static_cast<unsigned>(num_tokens < kMaxBlocks ? num_tokens : kMaxBlocks);
  constexpr int kVec = kPackBytes / static_cast<int>(sizeof(T));
  if (vec == kVec)
    combine_kernel<T, Acc, kVec><<<blocks, threads, 0, stream>>>(y_ND, w_N, rows_N, start_T1, num_tokens, dim, out_TD);
  else
    combine_kernel<T, Acc, 1><<<blocks, threads, 0, stream>>>(y_ND, w_N, rows_N, start_T1, num_tokens, dim, out_TD);
  return cudaGetLastError();
}

template <typename T, typename Acc>
cudaError_t unpermute_backward(const T* grad_out_TD, const T* y_ND, const int64_t* idx_N, const Acc* w_N, int64_t n,
                               int64_t num_tokens, int64_t dim, T* grad_y_ND, Acc* grad_w_N, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int vec = pack_width<T>(dim, {grad_out_TD, y_ND, grad_y_ND});
  const unsigned blocks = static_cast<unsigned>(grid_for(n, kThreads / kWarp));
  constexpr int kVec = kPackBytes / static_cast<int>(sizeof(T));
  if (vec == kVec)
    unpermute_backward_kernel<T, Acc, kVec><<<blocks, kThreads, 0, stream>>>(grad_out_TD, y_ND, idx_N, w_N, n,
                                                                             num_tokens, dim, grad_y_ND, grad_w_N);
  else
    unpermute_backward_kernel<T, Acc, 1><<<blocks, kThreads, 0, stream>>>(grad_out_TD, y_ND, idx_N, w_N, n,
                                                                          num_tokens, dim, grad_y_ND, grad_w_N);
  return cudaGetLastError();
}

#define MOE_INSTANTIATE(T, Acc)                                                                                     \
  template cudaError_t combine_rows<T, Acc>(const T*, const Acc*, const int64_t*, const int64_t*, int64_t, int64_t, \
                                            T*, cudaStream_t);                                                      \
  template cudaError_t unpermute_backward<T, Acc>(const T*, const T*, const int64_t*, const Acc*, int64_t, int64_t, \
                                                  int64_t, T*, Acc*, cudaStream_t);
MOE_INSTANTIATE(float, float)
MOE_INSTANTIATE(double, double)
MOE_INSTANTIATE(__half, float)
MOE_INSTANTIATE(__nv_bfloat16, float)
#undef MOE_INSTANTIATE

}  // namespace gpu
}  // namespace moe
