// swiglu_grouped_mm(h, w, counts) = grouped_mm(swiglu(h), w, counts): the second GEMM of SwiGLU
// experts with the activation folded in, and its backward with the SwiGLU backward folded in.
//
// Memory: the [N, H] activation is not kept for the backward, which recomputes it from h (kept
// anyway by the first GEMM's backward; SwiGLU costs ~10 flops per element against the 2D of
// each GEMM); the backward's dact [N, H] never exists as a whole.
// Both run expert by expert: SwiGLU -> GEMM (forward), SwiGLU -> dW GEMM -> dact GEMM -> SwiGLU
// backward (backward), so the [rows, H] temporaries are one expert's, not all N rows'. With many
// small experts (fine-grained MoE, split_by_expert) each thread takes whole experts with
// single-threaded BLAS, while an expert's rows are in cache: no thread start-up or BLAS
// partitioning per small GEMM. With few large experts the kernels thread themselves (GEMMs by
// column blocks as in grouped_mm, the dW GEMM by BLAS, SwiGLU by rows).
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

// body(e, first row, rows) for every expert with rows: whole experts per thread with many small
// experts, else one expert after another with each kernel threading itself.
template <typename F>
void for_each_expert(const std::vector<int64_t>& ends, const F& body) {
  auto run = [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      const int64_t start = e == 0 ? 0 : ends[e - 1];
      body(e, start, ends[e] - start);
    }
  };
  if (split_by_expert(true, int64_t(ends.size()))) {
    for_expert_runs(ends, run);
  } else {
    run(0, int64_t(ends.size()));
  }
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
  for_each_expert(ends, [&](int64_t e, int64_t start, int64_t rows) {
    if (rows == 0) return;
    auto y_e = y.narrow(0, start, rows);
    mm_out_by_columns(y_e, swiglu_rows(hc.narrow(0, start, rows)), w[e]);
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
  for_each_expert(ends, [&](int64_t e, int64_t start, int64_t rows) {
    if (rows == 0) {
      if (weight_grad) dw[e].zero_();
      return;
    }
    auto h_e = hc.narrow(0, start, rows);
    auto dy_e = dy.narrow(0, start, rows);
    if (weight_grad) {
      auto dw_e = dw[e];
      at::mm_out(dw_e, swiglu_rows(h_e).t(), dy_e);  // the activation, recomputed
    }
    auto dact = pooled_empty({rows, w.size(1)}, hc.options());
    mm_out_by_columns(dact, dy_e, w[e].t());
    auto grad_h_e = grad_h.narrow(0, start, rows);
    swiglu_backward_into(dact, h_e, grad_h_e);
  });
  zero_padding_rows(grad_h, ends);
  return {grad_h, dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("swiglu_grouped_mm", &swiglu_grouped_mm_cpu);
  m.impl("swiglu_grouped_mm_backward", &swiglu_grouped_mm_backward_cpu);
}

}  // namespace moe
