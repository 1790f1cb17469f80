// The CPU emulation behind cuda_emu.h, and a C interface to kdfast's CUDA host functions for the
// tests (ctypes). Build (tests/test_cuda.py does it):
//   g++ -std=c++20 -O1 -pthread -fPIC -shared -DKDFAST_CUDA_EMULATE -Icsrc -I<cuda>/include \
//       -x c++ csrc/cuda/*.cu -x none csrc/cuda/emu/emu.cpp -o libkdfast_emu.so
#include <pthread.h>

#include <algorithm>
#include <array>
#include <barrier>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <vector>

#include "cuda/emu/cuda_emu.h"
#include "cuda/kernels.h"

thread_local uint3 threadIdx;
thread_local uint3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace kdfast_emu {
namespace {

constexpr int kSms = 132;
constexpr int kSmemPerSm = 233472;
constexpr int kSmemOptin = 232448;

struct Buf {
  std::unique_ptr<unsigned char[]> raw;
  unsigned char* p = nullptr;
  size_t n = 0;
  void alloc(size_t bytes, size_t align) {
    raw.reset(new unsigned char[bytes + align]);
    p = raw.get() + (align - reinterpret_cast<uintptr_t>(raw.get()) % align) % align;
    n = bytes;
    std::memset(p, 0xFF, bytes);  // uninitialised shared memory reads as NaN
  }
};

using Barrier = std::barrier<>;
struct Cluster;

struct Block {
  std::mutex mu;
  std::map<int, Buf> shared;
  Buf dyn;
  std::unique_ptr<Barrier> bar;
  std::vector<std::unique_ptr<Barrier>> warp_bar;
  std::vector<std::array<uint64_t, 32>> warp_slots;
  Cluster* cluster = nullptr;
  unsigned rank = 0;
  uint3 idx;
};

struct Cluster {
  std::unique_ptr<Barrier> bar;
  std::vector<Block*> blocks;
};

thread_local Block* tl_block = nullptr;
thread_local std::optional<std::barrier<>::arrival_token> tl_arrival;

void* storage_of(Block* b, int id, size_t bytes, size_t align) {
  std::lock_guard<std::mutex> lock(b->mu);
  Buf& s = b->shared[id];
  if (s.p == nullptr) s.alloc(bytes, align);
  return s.p;
}

struct ThreadArgs {
  Block* block;
  uint3 tid;
  dim3 bdim, gdim;
  const std::function<void()>* body;
};

void* thread_main(void* arg) {
  auto* a = static_cast<ThreadArgs*>(arg);
  tl_block = a->block;
  threadIdx = a->tid;
  blockIdx = a->block->idx;
  blockDim = a->bdim;
  gridDim = a->gdim;
  (*a->body)();
  // An exited thread no longer holds the others up at a barrier (as on the GPU).
  a->block->bar->arrive_and_drop();
  a->block->warp_bar[a->tid.x / 32]->arrive_and_drop();
  if (a->block->cluster) a->block->cluster->bar->arrive_and_drop();
  return nullptr;
}

}  // namespace

void run_grid(dim3 grid, dim3 block, size_t dyn_smem, unsigned cluster_x, const std::function<void()>& body) {
  const unsigned nt = block.x * block.y * block.z;
  if (block.y != 1 || block.z != 1) throw std::runtime_error("emulation: 1-D blocks only");
  if (grid.x % cluster_x != 0) throw std::runtime_error("emulation: grid.x not a multiple of the cluster size");
  const unsigned per_wave = std::max(1u, 2048u / (nt * cluster_x));  // clusters run at a time
  std::vector<uint3> units;  // first block of each cluster
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; x += cluster_x) units.push_back(uint3{x, y, z});
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 1 << 20);
  for (size_t u0 = 0; u0 < units.size(); u0 += per_wave) {
    const size_t u1 = std::min(units.size(), u0 + per_wave);
    std::vector<std::unique_ptr<Cluster>> clusters;
    std::vector<std::unique_ptr<Block>> blocks;
    std::vector<ThreadArgs> args;
    args.reserve((u1 - u0) * cluster_x * nt);
    for (size_t u = u0; u < u1; ++u) {
      Cluster* cl = nullptr;
      if (cluster_x > 1) {
        clusters.push_back(std::make_unique<Cluster>());
        cl = clusters.back().get();
        cl->bar = std::make_unique<Barrier>(static_cast<std::ptrdiff_t>(cluster_x * nt));
      }
      for (unsigned r = 0; r < cluster_x; ++r) {
        blocks.push_back(std::make_unique<Block>());
        Block* b = blocks.back().get();
        b->idx = uint3{units[u].x + r, units[u].y, units[u].z};
        b->bar = std::make_unique<Barrier>(static_cast<std::ptrdiff_t>(nt));
        const unsigned nw = (nt + 31) / 32;
        for (unsigned w = 0; w < nw; ++w)
          b->warp_bar.push_back(std::make_unique<Barrier>(static_cast<std::ptrdiff_t>(std::min(32u, nt - 32 * w))));
        b->warp_slots.resize(nw);
        if (dyn_smem > 0) b->dyn.alloc(dyn_smem, 128);
        b->cluster = cl;
        b->rank = r;
        if (cl) cl->blocks.push_back(b);
        for (unsigned t = 0; t < nt; ++t) args.push_back(ThreadArgs{b, uint3{t, 0, 0}, block, grid, &body});
      }
    }
    std::vector<pthread_t> threads(args.size());
    for (size_t i = 0; i < args.size(); ++i) {
      if (pthread_create(&threads[i], &attr, thread_main, &args[i]) != 0)
        throw std::runtime_error("emulation: cannot start a thread");
    }
    for (pthread_t& th : threads) pthread_join(th, nullptr);
  }
  pthread_attr_destroy(&attr);
}

void* shared_storage(int id, size_t bytes, size_t align) { return storage_of(tl_block, id, bytes, align); }

unsigned char* dynamic_shared() { return tl_block->dyn.p; }

void syncthreads() { tl_block->bar->arrive_and_wait(); }

void warp_exchange(uint64_t mine, uint64_t* all32) {
  const unsigned w = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto& slots = tl_block->warp_slots[w];
  slots[lane] = mine;
  tl_block->warp_bar[w]->arrive_and_wait();
  std::copy(slots.begin(), slots.end(), all32);
  tl_block->warp_bar[w]->arrive_and_wait();
}

void cluster_sync() {
  if (tl_block->cluster) tl_block->cluster->bar->arrive_and_wait();
  else syncthreads();
}

void cluster_arrive() {
  if (tl_block->cluster) tl_arrival.emplace(tl_block->cluster->bar->arrive());
}

void cluster_wait() {
  if (tl_block->cluster && tl_arrival) {
    tl_block->cluster->bar->wait(std::move(*tl_arrival));
    tl_arrival.reset();
  }
}

unsigned cluster_rank() { return tl_block->rank; }

unsigned cluster_size() { return tl_block->cluster ? static_cast<unsigned>(tl_block->cluster->blocks.size()) : 1; }

void* map_shared(void* p, unsigned rank) {
  Block* me = tl_block;
  Block* other = me->cluster ? me->cluster->blocks.at(rank) : me;
  auto* q = static_cast<unsigned char*>(p);
  if (me->dyn.p && q >= me->dyn.p && q < me->dyn.p + me->dyn.n) return other->dyn.p + (q - me->dyn.p);
  int id = -1;
  size_t off = 0, bytes = 0;
  {
    std::lock_guard<std::mutex> lock(me->mu);
    for (auto& [k, buf] : me->shared) {
      if (q >= buf.p && q < buf.p + buf.n) {
        id = k, off = static_cast<size_t>(q - buf.p), bytes = buf.n;
        break;
      }
    }
  }
  if (id < 0) throw std::runtime_error("emulation: map_shared_rank of an address outside shared memory");
  return static_cast<unsigned char*>(storage_of(other, id, bytes, 128)) + off;
}

int blocks_per_sm(int threads, size_t smem) {
  if (smem > static_cast<size_t>(kSmemOptin)) return 0;
  const int by_smem = kSmemPerSm / static_cast<int>(smem + 2048 + 1024);
  return std::max(0, std::min({2048 / threads, 32, by_smem}));
}

int sm_count() { return kSms; }

}  // namespace kdfast_emu

// ---- the runtime functions the host code calls
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = kdfast_emu::kSms; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = kdfast_emu::kSmemPerSm; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = kdfast_emu::kSmemOptin; break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
}

// ---- C interface for the tests
namespace {
kdfast::kernel::DType dt(int d) { return static_cast<kdfast::kernel::DType>(d); }
int guarded(const std::function<cudaError_t()>& f) {
  try {
    return static_cast<int>(f());
  } catch (const std::exception&) {
    return -1;
  }
}
}  // namespace

extern "C" {
int emu_softmax_kl(int dtype, const void* s, const void* t, int64_t rows, int64_t V, int64_t ss, int64_t ts,
                   double inv_t, const void* w, void* kl, void* gs, void* gt) {
  kdfast::kernel::SoftmaxKLArgs a;
  a.dtype = dt(dtype);
  a.student = s, a.teacher = t, a.rows = rows, a.cols = V;
  a.student_row_stride = ss, a.teacher_row_stride = ts, a.inv_temperature = inv_t;
  a.row_weight = w, a.loss_rows = kl, a.grad_student = gs, a.grad_teacher = gt;
  return guarded([&] {
    const size_t ws = kdfast::cuda::softmax_kl_workspace(a);
    std::vector<double> buf(ws / sizeof(double) + 2);
    return kdfast::cuda::softmax_kl(a, ws ? buf.data() : nullptr, nullptr);
  });
}
int emu_softmax_kl_reload_knobs() {
  return guarded([] {
    kdfast::cuda::softmax_kl_reload_knobs();
    return cudaSuccess;
  });
}
int emu_feature_match(int dtype, const void* s, const void* t, int64_t rows, int64_t D, int64_t ss, int64_t ts,
                      int cosine, double eps, const void* w, void* loss, void* gs, void* gt) {
  kdfast::kernel::FeatureArgs a;
  a.dtype = dt(dtype);
  a.student = s, a.teacher = t, a.rows = rows, a.cols = D;
  a.student_row_stride = ss, a.teacher_row_stride = ts, a.cosine = cosine != 0, a.eps = eps;
  a.row_weight = w, a.loss_rows = loss, a.grad_student = gs, a.grad_teacher = gt;
  return guarded([&] {
    // partial sums in the accumulation type, summed per row in chunk order as the glue does
    const int64_t nchunk = kdfast::cuda::feature_match_chunks(a);
    const bool dbl = a.dtype == kdfast::kernel::DType::Double;
    std::vector<double> pd(nchunk > 1 ? rows * nchunk : 0);
    std::vector<float> pf(nchunk > 1 ? rows * nchunk : 0);
    std::vector<double> ws(kdfast::cuda::feature_match_workspace(a) / sizeof(double) + 1);
    cudaError_t e = kdfast::cuda::feature_match(a, dbl ? static_cast<void*>(pd.data()) : pf.data(), ws.data(), nullptr);
    for (int64_t r = 0; nchunk > 1 && r < rows; ++r) {
      double acc = 0;
      for (int64_t c = 0; c < nchunk; ++c) acc += dbl ? pd[r * nchunk + c] : pf[r * nchunk + c];
      if (dbl) static_cast<double*>(loss)[r] = acc;
      else static_cast<float*>(loss)[r] = static_cast<float>(acc);
    }
    return e;
  });
}
int emu_sparse_kl(int dtype, const void* s, const void* lp, const void* idx, int idx32, int64_t rows, int64_t V,
                  int64_t K, int64_t ss, int64_t ls, int64_t is, double inv_t, int tail, const void* w, void* loss,
                  void* gs, void* gt, int64_t* status) {
  kdfast::kernel::SparseKLArgs a;
  a.dtype = dt(dtype);
  a.student = s, a.teacher = lp, a.indices = idx, a.indices_int32 = idx32 != 0;
  a.rows = rows, a.vocab = V, a.k = K, a.student_row_stride = ss, a.teacher_row_stride = ls, a.index_row_stride = is;
  a.inv_temperature = inv_t, a.tail = static_cast<kdfast::kernel::SparseTail>(tail);
  a.row_weight = w, a.loss_rows = loss, a.grad_student = gs, a.grad_teacher = gt, a.status = status;
  return guarded([&] { return kdfast::cuda::sparse_kl(a, nullptr); });
}
int emu_scale_rows(int dtype, void* grad, int64_t rows, int64_t V, const void* ratio, int64_t ratio_stride) {
  return guarded([&] { return kdfast::cuda::scale_rows(dt(dtype), grad, rows, V, ratio, ratio_stride, nullptr); });
}
int emu_rkd_sq_dists(const double* x, int64_t B, int64_t n, int64_t dim, double* d2) {
  return guarded([&] { return kdfast::cuda::rkd_sq_dists(x, B, n, dim, d2, nullptr); });
}
int emu_rkd_angle_prep(int acc, const double* d2, const double* max_d2, const double* eps, int64_t B, int64_t n,
                       void* hi, void* lo, void* inv) {
  return guarded([&] { return kdfast::cuda::rkd_angle_prep(dt(acc), d2, max_d2, eps, B, n, hi, lo, inv, nullptr); });
}
int emu_rkd_pdist(const double* d2, int64_t B, int64_t n, int squared, const double* eps, double* dist) {
  return guarded([&] { return kdfast::cuda::rkd_pdist(d2, B, n, squared != 0, eps, dist, nullptr); });
}
int emu_rkd_pdist_backward(const double* d2, const double* dist, const double* gout, const double* inv_mean,
                           const double* k, int64_t B, int64_t n, int squared, const double* eps, double* m) {
  return guarded([&] {
    return kdfast::cuda::rkd_pdist_backward(d2, dist, gout, inv_mean, k, B, n, squared != 0, eps, m, nullptr);
  });
}
int emu_rkd_distance_blocks(int64_t n) { return kdfast::cuda::rkd_distance_blocks(n); }
int emu_rkd_distance_huber(const double* ds, const double* dtt, const double* ims, const double* imt,
                           const double* coef, int64_t B, int64_t n, double delta, double* partial, double* gps,
                           double* gpt) {
  return guarded([&] {
    return kdfast::cuda::rkd_distance_huber(ds, dtt, ims, imt, coef, B, n, delta, partial, gps, gpt, nullptr);
  });
}
int emu_rkd_angle_tiles(int64_t n) { return kdfast::cuda::rkd_angle_tiles(n); }
int emu_rkd_angle(int acc, const void* hs, const void* ls, const void* ht, const void* lt, const void* is,
                  const void* it, int64_t B, int64_t n, double delta, const double* coef, double* partial, void* as,
                  void* at, void* rs, void* rt, void* ss, void* st) {
  kdfast::cuda::RkdAngleArgs a;
  a.acc = dt(acc);
  a.hi_s = hs, a.lo_s = ls, a.hi_t = ht, a.lo_t = lt, a.inv_s = is, a.inv_t = it;
  a.B = B, a.n = n, a.delta = delta, a.coef = coef;
  a.loss_partial = partial, a.a_s = as, a.a_t = at, a.r_s = rs, a.r_t = rt, a.s_s = ss, a.s_t = st;
  return guarded([&] { return kdfast::cuda::rkd_angle(a, nullptr); });
}
int emu_rkd_angle_grad(int acc, const double* d2, const void* a, const void* r, const void* s, const double* eps,
                       int64_t B, int64_t n, double* m) {
  return guarded([&] { return kdfast::cuda::rkd_angle_grad(dt(acc), d2, a, r, s, eps, B, n, m, nullptr); });
}
}
