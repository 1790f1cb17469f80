// CPU output buffers of 64 KB and more (the gradients of the logits).
//
// The first touch of freshly mapped memory costs more than the kernel that fills it (a page fault
// and the OS zeroing the page, for every page; commits 18ef60e and 6414b18 measured it). So large blocks
// (8 MB and more) are 2 MB-aligned and advised for transparent huge pages, others page-aligned, and
// a freed block goes back to a small size-keyed cache instead of to the OS: the next step's
// gradient of the same shape lands in memory that is already mapped. KDFAST_CPU_CACHE_MB caps the
// cache (default 2048, 0 turns it off); torch.ops.kdfast._empty_cpu_cache() releases it.
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <sys/mman.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <string>

#include "common/tuning.h"
#include "cpu/alloc.h"

namespace kdfast {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kPage = 4096;
constexpr size_t kCached = tuning::kCachedBytes;  // smaller blocks come from malloc's heap, already mapped

struct BlockCache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;
  size_t cached = 0;
  size_t limit = 0;

  BlockCache() {
    const char* env = std::getenv("KDFAST_CPU_CACHE_MB");
    long mb = env ? std::strtol(env, nullptr, 10) : 2048;
    limit = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  void* take(size_t bytes) {
    std::lock_guard<std::mutex> g(mu);
    auto it = free_blocks.find(bytes);
    if (it == free_blocks.end()) return nullptr;
    void* p = it->second;
    free_blocks.erase(it);
    cached -= bytes;
    return p;
  }

  void give(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> g(mu);
      if (cached + bytes <= limit) {
        free_blocks.emplace(bytes, p);
        cached += bytes;
        return;
      }
    }
    std::free(p);
  }

  void clear() {
    std::lock_guard<std::mutex> g(mu);
    for (auto& kv : free_blocks) std::free(kv.second);
    free_blocks.clear();
    cached = 0;
  }
};

BlockCache& cache() {
  static BlockCache* c = new BlockCache();  // never destroyed: deleters may run at exit
  return *c;
}

}  // namespace

at::Tensor empty_cpu_fast(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  auto options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  if (bytes < kCached) return at::empty(sizes, options);
  // Mid-size blocks would fault too: malloc maps them fresh, or trims the heap when they are freed.
  const bool huge = bytes >= tuning::kHugeBytes;
  const size_t unit = huge ? kHuge : kPage;
  const size_t rounded = (bytes + unit - 1) / unit * unit;
  void* p = cache().take(rounded);
  if (p == nullptr) {
    if (posix_memalign(&p, unit, rounded) != 0) return at::empty(sizes, options);
#ifdef MADV_HUGEPAGE
    if (huge) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: ignored where THP is off
#endif
  }
  return at::from_blob(p, sizes, [rounded](void* q) { cache().give(q, rounded); }, options);
}

void empty_cpu_cache() { cache().clear(); }

}  // namespace kdfast
