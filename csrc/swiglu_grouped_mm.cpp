// swiglu_grouped_mm(h, w, counts) = grouped_mm(swiglu(h), w, counts): the second GEMM of SwiGLU
// experts with the activation folded in, and its backward with the SwiGLU backward folded in.
//
// Memory: the [N, H] activation is not kept for the backward, which recomputes it from h (kept
// anyway by the first GEMM's backward; SwiGLU costs ~10 flops per element against the 2D of
// each GEMM); the backward's dact [N, H] never exists as a whole with many small experts.
// Speed with many small experts (fine-grained MoE, split_by_expert): each thread takes whole
// experts and runs SwiGLU -> GEMM (forward) or SwiGLU -> dW GEMM -> dact GEMM -> SwiGLU backward
// (backward) on one expert's rows while they are in cache, with single-threaded BLAS: no
// thread start-up or BLAS partitioning per small GEMM. Otherwise (few large experts, one thread)
// it runs the separate kernels: each expert's GEMMs are large enough to thread on their own.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "buffer_pool.h"
#include "common.h"
#include "kernels.h"

namespace moe {
namespace {

void check_inputs(const at::Tensor& h, const at::Tensor& w, const at::Tensor& counts) {
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(1) % 2 == 0, "swiglu_grouped_mm: h must be [N, 2H], got shape ",
                    shape_str(h.sizes()));
  TORCH_CHECK_VALUE(w.dim() == 3 && w.size(1) * 2 == h.size(1), "swiglu_grouped_mm: w must be [E, H, D] with H = ",
                    num(h.size(1) / 2), ", got shape ", shape_str(w.sizes()));
  TORCH_CHECK_VALUE(counts.numel() == w.size(0), "counts has ", num(counts.numel()), " experts but w has ",
                    num(w.size(0)));
  TORCH_CHECK_TYPE(at::isFloatingType(h.scalar_type()) && h.scalar_type() == w.scalar_type(), "h is ",
                   h.scalar_type(), " but w is ", w.scalar_type());
}

at::Tensor swiglu_rows(const at::Tensor& h) {  // [rows, H] of contiguous h [rows, 2H]
  auto act = pooled_empty({h.size(0), h.size(1) / 2}, h.options());
  swiglu_into(h, act);
  return act;
}

at::Tensor swiglu_grouped_mm_cpu(const at::Tensor& h, const at::Tensor& w, const at::Tensor& counts) {
  check_inputs(h, w, counts);
  auto hc = h.contiguous();
  const auto ends = segment_ends(counts, hc.size(0));
  if (!split_by_expert(true, w.size(0))) return grouped_mm_impl(swiglu_rows(hc), w, counts);
  auto y = pooled_empty({hc.size(0), w.size(2)}, hc.options());
  for_expert_runs(ends, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t start = e == 0 ? 0 : ends[e - 1], rows = ends[e] - start;
      if (rows == 0) continue;
      auto y_e = y.narrow(0, start, rows);
      at::mm_out(y_e, swiglu_rows(hc.narrow(0, start, rows)), w[e]);
    }
  });
  const int64_t used = ends.empty() ? 0 : ends.back();
  if (used < hc.size(0)) y.narrow(0, used, hc.size(0) - used).zero_();
  return y;
}

// (grad_h [N, 2H], grad_w [E, H, D], or [0] when weight_grad is false).
std::tuple<at::Tensor, at::Tensor> swiglu_grouped_mm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& h,
                                                                  const at::Tensor& w, const at::Tensor& counts,
                                                                  bool weight_grad) {
  check_inputs(h, w, counts);
  TORCH_CHECK_VALUE(grad_y.dim() == 2 && grad_y.size(0) == h.size(0) && grad_y.size(1) == w.size(2),
                    "swiglu_grouped_mm_backward: grad_y must be [N, D] = [", num(h.size(0)), ", ", num(w.size(2)),
                    "], got shape ", shape_str(grad_y.sizes()));
  TORCH_CHECK_TYPE(grad_y.scalar_type() == h.scalar_type(), "grad_y is ", grad_y.scalar_type(), " but h is ",
                   h.scalar_type());
  auto hc = h.contiguous();
  auto dy = grad_y.contiguous();  // upstream grads can arrive expanded (stride 0)
  const auto ends = segment_ends(counts, hc.size(0));
  auto grad_h = pooled_empty(hc.sizes(), hc.options());
  if (!split_by_expert(true, w.size(0))) {
    at::Tensor dw = weight_grad ? grouped_mm_wgrad_impl(swiglu_rows(hc), dy, counts) : w.new_empty({0});
    swiglu_backward_into(grouped_mm_impl(dy, w.transpose(1, 2), counts), hc, grad_h);
    return {grad_h, dw};
  }
  auto dw = weight_grad ? pooled_empty(w.sizes(), w.options()) : w.new_empty({0});
  for_expert_runs(ends, [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t start = e == 0 ? 0 : ends[e - 1], rows = ends[e] - start;
      if (rows == 0) {
        if (weight_grad) dw[e].zero_();
        continue;
      }
      auto h_e = hc.narrow(0, start, rows);
      auto dy_e = dy.narrow(0, start, rows);
      if (weight_grad) {
        auto dw_e = dw[e];
        at::mm_out(dw_e, swiglu_rows(h_e).t(), dy_e);
      }
      auto grad_h_e = grad_h.narrow(0, start, rows);
      swiglu_backward_into(at::mm(dy_e, w[e].t()), h_e, grad_h_e);
    }
  });
  const int64_t used = ends.empty() ? 0 : ends.back();
  if (used < hc.size(0)) grad_h.narrow(0, used, hc.size(0) - used).zero_();
  return {grad_h, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("swiglu_grouped_mm", &swiglu_grouped_mm_cpu);
  m.impl("swiglu_grouped_mm_backward", &swiglu_grouped_mm_backward_cpu);
}

}  // namespace moe
