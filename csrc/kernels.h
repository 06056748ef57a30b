// CPU kernels one op file lends another (the fused swiglu_grouped_mm reuses the GEMM and SwiGLU
// kernels), and the row-balanced split of expert work over threads that they share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

namespace moe {

// grouped_mm.cpp: y = x @ w for one expert, each thread a block of y's columns (as grouped_mm's
// forward does; one block inside a parallel region).
void mm_out_by_columns(at::Tensor& y, const at::Tensor& x, const at::Tensor& w);
// grouped_mm.cpp: the grouped_mm op itself (x [M, K], w [E, K, N] -> [M, N]).
at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& counts);

// swiglu_cpu.cpp: out [N, H] = swiglu(h [N, 2H]) and grad_h [N, 2H] of it, into given contiguous
// tensors, no checks; they thread over rows unless called inside a parallel region.
void swiglu_into(const at::Tensor& h, at::Tensor& out);
void swiglu_backward_into(const at::Tensor& grad_out, const at::Tensor& h, at::Tensor& grad_h);

// One thread's part of one expert: the expert's rows are [start, end) (sorted rows), this part
// is rows [first, last) of them. Row-parallel work (a GEMM's output rows) takes [first, last);
// a weight gradient (a reduction over all the expert's rows) takes the same share of its
// output columns, columns(cols).
struct ExpertPart {
  int64_t expert, start, end, first, last;

  int64_t rows() const { return last - first; }
  bool whole() const { return first == start && last == end; }
  // [c0, c1) of [0, cols) in proportion to [first, last) within [start, end), cut at multiples
  // of 16 columns (whole SIMD blocks); parts that meet at a row meet at the same column.
  std::pair<int64_t, int64_t> columns(int64_t cols) const {
    auto cut = [&](int64_t row) -> int64_t {
      if (row <= start) return 0;
      if (row >= end) return cols;
      const int64_t c = cols * (row - start) / (end - start);
      return std::min(cols, (c + 8) / 16 * 16);
    };
    return {cut(first), cut(last)};
  }
};

// Threads worth using on `rows` routed rows: per-thread parts of fewer rows cost more in thread
// start-up and weight packing than they save.
constexpr int64_t kMinRowsPerThread = 32;

inline int64_t split_threads(bool on_cpu, int64_t rows) {
  if (!on_cpu || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinRowsPerThread));
}

// The parts of each thread when `threads` split the rows evenly: thread b takes rows
// [R b / t, R (b + 1) / t) of the R routed rows, whole experts where they fit and a share of each
// expert its range cuts (at most two per thread). Every thread gets the same number of rows, to
// within kMinRowsPerThread, whatever the routing (whole experts per thread left one thread 23%
// more rows than the mean on a random router's 8-expert routing, and its GEMMs ran that much
// longer). A cut that would leave a sliver of an expert (under kMinRowsPerThread rows) on one side
// moves to the expert's edge instead: BLAS packs the whole expert weight for every GEMM, so a
// 10-row share of a 266-row expert cost the small layer's backward 5% (BENCHMARKS.md, issue 21),
// and 10 rows of imbalance cost 0.5%.
inline std::vector<std::vector<ExpertPart>> expert_parts(const std::vector<int64_t>& ends, int64_t threads) {
  const int64_t rows = ends.empty() ? 0 : ends.back();
  std::vector<int64_t> cuts(threads + 1, rows);
  cuts[0] = 0;
  for (int64_t b = 1, e = 0; b < threads; ++b) {
    int64_t cut = rows * b / threads;
    while (ends[e] <= cut) ++e;  // the expert that row `cut` falls in (cut < rows = ends.back())
    const int64_t start = e == 0 ? 0 : ends[e - 1];
    if (cut - start < kMinRowsPerThread) cut = start;
    else if (ends[e] - cut < kMinRowsPerThread) cut = ends[e];
    cuts[b] = std::max(cut, cuts[b - 1]);
  }
  std::vector<std::vector<ExpertPart>> parts(threads);
  for (int64_t b = 0; b < threads; ++b) {
    const int64_t lo = cuts[b], hi = cuts[b + 1];
    for (int64_t e = 0, start = 0; e < int64_t(ends.size()) && start < hi; start = ends[e], ++e) {
      const int64_t first = std::max(start, lo), last = std::min(ends[e], hi);
      if (first < last) parts[b].push_back(ExpertPart{e, start, ends[e], first, last});
    }
  }
  return parts;
}

// Runs body(part) on every part, thread b on parts[b] (on the calling thread when there is one).
template <typename F>
void run_parts(const std::vector<std::vector<ExpertPart>>& parts, const F& body) {
  const int64_t threads = int64_t(parts.size());
  if (threads == 1) {
    for (const auto& p : parts[0]) body(p);
    return;
  }
  // Worker threads do not inherit the caller's dispatch state (autograd is excluded below the
  // op's autograd kernel): without it at::mm_out would refuse inputs that require grad.
  const at::ThreadLocalState state;
  at::parallel_for(0, threads, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t b = b0; b < b1; ++b) {
      for (const auto& p : parts[b]) body(p);
    }
  });
}

// Calls body(part) for every expert with rows, the rows split evenly over the threads worth
// using (expert_parts), each body running single-threaded BLAS on its part. With one thread (and
// on CUDA, where each GEMM fills the device), body sees every expert whole.
template <typename F>
void for_expert_parts(bool on_cpu, const std::vector<int64_t>& ends, const F& body) {
  run_parts(expert_parts(ends, split_threads(on_cpu, ends.empty() ? 0 : ends.back())), body);
}

// Zeroes out[e] for every expert with no rows (a weight gradient no part writes).
inline void zero_empty_experts(at::Tensor& out, const std::vector<int64_t>& ends) {
  for (size_t e = 0; e < ends.size(); ++e) {
    if (ends[e] == (e == 0 ? 0 : ends[e - 1])) out[int64_t(e)].zero_();
  }
}

}  // namespace moe
