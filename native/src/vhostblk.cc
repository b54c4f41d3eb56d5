// VhostBlkWorker: the native fast path of the vhost-user-blk export.  One
// native thread (an iothread) serves split virtqueues end to end for a disk
// that is a plain file (raw on file): it pops chains from the avail ring,
// reads the request header, preadv/pwritev's directly between the file and
// guest memory, writes the status byte, pushes the used element, publishes the
// used index once per batch and signals the call eventfd — no JavaScript.
//
// Behaviour mirrors hw/virtio/virtqueue.ts and hw/block/virtio-blk.ts (bounds
// checks, status codes, status byte = last byte of the last device-writable
// buffer, used len = all device-writable bytes).  One deliberate difference:
// structural chain errors that the TS walker reports on the element (nested
// or misplaced indirect descriptors, a bad indirect length, an indirect table
// outside guest memory, a `next` beyond the table, a chain longer than its
// table = a loop) break the queue here, as QEMU's virtio_error does; buffer
// faults (zero length, buffer outside guest memory, device-readable after
// device-writable) fail only that request with VIRTIO_BLK_S_IOERR.
//
// Guest memory is the mmapLayout ArrayBuffer (GPA = offset) and a list of
// mapped [start, end) spans; every address touched (rings, indirect tables,
// buffers) lies fully inside one span.  Shared ring indices are accessed with
// __atomic loads/stores (the guest runs concurrently on other CPUs).
//
// Threading: the JS thread owns the Queue objects' lifetime; it talks to the
// worker only through one mutex-protected command slot plus a control eventfd
// and blocks on a condvar until the worker has executed the command (a few
// microseconds).  The worker runs commands only between batches, so pause()
// and removeQueue() never see a request half done.  Counters are atomics the
// JS thread may read at any time.
//
// I/O is synchronous preadv/pwritev/fdatasync/fallocate on the worker thread.
// That is right for the common case (the image is page-cached: a 4 KiB copy
// costs ~1 us and an async submission would cost as much), but a cache miss
// or a slow fdatasync stalls every queue of this worker.  The replacement is
// an io_uring per worker (uring.cc's raw-syscall ring) with the chain kept as
// in flight until its CQE, and the pool fallback where io_uring is missing.
//
// Not done here (the TS path must serve the device instead): dirty-page
// logging (VHOST_F_LOG_ALL, migration), packed rings, formats other than raw.
#include <fcntl.h>
#include <limits.h>
#include <linux/falloc.h>
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common.h"

namespace spindle {
namespace {

constexpr uint32_t kMaxQueues = 1024;
constexpr uint32_t kMaxQueueSize = 32768;   // split ring limit
constexpr uint32_t kMaxIndirect = 1024;     // VIRTQUEUE_MAX_SIZE in virtqueue.ts
constexpr uint64_t kCtlKey = ~(uint64_t)0;  // epoll data of the control eventfd
constexpr uint32_t kSector = 512;
constexpr uint32_t kMaxDiscardSectors = 0x3fffff;
constexpr uint32_t kIdBytes = 20;

constexpr uint16_t VRING_DESC_F_NEXT = 1;
constexpr uint16_t VRING_DESC_F_WRITE = 2;
constexpr uint16_t VRING_DESC_F_INDIRECT = 4;
constexpr uint16_t VRING_AVAIL_F_NO_INTERRUPT = 1;

enum : uint32_t {
  T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13,
};
enum : uint8_t { S_OK = 0, S_IOERR = 1, S_UNSUPP = 2 };
constexpr uint32_t kWzUnmap = 1;

struct Span {
  uint64_t start, end;
};

// One attached queue.  Created and deleted by the JS thread; between addQueue
// and removeQueue only the worker touches the non-atomic ring state.
struct Queue {
  uint32_t index = 0;
  uint32_t num = 0;
  uint64_t desc = 0, avail = 0, used = 0;
  uint16_t last_avail = 0, used_idx = 0, published = 0;
  bool event_idx = false;
  int kick_fd = -1, call_fd = -1, fd = -1;
  uint64_t capacity = 0;  // sectors
  bool read_only = false;
  // Negotiated VIRTIO_BLK_F_DISCARD / WRITE_ZEROES: without them the request is UNSUPP.
  bool discard = true;
  bool write_zeroes = true;
  uint8_t serial[kIdBytes] = {};
  bool dead = false;  // worker-side copy of `broken`
  bool kicked_while_paused = false;
  std::vector<uint32_t> stamp;  // per head: batch in which it was popped
  uint32_t batch = 0;

  std::atomic<bool> write_cache{true};
  std::atomic<bool> broken{false};
  std::string why;  // guarded by Worker::stats_mu_
  std::atomic<uint64_t> requests{0}, bytes_read{0}, bytes_written{0}, errors{0}, calls{0}, batches{0};
  std::atomic<uint64_t> busy_ns{0};  // time spent in Serve (worker-side cost)
  std::atomic<uint32_t> pos{0};  // last_avail | published << 16, after each batch
};

// A popped chain: guest buffers as host pointers, already checked.
struct Elem {
  std::vector<iovec> out, in;
  uint64_t out_bytes = 0, in_bytes = 0;
  bool fault = false;
  void Clear() {
    out.clear();
    in.clear();
    out_bytes = in_bytes = 0;
    fault = false;
  }
};

// Full transfer between fd and iov (modified in place): loops over short
// transfers, EINTR and IOV_MAX.  A read that meets EOF zero-fills the rest (a
// file shorter than its capacity reads as zeroes, as in QEMU's raw driver).
int RwFull(int fd, iovec* iov, size_t cnt, uint64_t off, bool write) {
  while (cnt > 0) {
    int n = cnt > (size_t)IOV_MAX ? IOV_MAX : (int)cnt;
    ssize_t r = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
    if (r < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (r == 0) {
      if (write) return -EIO;
      for (size_t i = 0; i < cnt; i++) memset(iov[i].iov_base, 0, iov[i].iov_len);
      return 0;
    }
    off += (uint64_t)r;
    size_t left = (size_t)r;
    while (left > 0 && cnt > 0) {
      if (left >= iov->iov_len) {
        left -= iov->iov_len;
        iov++;
        cnt--;
      } else {
        iov->iov_base = (uint8_t*)iov->iov_base + left;
        iov->iov_len -= left;
        left = 0;
      }
    }
    while (cnt > 0 && iov->iov_len == 0) {
      iov++;
      cnt--;
    }
  }
  return 0;
}

int Fallocate(int fd, int mode, uint64_t off, uint64_t len) {
  for (;;) {
    if (fallocate(fd, mode, (off_t)off, (off_t)len) == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

int Fdatasync(int fd) {
  for (;;) {
    if (fdatasync(fd) == 0) return 0;
    if (errno != EINTR) return -errno;
  }
}

int WriteZeroes(int fd, uint64_t off, uint64_t len) {
  static const uint8_t zeroes[65536] = {};
  while (len > 0) {
    size_t n = len > sizeof zeroes ? sizeof zeroes : (size_t)len;
    iovec v{(void*)zeroes, n};
    int r = RwFull(fd, &v, 1, off, true);
    if (r < 0) return r;
    off += n;
    len -= n;
  }
  return 0;
}

class Worker {
 public:
  enum CmdType { kNone, kSetMem, kAdd, kRemove, kSetCall, kPause, kResume, kQuit };

  // Returns 0 or -errno.
  int Start() {
    ctl_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ctl_ < 0) return -errno;
    ep_ = epoll_create1(EPOLL_CLOEXEC);
    if (ep_ < 0) {
      int e = -errno;
      close(ctl_);
      ctl_ = -1;
      return e;
    }
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.u64 = kCtlKey;
    if (epoll_ctl(ep_, EPOLL_CTL_ADD, ctl_, &ev) < 0) {
      int e = -errno;
      Close();
      return e;
    }
    queues_.assign(kMaxQueues, nullptr);
    // Signals stay with Node's threads: the worker blocks them all (inherited
    // mask), so its syscalls are not interrupted and no handler runs on it.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    thread_ = std::thread([this] { Loop(); });
    pthread_sigmask(SIG_SETMASK, &old, nullptr);
    return 0;
  }

  // Stops the thread (after the batch in progress); closes every queue's fds.
  // The JS side deletes the Queue objects.
  void Stop() {
    if (thread_.joinable()) {
      Command(kQuit, nullptr, 0, -1);
      thread_.join();
    }
    Close();
  }

  // Executes a command on the worker thread; blocks until it is done.
  int Command(CmdType type, Queue* q, uint32_t index, int fd, const std::vector<Span>* spans = nullptr,
              uint8_t* mem = nullptr) {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [this] { return cmd_ == kNone; });
    cmd_ = type;
    cmd_q_ = q;
    cmd_index_ = index;
    cmd_fd_ = fd;
    cmd_spans_ = spans;
    cmd_mem_ = mem;
    cmd_done_ = false;
    cmd_pending_.store(true, std::memory_order_relaxed);  // ends a poll at once
    uint64_t one = 1;
    ssize_t w = write(ctl_, &one, sizeof one);
    (void)w;
    cv_.wait(l, [this] { return cmd_done_; });
    int r = cmd_result_;
    cmd_ = kNone;
    cmd_pending_.store(false, std::memory_order_relaxed);
    cv_.notify_all();
    return r;
  }

  std::mutex stats_mu_;

 private:
  void Close() {
    if (ep_ >= 0) close(ep_);
    if (ctl_ >= 0) close(ctl_);
    ep_ = ctl_ = -1;
  }

  void Loop() {
    epoll_event evs[64];
    for (;;) {
      int n = epoll_wait(ep_, evs, 64, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        return;  // cannot happen with a valid epoll fd
      }
      for (int i = 0; i < n; i++) {
        if (evs[i].data.u64 == kCtlKey) {
          uint64_t v;
          ssize_t r = read(ctl_, &v, sizeof v);
          (void)r;
          if (!RunCommand()) return;
          continue;
        }
        uint32_t idx = (uint32_t)evs[i].data.u64;
        Queue* q = idx < queues_.size() ? queues_[idx] : nullptr;
        if (!q) continue;  // removed in this round
        uint64_t v;
        ssize_t r = read(q->kick_fd, &v, sizeof v);  // readable: does not block
        (void)r;
        if (paused_) {
          q->kicked_while_paused = true;
          continue;
        }
        Serve(q);
      }
    }
  }

  // Returns false on kQuit.
  bool RunCommand() {
    std::unique_lock<std::mutex> l(mu_);
    if (cmd_ == kNone || cmd_done_) return true;
    int result = 0;
    bool go_on = true;
    Queue* q = cmd_q_;
    switch (cmd_) {
      case kSetMem:
        spans_ = *cmd_spans_;
        mem_ = cmd_mem_;
        break;
      case kAdd: {
        queues_[q->index] = q;
        epoll_event ev{};
        ev.events = EPOLLIN;
        ev.data.u64 = q->index;
        if (epoll_ctl(ep_, EPOLL_CTL_ADD, q->kick_fd, &ev) < 0) {
          result = -errno;
          queues_[q->index] = nullptr;
          break;
        }
        if (!q->dead && !RingsValid(q)) Break(q, "rings are not inside guest memory or are misaligned");
        // Serve what is already available, as if kicked (unless paused).
        l.unlock();
        if (paused_)
          q->kicked_while_paused = true;
        else
          Serve(q);
        l.lock();
        break;
      }
      case kRemove:
        epoll_ctl(ep_, EPOLL_CTL_DEL, q->kick_fd, nullptr);
        queues_[q->index] = nullptr;
        Detach(q);
        break;
      case kSetCall:
        if (q->call_fd >= 0) close(q->call_fd);
        q->call_fd = cmd_fd_;
        break;
      case kPause:
        paused_ = true;
        break;
      case kResume:
        paused_ = false;
        l.unlock();
        for (Queue* x : queues_)
          if (x && x->kicked_while_paused) {
            x->kicked_while_paused = false;
            Serve(x);
          }
        l.lock();
        break;
      case kQuit:
        for (Queue*& x : queues_)
          if (x) {
            epoll_ctl(ep_, EPOLL_CTL_DEL, x->kick_fd, nullptr);
            Detach(x);
            x = nullptr;
          }
        go_on = false;
        break;
      case kNone:
        break;
    }
    cmd_result_ = result;
    cmd_done_ = true;
    cv_.notify_all();
    return go_on;
  }

  // The queue leaves the worker: every batch already published its used
  // index; the position stays in q->pos; the dup'd fds are closed.
  void Detach(Queue* q) {
    q->pos.store((uint32_t)q->last_avail | ((uint32_t)q->published << 16));
    for (int* f : {&q->kick_fd, &q->call_fd, &q->fd}) {
      if (*f >= 0) close(*f);
      *f = -1;
    }
  }

  void Break(Queue* q, const std::string& why) {
    q->dead = true;
    {
      std::lock_guard<std::mutex> g(stats_mu_);
      q->why = "queue " + std::to_string(q->index) + ": " + why;
    }
    q->broken.store(true);
  }

  bool Contains(uint64_t addr, uint64_t len) const {
    if (len == 0) return false;
    for (const Span& s : spans_)
      if (addr >= s.start && addr < s.end && len <= s.end - addr) return true;
    return false;
  }

  bool RingsValid(Queue* q) const {
    uint64_t n = q->num;
    return n > 0 && (n & (n - 1)) == 0 && q->desc % 16 == 0 && q->avail % 2 == 0 && q->used % 4 == 0 &&
           Contains(q->desc, 16 * n) && Contains(q->avail, 6 + 2 * n) && Contains(q->used, 6 + 8 * n);
  }

  uint16_t Load16(uint64_t gpa, int order) const {
    return __atomic_load_n((const uint16_t*)(mem_ + gpa), order);
  }
  void Store16(uint64_t gpa, uint16_t v, int order) {
    __atomic_store_n((uint16_t*)(mem_ + gpa), v, order);
  }

  // Serves q until its avail ring is empty (or it breaks), one used-index
  // publication and at most one call per batch of at most `num` chains.
  static uint64_t Now() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
  }

  void Serve(Queue* q) {
    if (q->dead || paused_) return;
    uint64_t t0 = Now();
    ServeRing(q);
    q->busy_ns.fetch_add(Now() - t0, std::memory_order_relaxed);
  }

  void ServeRing(Queue* q) {
    uint32_t served = 0;
    for (;;) {
      uint32_t done = 0;
      q->batch++;
      if (q->batch == 0) {  // wrapped: old stamps could alias
        std::fill(q->stamp.begin(), q->stamp.end(), 0);
        q->batch = 1;
      }
      while (done < q->num) {
        int r = PopAndRun(q);
        if (r <= 0) break;
        done++;
      }
      Publish(q, done);
      served += done;
      if (q->dead) return;
      if (done >= q->num) continue;
      // Empty.  A driver with requests in flight adds more soon: look for them a
      // little while before asking for a kick, which costs the guest an exit
      // (QEMU's iothread polling, poll-max-ns).  Only after a batch of several:
      // at queue depth 1 nothing comes until the guest saw the completion.
      if (served > 1 && poll_ns_ > 0 && q->event_idx && Poll(q)) continue;
      if (!q->event_idx) return;
      // virtio 1.x 2.7.10: ask for the next kick, then look again, or a chain
      // added while we were asking goes unnoticed.
      Store16(q->used + 4 + 8 * (uint64_t)q->num, q->last_avail, __ATOMIC_RELAXED);
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      if (Load16(q->avail + 2, __ATOMIC_ACQUIRE) == q->last_avail) return;
    }
  }

  // Spins up to poll_ns_ for the avail index to move; true if it did.
  bool Poll(Queue* q) {
    uint64_t end = Now() + poll_ns_;
    do {
      for (int i = 0; i < 64; i++) {
        if (Load16(q->avail + 2, __ATOMIC_ACQUIRE) != q->last_avail) return true;
        __builtin_ia32_pause();
      }
    } while (Now() < end && !cmd_pending_.load(std::memory_order_relaxed));
    return false;
  }

  void Publish(Queue* q, uint32_t done) {
    if (done > 0) {
      uint16_t old = q->published, now = q->used_idx;
      Store16(q->used + 2, now, __ATOMIC_RELEASE);
      __atomic_thread_fence(__ATOMIC_SEQ_CST);  // 2.7.7: the flag/event read must not pass the store
      q->published = now;
      bool notify;
      if (q->event_idx) {
        uint16_t ev = Load16(q->avail + 4 + 2 * (uint64_t)q->num, __ATOMIC_RELAXED);
        notify = (uint16_t)(now - ev - 1) < (uint16_t)(now - old);  // vring_need_event
      } else {
        notify = !(Load16(q->avail, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
      }
      if (notify && q->call_fd >= 0) {
        uint64_t one = 1;
        ssize_t w;
        do w = write(q->call_fd, &one, sizeof one);
        while (w < 0 && errno == EINTR);
        q->calls.fetch_add(1, std::memory_order_relaxed);
      }
      q->batches.fetch_add(1, std::memory_order_relaxed);
    }
    q->pos.store((uint32_t)q->last_avail | ((uint32_t)q->published << 16), std::memory_order_release);
  }

  // 1: a chain was popped and completed; 0: ring empty; -1: the queue broke.
  int PopAndRun(Queue* q) {
    uint32_t n = q->num;
    uint16_t avail_idx = Load16(q->avail + 2, __ATOMIC_ACQUIRE);
    uint16_t count = (uint16_t)(avail_idx - q->last_avail);
    if (count == 0) return 0;
    if (count > n) {
      Break(q, "avail index moved by " + std::to_string(count) + ", more than the queue size " + std::to_string(n));
      return -1;
    }
    uint16_t head = Load16(q->avail + 4 + 2 * (uint64_t)(q->last_avail % n), __ATOMIC_RELAXED);
    if (head >= n) {
      Break(q, "head " + std::to_string(head) + " is beyond the queue size " + std::to_string(n));
      return -1;
    }
    // A head pushed in this batch is not yet visible to the driver as used.
    if (q->stamp[head] == q->batch) {
      Break(q, "head " + std::to_string(head) + " made available again while in flight");
      return -1;
    }
    std::string why;
    if (!Walk(q, head, &why)) {
      Break(q, why);
      return -1;
    }
    q->stamp[head] = q->batch;
    q->last_avail++;
    uint8_t status = Run(q);
    // Used element, published by the batch's single used->idx store.
    uint8_t* slot = mem_ + q->used + 4 + 8 * (uint64_t)(q->used_idx % n);
    uint32_t id = head, len = (uint32_t)e_.in_bytes;
    memcpy(slot, &id, 4);
    memcpy(slot + 4, &len, 4);
    q->used_idx++;
    q->requests.fetch_add(1, std::memory_order_relaxed);
    if (status != S_OK) q->errors.fetch_add(1, std::memory_order_relaxed);
    return 1;
  }

  // Reads the chain of `head` into e_; false (and *why) if the ring is broken.
  bool Walk(Queue* q, uint16_t head, std::string* why) {
    Elem& e = e_;
    e.Clear();
    uint64_t table = q->desc;
    uint32_t table_len = q->num, limit = q->num, i = head, count = 0;
    bool indirect = false;
    for (;;) {
      if (++count > limit) {
        *why = "descriptor chain of head " + std::to_string(head) + " is longer than its table (a loop?)";
        return false;
      }
      const uint8_t* d = mem_ + table + 16 * (uint64_t)i;
      uint64_t addr;
      uint32_t len;
      uint16_t flags, next;
      memcpy(&addr, d, 8);
      memcpy(&len, d + 8, 4);
      memcpy(&flags, d + 12, 2);
      memcpy(&next, d + 14, 2);
      if (flags & VRING_DESC_F_INDIRECT) {
        if (indirect) return *why = "nested indirect descriptor", false;
        if (count != 1) return *why = "indirect descriptor not at the head of its chain", false;
        if (flags & VRING_DESC_F_NEXT) return *why = "indirect descriptor with NEXT set", false;
        if (len == 0 || len % 16 != 0 || len / 16 > kMaxIndirect)
          return *why = "indirect table length " + std::to_string(len) + " is invalid", false;
        if (!Contains(addr, len)) return *why = "indirect table is not inside guest memory", false;
        table = addr;
        table_len = limit = len / 16;
        i = 0;
        count = 0;
        indirect = true;
        continue;
      }
      bool wr = (flags & VRING_DESC_F_WRITE) != 0;
      if (!wr && !e.in.empty()) {
        e.fault = true;  // device-readable after device-writable: fail the request
        return true;
      }
      if (len == 0 || !Contains(addr, len)) {
        e.fault = true;
      } else if (wr) {
        e.in.push_back({mem_ + addr, len});
        e.in_bytes += len;
      } else {
        e.out.push_back({mem_ + addr, len});
        e.out_bytes += len;
      }
      if (!(flags & VRING_DESC_F_NEXT)) return true;
      if (next >= table_len) {
        *why = "next index " + std::to_string(next) + " is beyond the table of " + std::to_string(table_len);
        return false;
      }
      i = next;
    }
  }

  // Copies `n` bytes from the device-readable buffers, starting `skip` bytes in.
  void CopyOut(uint8_t* dst, size_t skip, size_t n) {
    for (const iovec& v : e_.out) {
      if (n == 0) return;
      if (skip >= v.iov_len) {
        skip -= v.iov_len;
        continue;
      }
      size_t k = std::min(v.iov_len - skip, n);
      memcpy(dst, (uint8_t*)v.iov_base + skip, k);
      dst += k;
      n -= k;
      skip = 0;
    }
  }

  // data_ = device-readable bytes after the header (write) or device-writable
  // bytes before the status byte (read); returns their size.
  uint64_t Gather(bool write) {
    data_.clear();
    uint64_t bytes = 0;
    if (write) {
      size_t skip = 16;
      for (const iovec& v : e_.out) {
        if (skip >= v.iov_len) {
          skip -= v.iov_len;
          continue;
        }
        data_.push_back({(uint8_t*)v.iov_base + skip, v.iov_len - skip});
        bytes += v.iov_len - skip;
        skip = 0;
      }
    } else {
      size_t n = e_.in.size();
      for (size_t i = 0; i < n; i++) {
        size_t len = i == n - 1 ? e_.in[i].iov_len - 1 : e_.in[i].iov_len;
        if (len == 0) continue;
        data_.push_back({e_.in[i].iov_base, len});
        bytes += len;
      }
    }
    return bytes;
  }

  static bool InRange(const Queue* q, uint64_t sector, uint64_t count) {
    return sector <= q->capacity && count <= q->capacity - sector;
  }

  // Executes the request in e_; writes and returns its status.
  uint8_t Run(Queue* q) {
    if (e_.in.empty()) return S_IOERR;  // no status byte to write
    const iovec& last = e_.in.back();
    uint8_t* status_at = (uint8_t*)last.iov_base + last.iov_len - 1;
    uint8_t s = Request(q);
    *status_at = s;
    return s;
  }

  uint8_t Request(Queue* q) {
    if (e_.fault || e_.out_bytes < 16) return S_IOERR;
    uint8_t hdr[16];
    CopyOut(hdr, 0, 16);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    switch (type) {
      case T_IN:
      case T_OUT: {
        bool write = type == T_OUT;
        uint64_t bytes = Gather(write);
        if (bytes % kSector != 0 || !InRange(q, sector, bytes / kSector)) return S_IOERR;
        if (write && q->read_only) return S_IOERR;
        if (bytes == 0) return S_OK;
        if (RwFull(q->fd, data_.data(), data_.size(), sector * kSector, write) < 0) return S_IOERR;
        if (write) {
          q->bytes_written.fetch_add(bytes, std::memory_order_relaxed);
          if (!q->write_cache.load(std::memory_order_relaxed) && Fdatasync(q->fd) < 0) return S_IOERR;
        } else {
          q->bytes_read.fetch_add(bytes, std::memory_order_relaxed);
        }
        return S_OK;
      }
      case T_FLUSH:
        return Fdatasync(q->fd) < 0 ? S_IOERR : S_OK;
      case T_GET_ID: {
        Gather(false);
        uint32_t off = 0;
        for (const iovec& v : data_)
          for (size_t i = 0; i < v.iov_len && off < kIdBytes; i++, off++) ((uint8_t*)v.iov_base)[i] = q->serial[off];
        return S_OK;
      }
      case T_DISCARD:
      case T_WRITE_ZEROES:
        if (!(type == T_DISCARD ? q->discard : q->write_zeroes)) return S_UNSUPP;
        return DiscardOrZero(q, type == T_DISCARD);
      default:
        return S_UNSUPP;
    }
  }

  uint8_t DiscardOrZero(Queue* q, bool discard) {
    uint64_t n = Gather(true);
    if (n != 16) return n > 16 && n % 16 == 0 ? S_UNSUPP : S_IOERR;  // one segment at most
    uint8_t seg[16];
    CopyOut(seg, 16, 16);
    uint64_t sector;
    uint32_t count, flags;
    memcpy(&sector, seg, 8);
    memcpy(&count, seg + 8, 4);
    memcpy(&flags, seg + 12, 4);
    bool unmap = (flags & kWzUnmap) != 0;
    if ((flags & ~kWzUnmap) || (discard && unmap)) return S_UNSUPP;
    if (count > kMaxDiscardSectors || !InRange(q, sector, count) || q->read_only) return S_IOERR;
    if (count == 0) return S_OK;
    uint64_t off = sector * kSector, len = (uint64_t)count * kSector;
    int r;
    if (discard) {
      r = Fallocate(q->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, len);
      // Discard is advisory: a file system that cannot punch holes keeps the data.
      if (r == -EOPNOTSUPP) r = 0;
    } else {
      r = Fallocate(q->fd, unmap ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE : FALLOC_FL_ZERO_RANGE, off, len);
      if (r == -EOPNOTSUPP && unmap) r = Fallocate(q->fd, FALLOC_FL_ZERO_RANGE, off, len);
      if (r == -EOPNOTSUPP) r = WriteZeroes(q->fd, off, len);
    }
    if (r == 0 && !q->write_cache.load(std::memory_order_relaxed)) r = Fdatasync(q->fd);
    return r < 0 ? S_IOERR : S_OK;
  }

  int ctl_ = -1, ep_ = -1;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  CmdType cmd_ = kNone;
  Queue* cmd_q_ = nullptr;
  uint32_t cmd_index_ = 0;
  int cmd_fd_ = -1;
  const std::vector<Span>* cmd_spans_ = nullptr;
  uint8_t* cmd_mem_ = nullptr;
  bool cmd_done_ = false;
  int cmd_result_ = 0;
  std::atomic<bool> cmd_pending_{false};
  // How long an emptied ring is polled before asking for a kick ($SPINDLE_VHOST_POLL_NS).
  uint64_t poll_ns_ = PollNsFromEnv();

  static uint64_t PollNsFromEnv() {
    const char* v = getenv("SPINDLE_VHOST_POLL_NS");
    return v && *v ? strtoull(v, nullptr, 10) : 32000;
  }

  // Worker-thread state.
  std::vector<Queue*> queues_;
  std::vector<Span> spans_;
  uint8_t* mem_ = nullptr;
  bool paused_ = false;
  Elem e_;
  std::vector<iovec> data_;
};

int DupFd(int fd) { return fcntl(fd, F_DUPFD_CLOEXEC, 0); }

class VhostBlkWorker : public Napi::ObjectWrap<VhostBlkWorker> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "VhostBlkWorker",
                       {InstanceMethod<&VhostBlkWorker::SetMemory>("setMemory"),
                        InstanceMethod<&VhostBlkWorker::AddQueue>("addQueue"),
                        InstanceMethod<&VhostBlkWorker::RemoveQueue>("removeQueue"),
                        InstanceMethod<&VhostBlkWorker::SetCallFd>("setCallFd"),
                        InstanceMethod<&VhostBlkWorker::SetWriteCache>("setWriteCache"),
                        InstanceMethod<&VhostBlkWorker::Kick>("kick"),
                        InstanceMethod<&VhostBlkWorker::Pause>("pause"),
                        InstanceMethod<&VhostBlkWorker::Resume>("resume"),
                        InstanceMethod<&VhostBlkWorker::Stats>("stats"),
                        InstanceMethod<&VhostBlkWorker::Destroy>("destroy")});
  }

  VhostBlkWorker(const Napi::CallbackInfo& info) : Napi::ObjectWrap<VhostBlkWorker>(info) {
    Napi::Env env = info.Env();
    worker_.reset(new Worker());
    int r = worker_->Start();
    if (r < 0) {
      worker_.reset();
      Napi::Error e = Napi::Error::New(env, std::string("VhostBlkWorker: ") + strerror(-r));
      e.Set("errno", Napi::Number::New(env, r));
      e.ThrowAsJavaScriptException();
      return;
    }
    queues_.assign(kMaxQueues, nullptr);
    env_ = env;
    napi_add_env_cleanup_hook(env, OnEnvCleanup, this);
    hook_ = true;
  }

  ~VhostBlkWorker() override { Teardown(); }

 private:
  static void OnEnvCleanup(void* arg) {
    VhostBlkWorker* self = (VhostBlkWorker*)arg;
    self->hook_ = false;  // running: must not be removed
    self->Teardown();
  }

  void Teardown() {
    if (!worker_) return;
    worker_->Stop();
    worker_.reset();
    for (Queue*& q : queues_) {
      delete q;
      q = nullptr;
    }
    attached_ = 0;
    if (hook_) {
      napi_remove_env_cleanup_hook(env_, OnEnvCleanup, this);
      hook_ = false;
    }
    // memory_ (the layout reference) is released by the ObjectReference
    // destructor or by destroy(); never from an env cleanup hook.
  }

  Napi::Value Fail(Napi::Env env, const std::string& msg, bool range = false) {
    std::string m = "VhostBlkWorker: " + msg;
    if (range)
      Napi::RangeError::New(env, m).ThrowAsJavaScriptException();
    else
      Napi::Error::New(env, m).ThrowAsJavaScriptException();
    return env.Undefined();
  }

  static bool Int(const Napi::Value& v, double lo, double hi, double* out) {
    if (!v.IsNumber()) return false;
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= lo && d <= hi) || std::floor(d) != d) return false;
    *out = d;
    return true;
  }

  Queue* Lookup(const Napi::CallbackInfo& info) {
    double idx;
    if (!worker_) return Fail(info.Env(), "destroyed"), nullptr;
    if (!Int(info[0], 0, kMaxQueues - 1, &idx)) return Fail(info.Env(), "queue index out of range", true), nullptr;
    Queue* q = queues_[(uint32_t)idx];
    if (!q) return Fail(info.Env(), "queue " + std::to_string((uint32_t)idx) + " is not attached"), nullptr;
    return q;
  }

  // setMemory(layout: ArrayBuffer, spans: [start, end][])
  Napi::Value SetMemory(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!worker_) return Fail(env, "destroyed");
    if (attached_ > 0) return Fail(env, "setMemory while queues are attached");
    if (!info[0].IsArrayBuffer() || !info[1].IsArray()) return Fail(env, "setMemory(layout, spans)");
    Napi::ArrayBuffer ab = info[0].As<Napi::ArrayBuffer>();
    double size = (double)ab.ByteLength();
    Napi::Array arr = info[1].As<Napi::Array>();
    std::vector<Span> spans;
    for (uint32_t i = 0; i < arr.Length(); i++) {
      Napi::Value v = arr[i];
      if (!v.IsArray()) return Fail(env, "spans must be [start, end] pairs");
      Napi::Array p = v.As<Napi::Array>();
      double s, e;
      if (p.Length() != 2 || !Int(p[0u], 0, size, &s) || !Int(p[1u], 0, size, &e) || !(s < e))
        return Fail(env, "span " + std::to_string(i) + " is not inside the layout", true);
      spans.push_back({(uint64_t)s, (uint64_t)e});
    }
    if (size == 0 || ab.Data() == nullptr) spans.clear();
    worker_->Command(Worker::kSetMem, nullptr, 0, -1, &spans, (uint8_t*)ab.Data());
    memory_ = Napi::Persistent(Napi::Object(env, ab));  // keeps the mapping alive
    has_memory_ = !spans.empty();
    return env.Undefined();
  }

  // addQueue(index, {num, desc, avail, used, lastAvail, usedIdx, eventIdx, kickFd,
  //                  callFd, fd, capacitySectors, readOnly, serial, writeCache})
  Napi::Value AddQueue(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (!worker_) return Fail(env, "destroyed");
    double idx;
    if (!Int(info[0], 0, kMaxQueues - 1, &idx)) return Fail(env, "queue index out of range", true);
    if (queues_[(uint32_t)idx]) return Fail(env, "queue " + std::to_string((uint32_t)idx) + " is already attached");
    if (!has_memory_) return Fail(env, "addQueue before setMemory");
    if (!info[1].IsObject()) return Fail(env, "addQueue(index, options)");
    Napi::Object o = info[1].As<Napi::Object>();
    double num, desc, avail, used, last, uidx, kick, call, fd, cap;
    const double kMax = 9007199254740991.0;
    if (!Int(o.Get("num"), 1, kMaxQueueSize, &num) || ((uint32_t)num & ((uint32_t)num - 1)))
      return Fail(env, "num must be a power of 2 in [1, 32768]", true);
    if (!Int(o.Get("desc"), 0, kMax, &desc) || !Int(o.Get("avail"), 0, kMax, &avail) || !Int(o.Get("used"), 0, kMax, &used))
      return Fail(env, "desc/avail/used must be guest addresses", true);
    if (!Int(o.Get("lastAvail"), 0, 65535, &last) || !Int(o.Get("usedIdx"), 0, 65535, &uidx))
      return Fail(env, "lastAvail/usedIdx must be in [0, 65535]", true);
    if (!Int(o.Get("kickFd"), 0, INT_MAX, &kick) || !Int(o.Get("callFd"), -1, INT_MAX, &call) ||
        !Int(o.Get("fd"), 0, INT_MAX, &fd))
      return Fail(env, "kickFd/fd must be fds, callFd an fd or -1", true);
    if (!Int(o.Get("capacitySectors"), 0, kMax / kSector, &cap)) return Fail(env, "capacitySectors out of range", true);
    std::string serial = o.Get("serial").IsString() ? o.Get("serial").As<Napi::String>().Utf8Value() : "";
    if (serial.size() > kIdBytes) return Fail(env, "serial is longer than 20 bytes", true);

    Queue* q = new Queue();
    q->index = (uint32_t)idx;
    q->num = (uint32_t)num;
    q->desc = (uint64_t)desc;
    q->avail = (uint64_t)avail;
    q->used = (uint64_t)used;
    q->last_avail = (uint16_t)last;
    q->used_idx = q->published = (uint16_t)uidx;
    q->pos.store((uint32_t)q->last_avail | ((uint32_t)q->published << 16));
    q->event_idx = o.Get("eventIdx").ToBoolean();
    q->read_only = o.Get("readOnly").ToBoolean();
    q->discard = o.Get("discard").IsUndefined() || o.Get("discard").ToBoolean().Value();
    q->write_zeroes = o.Get("writeZeroes").IsUndefined() || o.Get("writeZeroes").ToBoolean().Value();
    q->write_cache.store(o.Get("writeCache").IsUndefined() ? true : o.Get("writeCache").ToBoolean().Value());
    q->capacity = (uint64_t)cap;
    memcpy(q->serial, serial.data(), serial.size());
    q->stamp.assign(q->num, 0);
    q->kick_fd = DupFd((int)kick);
    q->fd = q->kick_fd >= 0 ? DupFd((int)fd) : -1;
    q->call_fd = q->fd >= 0 && call >= 0 ? DupFd((int)call) : -1;
    if (q->kick_fd < 0 || q->fd < 0 || (call >= 0 && q->call_fd < 0)) {
      int e = errno;
      for (int f : {q->kick_fd, q->fd, q->call_fd})
        if (f >= 0) close(f);
      delete q;
      return Fail(env, std::string("addQueue: dup: ") + strerror(e));
    }
    int r = worker_->Command(Worker::kAdd, q, q->index, -1);
    if (r < 0) {
      for (int f : {q->kick_fd, q->fd, q->call_fd})
        if (f >= 0) close(f);
      delete q;
      return Fail(env, std::string("addQueue: epoll: ") + strerror(-r));
    }
    queues_[q->index] = q;
    attached_++;
    return env.Undefined();
  }

  Napi::Object StatsOf(Napi::Env env, Queue* q) {
    Napi::Object o = Napi::Object::New(env);
    uint32_t pos = q->pos.load(std::memory_order_acquire);
    o.Set("lastAvail", (double)(pos & 0xffff));
    o.Set("usedIdx", (double)(pos >> 16));
    o.Set("requests", (double)q->requests.load());
    o.Set("bytesRead", (double)q->bytes_read.load());
    o.Set("bytesWritten", (double)q->bytes_written.load());
    o.Set("errors", (double)q->errors.load());
    o.Set("calls", (double)q->calls.load());
    o.Set("batches", (double)q->batches.load());
    o.Set("busyNs", (double)q->busy_ns.load());
    if (q->broken.load()) {
      std::lock_guard<std::mutex> g(worker_->stats_mu_);
      o.Set("broken", q->why);
    } else {
      o.Set("broken", env.Null());
    }
    return o;
  }

  Napi::Value RemoveQueue(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    worker_->Command(Worker::kRemove, q, q->index, -1);
    Napi::Object o = StatsOf(info.Env(), q);
    queues_[q->index] = nullptr;
    attached_--;
    delete q;
    return o;
  }

  Napi::Value SetCallFd(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Queue* q = Lookup(info);
    if (!q) return env.Undefined();
    double fd;
    if (!Int(info[1], -1, INT_MAX, &fd)) return Fail(env, "setCallFd(index, fd | -1)", true);
    int dup = -1;
    if (fd >= 0 && (dup = DupFd((int)fd)) < 0) return Fail(env, std::string("setCallFd: dup: ") + strerror(errno));
    worker_->Command(Worker::kSetCall, q, q->index, dup);
    return env.Undefined();
  }

  Napi::Value SetWriteCache(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    q->write_cache.store(info[1].ToBoolean().Value());
    return info.Env().Undefined();
  }

  // kick(index): as if the driver kicked (the worker's dup of the kick fd).
  Napi::Value Kick(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    uint64_t one = 1;
    ssize_t w = write(q->kick_fd, &one, sizeof one);
    (void)w;
    return info.Env().Undefined();
  }

  Napi::Value Pause(const Napi::CallbackInfo& info) {
    if (!worker_) return Fail(info.Env(), "destroyed");
    worker_->Command(Worker::kPause, nullptr, 0, -1);
    return info.Env().Undefined();
  }

  Napi::Value Resume(const Napi::CallbackInfo& info) {
    if (!worker_) return Fail(info.Env(), "destroyed");
    worker_->Command(Worker::kResume, nullptr, 0, -1);
    return info.Env().Undefined();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Queue* q = Lookup(info);
    if (!q) return info.Env().Undefined();
    return StatsOf(info.Env(), q);
  }

  // destroy(): stops and joins the thread, closes every dup'd fd. Idempotent.
  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Teardown();
    memory_.Reset();
    has_memory_ = false;
    return info.Env().Undefined();
  }

  std::unique_ptr<Worker> worker_;
  std::vector<Queue*> queues_;  // JS-thread view: attached queues (owned here)
  uint32_t attached_ = 0;
  Napi::ObjectReference memory_;
  bool has_memory_ = false;
  napi_env env_ = nullptr;
  bool hook_ = false;
};

}  // namespace

void InitVhostBlk(Napi::Env env, Napi::Object exports) {
  exports.Set("VhostBlkWorker", VhostBlkWorker::Define(env));
}

}  // namespace spindle
