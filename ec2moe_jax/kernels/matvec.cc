// Threaded single-row matmul for XLA:CPU, called through the XLA FFI
// (ec2moe_jax/kernels/matvec.py builds and registers it).
//
// y[1, N] = x[1, K] @ w[K, N], float32, w row-major. XLA:CPU runs a matrix-vector product
// of a decode step's size on one core (seen in jax.profiler traces); this splits the N
// output columns into blocks that every thread of a small pool claims from a shared
// counter, so the weights stream through all cores. Each output column is summed by one
// thread in the order k = 0, 1, ..., K-1 (four at a time), whatever the thread count: the
// result does not depend on the number of threads.
//
// The caller takes part too and claims blocks until none is left, so a pool thread that
// is not scheduled (an oversubscribed machine) delays nothing but a block it claimed. A pool
// already in use by another call (several XLA devices or processes' threads at once) is
// not waited for: the call runs on its caller alone.

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>
#if defined(__linux__)
#include <sched.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kColumnBlock = 64;  // columns per claimed block (a multiple of 16)

// y[c0:c1] = x @ w[:, c0:c1], summing k in order, four rows of w per pass.
void MatvecColumns(const float* x, const float* w, int64_t k_dim, int64_t n, int64_t c0,
                   int64_t c1, float* y) {
  for (int64_t c = c0; c < c1; ++c) y[c] = 0.f;
  int64_t k = 0;
  for (; k + 4 <= k_dim; k += 4) {
    const float a0 = x[k], a1 = x[k + 1], a2 = x[k + 2], a3 = x[k + 3];
    const float* w0 = w + k * n;
    const float* w1 = w0 + n;
    const float* w2 = w1 + n;
    const float* w3 = w2 + n;
    for (int64_t c = c0; c < c1; ++c) {
      y[c] += a0 * w0[c] + a1 * w1[c] + a2 * w2[c] + a3 * w3[c];
    }
  }
  for (; k < k_dim; ++k) {
    const float a = x[k];
    const float* wk = w + k * n;
    for (int64_t c = c0; c < c1; ++c) y[c] += a * wk[c];
  }
}

int DefaultThreads() {
  if (const char* env = std::getenv("EC2MOE_CPU_KERNEL_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return std::min(n, 64);
  }
  int n = static_cast<int>(std::thread::hardware_concurrency());
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
#endif
  return std::clamp(n, 1, 4);  // a decode step's matvec gains nothing from more
}

struct Job {
  const float* x = nullptr;
  const float* w = nullptr;
  float* y = nullptr;
  int64_t k = 0, n = 0, blocks = 0;
};

// Blocks are claimed with tickets: the high 32 bits of ticket_ name the job (its
// generation), the low 32 bits its next unclaimed block. A thread claims a block only by
// advancing a ticket of the job it copied, so a thread that wakes late, after its job has
// ended and another has begun, claims nothing of the new one with the old job's pointers.
// A job ends when all its blocks are finished; every finished block was claimed in it.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) {
      try {
        workers_.emplace_back([this] { Work(); });
      } catch (const std::system_error&) {  // no more threads here: run with those we have
        break;
      }
    }
  }

  // Runs the job on this thread and any pool threads that join; false if the pool is
  // busy with another caller's job (the caller then runs it alone).
  bool Run(const Job& job) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || workers_.empty()) return false;
    uint64_t generation;
    finished_.store(0, std::memory_order_relaxed);
    {
      std::lock_guard<std::mutex> lock(wake_mu_);  // workers copy job_ under this lock
      job_ = job;
      generation = generation_.load(std::memory_order_relaxed) + 1;
      ticket_.store(generation << 32, std::memory_order_release);
      generation_.store(generation, std::memory_order_release);
    }
    wake_.notify_all();
    Claim(generation, job);
    for (int spins = 0; finished_.load(std::memory_order_acquire) < job.blocks; ++spins) {
      if (spins > 256) std::this_thread::yield();
    }
    return true;
  }

 private:
  // Claims and computes blocks of job `generation` until none is left (or it has ended).
  void Claim(uint64_t generation, const Job& j) {
    const uint64_t tag = generation & 0xffffffffu;
    for (;;) {
      uint64_t t = ticket_.load(std::memory_order_acquire);
      if ((t >> 32) != tag || static_cast<int64_t>(t & 0xffffffffu) >= j.blocks) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      const int64_t c0 = static_cast<int64_t>(t & 0xffffffffu) * kColumnBlock;
      MatvecColumns(j.x, j.w, j.k, j.n, c0, std::min(j.n, c0 + kColumnBlock), j.y);
      finished_.fetch_add(1, std::memory_order_release);
    }
  }

  void Work() {
    uint64_t seen = 0;
    for (;;) {
      // Spin briefly (a decode step calls again within microseconds), then sleep.
      const auto start = std::chrono::steady_clock::now();
      for (int spins = 1; generation_.load(std::memory_order_acquire) == seen; ++spins) {
        if (spins % 512 == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::microseconds(50)) {
          std::unique_lock<std::mutex> lock(wake_mu_);
          wake_.wait(lock, [&] { return generation_.load() != seen; });
        }
      }
      Job job;
      {
        std::lock_guard<std::mutex> lock(wake_mu_);
        job = job_;
        seen = generation_.load(std::memory_order_relaxed);
      }
      Claim(seen, job);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, wake_mu_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0}, ticket_{0};
  std::atomic<int64_t> finished_{0};
  Job job_;
};

Pool& GetPool() {
  static Pool* pool = new Pool(DefaultThreads());  // never destroyed: threads outlive exit
  return *pool;
}

ffi::Error MatvecImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("ec2moe_matvec: w must be [K, N]");
  const int64_t k = wd[0], n = wd[1];
  if (static_cast<int64_t>(x.element_count()) != k ||
      static_cast<int64_t>(y->element_count()) != n) {
    return ffi::Error::InvalidArgument("ec2moe_matvec: x must hold K values and y N");
  }
  Job job{x.typed_data(), w.typed_data(), y->typed_data(), k, n,
          (n + kColumnBlock - 1) / kColumnBlock};
  if (job.blocks <= 1 || !GetPool().Run(job)) {
    MatvecColumns(job.x, job.w, k, n, 0, n, job.y);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Ec2moeMatvec, MatvecImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
