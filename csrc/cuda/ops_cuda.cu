// CUDA implementations of the moe:: ops (schemas in csrc/schemas.cpp): input checks as on the CPU
// side, then the torch-free launchers of kernels.cuh on the current stream.
//
// Host syncs: none. Index ranges (expert ids, token_idx) are checked on the device by a
// device-side assert; shapes, dtypes and devices are checked here. Scratch memory comes from
// torch's caching allocator on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../common.h"
#include "kernels.cuh"

namespace moe {
namespace {

// torch's element types -> the CUDA types the kernels are instantiated for (same bits).
template <typename T>
struct DeviceType {
  using type = T;
};
template <>
struct DeviceType<at::Half> {
  using type = __half;
};
template <>
struct DeviceType<at::BFloat16> {
  using type = __nv_bfloat16;
};

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void check_on(const at::Tensor& t, const at::Tensor& first, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.device() == first.device(), name, " must be on ", first.device(), ", got ",
              t.device());
}

void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, name,
                   " must be float32, float64, float16 or bfloat16, got ", s);
}

std::tuple<at::Tensor, at::Tensor> sort_by_expert_cuda(const at::Tensor& expert_ids, int64_t num_experts) {
  TORCH_CHECK_VALUE(num_experts > 0, "num_experts must be positive, got ", num(num_experts));
  TORCH_CHECK_VALUE(num_experts < std::numeric_limits<int32_t>::max(), "num_experts must be < 2^31 - 1, got ",
                    num(num_experts));
  auto ids = expert_ids.reshape({-1}).contiguous();
  check_index(ids, "expert_ids");
  check_on(ids, ids, "expert_ids");
  const c10::cuda::CUDAGuard guard(ids.device());
  const int64_t n = ids.numel();
  auto order = at::empty({n}, ids.options());
  auto counts = at::empty({num_experts}, ids.options());
  auto workspace = at::empty({n == 0 ? 0 : gpu::sort_workspace_elems(n, num_experts)}, ids.options());
  C10_CUDA_CHECK(gpu::sort_by_expert(ids.const_data_ptr<int64_t>(), n, num_experts, order.mutable_data_ptr<int64_t>(),
                                     counts.mutable_data_ptr<int64_t>(), workspace.mutable_data_ptr<int64_t>(),
                                     current_stream()));
  return {order, counts};
}

at::Tensor align_block_size_cuda(const at::Tensor& counts, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", num(block_size));
  auto c = counts.contiguous();
  check_index(c, "counts");
  check_on(c, c, "counts");
  const c10::cuda::CUDAGuard guard(c.device());
  auto offsets = at::empty({c.numel() + 1}, c.options());
  C10_CUDA_CHECK(gpu::align_block_size(c.const_data_ptr<int64_t>(), c.numel(), block_size,
                                       offsets.mutable_data_ptr<int64_t>(), current_stream()));
  return offsets;
}

at::Tensor permute_cuda(const at::Tensor& x, const at::Tensor& token_idx) {
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be [T, D], got shape ", shape_str(x.sizes()));
  check_index(token_idx, "token_idx");
  check_on(x, x, "x");
  check_on(token_idx, x, "token_idx");
  TORCH_CHECK_VALUE(x.size(0) > 0 || token_idx.numel() == 0, "token_idx has ", num(token_idx.numel()),
                    " rows but x has no tokens to gather");
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto idx = token_idx.contiguous();
  auto out = at::empty({idx.numel(), xc.size(1)}, xc.options());
  C10_CUDA_CHECK(gpu::gather_rows(xc.const_data_ptr(), idx.const_data_ptr<int64_t>(), idx.numel(), xc.size(0),
                                  xc.size(1) * xc.element_size(), out.mutable_data_ptr(), current_stream()));
  return out;
}

// Shared body of scatter_rows (weights undefined) and unpermute: rows grouped per token by a
// stable sort of token_idx (CSR), then one fixed-order fp32 (fp64) sum per output element.
at::Tensor combine_cuda(const at::Tensor& y, const at::Tensor& token_idx, const at::Tensor& weights,
                        int64_t num_tokens) {
  TORCH_CHECK_VALUE(y.dim() == 2, "y must be [N, D], got shape ", shape_str(y.sizes()));
  TORCH_CHECK_VALUE(num_tokens >= 0, "num_tokens must be >= 0, got ", num(num_tokens));
  TORCH_CHECK_VALUE(num_tokens < std::numeric_limits<int32_t>::max(), "num_tokens must be < 2^31 - 1, got ",
                    num(num_tokens));
  check_index(token_idx, "token_idx");
  TORCH_CHECK_VALUE(token_idx.numel() == y.size(0), "token_idx has ", num(token_idx.numel()), " rows but y has ",
                    num(y.size(0)));
  check_float(y, "y");
  check_on(y, y, "y");
  check_on(token_idx, y, "token_idx");
  TORCH_CHECK_VALUE(num_tokens > 0 || y.size(0) == 0, "y has ", num(y.size(0)), " rows but num_tokens is 0");
  const c10::cuda::CUDAGuard guard(y.device());
  const auto acc_type = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor w;
  if (weights.defined()) {
    TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == y.size(0), "weights must be [N] = [", num(y.size(0)),
                      "], got shape ", shape_str(weights.sizes()));
    check_on(weights, y, "weights");
    w = weights.to(acc_type).contiguous();
  }
  const int64_t n = y.size(0);
  if (n == 0) return at::zeros({num_tokens, y.size(1)}, y.options());
  auto yc = y.contiguous();
  auto idx = token_idx.contiguous();
  auto out = at::empty({num_tokens, yc.size(1)}, yc.options());
  const cudaStream_t stream = current_stream();
  auto keys = at::empty({n}, idx.options().dtype(at::kInt));
  C10_CUDA_CHECK(gpu::token_keys(idx.const_data_ptr<int64_t>(), n, num_tokens, keys.mutable_data_ptr<int32_t>(), stream));
  at::Tensor sorted, rows;  // not a structured binding: C++17 lambdas cannot capture those
  std::tie(sorted, rows) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  auto start = at::empty({num_tokens + 1}, idx.options());
  C10_CUDA_CHECK(gpu::segment_starts(sorted.const_data_ptr<int32_t>(), n, num_tokens, start.mutable_data_ptr<int64_t>(),
                                     stream));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_combine_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using acc_t = at::opmath_type<scalar_t>;
    const cudaError_t err = gpu::combine_rows<T, acc_t>(
        reinterpret_cast<const T*>(yc.const_data_ptr<scalar_t>()), w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
        rows.const_data_ptr<int64_t>(), start.const_data_ptr<int64_t>(), num_tokens, yc.size(1),
        reinterpret_cast<T*>(out.mutable_data_ptr<scalar_t>()), stream);
    C10_CUDA_CHECK(err);
  });
  return out;
}

at::Tensor scatter_rows_cuda(const at::Tensor& y, const at::Tensor& token_idx, int64_t num_tokens) {
  return combine_cuda(y, token_idx, at::Tensor(), num_tokens);
}

at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& token_idx, const at::Tensor& weights,
                          int64_t num_tokens) {
  return combine_cuda(y, token_idx, weights, num_tokens);
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y,
                                                           const at::Tensor& token_idx, const at::Tensor& weights) {
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && y.dim() == 2 && grad_out.size(1) == y.size(1),
                    "grad_out must be [T, D] and y [N, D] with the same D, got ", shape_str(grad_out.sizes()), " and ",
                    shape_str(y.sizes()));
  TORCH_CHECK_TYPE(grad_out.scalar_type() == y.scalar_type(), "grad_out is ", grad_out.scalar_type(), " but y is ",
                   y.scalar_type());
  check_float(y, "y");
  check_index(token_idx, "token_idx");
  TORCH_CHECK_VALUE(token_idx.numel() == y.size(0), "token_idx has ", num(token_idx.numel()), " rows but y has ",
                    num(y.size(0)));
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == y.size(0), "weights must be [N] = [", num(y.size(0)),
                    "], got shape ", shape_str(weights.sizes()));
  check_on(y, y, "y");
  check_on(grad_out, y, "grad_out");
  check_on(token_idx, y, "token_idx");
  check_on(weights, y, "weights");
  TORCH_CHECK_VALUE(grad_out.size(0) > 0 || y.size(0) == 0, "y has ", num(y.size(0)),
                    " rows but grad_out has no tokens");
  const c10::cuda::CUDAGuard guard(y.device());
  auto g = grad_out.contiguous();
  auto yc = y.contiguous();
  auto idx = token_idx.contiguous();
  const auto acc_type = yc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto w = weights.to(acc_type).contiguous();
  auto grad_y = at::empty_like(yc, at::MemoryFormat::Contiguous);
  auto grad_w = at::empty({yc.size(0)}, yc.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, yc.scalar_type(), "moe_unpermute_backward_cuda", [&] {
    using T = typename DeviceType<scalar_t>::type;
    using acc_t = at::opmath_type<scalar_t>;
    const cudaError_t err = gpu::unpermute_backward<T, acc_t>(
        reinterpret_cast<const T*>(g.const_data_ptr<scalar_t>()), reinterpret_cast<const T*>(yc.const_data_ptr<scalar_t>()),
        idx.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(), yc.size(0), g.size(0), yc.size(1),
        reinterpret_cast<T*>(grad_y.mutable_data_ptr<scalar_t>()), grad_w.mutable_data_ptr<acc_t>(), current_stream());
    C10_CUDA_CHECK(err);
  });
  return {grad_y, grad_w.to(weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CUDA, m) {
  m.impl("sort_by_expert", &sort_by_expert_cuda);
  m.impl("align_block_size", &align_block_size_cuda);
  m.impl("permute", &permute_cuda);
  m.impl("scatter_rows", &scatter_rows_cuda);
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace moe
