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

#include <array>
#include <tuple>
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

// One part's backward through swiglu_grouped_mm, shared by its backward and swiglu_experts':
// the part's share of dW's columns over all the expert's rows (skipped when dw is null), then
// grad_h_p [rows, 2H] = the SwiGLU backward of dact = dy_p w^T.
void part_backward(const ExpertPart& p, const at::Tensor& dy, const at::Tensor& hc, const at::Tensor& w,
                   at::Tensor* dw, at::Tensor& grad_h_p) {
  if (dw != nullptr) {
    const auto [c0, c1] = p.columns(w.size(2));
    if (c1 > c0) {
      const int64_t rows = p.end - p.start;
      auto dw_e = (*dw)[p.expert].narrow(1, c0, c1 - c0);
      auto act_e = swiglu_rows(hc.narrow(0, p.start, rows));  // the activation, recomputed
      at::mm_out(dw_e, act_e.t(), dy.narrow(0, p.start, rows).narrow(1, c0, c1 - c0));
    }
  }
  auto dact = pooled_empty({p.rows(), w.size(1)}, hc.options());
  mm_out_by_columns(dact, dy.narrow(0, p.first, p.rows()), w[p.expert].t());
  swiglu_backward_into(dact, hc.narrow(0, p.first, p.rows()), grad_h_p);
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
    auto grad_h_p = grad_h.narrow(0, p.first, p.rows());
    part_backward(p, dy, hc, w, weight_grad ? &dw : nullptr, grad_h_p);
  });
  if (weight_grad) zero_empty_experts(dw, ends);
  zero_padding_rows(grad_h, ends);
  return {grad_h, dw};
}

// swiglu_experts: the whole SwiGLU expert MLP, y = swiglu(x @ w_in) @ w_out per expert, and one
// backward for all of it. The forward is grouped_mm then swiglu_grouped_mm (h is returned to be
// kept for the backward). The backward runs each thread part through every step while its rows
// are in cache: dW_out share, dact = dy w_out^T, grad_h = SwiGLU backward, dx = grad_h w_in^T,
// dW_in = x^T grad_h. grad_h [N, 2H], the largest gradient of the layer, never exists whole: the
// separate ops held it (128 MiB on benchmarks/moe_layer.py's standard shape) next to dW_in at
// the step's memory peak. dW_in of an expert two threads share reduces over both parts' rows:
// those parts keep their grad_h rows, and one GEMM per such expert after the parallel part
// computes it (the same GEMM a whole expert gets, so results do not depend on the split).
void check_experts(const at::Tensor& x, const at::Tensor& w_in, const at::Tensor& w_out) {
  TORCH_CHECK_VALUE(x.dim() == 2 && w_in.dim() == 3 && w_in.size(1) == x.size(1),
                    "swiglu_experts: x must be [N, D] and w_in [E, D, 2H], got shapes ", shape_str(x.sizes()), " and ",
                    shape_str(w_in.sizes()));
  TORCH_CHECK_VALUE(w_out.dim() == 3 && w_out.size(0) == w_in.size(0) && 2 * w_out.size(1) == w_in.size(2) &&
                        w_out.size(2) == x.size(1),
                    "swiglu_experts: w_out must be [E, H, D] = [", num(w_in.size(0)), ", ", num(w_in.size(2) / 2), ", ",
                    num(x.size(1)), "], got shape ", shape_str(w_out.sizes()));
  TORCH_CHECK_TYPE(x.scalar_type() == w_in.scalar_type() && x.scalar_type() == w_out.scalar_type(), "x is ",
                   x.scalar_type(), " but w_in is ", w_in.scalar_type(), " and w_out ", w_out.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> swiglu_experts_cpu(const at::Tensor& x, const at::Tensor& w_in,
                                                      const at::Tensor& w_out, const at::Tensor& counts) {
  check_experts(x, w_in, w_out);
  auto h = grouped_mm_impl(x, w_in, counts);
  return {swiglu_grouped_mm_cpu(h, w_out, counts), h};
}

// (dx [N, D], dw_in [E, D, 2H], dw_out [E, H, D]); each is [0] where output_mask says it is not needed.
std::tuple<at::Tensor, at::Tensor, at::Tensor> swiglu_experts_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& h, const at::Tensor& w_in, const at::Tensor& w_out,
    const at::Tensor& counts, std::array<bool, 3> output_mask) {
  check_experts(x, w_in, w_out);
  check_inputs(h, w_out, counts);
  TORCH_CHECK_VALUE(h.size(0) == x.size(0) && grad_y.dim() == 2 && grad_y.size(0) == x.size(0) &&
                        grad_y.size(1) == x.size(1),
                    "swiglu_experts_backward: h must be [N, 2H] and grad_y [N, D] with N = ", num(x.size(0)),
                    ", got shapes ", shape_str(h.sizes()), " and ", shape_str(grad_y.sizes()));
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type() && h.scalar_type() == x.scalar_type(), "grad_y is ",
                   grad_y.scalar_type(), " and h ", h.scalar_type(), " but x is ", x.scalar_type());
  const auto [need_dx, need_dw_in, need_dw_out] = output_mask;
  auto xc = x.contiguous();
  auto hc = h.contiguous();
  auto dy = grad_y.contiguous();  // upstream grads can arrive expanded (stride 0)
  const int64_t n = xc.size(0), hidden = w_out.size(1);
  const auto ends = segment_ends(counts, n);
  const int64_t used = ends.empty() ? 0 : ends.back();
  auto dx = need_dx ? pooled_empty({n, xc.size(1)}, xc.options()) : xc.new_empty({0});
  auto dw_in = need_dw_in ? pooled_empty(w_in.sizes(), w_in.options()) : w_in.new_empty({0});
  auto dw_out = need_dw_out ? pooled_empty(w_out.sizes(), w_out.options()) : w_out.new_empty({0});
  const auto parts = expert_parts(ends, split_threads(true, used));
  // Experts shared by threads keep their grad_h rows in `shared_h`, at offset shared_row[e].
  std::vector<int64_t> shared_row(ends.size(), -1);
  int64_t shared_rows = 0;
  for (const auto& thread_parts : parts) {
    for (const auto& p : thread_parts) {
      if (need_dw_in && !p.whole() && shared_row[p.expert] < 0) {
        shared_row[p.expert] = shared_rows;
        shared_rows += p.end - p.start;
      }
    }
  }
  auto shared_h = pooled_empty({shared_rows, 2 * hidden}, hc.options());
  run_parts(parts, [&](const ExpertPart& p) {
    const int64_t e = p.expert;
    auto grad_h = shared_row[e] >= 0 ? shared_h.narrow(0, shared_row[e] + p.first - p.start, p.rows())
                                     : pooled_empty({p.rows(), 2 * hidden}, hc.options());
    part_backward(p, dy, hc, w_out, need_dw_out ? &dw_out : nullptr, grad_h);
    if (need_dx) {
      auto dx_p = dx.narrow(0, p.first, p.rows());
      mm_out_by_columns(dx_p, grad_h, w_in[e].t());
    }
    if (need_dw_in && shared_row[e] < 0) {
      auto dw_e = dw_in[e];
      at::mm_out(dw_e, xc.narrow(0, p.first, p.rows()).t(), grad_h);
    }
  });
  for (size_t e = 0; e < ends.size(); ++e) {  // dW_in of shared experts: BLAS threads each GEMM
    if (shared_row[e] < 0) continue;
    const int64_t start = e == 0 ? 0 : ends[e - 1], rows = ends[e] - start;
    auto dw_e = dw_in[int64_t(e)];
    at::mm_out(dw_e, xc.narrow(0, start, rows).t(), shared_h.narrow(0, shared_row[e], rows));
  }
  if (need_dw_in) zero_empty_experts(dw_in, ends);
  if (need_dw_out) zero_empty_experts(dw_out, ends);
  if (need_dx) zero_padding_rows(dx, ends);
  return {dx, dw_in, dw_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("swiglu_grouped_mm", &swiglu_grouped_mm_cpu);
  m.impl("swiglu_grouped_mm_backward", &swiglu_grouped_mm_backward_cpu);
  m.impl("swiglu_experts", &swiglu_experts_cpu);
  m.impl("swiglu_experts_backward", &swiglu_experts_backward_cpu);
}

}  // namespace moe
