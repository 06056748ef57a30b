// sort_by_expert and align_block_size on CPU: counting sort, O(N + E).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common.h"

namespace moe {
namespace {

std::tuple<at::Tensor, at::Tensor> sort_by_expert_cpu(const at::Tensor& expert_ids, int64_t num_experts) {
  TORCH_CHECK_VALUE(num_experts > 0, "num_experts must be positive, got ", num(num_experts));
  auto ids = expert_ids.reshape({-1}).contiguous();
  check_index(ids, "expert_ids");
  const int64_t n = ids.numel();
  const int64_t* id = ids.data_ptr<int64_t>();
  // Bin E holds dropped copies, so they land after every expert's segment.
  std::vector<int64_t> next(num_experts + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(id[i] < num_experts, "expert_ids[", num(i), "] = ", num(id[i]), " is out of range for ",
                      num(num_experts), " experts (use -1 for dropped copies)");
    ++next[id[i] < 0 ? num_experts : id[i]];
  }
  auto counts = at::empty({num_experts}, ids.options());
  std::copy(next.begin(), next.begin() + num_experts, counts.data_ptr<int64_t>());
  int64_t start = 0;
  for (auto& c : next) {  // exclusive prefix sum: next[b] = first free slot of bin b
    const int64_t size = c;
    c = start;
    start += size;
  }
  auto order = at::empty({n}, ids.options());
  int64_t* out = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) out[next[id[i] < 0 ? num_experts : id[i]]++] = i;  // stable
  return {order, counts};
}

at::Tensor align_block_size_cpu(const at::Tensor& counts, int64_t block_size) {
  TORCH_CHECK_VALUE(block_size > 0, "block_size must be positive, got ", num(block_size));
  auto c = counts.contiguous();
  check_index(c, "counts");
  auto offsets = at::empty({c.numel() + 1}, c.options());
  const int64_t* in = c.data_ptr<int64_t>();
  int64_t* out = offsets.data_ptr<int64_t>();
  out[0] = 0;
  for (int64_t e = 0; e < c.numel(); ++e) out[e + 1] = out[e] + (in[e] + block_size - 1) / block_size * block_size;
  return offsets;
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) {
  m.impl("sort_by_expert", &sort_by_expert_cpu);
  m.impl("align_block_size", &align_block_size_cpu);
}

}  // namespace moe
