// grouped_mm and its weight gradient: at::mm (BLAS on CPU, cuBLAS on CUDA) over contiguous
// expert segments, written straight into the output (no zero-fill except the padding tail).
// The same code serves CPU and CUDA; on CUDA the counts are read on the host (one sync).
//
// Forward and dX on CPU with several threads: each thread owns one column block of every
// expert's output and runs single-threaded GEMMs over it: per-expert GEMMs are small (a few
// hundred rows), and splitting them across threads inside BLAS costs packing and
// synchronisation per call; a column split is balanced whatever the routing and each weight
// block is packed once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include "buffer_pool.h"
#include "common.h"
#include "kernels.h"

namespace moe {
namespace {

constexpr int64_t kMinBlockCols = 64;  // narrower column blocks lose more to packing than they gain

// Calls body(c0, c1) over column blocks [c0, c1) of [0, cols): one block per thread on CPU,
// the whole range (BLAS threads it) on CUDA, with one thread, or when the split is too fine.
template <typename F>
void for_column_blocks(bool on_cpu, int64_t cols, const F& body) {
  const int64_t blocks = on_cpu && !at::in_parallel_region()
                             ? std::min<int64_t>(at::get_num_threads(), cols / kMinBlockCols)
                             : 1;
  if (blocks <= 1) return body(0, cols);
  // Worker threads do not inherit the caller's dispatch state (autograd is excluded below the
  // op's autograd kernel): without it at::mm_out would refuse inputs that require grad.
  const at::ThreadLocalState state;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t b = b0; b < b1; ++b) body(cols * b / blocks, cols * (b + 1) / blocks);
  });
}

}  // namespace

void mm_out_by_columns(at::Tensor& y, const at::Tensor& x, const at::Tensor& w) {
  for_column_blocks(y.is_cpu(), w.size(1), [&](int64_t c0, int64_t c1) {
    auto y_c = y.narrow(1, c0, c1 - c0);
    at::mm_out(y_c, x, w.narrow(1, c0, c1 - c0));
  });
}

at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& counts) {
  TORCH_CHECK_VALUE(x.dim() == 2 && w.dim() == 3, "x must be [M, K] and w [E, K, N], got ", shape_str(x.sizes()),
                    " and ", shape_str(w.sizes()));
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "x has K = ", num(x.size(1)), " columns but w has K = ", num(w.size(1)));
  TORCH_CHECK_VALUE(counts.numel() == w.size(0), "counts has ", num(counts.numel()), " experts but w has ",
                    num(w.size(0)));
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), "x is ", x.scalar_type(), " but w is ", w.scalar_type());
  const auto ends = segment_ends(counts, x.size(0));
  auto y = pooled_empty({x.size(0), w.size(2)}, x.options());
  for_column_blocks(x.is_cpu(), w.size(2), [&](int64_t c0, int64_t c1) {
    int64_t start = 0;
    for (int64_t e = 0; e < w.size(0); ++e) {
      if (ends[e] > start) {
        auto y_e = y.narrow(0, start, ends[e] - start).narrow(1, c0, c1 - c0);
        at::mm_out(y_e, x.narrow(0, start, ends[e] - start), w[e].narrow(1, c0, c1 - c0));
      }
      start = ends[e];
    }
  });
  const int64_t used = ends.empty() ? 0 : ends.back();
  if (used < x.size(0)) y.narrow(0, used, x.size(0) - used).zero_();
  return y;
}

at::Tensor grouped_mm_wgrad_impl(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& counts) {
  TORCH_CHECK_VALUE(x.dim() == 2 && dy.dim() == 2 && x.size(0) == dy.size(0),
                    "x [M, K] and dy [M, N] must share M, got ", shape_str(x.sizes()), " and ", shape_str(dy.sizes()));
  TORCH_CHECK_TYPE(x.scalar_type() == dy.scalar_type(), "x is ", x.scalar_type(), " but dy is ", dy.scalar_type());
  const auto ends = segment_ends(counts, x.size(0));
  auto dw = pooled_empty({counts.numel(), x.size(1), dy.size(1)}, x.options());
  // Few large experts: BLAS threads each expert's GEMM (a column split was no faster: each dW
  // GEMM has only its rows as the inner dimension and a whole [K, N] output). Many small
  // experts: whole experts per thread (for_expert_runs); 64 experts x 192 rows, K = N = 1024,
  // 2 threads: 2.3x faster than BLAS threading each expert (paired median, shared cores, 2026-12-04).
  auto run = [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t start = e == 0 ? 0 : ends[e - 1];
      auto dw_e = dw[e];
      if (ends[e] > start) {
        at::mm_out(dw_e, x.narrow(0, start, ends[e] - start).t(), dy.narrow(0, start, ends[e] - start));
      } else {
        dw_e.zero_();
      }
    }
  };
  if (split_by_expert(x.is_cpu(), counts.numel())) {
    for_expert_runs(ends, run);
  } else {
    run(0, counts.numel());
  }
  return dw;
}

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("grouped_mm", &grouped_mm_impl);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_impl);
}

#ifdef MOE_WITH_CUDA
TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("grouped_mm", &grouped_mm_impl);
  m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_impl);
}
#endif

}  // namespace moe
