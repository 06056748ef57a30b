// permute (row gather), scatter_rows / unpermute (deterministic weighted row sums) and
// unpermute_backward on CPU, multithreaded with at::parallel_for.
//
// The scatter side never races: rows are grouped per token (a CSR inverse of token_idx,
// built by a counting sort that keeps row order), and each token sums its own rows in
// ascending row order, so results are bitwise reproducible and match index_add's order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "buffer_pool.h"
#include "common.h"

namespace moe {
namespace {

constexpr int64_t kRowGrain = 16;

void check_rows(const at::Tensor& token_idx, int64_t num_tokens) {
  const int64_t* idx = token_idx.data_ptr<int64_t>();
  for (int64_t j = 0; j < token_idx.numel(); ++j)
    TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < num_tokens, "token_idx[", num(j), "] = ", num(idx[j]),
                      " is out of range for ", num(num_tokens), " tokens");
}

at::Tensor permute_cpu(const at::Tensor& x, const at::Tensor& token_idx) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [T, D], got shape ", shape_str(x.sizes()));
  check_index(token_idx, "token_idx");
  auto xc = x.contiguous();
  auto idx = token_idx.contiguous();
  check_rows(idx, xc.size(0));
  auto out = pooled_empty({idx.numel(), xc.size(1)}, xc.options());
  const int64_t row_bytes = xc.size(1) * xc.element_size();
  const char* src = static_cast<const char*>(xc.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t* id = idx.data_ptr<int64_t>();
  if (row_bytes == 0) return out;
  at::parallel_for(0, idx.numel(), kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) std::memcpy(dst + j * row_bytes, src + id[j] * row_bytes, row_bytes);
  });
  return out;
}

// CSR of the rows of each token: rows[start[t] : start[t + 1]] in ascending order.
std::pair<std::vector<int64_t>, std::vector<int64_t>> rows_by_token(const at::Tensor& idx, int64_t num_tokens) {
  const int64_t* id = idx.data_ptr<int64_t>();
  std::vector<int64_t> start(num_tokens + 1, 0);
  for (int64_t j = 0; j < idx.numel(); ++j) ++start[id[j] + 1];
  for (int64_t t = 0; t < num_tokens; ++t) start[t + 1] += start[t];
  std::vector<int64_t> fill(start.begin(), start.end() - 1), rows(idx.numel());
  for (int64_t j = 0; j < idx.numel(); ++j) rows[fill[id[j]]++] = j;
  return {start, rows};
}

// o = 0 + y * w (first row of a token) or o += y * w, for fp32 rows summed in the output row.
// An AVX2 clone where the CPU has it: twice the lanes of the SSE2 baseline. No FMA in its target:
// a fused multiply-add would round once instead of twice and change the bits.
// always_inline: the AVX2 clone compiles this same body with its own target.
#if defined(__GNUC__)
#define MOE_ROW_INLINE __attribute__((always_inline)) inline
#else
#define MOE_ROW_INLINE inline
#endif

template <bool first>
MOE_ROW_INLINE void axpy_row_body(float* __restrict o, const float* __restrict y, float w, int64_t n) {
  for (int64_t d = 0; d < n; ++d) o[d] = (first ? 0.0f : o[d]) + y[d] * w;
}

#if defined(__x86_64__) && defined(__GNUC__)
template <bool first>
__attribute__((target("avx2"))) void axpy_row_avx2(float* __restrict o, const float* __restrict y, float w,
                                                  int64_t n) {
  axpy_row_body<first>(o, y, w, n);
}
#endif

template <bool first>
void axpy_row(float* o, const float* y, float w, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2) return axpy_row_avx2<first>(o, y, w, n);
#endif
  axpy_row_body<first>(o, y, w, n);
}

template <typename scalar_t, typename acc_t>
void weighted_row_sums(const scalar_t* y, const acc_t* w, const std::vector<int64_t>& start,
                       const std::vector<int64_t>& rows, int64_t num_tokens, int64_t dim, scalar_t* out) {
  // Where the sum is kept in the output's own type (fp32, fp64) it is accumulated in the output
  // row itself: one pass over it instead of three (zero a scratch row, add, copy out). The first
  // row is added to an explicit 0 so that the bits match the scratch-row version (-0.0 + 0 = +0).
  constexpr bool in_place = std::is_same_v<scalar_t, acc_t>;
  at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(in_place ? 0 : dim);
    for (int64_t t = begin; t < end; ++t) {
      scalar_t* o = out + t * dim;
      acc_t* acc = in_place ? reinterpret_cast<acc_t*>(o) : scratch.data();
      if (start[t] == start[t + 1]) {
        std::fill(o, o + dim, scalar_t(0));
        continue;
      }
      for (int64_t r = start[t]; r < start[t + 1]; ++r) {
        const int64_t j = rows[r];
        const scalar_t* yj = y + j * dim;
        const acc_t wj = w == nullptr ? acc_t(1) : w[j];  // y * 1 is y exactly
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (r == start[t]) {
            axpy_row<true>(acc, yj, wj, dim);
          } else {
            axpy_row<false>(acc, yj, wj, dim);
          }
        } else if (r == start[t]) {
          for (int64_t d = 0; d < dim; ++d) acc[d] = acc_t(0) + static_cast<acc_t>(yj[d]) * wj;
        } else {
          for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<acc_t>(yj[d]) * wj;
        }
      }
      if constexpr (!in_place) {
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<scalar_t>(acc[d]);
      }
    }
  });
}

// Shared body of scatter_rows (weights undefined) and unpermute.
at::Tensor combine_cpu(const at::Tensor& y, const at::Tensor& token_idx, const at::Tensor& weights,
                       int64_t num_tokens) {
  TORCH_CHECK_VALUE(y.dim() == 2, "y must be [N, D], got shape ", shape_str(y.sizes()));
  TORCH_CHECK_VALUE(num_tokens >= 0, "num_tokens must be >= 0, got ", num(num_tokens));
  check_index(token_idx, "token_idx");
  TORCH_CHECK_VALUE(token_idx.numel() == y.size(0), "token_idx has ", num(token_idx.numel()), " rows but y has ",
                    num(y.size(0)));
  auto yc = y.contiguous();
  auto idx = token_idx.contiguous();
  check_rows(idx, num_tokens);
  auto [start, rows] = rows_by_token(idx, num_tokens);
  auto out = pooled_empty({num_tokens, yc.size(1)}, yc.options());
  const auto acc_type = yc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w;
  if (weights.defined()) {
    TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == y.size(0), "weights must be [N] = [", num(y.size(0)),
                      "], got shape ", shape_str(weights.sizes()));
    TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "weights must be floating, got ",
                     weights.scalar_type());
    w = weights.to(acc_type).contiguous();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_combine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    weighted_row_sums<scalar_t, acc_t>(yc.const_data_ptr<scalar_t>(), w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                       start, rows, num_tokens, yc.size(1), out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor scatter_rows_cpu(const at::Tensor& y, const at::Tensor& token_idx, int64_t num_tokens) {
  return combine_cpu(y, token_idx, at::Tensor(), num_tokens);
}

at::Tensor unpermute_cpu(const at::Tensor& y, const at::Tensor& token_idx, const at::Tensor& weights,
                         int64_t num_tokens) {
  return combine_cpu(y, token_idx, weights, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y,
                                                          const at::Tensor& token_idx, const at::Tensor& weights) {
  check_index(token_idx, "token_idx");
  TORCH_CHECK_VALUE(y.dim() == 2 && token_idx.numel() == y.size(0),
                    "y must be [N, D] with N = token_idx.numel() = ", num(token_idx.numel()), ", got shape ",
                    shape_str(y.sizes()));
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(1) == y.size(1), "grad_out must be [T, ", num(y.size(1)),
                    "], got shape ", shape_str(grad_out.sizes()));
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == y.size(0), "weights must be [N] = [", num(y.size(0)),
                    "], got shape ", shape_str(weights.sizes()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == y.scalar_type(), "grad_out is ", grad_out.scalar_type(), " but y is ",
                   y.scalar_type());
  auto g = grad_out.contiguous();
  auto yc = y.contiguous();
  auto idx = token_idx.contiguous();
  check_rows(idx, g.size(0));
  const auto acc_type = yc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto w = weights.to(acc_type).contiguous();
  auto grad_y = pooled_empty(yc.sizes(), yc.options());
  auto grad_w = at::empty({yc.size(0)}, yc.options().dtype(acc_type));
  const int64_t dim = yc.size(1);
  const int64_t* id = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_unpermute_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* yp = yc.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    scalar_t* gy = grad_y.mutable_data_ptr<scalar_t>();
    acc_t* gw = grad_w.mutable_data_ptr<acc_t>();
    at::parallel_for(0, yc.size(0), kRowGrain, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const scalar_t* gt = gp + id[j] * dim;
        const scalar_t* yj = yp + j * dim;
        acc_t dot = 0;
        for (int64_t d = 0; d < dim; ++d) {
          const acc_t gd = static_cast<acc_t>(gt[d]);
          gy[j * dim + d] = static_cast<scalar_t>(gd * wp[j]);
          dot += gd * static_cast<acc_t>(yj[d]);
        }
        gw[j] = dot;
      }
    });
  });
  return {grad_y, grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("scatter_rows", &scatter_rows_cpu);
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace moe
