// A pool of large CPU buffers for the outputs of the moe:: ops (permute, unpermute, grouped_mm,
// swiglu and their backwards).
//
// Why: a training step allocates the same large buffers every step (sorted rows, the expert
// activations, their gradients, the expert weight gradients). glibc serves each from a fresh
// mmap and unmaps it on free, so every step page-faults hundreds of MiB back in (10-20% of a
// step; moe.keep_freed_memory() fixes it process-wide, at a cost in resident memory). Here a
// buffer whose tensor dies goes back to this pool, and the next request of about its size
// (best fit, at most 1/8 larger) takes it again, already resident.
//
// Safe with autograd by construction: a buffer returns to the pool only when the last
// reference to its storage is gone (the tensor, every view, autograd's saved copies), so a
// buffer is never handed out while anything can still read it.
//
// Bounded: the pool's bytes, live and free together, stay within a limit (oldest free buffers
// are released first to make room); by default twice the high-water mark of live pooled bytes.
// A step needs more distinct buffers than it holds at its peak (the standard layer of
// benchmarks/moe_layer.py: 720 MiB of distinct outputs, 579 MiB live at once), and buffers of
// different sizes cannot stand in for each other: at 5/4 that layer still missed 5 buffers a
// step, at 3/2 none. Two shapes that alternate (an expert-parallel layer switching between its
// plain and pipelined paths, benchmarks/all_to_all.py) need the buffers of both: at 3/2 they
// evicted each other, 207 fresh buffers in 50 steps, each page-faulted back in. The limit only
// caps what the pool may keep; it never holds more than the distinct buffers a loop uses.
// set_limit trades memory for reuse; set_limit(0) turns reuse off.
#include "buffer_pool.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <pthread.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

namespace moe {
namespace {

constexpr size_t kPoolMinBytes = size_t(1) << 20;  // below 1 MiB glibc's heap serves well already

struct Block {
  void* ptr;
  size_t size;
};

class BufferPool final : public c10::Allocator {
 public:
  static BufferPool* self();

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kPoolMinBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    Block* block = take(nbytes);
    if (block == nullptr) block = new Block{c10::alloc_cpu(nbytes), nbytes};
    report(block, true);
    return {block->ptr, block, &BufferPool::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // (fresh allocations, reuses, live bytes, free bytes kept, high-water mark of live bytes, limit)
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {fresh_, reused_, int64_t(live_), int64_t(cached_), int64_t(high_water_), limit_};
  }

  // Bytes live + free may reach: < 0 = twice the high-water mark of live bytes (default),
  // 0 = keep nothing free, > 0 = that many bytes.
  void set_limit(int64_t limit) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_ = limit;
      evict_for(0, evicted);
    }
    destroy(evicted);
  }

 private:
  static void release(void* ctx) { self()->give_back(static_cast<Block*>(ctx)); }

  size_t effective_limit() const { return limit_ < 0 ? 2 * high_water_ : size_t(limit_); }

  void report(Block* block, bool taken) {
    if (!c10::memoryProfilingEnabled()) return;
    const int64_t delta = taken ? int64_t(block->size) : -int64_t(block->size);
    c10::reportMemoryUsageToProfiler(block->ptr, delta, 0, 0, c10::Device(c10::DeviceType::CPU));
  }

  // The smallest free block of nbytes to nbytes * 9/8 (nullptr: none; the caller allocates).
  Block* take(size_t nbytes) {
    std::vector<Block*> evicted;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if ((*it)->size >= nbytes && (*it)->size <= nbytes + nbytes / 8 &&
            (best == free_.end() || (*it)->size < (*best)->size))
          best = it;
      }
      if (best != free_.end()) {
        block = *best;
        free_.erase(best);
        cached_ -= block->size;
        ++reused_;
      } else {
        ++fresh_;
        high_water_ = std::max(high_water_, live_ + nbytes);
        evict_for(nbytes, evicted);
      }
      live_ += block ? block->size : nbytes;
      high_water_ = std::max(high_water_, live_);  // a reused block can be up to 1/8 larger
    }
    destroy(evicted);
    return block;
  }

  void give_back(Block* block) {
    report(block, false);
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_ -= block->size;
      free_.push_back(block);  // newest last: eviction takes the oldest first
      cached_ += block->size;
      evict_for(0, evicted);
    }
    destroy(evicted);
  }

  // Releases the oldest free blocks until live + free + incoming fits the limit (or none is left).
  void evict_for(size_t incoming, std::vector<Block*>& evicted) {
    const size_t limit = effective_limit();
    size_t drop = 0;
    while (drop < free_.size() && live_ + cached_ + incoming > limit) {
      cached_ -= free_[drop]->size;
      evicted.push_back(free_[drop++]);
    }
    free_.erase(free_.begin(), free_.begin() + int64_t(drop));
  }

  static void destroy(const std::vector<Block*>& blocks) {  // outside the lock: free can be slow
    for (Block* b : blocks) {
      c10::free_cpu(b->ptr);
      delete b;
    }
  }

  std::mutex mutex_;
  std::vector<Block*> free_;
  size_t live_ = 0, cached_ = 0, high_water_ = 0;
  int64_t fresh_ = 0, reused_ = 0, limit_ = -1;
};

// Never destroyed: tensors that outlive static destruction still return their buffers here.
// fork() (a DataLoader's workers) copies the pool's mutex as it is: had another thread held it,
// the child's copy would stay locked and its first pooled allocation would hang. The fork
// handlers take the lock around fork() and release it on both sides; the child keeps the free
// buffers (its own copies of them).
BufferPool* BufferPool::self() {
  static BufferPool* pool = [] {
    auto* p = new BufferPool();
    pthread_atfork([] { self()->mutex_.lock(); }, [] { self()->mutex_.unlock(); },
                   [] { self()->mutex_.unlock(); });
    return p;
  }();
  return pool;
}

std::vector<int64_t> buffer_pool_stats() { return BufferPool::self()->stats(); }

void set_buffer_pool_limit(int64_t limit) { BufferPool::self()->set_limit(limit); }

at::Tensor empty_pooled(at::IntArrayRef size, at::ScalarType dtype) {
  return pooled_empty(size, at::TensorOptions().dtype(dtype));
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (options.device().type() != c10::DeviceType::CPU) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, BufferPool::self(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), std::nullopt);
}

TORCH_LIBRARY_FRAGMENT(moe, m) {
  // (fresh allocations, reuses, live bytes, free bytes kept, high-water mark, limit) of the pool.
  m.def("buffer_pool_stats() -> int[]", &buffer_pool_stats);
  // Bytes of free buffers the pool may keep: < 0 = the high-water mark of live bytes, 0 = none.
  m.def("set_buffer_pool_limit(int limit) -> ()", &set_buffer_pool_limit);
  // An uninitialised CPU tensor from the pool (Python callers: the all-to-all receive buffers).
  m.def("empty_pooled(int[] size, ScalarType dtype) -> Tensor", &empty_pooled);
}

}  // namespace moe
