// The buffer pool the CPU ops allocate their large outputs from (buffer_pool.cpp says why).
#pragma once

#include <ATen/ATen.h>

namespace moe {

// at::empty(sizes, options), served from the pool on CPU for outputs of at least kPoolMinBytes;
// elsewhere (CUDA, small outputs) exactly at::empty.
at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

}  // namespace moe
