// The CPU executor of tests/cuda_on_cpu/cuda_on_cpu.h: fibers for the threads of a block, barriers, the scheduling
// orders, the out-of-bounds handler, and the few CUDA runtime calls the launchers make.
#include <ucontext.h>

#include <array>
#include <cstdlib>
#include <deque>
#include <cstring>
#include <iterator>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_on_cpu.h"

namespace cuda_on_cpu {

Position g_pos;

namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr int kWarp = 32;

enum class Wait { kNone, kBlock, kWarp, kDone };

// One cp.async copy in flight: its destination and the bytes that land there at the wait.
struct Copy {
  unsigned char* dst;
  size_t bytes;
  std::array<unsigned char, 16> data;
};

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  uint3 thread;
  Wait wait = Wait::kNone;
  std::vector<Copy> open;                 // issued since the last commit
  std::deque<std::vector<Copy>> groups;   // committed, oldest first, not yet waited for
};

struct Run {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  int current = -1;
  ucontext_t scheduler;
  std::vector<uint64_t> exchange;  // kWarp slots per warp
  std::string error;               // the first out-of-bounds report of the launch
};
Run g_run;

void yield(Wait why) {
  Fiber& f = g_run.fibers[g_run.current];
  f.wait = why;
  swapcontext(&f.ctx, &g_run.scheduler);
}

void fiber_main() {
  (*g_run.body)();
  Fiber& f = g_run.fibers[g_run.current];
  f.wait = Wait::kDone;
  swapcontext(&f.ctx, &g_run.scheduler);
}

// The order in which the threads waiting to run are resumed: CONMIM_CUDA_ON_CPU_ORDER = forward (default),
// reverse, shuffle:<seed> (a fresh permutation at every step, from that seed), or warps: the lowest warp with a
// thread to run runs alone, its warp barriers released as soon as its lanes reach them, so it gets to the next
// block barrier before the next warp starts (a warp running ahead of the others, as on a GPU).
struct Order {
  enum Kind { kForward, kReverse, kShuffle, kWarps } kind = kForward;
  std::mt19937_64 rng;

  static Order from_env() {
    Order o;
    const char* env = std::getenv("CONMIM_CUDA_ON_CPU_ORDER");
    const std::string s = env ? env : "forward";
    if (s == "reverse") {
      o.kind = kReverse;
    } else if (s == "warps") {
      o.kind = kWarps;
    } else if (s.rfind("shuffle:", 0) == 0) {
      o.kind = kShuffle;
      o.rng.seed(std::stoull(s.substr(8)));
    } else if (s != "forward") {
      throw std::invalid_argument("CONMIM_CUDA_ON_CPU_ORDER must be forward, reverse, shuffle:<seed> or warps, got " +
                                  s);
    }
    return o;
  }

  // ids: the threads ready to run, ascending.
  void arrange(std::vector<int>& ids) {
    if (kind == kReverse) std::reverse(ids.begin(), ids.end());
    if (kind == kShuffle) std::shuffle(ids.begin(), ids.end(), rng);
    if (kind == kWarps) {
      const int warp = ids.front() / kWarp;
      ids.erase(std::find_if(ids.begin(), ids.end(), [&](int i) { return i / kWarp != warp; }), ids.end());
    }
  }
};

// Releases the threads waiting at a barrier that every live thread of its scope has reached; false if none.
bool release_barriers(int nthreads) {
  bool any_live = false, all_at_block = true;
  for (const Fiber& f : g_run.fibers) {
    if (f.wait == Wait::kDone) continue;
    any_live = true;
    all_at_block &= f.wait == Wait::kBlock;
  }
  if (any_live && all_at_block) {
    for (Fiber& f : g_run.fibers)
      if (f.wait == Wait::kBlock) f.wait = Wait::kNone;
    return true;
  }
  bool released = false;
  for (int w0 = 0; w0 < nthreads; w0 += kWarp) {
    const int w1 = std::min(nthreads, w0 + kWarp);
    bool all = true, some = false;
    for (int i = w0; i < w1; ++i) {
      const Wait w = g_run.fibers[i].wait;
      if (w == Wait::kDone) continue;
      all &= w == Wait::kWarp;
      some = true;
    }
    if (all && some) {
      for (int i = w0; i < w1; ++i)
        if (g_run.fibers[i].wait == Wait::kWarp) g_run.fibers[i].wait = Wait::kNone;
      released = true;
    }
  }
  return released;
}

std::string where(const uint3& block) {
  return "block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " + std::to_string(block.z) +
         ")";
}

void run_block(const uint3& block, int nthreads, Order& order) {
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = g_run.fibers[i];
    f.wait = Wait::kNone;
    f.open.clear();  // copies a previous block never waited for do not land in this one
    f.groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_main, 0);
  }
  std::vector<int> ready;
  for (;;) {
    if (order.kind == Order::kWarps) release_barriers(nthreads);
    ready.clear();
    for (int i = 0; i < nthreads; ++i)
      if (g_run.fibers[i].wait == Wait::kNone) ready.push_back(i);
    if (ready.empty()) {
      if (std::all_of(g_run.fibers.begin(), g_run.fibers.begin() + nthreads,
                      [](const Fiber& f) { return f.wait == Wait::kDone; }))
        return;
      if (!release_barriers(nthreads))
        throw std::runtime_error("cuda_on_cpu: deadlock in " + where(block) +
                                 ": threads wait at barriers that not every thread of their scope reaches");
      continue;
    }
    order.arrange(ready);
    for (int i : ready) {
      Fiber& f = g_run.fibers[i];
      g_run.current = i;
      g_pos.thread = f.thread;
      swapcontext(&g_run.scheduler, &f.ctx);
      if (!g_run.error.empty())
        throw std::runtime_error("cuda_on_cpu: " + g_run.error + " (thread " + std::to_string(i) + " of " +
                                 where(block) + ")");
    }
  }
}

}  // namespace

void sync_threads() { yield(Wait::kBlock); }
void sync_warp() { yield(Wait::kWarp); }
int lane_id() { return g_run.current % kWarp; }

void memcpy_async(void* dst, const void* src, size_t bytes, size_t zfill) {
  const bool size_ok = bytes == 4 || bytes == 8 || bytes == 16;
  if (!size_ok || zfill > bytes || reinterpret_cast<uintptr_t>(dst) % bytes != 0 ||
      reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    if (g_run.error.empty())
      g_run.error = "cp.async of " + std::to_string(bytes) + " bytes (" + std::to_string(zfill) +
                    " zero-filled) needs a size of 4, 8 or 16 and addresses aligned to it";
    return;
  }
  Copy c{static_cast<unsigned char*>(dst), bytes, {}};
  std::memcpy(c.data.data(), src, bytes - zfill);  // the source is global memory, unchanged during the kernel
  std::memset(c.data.data() + bytes - zfill, 0, zfill);
  std::memset(c.dst, 0xff, bytes);  // undefined until the wait
  g_run.fibers[g_run.current].open.push_back(c);
}

void commit_group() {
  Fiber& f = g_run.fibers[g_run.current];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void wait_prior(size_t groups) {
  Fiber& f = g_run.fibers[g_run.current];
  while (f.groups.size() > groups) {
    for (const Copy& c : f.groups.front()) std::memcpy(c.dst, c.data.data(), c.bytes);
    f.groups.pop_front();
  }
}
void check_vector(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0 && g_run.error.empty())
    g_run.error = "16-byte vector access at an address that is not 16-byte aligned";
}

uint64_t* warp_exchange_slot(int lane) { return &g_run.exchange[(g_run.current / kWarp) * kWarp + lane]; }

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int nthreads = static_cast<int>(block.x * block.y * block.z);
  Order order = Order::from_env();
  g_run.body = &body;
  g_run.error.clear();
  g_run.fibers.resize(std::max<size_t>(g_run.fibers.size(), nthreads));
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = g_run.fibers[i];
    if (!f.stack) f.stack.reset(new char[kStackBytes]);
    f.thread = uint3{static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                     static_cast<unsigned>(i) / (block.x * block.y)};
  }
  g_run.exchange.assign(((nthreads + kWarp - 1) / kWarp) * kWarp, 0);
  g_pos.block_dim = block;
  g_pos.grid_dim = grid;
  std::vector<float> dyn((smem + sizeof(float) - 1) / sizeof(float));
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        std::fill(dyn.begin(), dyn.end(), std::numeric_limits<float>::quiet_NaN());  // unwritten reads show
        g_pos.dynamic_smem = dyn.empty() ? nullptr : dyn.data();
        g_pos.block = uint3{x, y, z};
        run_block(g_pos.block, nthreads, order);
      }
}

}  // namespace cuda_on_cpu

// The handler -fsanitize=bounds calls for an out-of-range subscript (its ABI: a source location first). It records
// the first report; the scheduler fails the launch as soon as the thread yields.
namespace {
struct SourceLocation {
  const char* file;
  uint32_t line, column;
};
}  // namespace

extern "C" void __ubsan_handle_out_of_bounds(void* data, void* index) {
  auto* loc = static_cast<const SourceLocation*>(data);
  if (cuda_on_cpu::g_run.error.empty())
    cuda_on_cpu::g_run.error = "out-of-bounds subscript " + std::to_string(reinterpret_cast<intptr_t>(index)) +
                               " at " + loc->file + ":" + std::to_string(loc->line);
}
extern "C" void __ubsan_handle_out_of_bounds_abort(void* data, void* index) {
  __ubsan_handle_out_of_bounds(data, index);
}

// The modelled devices (cuda_on_cpu.h) and the kernels' shared-memory opt-ins on each.
namespace {
constexpr int kSmemOptin[] = {232448, 101376};  // sm_90 (H100, H200); sm_86 / sm_89
constexpr size_t kDefaultDynamicSmem = 48 * 1024;
std::map<std::pair<const void*, int>, int> g_opted_in;

int env_device() {
  const char* env = std::getenv("CONMIM_CUDA_ON_CPU_DEVICE");
  const int dev = env ? std::atoi(env) : 0;
  if (dev < 0 || dev >= static_cast<int>(std::size(kSmemOptin)))
    throw std::invalid_argument("CONMIM_CUDA_ON_CPU_DEVICE must be 0 or 1");
  return dev;
}
}  // namespace

void cuda_on_cpu::check_dynamic_smem(const void* kernel, size_t smem) {
  if (smem <= kDefaultDynamicSmem) return;
  const auto it = g_opted_in.find({kernel, env_device()});
  if (it == g_opted_in.end() || static_cast<size_t>(it->second) < smem)
    throw std::runtime_error("cuda_on_cpu: a launch with " + std::to_string(smem) +
                             " bytes of dynamic shared memory, more than its kernel opted in to on device " +
                             std::to_string(env_device()));
}

// The CUDA runtime calls of the launchers.
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "no error"; }
cudaError_t cudaGetDevice(int* device) {
  *device = env_device();
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin || device < 0 ||
      device >= static_cast<int>(std::size(kSmemOptin)))
    return cudaErrorInvalidValue;
  *value = kSmemOptin[device];
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void* kernel, enum cudaFuncAttribute attr, int value) {
  const int dev = env_device();
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > kSmemOptin[dev])
    return cudaErrorInvalidValue;
  g_opted_in[{kernel, dev}] = value;
  return cudaSuccess;
}
}
