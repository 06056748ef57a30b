// swiglu_grouped_mm(h, w, counts) = grouped_mm(swiglu(h), w, counts): the second GEMM of SwiGLU
// experts with the activation folded in, and its backward with the SwiGLU backward folded in.
//
// Memory: the [N, H] activation is not kept for the backward, which recomputes it from h (kept
// anyway by the first GEMM's backward; SwiGLU costs ~10 flops per element against the 2D of
// each GEMM); the backward's dact [N, H] never exists as a whole.
// Both run expert by expert: SwiGLU -> GEMM (forward), SwiGLU -> dW GEMM -> dact GEMM -> SwiGLU
// backward (backward), so the [rows, H] temporaries are one expert's, not all N rows'. Threads
// split the rows evenly (for_expert_parts): each takes whole experts, plus a share of the one or
// two its range cuts, with single-threaded BLAS while the part's rows are in cache; no thread
// start-up or BLAS partitioning per small GEMM, and no thread waits on another's larger expert.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

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

void zero_padding_rows(at::Tensor& t, const std::vector<int64_t>& ends) {
  const int64_t used = ends.empty() ? 0 : ends.back();
  if (used < t.size(0)) t.narrow(0, used, t.size(0) - used).zero_();
}

at::Tensor swiglu_grouped_mm_cpu(const at::Tensor& h, const at::Tensor& w, const at::Tensor& counts) {
  check_inputs(h, w, counts);
  auto hc = h.contiguous();
  const auto ends = segment_ends(counts, hc.size(0));
  auto y = pooled_empty({hc.size(0), w.size(2)}, hc.options());
  for_expert_parts(true, ends, [&](const ExpertPart& p) {
    auto y_p = y.narrow(0, p.first, p.rows());
    mm_out_by_columns(y_p, swiglu_rows(hc.narrow(0, p.first, p.rows())), w[p.expert]);
  });
  zero_padding_rows(y, ends);
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
  auto dw = weight_grad ? pooled_empty(w.sizes(), w.options()) : w.new_empty({0});
  for_expert_parts(true, ends, [&](const ExpertPart& p) {
    if (weight_grad) {  // this part's share of dW's columns, over all the expert's rows
      const auto [c0, c1] = p.columns(w.size(2));
      if (c1 > c0) {
        const int64_t rows = p.end - p.start;
        auto dw_e = dw[p.expert].narrow(1, c0, c1 - c0);
        auto act_e = swiglu_rows(hc.narrow(0, p.start, rows));  // the activation, recomputed
        at::mm_out(dw_e, act_e.t(), dy.narrow(0, p.start, rows).narrow(1, c0, c1 - c0));
      }
    }
    auto dact = pooled_empty({p.rows(), w.size(1)}, hc.options());
    mm_out_by_columns(dact, dy.narrow(0, p.first, p.rows()), w[p.expert].t());
    auto grad_h_p = grad_h.narrow(0, p.first, p.rows());
    swiglu_backward_into(dact, hc.narrow(0, p.first, p.rows()), grad_h_p);
  });
  if (weight_grad) zero_empty_experts(dw, ends);
  zero_padding_rows(grad_h, ends);
  return {grad_h, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("swiglu_grouped_mm", &swiglu_grouped_mm_cpu);
  m.impl("swiglu_grouped_mm_backward", &swiglu_grouped_mm_backward_cpu);
}

}  // namespace moe
