// CPU kernels one op file lends another (the fused swiglu_grouped_mm reuses the GEMM and SwiGLU
// kernels), and the split of many small experts over threads that they share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <vector>

namespace moe {

// grouped_mm.cpp: y = x @ w for one expert, each thread a block of y's columns (as grouped_mm's
// forward does; one block inside a parallel region).
void mm_out_by_columns(at::Tensor& y, const at::Tensor& x, const at::Tensor& w);

// swiglu_cpu.cpp: out [N, H] = swiglu(h [N, 2H]) and grad_h [N, 2H] of it, into given contiguous
// tensors, no checks; they thread over rows unless called inside a parallel region.
void swiglu_into(const at::Tensor& h, at::Tensor& out);
void swiglu_backward_into(const at::Tensor& grad_out, const at::Tensor& h, at::Tensor& grad_h);

// Whether to split experts over threads: one thread, or many small experts (E >= 2 x threads,
// fine-grained MoE) on CPU, where per-expert GEMMs are too small to thread well one by one.
inline bool split_by_expert(bool on_cpu, int64_t experts) {
  if (!on_cpu || at::in_parallel_region()) return false;
  const int64_t threads = at::get_num_threads();
  return threads > 1 && experts >= 2 * threads;
}

// Calls body(e0, e1) on runs of whole experts, one run per thread with about equal rows
// (ends: cumulative rows per expert); each thread's BLAS calls run single-threaded, so thread
// start-up and BLAS's per-call partitioning are paid once per call, not once per expert.
template <typename F>
void for_expert_runs(const std::vector<int64_t>& ends, const F& body) {
  const int64_t experts = int64_t(ends.size()), threads = at::get_num_threads();
  const int64_t rows = ends.empty() ? 0 : ends.back();
  std::vector<int64_t> first(threads + 1, experts);  // thread b: experts ending in (rows b/t, rows (b+1)/t]
  first[0] = 0;
  for (int64_t b = 1, e = 0; b < threads; ++b) {
    while (e < experts && ends[e] <= rows * b / threads) ++e;
    first[b] = e;
  }
  // Worker threads do not inherit the caller's dispatch state (autograd is excluded below the
  // op's autograd kernel): without it at::mm_out would refuse inputs that require grad.
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t b = b0; b < b1; ++b) body(first[b], first[b + 1]);
  });
}

}  // namespace moe
