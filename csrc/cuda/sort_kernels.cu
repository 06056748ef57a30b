// sort_by_expert and align_block_size on the GPU: a stable counting sort with no host sync.
//
// The N copies are cut into C chunks, one warp per chunk. Four launches:
//   1. histogram: each warp counts its chunk per bin into table[b * C + c] (B = E + 1 bins).
//   2. column scan: one block per bin turns its row of the table into exclusive offsets within
//      the bin and writes the bin total.
//   3. bin scan: one block turns the B totals into bin starts (and writes counts[e]).
//   4. scatter: each warp walks its chunk in order; lanes with the same bin are grouped with
//      __match_any_sync, ranked by lane, and the group leader bumps the bin's cursor, so copies of
//      one bin keep their slot order (stable) and the result is deterministic.
// Per-warp cursors live in shared memory when B is small enough, else in the table itself.
#include "device_utils.cuh"
#include "kernels.cuh"

namespace moe {
namespace gpu {
namespace {

constexpr int kScanThreads = 256;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kSharedBytes = 48 * 1024;

struct SortPlan {
  int64_t bins, chunk, num_chunks;
  int warps_per_block;
  bool shared_cursors;
};

SortPlan plan_sort(int64_t n, int64_t num_experts) {
  SortPlan p;
  p.bins = num_experts + 1;
  // Chunks of >= B copies keep the table (B * C int64) no larger than ~N; >= 256 copies per
  // warp amortise the per-chunk work; <= 4096 chunks bound the table for huge N.
  int64_t chunk = n / 4096 + 1;
  if (chunk < 256) chunk = 256;
  if (chunk < p.bins) chunk = p.bins;
  p.chunk = ceil_div(chunk, kWarp) * kWarp;
  p.num_chunks = ceil_div(n, p.chunk);
  const int64_t per_warp = p.bins * static_cast<int64_t>(sizeof(int64_t));
  p.shared_cursors = per_warp <= kSharedBytes;
  p.warps_per_block = p.shared_cursors ? static_cast<int>(kSharedBytes / per_warp) : kWarpsPerBlock;
  if (p.warps_per_block > kWarpsPerBlock) p.warps_per_block = kWarpsPerBlock;
  return p;
}

// The bin of slot i of a chunk; lanes past the chunk's end get the unused sentinel bin B.
// Bins fit 32 bits (the binding checks num_experts < 2^31 - 1), so warps match 32-bit keys.
__device__ inline unsigned bin_of(const int64_t* ids, int64_t i, int64_t end, int64_t num_experts) {
  if (i >= end) return static_cast<unsigned>(num_experts + 1);
  const int64_t id = ids[i];
  MOE_DEVICE_CHECK(id < num_experts);  // expert id out of range (use -1 for dropped copies)
  return static_cast<unsigned>(id < 0 ? num_experts : id);
}

// Cursors of this warp's chunk: cursor(b) = base[b * stride].
struct Cursors {
  int64_t* base;
  int64_t stride;
  __device__ int64_t& operator[](int64_t b) const { return base[b * stride]; }
};

__device__ inline Cursors warp_cursors(const SortPlan& p, int64_t* table, int64_t chunk_id) {
  extern __shared__ int64_t shared[];
  if (p.shared_cursors) return {shared + (threadIdx.x / kWarp) * p.bins, 1};
  return {table + chunk_id, p.num_chunks};
}

__global__ void histogram_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t num_experts, SortPlan p,
                                 int64_t* __restrict__ table) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * p.warps_per_block + threadIdx.x / kWarp;
  if (c >= p.num_chunks) return;  // whole warps exit together
  const int lane = threadIdx.x % kWarp;
  const Cursors cur = warp_cursors(p, table, c);
  for (int64_t b = lane; b < p.bins; b += kWarp) cur[b] = 0;
  __syncwarp();
  const int64_t begin = c * p.chunk, end = min(n, begin + p.chunk);
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const unsigned bin = bin_of(ids, i, end, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, bin);
    if (i < end && lane == __ffs(peers) - 1) cur[bin] += __popc(peers);
    __syncwarp();
  }
  if (p.shared_cursors)
    for (int64_t b = lane; b < p.bins; b += kWarp) table[b * p.num_chunks + c] = cur[b];
}

// Block b: table[b, :] <- exclusive scan of table[b, :]; totals[b] = its sum.
__global__ void column_scan_kernel(SortPlan p, int64_t* __restrict__ table, int64_t* __restrict__ totals) {
  __shared__ int64_t warp_sums[kWarp];
  int64_t* row = table + static_cast<int64_t>(blockIdx.x) * p.num_chunks;
  int64_t carry = 0;
  for (int64_t start = 0; start < p.num_chunks; start += blockDim.x) {
    const int64_t c = start + threadIdx.x;
    const int64_t v = c < p.num_chunks ? row[c] : 0;
    int64_t tile_total;
    const int64_t before = block_exclusive_scan(v, warp_sums, &tile_total);
    if (c < p.num_chunks) row[c] = carry + before;
    carry += tile_total;
  }
  if (threadIdx.x == 0) totals[blockIdx.x] = carry;
}

// Exclusive scan of n values, one block, in tiles with a carry; out may alias in.
// counts receives the first n_counts inputs before they are overwritten.
__global__ void scan_kernel(const int64_t* in, int64_t n, int64_t* out, int64_t* counts, int64_t n_counts) {
  __shared__ int64_t warp_sums[kWarp];
  int64_t carry = 0;
  for (int64_t start = 0; start < n; start += blockDim.x) {
    const int64_t i = start + threadIdx.x;
    const int64_t v = i < n ? in[i] : 0;
    if (i < n_counts) counts[i] = v;
    int64_t tile_total;
    const int64_t before = block_exclusive_scan(v, warp_sums, &tile_total);  // syncs: all reads done
    if (i < n) out[i] = carry + before;
    carry += tile_total;
  }
}

__global__ void scatter_kernel(const int64_t* __restrict__ ids, int64_t n, int64_t num_experts, SortPlan p,
                               int64_t* __restrict__ table, const int64_t* __restrict__ bin_start,
                               int64_t* __restrict__ order) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * p.warps_per_block + threadIdx.x / kWarp;
  if (c >= p.num_chunks) return;
  const int lane = threadIdx.x % kWarp;
  const Cursors cur = warp_cursors(p, table, c);
  for (int64_t b = lane; b < p.bins; b += kWarp) cur[b] = bin_start[b] + table[b * p.num_chunks + c];
  __syncwarp();
  const unsigned lanes_below = (1u << lane) - 1u;
  const int64_t begin = c * p.chunk, end = min(n, begin + p.chunk);
  for (int64_t base = begin; base < end; base += kWarp) {
    const int64_t i = base + lane;
    const unsigned bin = bin_of(ids, i, end, num_experts);
    const unsigned peers = __match_any_sync(kFullMask, bin);
    const int leader = __ffs(peers) - 1;
    int64_t pos = 0;
    if (i < end && lane == leader) {
      pos = cur[bin];
      cur[bin] = pos + __popc(peers);
    }
    pos = __shfl_sync(kFullMask, pos, leader);
    if (i < end) order[pos + __popc(peers & lanes_below)] = i;
    __syncwarp();
  }
}

__global__ void align_kernel(const int64_t* counts, int64_t num_experts, int64_t block_size, int64_t* offsets) {
  __shared__ int64_t warp_sums[kWarp];
  int64_t carry = 0;
  if (threadIdx.x == 0) offsets[0] = 0;
  for (int64_t start = 0; start < num_experts; start += blockDim.x) {
    const int64_t e = start + threadIdx.x;
    const int64_t padded = e < num_experts ? (counts[e] + block_size - 1) / block_size * block_size : 0;
    int64_t tile_total;
    const int64_t before = block_exclusive_scan(padded, warp_sums, &tile_total);
    if (e < num_experts) offsets[e + 1] = carry + before + padded;
    carry += tile_total;
  }
}

}  // namespace

int64_t sort_workspace_elems(int64_t n, int64_t num_experts) {
  const SortPlan p = plan_sort(n, num_experts);
  return p.bins * p.num_chunks + p.bins;  // table + bin totals / starts
}

cudaError_t sort_by_expert(const int64_t* ids_N, int64_t n, int64_t num_experts, int64_t* order_N, int64_t* counts_E,
                           int64_t* workspace, cudaStream_t stream) {
  if (n == 0) return cudaMemsetAsync(counts_E, 0, num_experts * sizeof(int64_t), stream);
  const SortPlan p = plan_sort(n, num_experts);
  int64_t* table = workspace;
  int64_t* bin_start = workspace + p.bins * p.num_chunks;
  const unsigned blocks = static_cast<unsigned>(ceil_div(p.num_chunks, p.warps_per_block));
  const int threads = p.warps_per_block * kWarp;
  const size_t shared = p.shared_cursors ? static_cast<size_t>(p.warps_per_block * p.bins) * sizeof(int64_t) : 0;
  histogram_kernel<<<blocks, threads, shared, stream>>>(ids_N, n, num_experts, p, table);
  column_scan_kernel<<<static_cast<unsigned>(p.bins), kScanThreads, 0, stream>>>(p, table, bin_start);
  scan_kernel<<<1, 1024, 0, stream>>>(bin_start, p.bins, bin_start, counts_E, num_experts);
  scatter_kernel<<<blocks, threads, shared, stream>>>(ids_N, n, num_experts, p, table, bin_start, order_N);
  return cudaGetLastError();
}

cudaError_t align_block_size(const int64_t* counts_E, int64_t num_experts, int64_t block_size, int64_t* offsets_E1,
                             cudaStream_t stream) {
  align_kernel<<<1, 1024, 0, stream>>>(counts_E, num_experts, block_size, offsets_E1);
  return cudaGetLastError();
}

}  // namespace gpu
}  // namespace moe
