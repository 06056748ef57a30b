// Schemas of the moe:: ops (declared once; CPU impls in *_cpu.cpp, CUDA impls in cuda/*.cu).
//
// Shapes: T tokens, D features, E experts, N dispatched token copies, M grouped-GEMM rows.
#include <torch/library.h>

TORCH_LIBRARY(moe, m) {
  // Stable counting sort of copies by expert id, dropped (< 0) copies last.
  m.def("sort_by_expert(Tensor expert_ids, int num_experts) -> (Tensor order, Tensor counts)");
  // Pads each expert's segment to a multiple of block_size: [E + 1] int64 padded offsets.
  m.def("align_block_size(Tensor counts, int block_size) -> Tensor");
  // x_sorted[j] = x[token_idx[j]].
  m.def("permute(Tensor x, Tensor token_idx) -> Tensor");
  // out[t] = sum_{j: token_idx[j] == t} y[j] (the adjoint of permute), fp32 accumulation.
  m.def("scatter_rows(Tensor y, Tensor token_idx, int num_tokens) -> Tensor");
  // out[t] = sum_{j: token_idx[j] == t} weights[j] * y[j], fp32 accumulation, deterministic.
  m.def("unpermute(Tensor y, Tensor token_idx, Tensor weights, int num_tokens) -> Tensor");
  // (grad_y [N, D], grad_weights [N]) of unpermute.
  m.def("unpermute_backward(Tensor grad_out, Tensor y, Tensor token_idx, Tensor weights) -> (Tensor, Tensor)");
  // y[rows of e] = x[rows of e] @ w[e]; rows past counts.sum() are zero.
  m.def("grouped_mm(Tensor x, Tensor w, Tensor counts) -> Tensor");
  // dw[e] = x[rows of e]^T @ dy[rows of e]; zero for experts with no rows.
  m.def("grouped_mm_wgrad(Tensor x, Tensor dy, Tensor counts) -> Tensor");
  // SwiGLU of h = [gate | up] ([N, 2H]): silu(gate) * up, [N, H], computed in fp32 (fp64 stays fp64).
  m.def("swiglu(Tensor h) -> Tensor");
  // grad_h [N, 2H] of swiglu: [grad_out * up * silu'(gate) | grad_out * silu(gate)].
  m.def("swiglu_backward(Tensor grad_out, Tensor h) -> Tensor");
  // grouped_mm(swiglu(h), w, counts): h [N, 2H], w [E, H, D] -> [N, D] (the activation is not kept).
  m.def("swiglu_grouped_mm(Tensor h, Tensor w, Tensor counts) -> Tensor");
  // (grad_h [N, 2H], grad_w [E, H, D], or [0] without weight_grad) of swiglu_grouped_mm.
  m.def("swiglu_grouped_mm_backward(Tensor grad_y, Tensor h, Tensor w, Tensor counts, bool weight_grad) -> (Tensor, Tensor)");
  // The SwiGLU expert MLP: (y [N, D] = swiglu_grouped_mm(h, w_out, counts), h [N, 2H] = grouped_mm(x, w_in, counts)),
  // h returned for the backward (not differentiable).
  m.def("swiglu_experts(Tensor x, Tensor w_in, Tensor w_out, Tensor counts) -> (Tensor, Tensor)");
  // (dx [N, D], dw_in [E, D, 2H], dw_out [E, H, D]) of swiglu_experts' y, each [0] where output_mask is false.
  m.def("swiglu_experts_backward(Tensor grad_y, Tensor x, Tensor h, Tensor w_in, Tensor w_out, Tensor counts, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // y [M, N] = x [M, K] @ dequantize(w) for one quantized weight (moe.quant): int8 data [K, N] with
  // scale [1, N] and no zero (group_size = K), or int4 data uint8 [K / 2, N] with scale and zero
  // [K / G, N]; computed in fp32, returned in x's dtype.
  m.def("quant_matmul(Tensor x, Tensor data, Tensor scale, Tensor? zero, int group_size) -> Tensor");
}
