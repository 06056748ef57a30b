// Input checks and segment bounds shared by the CPU (and CUDA host-side) op implementations.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace moe {

// Error messages format numbers with std::to_string, never with an ostream's operator<<: in the
// extension built by nvcc on the H200 image (torch 2.11+cu130, 2026-12-04) inserting an int64 into
// a TORCH_CHECK message crashed the process (SIGSEGV inside std::ostream::_M_insert<long>, which
// that build carried a copy of), while strings, devices and dtypes formatted fine.
inline std::string num(int64_t v) { return std::to_string(v); }

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + std::to_string(sizes[i]);
  return out + "]";
}

inline void check_index(const at::Tensor& idx, const char* name) {
  TORCH_CHECK_VALUE(idx.dim() == 1, name, " must be 1-D, got shape ", shape_str(idx.sizes()));
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
    TORCH_CHECK_VALUE(c[e] >= 0, "counts[", num(e), "] = ", num(c[e]), " is negative");
    total += c[e];
    ends[e] = total;
  }
  TORCH_CHECK_VALUE(total <= num_rows, "counts sum to ", num(total), " but x has only ", num(num_rows), " rows");
  return ends;
}

}  // namespace moe
