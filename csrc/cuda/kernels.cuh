// Torch-free CUDA kernels of the moe:: ops: launchers over raw device pointers and a stream.
//
// Shapes: T tokens, D features, E experts, N dispatched token copies (rows), B = E + 1 sort bins
// (bin E holds dropped copies). All indices and offsets are int64; every launcher returns the
// launch error (cudaSuccess when there is nothing to do) and never synchronises the host.
// Index ranges are checked on the device (a failed check is a device-side assert, as in
// torch's own index kernels): checking them on the host would cost a sync per call.
//
// Only CUDA headers here, so CI compiles these files with plain nvcc (tests/test_nvcc_compile.py);
// csrc/cuda/ops_cuda.cu binds them to torch; device_utils.cuh holds the device-side helpers.
// This header is plain host C++ plus CUDA types, so the binding also compiles with a host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace moe {
namespace gpu {

// ---- sort_by_expert / align_block_size (sort_kernels.cu) ----

// int64 elements of scratch memory sort_by_expert needs (allocate on the same stream).
int64_t sort_workspace_elems(int64_t n, int64_t num_experts);

// Stable counting sort of ids_N by expert, dropped (< 0) copies last.
// order_N[j] = slot of the j-th sorted copy; counts_E[e] = copies of expert e.
// Device-checks ids_N[i] < num_experts.
cudaError_t sort_by_expert(const int64_t* ids_N, int64_t n, int64_t num_experts, int64_t* order_N, int64_t* counts_E,
                           int64_t* workspace, cudaStream_t stream);

// offsets_E1[0] = 0, offsets_E1[e + 1] = offsets_E1[e] + counts_E[e] rounded up to block_size.
cudaError_t align_block_size(const int64_t* counts_E, int64_t num_experts, int64_t block_size, int64_t* offsets_E1,
                             cudaStream_t stream);

// ---- permute / combine / unpermute backward (permute_kernels.cu) ----

// dst[j, :] = src[idx_N[j], :] for rows of row_bytes bytes (any element type), vectorised to
// 16/8/4/2 bytes where the rows and pointers allow. Device-checks 0 <= idx_N[j] < src_rows.
cudaError_t gather_rows(const void* src, const int64_t* idx_N, int64_t n, int64_t src_rows, int64_t row_bytes,
                        void* dst, cudaStream_t stream);

// keys_N[j] = (int32) idx_N[j], device-checking 0 <= idx_N[j] < num_tokens (num_tokens < 2^31).
cudaError_t token_keys(const int64_t* idx_N, int64_t n, int64_t num_tokens, int32_t* keys_N, cudaStream_t stream);

// CSR starts of sorted keys: start_T1[t] = first j with sorted_N[j] >= t (start_T1[T] = n).
cudaError_t segment_starts(const int32_t* sorted_N, int64_t n, int64_t num_tokens, int64_t* start_T1,
                           cudaStream_t stream);

// out[t, :] = sum_{r in [start[t], start[t+1])} w[rows[r]] * y[rows[r], :] (w == nullptr: weight 1),
// accumulated in Acc in ascending r order: deterministic, no atomics. rows_N is a permutation of
// the rows grouped by token (stable, so ascending row index within each token); start_T1 [T + 1].
template <typename T, typename Acc>
cudaError_t combine_rows(const T* y_ND, const Acc* w_N, const int64_t* rows_N, const int64_t* start_T1,
                         int64_t num_tokens, int64_t dim, T* out_TD, cudaStream_t stream);

// grad_y[j, :] = (T)(w[j] * grad_out[idx[j], :]); grad_w[j] = sum_d grad_out[idx[j], d] * y[j, d] in Acc.
// Device-checks 0 <= idx_N[j] < num_tokens.
template <typename T, typename Acc>
cudaError_t unpermute_backward(const T* grad_out_TD, const T* y_ND, const int64_t* idx_N, const Acc* w_N, int64_t n,
                               int64_t num_tokens, int64_t dim, T* grad_y_ND, Acc* grad_w_N, cudaStream_t stream);

}  // namespace gpu
}  // namespace moe
