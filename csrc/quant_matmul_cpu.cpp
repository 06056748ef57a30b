// y = x @ dequantize(w) on CPU with the dequantization inside the GEMM (moe.quant's formats):
// the weight is dequantized one [32 x 64] tile at a time into an L1-resident fp32 buffer and
// multiplied into the output columns it covers, so the whole fp32 weight is never written out
// (dequantize-then-matmul writes and reads K x N fp32 values: 4-8x the quantized bytes).
//
//   int8: data int8 [K, N], scale [1, N]            w[k, n] = data[k, n] * scale[0, n]
//   int4: data uint8 [K / 2, N] (row 2i low nibble, row 2i + 1 high nibble),
//         scale, zero [K / G, N]                    w[k, n] = (q[k, n] - zero[k / G, n]) * scale[k / G, n]
//
// Math in fp32 (x, scales and zero points are converted first; they are small). Threads split
// the output columns. The tile loops are compiled for AVX-512 / AVX2+FMA / baseline and the
// best is picked at run time, as in swiglu_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"

namespace moe {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
#define MOE_QMM_X86 1
#define MOE_QMM_INLINE __attribute__((always_inline)) inline
#else
#define MOE_QMM_X86 0
#define MOE_QMM_INLINE inline
#endif

constexpr int64_t kTileK = 32;  // divides every int4 group size (32, 64, 128) and keeps pairs of rows
constexpr int64_t kTileN = 64;

struct Problem {
  const float* x;      // [M, K]
  const void* data;    // int8 [K, N] or uint8 [K / 2, N]
  const float* scale;  // [K / G, N] (int8: G = K)
  const float* zero;   // [K / G, N] or nullptr (int8)
  float* y;            // [M, N], zero-initialised
  int64_t M, K, N, G;
  bool int4;
};

// Columns [n0, n0 + nb) of y, over all of K.
MOE_QMM_INLINE void columns_body(const Problem& p, int64_t n0, int64_t nb) {
  alignas(64) float tile[kTileK * kTileN];
  for (int64_t k0 = 0; k0 < p.K; k0 += kTileK) {
    const int64_t kb = std::min(kTileK, p.K - k0);
    const int64_t g = k0 / p.G;  // a tile never straddles two groups (kTileK divides G for int4)
    const float* s = p.scale + g * p.N + n0;
    if (p.int4) {
      const float* z = p.zero + g * p.N + n0;
      const uint8_t* q = static_cast<const uint8_t*>(p.data);
      for (int64_t kk = 0; kk < kb; kk += 2) {
        const uint8_t* row = q + ((k0 + kk) / 2) * p.N + n0;
        float* lo = tile + kk * nb;
        float* hi = lo + nb;
        for (int64_t j = 0; j < nb; ++j) {
          lo[j] = (static_cast<float>(row[j] & 0x0F) - z[j]) * s[j];
          hi[j] = (static_cast<float>(row[j] >> 4) - z[j]) * s[j];
        }
      }
    } else {
      const int8_t* q = static_cast<const int8_t*>(p.data);
      for (int64_t kk = 0; kk < kb; ++kk) {
        const int8_t* row = q + (k0 + kk) * p.N + n0;
        float* t = tile + kk * nb;
        for (int64_t j = 0; j < nb; ++j) t[j] = static_cast<float>(row[j]) * s[j];
      }
    }
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = p.x + m * p.K + k0;
      float* acc = p.y + m * p.N + n0;
      for (int64_t kk = 0; kk < kb; ++kk) {
        const float xv = xr[kk];
        const float* t = tile + kk * nb;
        for (int64_t j = 0; j < nb; ++j) acc[j] += xv * t[j];
      }
    }
  }
}

void columns_base(const Problem& p, int64_t n0, int64_t nb) { columns_body(p, n0, nb); }

#if MOE_QMM_X86
__attribute__((target("avx2,fma"))) void columns_avx2(const Problem& p, int64_t n0, int64_t nb) {
  columns_body(p, n0, nb);
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx2,fma"))) void columns_avx512(const Problem& p, int64_t n0,
                                                                                int64_t nb) {
  columns_body(p, n0, nb);
}
#endif

using ColumnsFn = void (*)(const Problem&, int64_t, int64_t);

ColumnsFn pick_columns() {
#if MOE_QMM_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return columns_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return columns_avx2;
#endif
  return columns_base;
}

at::Tensor quant_matmul_cpu(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                            const std::optional<at::Tensor>& zero, int64_t group_size) {
  TORCH_CHECK_VALUE(x.dim() == 2, "quant_matmul: x must be [M, K], got ", shape_str(x.sizes()));
  TORCH_CHECK_TYPE(x.is_floating_point(), "quant_matmul: x must be floating point, got ", x.scalar_type());
  TORCH_CHECK_VALUE(data.dim() == 2 && scale.dim() == 2, "quant_matmul: data and scale must be 2-D, got ",
                    shape_str(data.sizes()), " and ", shape_str(scale.sizes()));
  const bool int4 = zero.has_value();
  const int64_t M = x.size(0), K = x.size(1), N = data.size(1);
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0, "quant_matmul: group_size ", num(group_size),
                    " must divide K = ", num(K));
  if (int4) {
    TORCH_CHECK_TYPE(data.scalar_type() == at::kByte, "quant_matmul: int4 data must be uint8, got ",
                     data.scalar_type());
    TORCH_CHECK_VALUE(group_size % kTileK == 0 && data.size(0) * 2 == K, "quant_matmul: int4 needs data [K / 2, N] = [",
                      num(K / 2), ", N] and a group size divisible by 32; got data ", shape_str(data.sizes()),
                      ", group size ", num(group_size));
    TORCH_CHECK_VALUE(zero->sizes() == scale.sizes(), "quant_matmul: zero ", shape_str(zero->sizes()),
                      " must match scale ", shape_str(scale.sizes()));
  } else {
    TORCH_CHECK_TYPE(data.scalar_type() == at::kChar, "quant_matmul: int8 data must be int8, got ",
                     data.scalar_type());
    TORCH_CHECK_VALUE(data.size(0) == K && group_size == K, "quant_matmul: int8 needs data [K, N] and group_size K = ",
                      num(K), "; got data ", shape_str(data.sizes()), ", group size ", num(group_size));
  }
  TORCH_CHECK_VALUE(scale.size(0) == K / group_size && scale.size(1) == N, "quant_matmul: scale must be [",
                    num(K / group_size), ", ", num(N), "], got ", shape_str(scale.sizes()));
  auto xf = x.to(at::kFloat).contiguous();
  auto q = data.contiguous();
  auto sf = scale.to(at::kFloat).contiguous();
  at::Tensor zf = int4 ? zero->to(at::kFloat).contiguous() : at::Tensor();
  auto y = at::zeros({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  Problem p{xf.data_ptr<float>(), q.data_ptr(), sf.data_ptr<float>(), int4 ? zf.data_ptr<float>() : nullptr,
            y.data_ptr<float>(),  M, K, N, group_size, int4};
  static const ColumnsFn columns = pick_columns();
  const int64_t blocks = (N + kTileN - 1) / kTileN;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kTileN;
      columns(p, n0, std::min(kTileN, N - n0));
    }
  });
  return y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(moe, CPU, m) { m.impl("quant_matmul", &quant_matmul_cpu); }

}  // namespace moe
