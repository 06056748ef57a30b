// grouped_mm and its weight gradient: one at::mm (BLAS on CPU, cuBLAS on CUDA) per contiguous
// expert segment, written straight into the output (no zero-fill except the padding tail).
// The same code serves CPU and CUDA; on CUDA the counts are read on the host (one sync).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace moe {

at::Tensor grouped_mm_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& counts) {
  TORCH_CHECK_VALUE(x.dim() == 2 && w.dim() == 3, "x must be [M, K] and w [E, K, N], got ", x.sizes(), " and ", w.sizes());
  TORCH_CHECK_VALUE(w.size(1) == x.size(1), "x has K = ", x.size(1), " columns but w has K = ", w.size(1));
  TORCH_CHECK_VALUE(counts.numel() == w.size(0), "counts has ", counts.numel(), " experts but w has ", w.size(0));
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), "x is ", x.scalar_type(), " but w is ", w.scalar_type());
  const auto ends = segment_ends(counts, x.size(0));
  auto y = at::empty({x.size(0), w.size(2)}, x.options());
  int64_t start = 0;
  for (int64_t e = 0; e < w.size(0); ++e) {
    if (ends[e] > start) {
      auto y_e = y.narrow(0, start, ends[e] - start);
      at::mm_out(y_e, x.narrow(0, start, ends[e] - start), w[e]);
    }
    start = ends[e];
  }
  if (start < x.size(0)) y.narrow(0, start, x.size(0) - start).zero_();
  return y;
}

at::Tensor grouped_mm_wgrad_impl(const at::Tensor& x, const at::Tensor& dy, const at::Tensor& counts) {
  TORCH_CHECK_VALUE(x.dim() == 2 && dy.dim() == 2 && x.size(0) == dy.size(0), "x [M, K] and dy [M, N] must share M, got ",
              x.sizes(), " and ", dy.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == dy.scalar_type(), "x is ", x.scalar_type(), " but dy is ", dy.scalar_type());
  const auto ends = segment_ends(counts, x.size(0));
  auto dw = at::empty({counts.numel(), x.size(1), dy.size(1)}, x.options());
  int64_t start = 0;
  for (int64_t e = 0; e < counts.numel(); ++e) {
    auto dw_e = dw[e];
    if (ends[e] > start) {
      at::mm_out(dw_e, x.narrow(0, start, ends[e] - start).t(), dy.narrow(0, start, ends[e] - start));
    } else {
      dw_e.zero_();
    }
    start = ends[e];
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
