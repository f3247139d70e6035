// A small CPU emulator for the CUDA kernels in sft_kernels/csrc/, so that they run (slowly) on a
// machine without a GPU: every CUDA thread of a CTA is a ucontext fiber; CTAs run one
// after another. Collective operations are emulated from the PTX ISA's definitions:
//   - __syncthreads: all live threads of the CTA;
//   - mma.m16n8k16 (fp16/bf16 -> fp32), ldmatrix.x4 (.trans), shfl.xor: all 32 lanes
//     of a warp (a warp whose lanes call different collectives aborts: divergence);
//   - cp.async: queued per thread and performed at cp.async.wait_all (EMU_CP_ASYNC=
//     deferred, the default) or at once (=immediate); a kernel that reads shared memory
//     before waiting, or overwrites a stage another warp still reads, gives different
//     results in the two modes.
// Two schedulers (EMU_SCHED, seeded by EMU_SEED):
//   - interleave (default): every round resumes each fiber once, in a random order, so
//     the warps of a CTA advance in near lockstep, one collective at a time: catches a
//     warp reading what another warp writes in the same barrier interval;
//   - runahead: warps run one at a time, in a random order, each until all its threads
//     wait at a __syncthreads (or finish) before the next warp starts: one warp passes a
//     whole barrier interval (and the next __syncthreads' preamble) while the others have
//     not begun it. This is what shows a write-after-read race on a double buffer (a
//     prefetch issued before the barrier that says every warp is done with that buffer).
// Dynamic shared memory is filled with 0xFF (a NaN in fp16, bf16 and fp32) at every CTA
// start, so reads of unwritten shared memory poison the results.
//
// Include exactly once, in the test translation unit, after the kernels.
#pragma once

#include <ucontext.h>

#include <cstring>
#include <random>
#include <vector>

namespace emu {

struct Copy {
  void* dst;
  const void* src;
  int bytes;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  unsigned tid = 0;
  bool done = false;
  long barrier_gen = -1;  // the CTA barrier generation this thread waits at, -1 when running
  std::vector<Copy> pending;
};

enum Op { kNone = 0, kMma, kMmaBf16, kLdm, kLdmT, kShfl };

struct Warp {
  int arrived = 0;
  long gen = 0;
  int op = kNone;
  int arg = 0;
  uint32_t in[32][6];
  float fin[32][4];
  const void* ptr[32];
  uint32_t out[32][4];
  float fout[32][4];
};

struct State {
  std::vector<Fiber> fibers;
  ucontext_t sched;
  int cur = -1;
  dim3 block{1, 1, 1};
  int live = 0;
  int cta_arrived = 0;
  long cta_gen = 0;
  long events = 0;
  std::vector<Warp> warps;
  std::vector<unsigned char> smem;
  size_t smem_limit = 48 * 1024;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  bool deferred = true;
  bool runahead = false;
  std::mt19937 rng{12345};
  long launches = 0;
};

inline State& st() {
  static State s;
  return s;
}

[[noreturn]] inline void fatal(const char* msg) {
  std::fprintf(stderr, "emu: %s\n", msg);
  std::abort();
}

inline Fiber& me() { return st().fibers[st().cur]; }
inline void yield() { swapcontext(&me().ctx, &st().sched); }

static dim3 g_block_idx;
dim3 thread_idx() { return dim3(me().tid, 0, 0); }
dim3 block_idx() { return g_block_idx; }
unsigned char* dynamic_smem() { return st().smem.data(); }
void set_max_dynamic_smem(size_t bytes) { st().smem_limit = bytes; }

void syncthreads() {
  State& s = st();
  for (auto& c : me().pending) (void)c;  // pending copies stay pending: a barrier is not a wait
  s.cta_arrived++;
  const long g = s.cta_gen;
  for (;;) {
    if (s.cta_gen != g) break;
    if (s.cta_arrived == s.live) {
      s.cta_arrived = 0;
      s.cta_gen++;
      s.events++;
      break;
    }
    me().barrier_gen = g;
    yield();
  }
  me().barrier_gen = -1;
}

template <typename F>
inline void warp_op(int op, int arg, F compute) {
  State& s = st();
  const unsigned tid = me().tid;
  Warp& w = s.warps[tid / 32];
  if (w.arrived == 0) {
    w.op = op;
    w.arg = arg;
  } else if (w.op != op || w.arg != arg) {
    fatal("divergent warp: lanes of one warp reached different collective operations");
  }
  w.arrived++;
  if (w.arrived == 32) {
    compute(w);
    w.arrived = 0;
    w.gen++;
    s.events++;
    return;
  }
  const long g = w.gen;
  while (w.gen == g) yield();
}

inline float half_bits_to_float(uint16_t b, bool bf16) {
  if (bf16) {
    __nv_bfloat16 h;
    h.x = b;
    return __bfloat162float(h);
  }
  __half h;
  h.x = b;
  return __half2float(h);
}

void mma_f16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, bool bf16) {
  const unsigned lane = me().tid % 32;
  Warp& w = st().warps[me().tid / 32];
  for (int i = 0; i < 4; ++i) {
    w.in[lane][i] = a[i];
    w.fin[lane][i] = c[i];
  }
  w.in[lane][4] = b0;
  w.in[lane][5] = b1;
  warp_op(bf16 ? kMmaBf16 : kMma, 0, [bf16](Warp& W) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      auto lo = [&](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r & 0xffff), bf16); };
      auto hi = [&](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r >> 16), bf16); };
      const uint32_t* a = W.in[l];
      A[g][2 * t] = lo(a[0]);
      A[g][2 * t + 1] = hi(a[0]);
      A[g + 8][2 * t] = lo(a[1]);
      A[g + 8][2 * t + 1] = hi(a[1]);
      A[g][2 * t + 8] = lo(a[2]);
      A[g][2 * t + 9] = hi(a[2]);
      A[g + 8][2 * t + 8] = lo(a[3]);
      A[g + 8][2 * t + 9] = hi(a[3]);
      B[2 * t][g] = lo(a[4]);
      B[2 * t + 1][g] = hi(a[4]);
      B[2 * t + 8][g] = lo(a[5]);
      B[2 * t + 9][g] = hi(a[5]);
      C[g][2 * t] = W.fin[l][0];
      C[g][2 * t + 1] = W.fin[l][1];
      C[g + 8][2 * t] = W.fin[l][2];
      C[g + 8][2 * t + 1] = W.fin[l][3];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      const int rows[4] = {g, g, g + 8, g + 8};
      const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
      for (int e = 0; e < 4; ++e) {
        float acc = C[rows[e]][cols[e]];
        for (int k = 0; k < 16; ++k) acc += A[rows[e]][k] * B[k][cols[e]];
        W.fout[l][e] = acc;
      }
    }
  });
  for (int e = 0; e < 4; ++e) c[e] = w.fout[lane][e];
}

void ldmatrix_x4(uint32_t r[4], const void* p, bool trans) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fatal("ldmatrix: row address not 16-byte aligned");
  const unsigned lane = me().tid % 32;
  Warp& w = st().warps[me().tid / 32];
  w.ptr[lane] = p;
  warp_op(trans ? kLdmT : kLdm, 0, [trans](Warp& W) {
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        uint16_t lo, hi;
        if (!trans) {  // thread l: row l/4, columns 2(l%4), 2(l%4)+1 of matrix i
          const uint16_t* row = static_cast<const uint16_t*>(W.ptr[8 * i + l / 4]);
          lo = row[2 * (l % 4)];
          hi = row[2 * (l % 4) + 1];
        } else {  // transposed: rows 2(l%4), 2(l%4)+1, column l/4
          lo = static_cast<const uint16_t*>(W.ptr[8 * i + 2 * (l % 4)])[l / 4];
          hi = static_cast<const uint16_t*>(W.ptr[8 * i + 2 * (l % 4) + 1])[l / 4];
        }
        W.out[l][i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
      }
  });
  for (int i = 0; i < 4; ++i) r[i] = w.out[lane][i];
}

float shfl_xor(float v, int mask) {
  const unsigned lane = me().tid % 32;
  Warp& w = st().warps[me().tid / 32];
  w.fin[lane][0] = v;
  warp_op(kShfl, mask, [mask](Warp& W) {
    for (int l = 0; l < 32; ++l) W.fout[l][0] = W.fin[l ^ mask][0];
  });
  return w.fout[lane][0];
}

inline void do_copy(const Copy& c) {
  if (c.bytes > 0)
    std::memcpy(c.dst, c.src, 16);
  else
    std::memset(c.dst, 0, 16);
}

void cp_async_16(void* dst, const void* src, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16))
    fatal("cp.async: address not 16-byte aligned");
  if (src_bytes != 0 && src_bytes != 16) fatal("cp.async: partial copies are not used by the kernels");
  Copy c{dst, src, src_bytes};
  if (st().deferred)
    me().pending.push_back(c);
  else
    do_copy(c);
}

void cp_async_wait_all() {
  for (const Copy& c : me().pending) do_copy(c);
  me().pending.clear();
}

static void fiber_entry() {
  State& s = st();
  s.body(s.ctx);
  me().done = true;
  me().pending.clear();
  s.live--;
  s.events++;
  swapcontext(&me().ctx, &s.sched);
  fatal("finished fiber resumed");
}

// Resume thread t until it next waits (a no-op for a finished thread).
inline void resume(unsigned t) {
  State& s = st();
  if (s.fibers[t].done) return;
  s.cur = static_cast<int>(t);
  swapcontext(&s.sched, &s.fibers[t].ctx);
}

// A thread parked at a __syncthreads that has not yet opened.
inline bool parked(const Fiber& f) { return f.done || (f.barrier_gen >= 0 && f.barrier_gen == st().cta_gen); }

// One round of the runahead scheduler: each warp in a random order runs alone until all
// its threads are parked at a barrier (or done); the last warp to arrive opens it.
inline void run_warps_ahead(unsigned n) {
  State& s = st();
  std::vector<unsigned> warps(n / 32);
  for (unsigned w = 0; w < warps.size(); ++w) warps[w] = w;
  std::shuffle(warps.begin(), warps.end(), s.rng);
  std::vector<unsigned> lanes(32);
  for (unsigned w : warps) {
    for (int stuck = 0; stuck <= 4;) {
      bool all_parked = true;
      for (unsigned l = 0; l < 32; ++l) all_parked = all_parked && parked(s.fibers[w * 32 + l]);
      if (all_parked) break;
      const long before = s.events;
      for (unsigned l = 0; l < 32; ++l) lanes[l] = w * 32 + l;
      std::shuffle(lanes.begin(), lanes.end(), s.rng);
      for (unsigned t : lanes)
        if (!parked(s.fibers[t])) resume(t);
      stuck = s.events == before ? stuck + 1 : 0;  // no progress: leave it to the deadlock check
    }
  }
}

void launch_impl(void (*body)(void*), void* ctx, dim3 grid, dim3 block, size_t smem) {
  State& s = st();
  if (block.y != 1 || block.z != 1 || block.x % 32 != 0 || block.x == 0) fatal("launch: 1-D blocks of whole warps only");
  if (smem > s.smem_limit) fatal("launch: dynamic shared memory over the limit set with cudaFuncSetAttribute");
  if (smem > 227 * 1024) fatal("launch: dynamic shared memory over the sm_90 limit");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fatal("launch: empty grid (cudaErrorInvalidConfiguration)");
  if (grid.y > 65535 || grid.z > 65535) fatal("launch: grid.y / grid.z over 65535");
  if (const char* m = std::getenv("EMU_CP_ASYNC")) s.deferred = std::strcmp(m, "immediate") != 0;
  if (const char* m = std::getenv("EMU_SCHED")) {
    if (std::strcmp(m, "runahead") != 0 && std::strcmp(m, "interleave") != 0) fatal("EMU_SCHED must be interleave or runahead");
    s.runahead = std::strcmp(m, "runahead") == 0;
  }
  if (s.launches++ == 0)
    if (const char* seed = std::getenv("EMU_SEED")) s.rng.seed(std::strtoul(seed, nullptr, 10));
  s.body = body;
  s.ctx = ctx;
  const unsigned n = block.x;
  s.block = block;
  s.fibers.assign(n, Fiber());
  s.warps.assign(n / 32, Warp());
  for (auto& f : s.fibers) f.stack.resize(256 * 1024);
  std::vector<unsigned> order(n);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = dim3(x, y, z);
        s.smem.assign(std::max<size_t>(smem, 16), 0xFF);
        s.live = n;
        s.cta_arrived = 0;
        for (unsigned t = 0; t < n; ++t) {
          Fiber& f = s.fibers[t];
          f.tid = t;
          f.done = false;
          f.barrier_gen = -1;
          f.pending.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, fiber_entry, 0);
          order[t] = t;
        }
        for (auto& w : s.warps) w = Warp();
        long last_events = -1;
        int idle_rounds = 0;
        while (s.live > 0) {
          if (s.runahead) {
            run_warps_ahead(n);
          } else {
            std::shuffle(order.begin(), order.end(), s.rng);
            for (unsigned t : order) resume(t);
          }
          if (s.events == last_events) {
            if (++idle_rounds > 4) fatal("deadlock: threads wait at barriers / collectives that never complete");
          } else {
            idle_rounds = 0;
            last_events = s.events;
          }
        }
        s.cur = -1;
      }
}

}  // namespace emu
