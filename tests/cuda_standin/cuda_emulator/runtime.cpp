// The CPU runtime behind cuda_emulator.h: launches a kernel over its grid the way
// a GPU would expose its bugs.
//
// - Blocks run one after another, in a seeded random order. The threads of a
//   block each get a stack of their own (a fiber) and run concurrently up to
//   each barrier or warp collective: the scheduler picks the next runnable
//   thread at random, so a missing __syncthreads lets a reader run before the
//   writer, in an order that changes with the seed.
// - A barrier must be reached by every thread of the block, a collective by
//   every lane of its mask, at the same kind of operation; anything else
//   (a thread that exits or waits elsewhere) is an error naming both places.
// - Memory faults (reads and writes into the guard pages after each device
//   allocation, null pointers), integer division traps and a kernel that runs
//   too long end the launch with a report instead of killing the process.
//
// Exported with C linkage for ctypes (see __init__.py).
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <vector>

#include "cuda_emulator.h"

// The hand-written switch is for x86-64; elsewhere (or with CUEMU_UCONTEXT) threads switch with ucontext.
#if defined(__x86_64__) && !defined(CUEMU_UCONTEXT)
#define CUEMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kStackSize = 64 * 1024;  // per CUDA thread
constexpr size_t kGuardBelow = 64 * 1024;  // inaccessible bytes before each allocation's first page
constexpr size_t kGuardAbove = 1 << 20;    // and after its last byte
constexpr unsigned char kCanary = 0xff;    // fills the unused start of the first page (NaN as floats)

enum Status { OK = 0, FAULT = 1, ERROR = 2, TIMEOUT = 3 };
enum State { RUNNABLE, AT_BARRIER, AT_WARP_OP, DONE };

struct Fiber {
  cuemu_thread pub;  // first: kernel code reads threadIdx through cuemu_self
  void* sp;          // saved stack pointer while switched out
  char* stack;       // lowest address of its stack (a guard page)
  int linear, warp, lane, state;
  const char* where;  // the barrier or collective it waits at
  int barrier_op, predicate;
  unsigned long long result;
#if !CUEMU_ASM_SWITCH
  ucontext_t context;
#endif
};

struct Warp {
  unsigned lanes;    // lanes that exist (the last warp of a block may be partial)
  unsigned done;     // lanes that exited
  unsigned arrived;  // lanes waiting in the pending collective
  unsigned mask;
  int op, width;
  const char* where;
  unsigned long long value[32], result[32];
  int arg[32];
};

struct Result {
  int status, signal, write;
  unsigned long long address;
  int shared_array;  // the __shared__ array whose canary a block changed, or -1
  unsigned block[3], thread[3];
  char message[4096];
};

unsigned long long next_random(unsigned long long& state) {  // xorshift64*
  state ^= state >> 12;
  state ^= state << 25;
  state ^= state >> 27;
  return state * 2685821657736338717ULL;
}

// ----- the launch in progress ---------------------------------------------------------------
void (*g_invoke)(void**);
void** g_params;
std::vector<Fiber> g_fibers;
// The threads that can run, by warp: the scheduler runs the runnable lanes of one warp, in a random
// order, before it picks another warp at random (as a GPU schedules warps; it also keeps a warp's
// neighbouring memory accesses together, which grid-stride loops need to run fast on a CPU).
struct Runnable {
  std::vector<int> lanes;        // per warp: its runnable threads (linear indices), 32 slots each
  std::vector<int> count;        // per warp: how many
  std::vector<int> warps;        // the warps with runnable threads
  std::vector<int> where;        // per warp: its position in `warps`
  int current = -1;              // the warp being run

  void reset(int warp_count) {
    lanes.assign(32 * warp_count, 0);
    count.assign(warp_count, 0);
    where.assign(warp_count, -1);
    warps.clear();
    current = -1;
  }
  bool empty() const { return warps.empty(); }
  void push(int thread) {
    const int w = thread / 32;
    if (count[w] == 0) {
      where[w] = (int)warps.size();
      warps.push_back(w);
    }
    lanes[32 * w + count[w]++] = thread;
  }
  int pop(unsigned long long& rng) {
    if (current < 0 || count[current] == 0) current = warps[(size_t)(((next_random(rng) >> 32) * warps.size()) >> 32)];
    const int w = current;
    const int pick = (int)(((next_random(rng) >> 32) * (unsigned long long)count[w]) >> 32);
    const int thread = lanes[32 * w + pick];
    lanes[32 * w + pick] = lanes[32 * w + --count[w]];
    if (count[w] == 0) {  // take the warp off the list
      const int last = warps.back();
      warps[where[w]] = last;
      where[last] = where[w];
      warps.pop_back();
      where[w] = -1;
    }
    return thread;
  }
};
Runnable g_runnable;
std::vector<Warp> g_warps;
std::vector<char*> g_stacks;       // every stack mapped so far
std::vector<char*> g_free_stacks;  // those no thread of the running block holds
Fiber* g_current;
int g_threads, g_done, g_at_barrier;
unsigned long long g_rng;
Result* g_result;
sigjmp_buf g_escape;
volatile sig_atomic_t g_in_kernel;
void* g_scheduler_sp;
#if !CUEMU_ASM_SWITCH
ucontext_t g_scheduler_context;
#endif

// ----- fibers ----------------------------------------------------------------------------------
#if CUEMU_ASM_SWITCH
extern "C" void cuemu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .globl cuemu_switch
  .hidden cuemu_switch
  .type cuemu_switch, @function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
)");
#endif

[[noreturn]] void fiber_main();

void prepare(Fiber& f) {
  // Stack tops staggered by a few cache lines, so that the threads' frames do not all map to the same
  // cache sets.
  char* top = f.stack + kStackSize - 64 * (f.linear % 61);
#if CUEMU_ASM_SWITCH
  auto* words = reinterpret_cast<unsigned long long*>(top);
  words[-1] = 0;                                                 // fiber_main's return address: none
  words[-2] = reinterpret_cast<unsigned long long>(&fiber_main);  // where cuemu_switch returns to
  for (int i = 3; i <= 8; ++i) words[-i] = 0;                    // rbp, rbx, r12-r15
  f.sp = &words[-8];  // (the floating-point control words are shared: kernels do not change them)
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack + kPage;
  f.context.uc_stack.ss_size = kStackSize - kPage;
  f.context.uc_link = nullptr;
  makecontext(&f.context, reinterpret_cast<void (*)()>(&fiber_main), 0);
#endif
}

void run(Fiber& f) {  // scheduler -> fiber, until it yields
  if (!f.stack) {  // its first run: take the stack an exited thread left, still warm in the cache
    f.stack = g_free_stacks.back();
    g_free_stacks.pop_back();
    prepare(f);
  }
  g_current = &f;
  cuemu_self = &f.pub;
#if CUEMU_ASM_SWITCH
  cuemu_switch(&g_scheduler_sp, f.sp);
#else
  swapcontext(&g_scheduler_context, &f.context);
#endif
}

void yield() {  // fiber -> scheduler
  Fiber& f = *g_current;
#if CUEMU_ASM_SWITCH
  cuemu_switch(&f.sp, g_scheduler_sp);
#else
  swapcontext(&f.context, &g_scheduler_context);
#endif
}

bool ensure_stacks(int count) {
  while ((int)g_stacks.size() < count) {
    void* p = mmap(nullptr, kStackSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) return false;
    mprotect(p, kPage, PROT_NONE);  // a stack overflow faults instead of writing into the next stack
    g_stacks.push_back(static_cast<char*>(p));
  }
  return true;
}

// ----- errors ------------------------------------------------------------------------------------
void describe_thread(const Fiber* f) {
  g_result->block[0] = cuemu_block_idx.x;
  g_result->block[1] = cuemu_block_idx.y;
  g_result->block[2] = cuemu_block_idx.z;
  if (f) {
    g_result->thread[0] = f->pub.idx.x;
    g_result->thread[1] = f->pub.idx.y;
    g_result->thread[2] = f->pub.idx.z;
  }
}

void set_error(const Fiber* f, const char* format, ...) {
  if (g_result->status != OK) return;  // keep the first
  g_result->status = ERROR;
  describe_thread(f);
  va_list args;
  va_start(args, format);
  vsnprintf(g_result->message, sizeof g_result->message, format, args);
  va_end(args);
}

// Called on a fiber: record the error and leave the launch for good.
[[noreturn]] void fail_here() {
  Fiber& f = *g_current;
  f.state = DONE;
  yield();
  abort();  // a failed fiber is never resumed
}

void release_barrier() {
  int count = 0, all = 1, any = 0;
  for (Fiber& f : g_fibers) {
    count += f.predicate;
    all &= f.predicate;
    any |= f.predicate;
  }
  for (Fiber& f : g_fibers) {
    f.result = f.barrier_op == CUEMU_BAR_COUNT ? count : f.barrier_op == CUEMU_BAR_AND ? all : any;
    f.state = RUNNABLE;
    g_runnable.push(f.linear);
  }
  g_at_barrier = 0;
}

// A barrier is complete when every thread of the block waits at it; a thread that exited
// or waits at another barrier means the block diverged at a barrier.
void check_barrier() {
  if (g_at_barrier == 0 || g_at_barrier + g_done < g_threads) return;
  const Fiber* first = nullptr;
  for (const Fiber& f : g_fibers) {
    if (f.state != AT_BARRIER) continue;
    if (!first) {
      first = &f;
    } else if (strcmp(f.where, first->where) != 0) {
      return set_error(&f, "threads of one block wait at different barriers: thread (%u,%u,%u) at %s, thread "
                       "(%u,%u,%u) at %s", first->pub.idx.x, first->pub.idx.y, first->pub.idx.z, first->where,
                       f.pub.idx.x, f.pub.idx.y, f.pub.idx.z, f.where);
    }
  }
  if (g_done) {
    const Fiber* gone = nullptr;
    for (const Fiber& f : g_fibers)
      if (f.state == DONE && !gone) gone = &f;
    return set_error(first, "%s was reached by %d of the block's %d threads: %d exited without it (thread "
                     "(%u,%u,%u) among them), which on a GPU hangs or corrupts the barrier", first->where,
                     g_at_barrier, g_threads, g_done, gone->pub.idx.x, gone->pub.idx.y, gone->pub.idx.z);
  }
  release_barrier();
}

void deadlock() {
  // No thread can run: some wait at a barrier or collective that others never reach.
  const Fiber* barrier = nullptr;
  const Fiber* collective = nullptr;
  for (const Fiber& f : g_fibers) {
    if (f.state == AT_BARRIER && !barrier) barrier = &f;
    if (f.state == AT_WARP_OP && !collective) collective = &f;
  }
  if (barrier && collective) {
    const Warp& w = g_warps[collective->warp];
    return set_error(collective, "deadlock: %d thread(s) wait at %s while lanes 0x%08x of warp %d wait at %s "
                     "(mask 0x%08x) for lanes that are at the barrier", g_at_barrier, barrier->where, w.arrived,
                     collective->warp, w.where, w.mask);
  }
  if (collective) {
    const Warp& w = g_warps[collective->warp];
    return set_error(collective, "deadlock: lanes 0x%08x of warp %d wait at %s (mask 0x%08x) for lanes 0x%08x "
                     "that never reach it", w.arrived, collective->warp, w.where, w.mask, w.mask & ~w.arrived);
  }
  set_error(barrier, "deadlock: %d thread(s) wait at %s", g_at_barrier, barrier ? barrier->where : "?");
}

[[noreturn]] void fiber_main() {
  g_invoke(g_params);
  Fiber& f = *g_current;
  f.state = DONE;
  ++g_done;
  g_free_stacks.push_back(f.stack);  // free once this thread has switched away for good
  Warp& w = g_warps[f.warp];
  w.done |= 1u << f.lane;
  if (w.arrived && (w.mask & (1u << f.lane)))
    set_error(&f, "%s with mask 0x%08x: lane %d of warp %d exited without reaching it", w.where, w.mask, f.lane,
              f.warp);
  else if (g_at_barrier)
    check_barrier();
  yield();
  abort();  // an exited fiber is never resumed
}

int run_block(int threads) {
  g_threads = threads;
  g_done = g_at_barrier = 0;
  g_runnable.reset((threads + 31) / 32);
  uint3 idx = {0, 0, 0};
  for (int i = 0; i < threads; ++i) {
    Fiber& f = g_fibers[i];
    f.pub.idx = idx;
    if (++idx.x == cuemu_block_dim.x) {  // the next thread's index, without a division
      idx.x = 0;
      if (++idx.y == cuemu_block_dim.y) {
        idx.y = 0;
        ++idx.z;
      }
    }
    f.linear = i;
    f.warp = i / 32;
    f.lane = i % 32;
    f.state = RUNNABLE;
    f.where = nullptr;
    f.predicate = 0;
    f.stack = nullptr;  // given one when it first runs
    g_runnable.push(i);
  }
  g_free_stacks.assign(g_stacks.rbegin(), g_stacks.rend());
  for (int w = 0; w < (threads + 31) / 32; ++w) {
    int lanes = threads - 32 * w < 32 ? threads - 32 * w : 32;
    g_warps[w].lanes = lanes == 32 ? 0xffffffffu : (1u << lanes) - 1;
    g_warps[w].done = g_warps[w].arrived = 0;
  }
  while (g_done < threads && g_result->status == OK) {
    if (g_runnable.empty()) {
      deadlock();
      break;
    }
    run(g_fibers[g_runnable.pop(g_rng)]);
  }
  return g_result->status;
}

// ----- signals --------------------------------------------------------------------------------
void on_signal(int signal, siginfo_t* info, void* context) {
  if (!g_in_kernel) {  // not ours: a late watchdog tick is dropped, a fault outside kernels stays fatal
    if (signal == SIGRTMIN + 3) return;
    ::signal(signal, SIG_DFL);
    raise(signal);
    return;
  }
  g_in_kernel = 0;
  g_result->status = signal == SIGRTMIN + 3 ? TIMEOUT : FAULT;
  g_result->signal = signal;
  g_result->address = reinterpret_cast<unsigned long long>(info->si_addr);
  g_result->write = -1;
#if defined(__x86_64__) && defined(REG_ERR)
  if (signal == SIGSEGV) g_result->write = (static_cast<ucontext_t*>(context)->uc_mcontext.gregs[REG_ERR] & 2) != 0;
#else
  (void)context;
#endif
  describe_thread(g_current);
  siglongjmp(g_escape, 1);
}

struct SignalGuard {  // our handlers and alternate stack for the launch, the previous ones restored after
  static constexpr int kSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL};
  struct sigaction previous[5];
  stack_t previous_stack;
  timer_t timer;
  bool has_timer = false;
  static char* alt_stack;

  explicit SignalGuard(double timeout_s) {
    if (!alt_stack) alt_stack = static_cast<char*>(malloc(1 << 16));
    stack_t stack = {};
    stack.ss_sp = alt_stack;
    stack.ss_size = 1 << 16;
    sigaltstack(&stack, &previous_stack);
    struct sigaction action = {};
    action.sa_sigaction = on_signal;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &action, &previous[i]);
    sigaction(SIGRTMIN + 3, &action, &previous[4]);
    if (timeout_s > 0) {
      struct sigevent event = {};
      event.sigev_notify = SIGEV_THREAD_ID;
      event.sigev_signo = SIGRTMIN + 3;
      event._sigev_un._tid = (pid_t)syscall(SYS_gettid);
      if (timer_create(CLOCK_MONOTONIC, &event, &timer) == 0) {
        has_timer = true;
        struct itimerspec when = {};
        when.it_value.tv_sec = (time_t)timeout_s;
        when.it_value.tv_nsec = (long)((timeout_s - (double)(time_t)timeout_s) * 1e9);
        timer_settime(timer, 0, &when, nullptr);
      }
    }
  }
  ~SignalGuard() {
    if (has_timer) timer_delete(timer);
    for (int i = 0; i < 4; ++i) sigaction(kSignals[i], &previous[i], nullptr);
    sigaction(SIGRTMIN + 3, &previous[4], nullptr);
    sigaltstack(&previous_stack, nullptr);
  }
};
char* SignalGuard::alt_stack = nullptr;

}  // namespace

// ----- what kernel code calls ------------------------------------------------------------------
extern "C" {
void cuemu_garbage(void* data, size_t nbytes, unsigned long long seed);
cuemu_thread* cuemu_self;
uint3 cuemu_block_idx;
dim3 cuemu_block_dim, cuemu_grid_dim;

void cuemu_fail(const char* where, const char* message) {
  set_error(g_current, "%s (%s)", message, where);
  fail_here();
}

int cuemu_syncthreads_op(int op, int predicate, const char* where) {
  Fiber& f = *g_current;
  Warp& w = g_warps[f.warp];
  if (w.arrived) {  // lanes of this warp wait in a collective this lane will not reach now
    set_error(&f, "lane %d of warp %d reached %s while lanes 0x%08x of its warp wait at %s (mask 0x%08x)", f.lane,
              f.warp, where, w.arrived, w.where, w.mask);
    fail_here();
  }
  f.state = AT_BARRIER;
  f.where = where;  // names the kind of barrier too, so threads at one `where` agree on `op`
  f.barrier_op = op;
  f.predicate = predicate;
  ++g_at_barrier;
  check_barrier();
  if (g_result->status != OK) fail_here();
  yield();
  return (int)f.result;
}

void cuemu_syncthreads(const char* where) { cuemu_syncthreads_op(CUEMU_BAR_PLAIN, 0, where); }

unsigned cuemu_active_mask(void) {
  const Warp& w = g_warps[g_current->warp];
  return w.lanes & ~w.done;
}

unsigned long long cuemu_warp_op(int op, unsigned mask, unsigned long long value, int arg, int width,
                                 const char* where) {
  Fiber& f = *g_current;
  Warp& w = g_warps[f.warp];
  const unsigned me = 1u << f.lane;
  if (!(mask & me)) {
    set_error(&f, "lane %d of warp %d calls %s with mask 0x%08x, which leaves the lane itself out", f.lane, f.warp,
              where, mask);
    fail_here();
  }
  if (mask & ~w.lanes) {
    set_error(&f, "%s with mask 0x%08x names lanes that do not exist: warp %d of this %d-thread block has lanes "
              "0x%08x", where, mask, f.warp, g_threads, w.lanes);
    fail_here();
  }
  if (mask & w.done) {
    set_error(&f, "%s with mask 0x%08x: lanes 0x%08x of warp %d already exited and never reach it", where, mask,
              mask & w.done, f.warp);
    fail_here();
  }
  if (width < 1 || width > 32 || (width & (width - 1))) {
    set_error(&f, "%s: width %d is not a power of 2 from 1 to 32", where, width);
    fail_here();
  }
  if (w.arrived == 0) {
    w.op = op;
    w.mask = mask;
    w.width = width;
    w.where = where;
  } else if (w.op != op || w.mask != mask || w.width != width) {
    set_error(&f, "lanes of warp %d disagree: lanes 0x%08x wait at %s (mask 0x%08x, width %d), lane %d calls %s "
              "(mask 0x%08x, width %d)", f.warp, w.arrived, w.where, w.mask, w.width, f.lane, where, mask, width);
    fail_here();
  }
  w.value[f.lane] = value;
  w.arg[f.lane] = arg;
  w.arrived |= me;
  f.state = AT_WARP_OP;
  f.where = where;
  if (w.arrived == w.mask) {
    unsigned long long ballot = 0, reduced = 0;
    bool first = true;
    for (int lane = 0; lane < 32; ++lane) {
      if (!(w.mask >> lane & 1)) continue;
      ballot |= (unsigned long long)(w.value[lane] != 0) << lane;
      const long long v = w.arg[lane] ? (long long)(int)w.value[lane] : (long long)(unsigned)w.value[lane];
      const long long r = first ? v : (long long)reduced;
      reduced = (unsigned long long)(op == CUEMU_REDUCE_ADD ? (first ? v : r + v)
                                     : op == CUEMU_REDUCE_MIN ? (v < r ? v : r)
                                                              : (v > r ? v : r));
      first = false;
    }
    for (int lane = 0; lane < 32; ++lane) {
      if (!(w.mask >> lane & 1)) continue;
      const int base = lane & ~(w.width - 1);
      int source = lane;
      switch (w.op) {
        case CUEMU_SHFL_IDX: source = base + (w.arg[lane] & (w.width - 1)); break;
        case CUEMU_SHFL_UP: source = lane - w.arg[lane] < base ? lane : lane - w.arg[lane]; break;
        case CUEMU_SHFL_DOWN: source = lane + w.arg[lane] >= base + w.width ? lane : lane + w.arg[lane]; break;
        case CUEMU_SHFL_XOR: source = (lane ^ w.arg[lane]) >= base + w.width ? lane : lane ^ w.arg[lane]; break;
      }
      unsigned long long result;
      if (w.op == CUEMU_BALLOT) result = ballot;
      else if (w.op >= CUEMU_REDUCE_ADD) result = reduced & 0xffffffffULL;
      else if (w.op == CUEMU_SYNCWARP) result = 0;
      else if (source < 0 || source > 31 || !(w.mask >> source & 1)) result = next_random(g_rng);  // undefined
      else result = w.value[source];
      w.result[lane] = result;
      Fiber& other = g_fibers[f.warp * 32 + lane];
      other.state = RUNNABLE;
      g_runnable.push(other.linear);
    }
    w.arrived = 0;
  }
  yield();
  return w.result[f.lane];
}

// ----- what ctypes calls -----------------------------------------------------------------------
// Run invoke(params) over a grid; the result says how it ended.
// `shared` lists (address, bytes, bytes of canary after it) of the module's __shared__ arrays,
// `shared_count` of them.
int cuemu_launch(void (*invoke)(void**), void** params, const unsigned* grid, const unsigned* block,
                 const unsigned long long* shared, size_t shared_count, unsigned long long seed, double timeout_s,
                 Result* result) {
  memset(result, 0, sizeof *result);
  result->shared_array = -1;
  g_result = result;
  const int threads = (int)(block[0] * block[1] * block[2]);
  if (!ensure_stacks(threads)) {
    snprintf(result->message, sizeof result->message, "cannot map stacks for %d threads", threads);
    return result->status = ERROR;
  }
  g_fibers.resize(threads);
  g_warps.resize((threads + 31) / 32);
  g_invoke = invoke;
  g_params = params;
  g_current = nullptr;
  cuemu_block_dim = dim3(block[0], block[1], block[2]);
  cuemu_grid_dim = dim3(grid[0], grid[1], grid[2]);
  const unsigned long long blocks = (unsigned long long)grid[0] * grid[1] * grid[2];
  g_rng = seed * 0x9E3779B97F4A7C15ULL + 1;
  // Blocks in a random order: a permutation for grids of up to 2^20 blocks, else a random rotation.
  std::vector<unsigned> order;
  if (blocks <= (1u << 20)) {
    order.resize(blocks);
    for (unsigned i = 0; i < blocks; ++i) order[i] = i;
    for (unsigned i = (unsigned)blocks; i > 1; --i) {
      unsigned j = (unsigned)(next_random(g_rng) % i);
      unsigned t = order[i - 1];
      order[i - 1] = order[j];
      order[j] = t;
    }
  }
  const unsigned long long rotation = next_random(g_rng) % blocks;
  SignalGuard guard(timeout_s);
  if (sigsetjmp(g_escape, 1) == 0) {
    g_in_kernel = 1;
    for (unsigned long long k = 0; k < blocks && result->status == OK; ++k) {
      const unsigned long long b = order.empty() ? (k + rotation) % blocks : order[k];
      cuemu_block_idx = {(unsigned)(b % grid[0]), (unsigned)(b / grid[0] % grid[1]),
                         (unsigned)(b / ((unsigned long long)grid[0] * grid[1]))};
      for (size_t a = 0; a < shared_count; ++a) {  // shared memory starts as garbage, not zeros
        char* array = reinterpret_cast<char*>(shared[3 * a]);
        cuemu_garbage(array, shared[3 * a + 1], next_random(g_rng));
        memset(array + shared[3 * a + 1], kCanary, shared[3 * a + 2]);
      }
      run_block(threads);
      for (size_t a = 0; a < shared_count && result->status == OK; ++a) {
        const unsigned char* tail = reinterpret_cast<unsigned char*>(shared[3 * a] + shared[3 * a + 1]);
        for (size_t i = 0; i < shared[3 * a + 2]; ++i) {
          if (tail[i] != kCanary) {
            result->status = FAULT;
            result->shared_array = (int)a;
            result->address = shared[3 * a + 1] + i;  // the offset written, from the array's start
            result->write = 1;
            describe_thread(nullptr);
            break;
          }
        }
      }
    }
    g_in_kernel = 0;
  }
  cuemu_self = nullptr;
  g_current = nullptr;
  return result->status;
}

// Device memory: the data ends exactly where an inaccessible guard region starts, so a read or
// write past the end faults; the unused start of its first page holds a canary (cuemu_canary).
void* cuemu_alloc(size_t nbytes) {
  const size_t pages = nbytes ? (nbytes + kPage - 1) / kPage : 1;
  char* base = static_cast<char*>(mmap(nullptr, kGuardBelow + pages * kPage + kGuardAbove, PROT_NONE,
                                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (base == MAP_FAILED) return nullptr;
  char* first = base + kGuardBelow;
  if (mprotect(first, pages * kPage, PROT_READ | PROT_WRITE) != 0) {
    munmap(base, kGuardBelow + pages * kPage + kGuardAbove);
    return nullptr;
  }
  char* data = first + pages * kPage - nbytes;
  memset(first, kCanary, data - first);
  return data;
}

void cuemu_free(void* data, size_t nbytes) {
  const size_t pages = nbytes ? (nbytes + kPage - 1) / kPage : 1;
  char* first = static_cast<char*>(data) + nbytes - pages * kPage;
  munmap(first - kGuardBelow, kGuardBelow + pages * kPage + kGuardAbove);
}

// Bytes of the canary before `data` that are no longer the canary (a write before the start); the
// canary is restored for the launches that follow.
size_t cuemu_canary(void* data, size_t nbytes) {
  const size_t pages = nbytes ? (nbytes + kPage - 1) / kPage : 1;
  unsigned char* first = static_cast<unsigned char*>(data) + nbytes - pages * kPage;
  size_t changed = 0;
  for (unsigned char* p = first; p < static_cast<unsigned char*>(data); ++p) {
    changed += *p != kCanary;
    *p = kCanary;
  }
  return changed;
}

void cuemu_garbage(void* data, size_t nbytes, unsigned long long seed) {
  unsigned long long state = seed * 0x9E3779B97F4A7C15ULL + 7;
  char* p = static_cast<char*>(data);
  for (size_t i = 0; i < nbytes; i += 8) {
    unsigned long long word = next_random(state);
    memcpy(p + i, &word, nbytes - i < 8 ? nbytes - i : 8);
  }
}

size_t cuemu_guard_sizes(size_t* below, size_t* above) {
  *below = kGuardBelow;
  *above = kGuardAbove;
  return kPage;
}
}
