// Input checks and segment bounds shared by the CPU (and CUDA host-side) op implementations.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace moe {

inline void check_index(const at::Tensor& idx, const char* name) {
  TORCH_CHECK_VALUE(idx.dim() == 1, name, " must be 1-D, got shape ", idx.sizes());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, name, " must be int64, got ", idx.scalar_type());
}

// Cumulative segment ends of counts (read on the host), checked against the available rows.
inline std::vector<int64_t> segment_ends(const at::Tensor& counts, int64_t num_rows) {
  check_index(counts, "counts");
  auto host = counts.to(at::kCPU).contiguous();
  const int64_t* c = host.data_ptr<int64_t>();
  std::vector<int64_t> ends(host.numel());
  int64_t total = 0;
  for (int64_t e = 0; e < host.numel(); ++e) {
    TORCH_CHECK_VALUE(c[e] >= 0, "counts[", e, "] = ", c[e], " is negative");
    total += c[e];
    ends[e] = total;
  }
  TORCH_CHECK_VALUE(total <= num_rows, "counts sum to ", total, " but x has only ", num_rows, " rows");
  return ends;
}

}  // namespace moe
