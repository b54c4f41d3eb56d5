// VhostBlkWorker: the native fast path of the vhost-user-blk export.  One
// native thread (an iothread) serves split virtqueues end to end: it pops
// chains from the avail ring, reads the request header, preadv/pwritev's
// directly between the image file and guest memory, writes the status byte,
// pushes the used element, publishes the used index once per batch and
// signals the call eventfd — no JavaScript.
//
// Two kinds of queue:
// - raw (no map): guest offset == file offset; every request is served here.
// - mapped (a ClusterMap, map.h; e.g. qcow2): JavaScript fills a table of
//   guest cluster -> host offset (+ writable).  A read whose clusters are all
//   mapped (a write: mapped writable) is served here, split into runs of
//   host-contiguous clusters; every other read/write, and every flush,
//   discard and write-zeroes (the format has metadata to flush or clusters
//   to free), is *forwarded*: its head goes into a shared-memory forward ring
//   and an eventfd tells JavaScript, which executes it (guest data and status
//   byte included) and hands back (head, used len) through a completion ring
//   plus an eventfd.  The worker pushes those used elements itself, so it
//   stays the only writer of the used ring while the queue is attached.
//   Request checks that end in a status without touching the image (faults,
//   bounds, read-only, zero length, GET_ID, unknown types) stay native.
//   Forward ring layout (Int32 slots holding u32, free-running counters):
//   [0] fwdProd (worker) [1] fwdCons (JS) [2] cplProd (JS) [3] cplCons
//   (worker) [4..15] reserved, [16 + i % num] forwarded heads, [16 + num +
//   2 * (i % num)] (head, len) completions.  A forwarded head stays "in
//   flight" until its completion; the driver making it available again, or a
//   completion for a head not in flight, breaks the queue.  The map is read
//   without locks; after map.invalidate JS calls barrier(), which returns once
//   every request that looked at the old entries has finished its I/O.
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
// microseconds).  The worker runs commands only between requests: a pending
// command ends the batch in progress (published first) and the queue is
// served again after it (Queue::resched), so pause(), removeQueue() and
// barrier() are prompt under load and never see a request half done.  While
// paused nothing new is popped, but completions of forwarded requests are
// still pushed.  Counters are atomics the JS thread may read at any time.
//
// I/O is synchronous preadv/pwritev/fdatasync/fallocate on the worker thread.
// That is right for the common case (the image is page-cached: a 4 KiB copy
// costs ~1 us and an async submission would cost as much), but a cache miss
// or a slow fdatasync stalls every queue of this worker.  The replacement is
// an io_uring per worker (uring.cc's raw-syscall ring) with the chain kept as
// in flight until its CQE, and the pool fallback where io_uring is missing.
//
// Not done here (the TS path must serve the device instead): dirty-page
// logging (VHOST_F_LOG_ALL, migration), packed rings.
//
// Files: worker.h (this: shared types and the Worker class), worker.cc (the
// thread, its epoll loop and commands), ring.cc (serving the split rings),
// request.cc (executing virtio-blk requests), forward.cc (mapped I/O, the
// forward and completion rings), map.h/map.cc (the cluster map and its JS
// class), napi.cc (the worker's JS class).
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "map.h"

namespace spindle {
namespace vhostblk {

constexpr uint32_t kMaxQueues = 1024;
constexpr uint32_t kMaxQueueSize = 32768;  // split ring limit
constexpr uint32_t kSector = 512;
constexpr uint32_t kIdBytes = 20;

enum : uint8_t { S_OK = 0, S_IOERR = 1, S_UNSUPP = 2 };
// Request()'s answer for "JavaScript executes this one": no status byte written.
constexpr uint8_t kForward = 0xff;

// Forward ring slots (Int32Array indices; see the header comment).
enum : uint32_t { kFwdProd = 0, kFwdCons = 1, kCplProd = 2, kCplCons = 3, kFwdEntries = 16 };

struct Span {
  uint64_t start, end;
};

// One attached queue.  Created and deleted by the JS thread; between addQueue
// and removeQueue only the worker touches the non-atomic ring state.
struct Queue {
  uint32_t index = 0;
  // Its guest's memory: the layout (GPA = offset) and the mapped spans.  Queues
  // of different guests (sessions) may share a worker (an iothread).
  uint8_t* mem = nullptr;
  std::vector<Span> spans;
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
  // The node may free blocks (discard=unmap): else discard does nothing and
  // write-zeroes keeps the blocks allocated, as the block layer does.
  bool unmap = true;
  uint8_t serial[kIdBytes] = {};
  bool dead = false;  // worker-side copy of `broken`
  // Serve again when possible: kicked while paused, or a batch cut short by a command.
  bool resched = false;
  std::vector<uint32_t> stamp;  // per head: batch in which it was popped
  uint32_t batch = 0;

  // Mapped queues: guest -> host through the map; what it cannot serve is forwarded.
  std::shared_ptr<ClusterMap> map;
  uint32_t* fring = nullptr;  // the forward/completion ring (JS memory, kept alive by napi.cc)
  int notify_fd = -1, complete_fd = -1;
  uint32_t fwd_prod = 0, cpl_cons = 0;  // worker-owned counters (also stored in fring)
  bool fwd_batch = false;  // forwarded something in the batch in progress
  std::vector<uint8_t> fwd_inflight;  // per head: forwarded, completion not yet seen

  std::atomic<bool> write_cache{true};
  std::atomic<bool> broken{false};
  std::string why;  // guarded by Worker::stats_mu_
  std::atomic<uint64_t> requests{0}, bytes_read{0}, bytes_written{0}, errors{0}, calls{0}, batches{0};
  std::atomic<uint64_t> busy_ns{0};  // time spent in Serve (worker-side cost)
  std::atomic<uint64_t> forwarded{0};
  std::atomic<uint32_t> in_forward{0};
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

class Worker {
 public:
  enum CmdType { kNone, kAdd, kRemove, kSetCall, kSetCapacity, kPause, kResume, kBarrier, kQuit };

  // Returns 0 or -errno.
  int Start();
  // Stops the thread (after the batch in progress); closes every queue's fds.
  // The JS side deletes the Queue objects.
  void Stop();
  // Executes a command on the worker thread; blocks until it is done.
  int Command(CmdType type, Queue* q, uint32_t index, int fd, uint64_t arg = 0);

  std::mutex stats_mu_;
  // The thread's kernel id once it runs (query-iothreads' thread-id), else 0.
  std::atomic<int> tid_{0};

 private:
  // worker.cc: the thread and its commands.
  void Close();
  void Loop();
  bool RunCommand();
  bool Execute();
  void ServeRescheduled();
  void Detach(Queue* q);
  void Break(Queue* q, const std::string& why);
  static uint64_t PollNsFromEnv();

  // ring.cc: bounds, ring access, batches, chain walking.
  bool Contains(uint64_t addr, uint64_t len) const;
  bool RingsValid(Queue* q) const;
  uint16_t Load16(uint64_t gpa, int order) const;
  void Store16(uint64_t gpa, uint16_t v, int order);
  static uint64_t Now();
  void Serve(Queue* q);
  void ServeRing(Queue* q);
  bool Poll(Queue* q);
  void Publish(Queue* q);
  void PushUsed(Queue* q, uint32_t head, uint32_t len);
  int PopAndRun(Queue* q);
  bool Walk(Queue* q, uint16_t head, std::string* why);

  // request.cc: the virtio-blk request in e_.
  void CopyOut(uint8_t* dst, size_t skip, size_t n);
  uint64_t Gather(bool write);
  static bool InRange(const Queue* q, uint64_t sector, uint64_t count);
  uint8_t Run(Queue* q);
  uint8_t Request(Queue* q);
  uint8_t DiscardOrZero(Queue* q, bool discard);

  // forward.cc: mapped queues.
  uint8_t MappedRw(Queue* q, uint64_t off, uint64_t bytes, bool write);
  bool Forward(Queue* q, uint16_t head);
  void EndForwardBatch(Queue* q);
  bool CompletionsPending(const Queue* q) const;
  void TakeCompletions(Queue* q);
  void Complete(Queue* q);

  int ctl_ = -1, ep_ = -1;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  CmdType cmd_ = kNone;
  Queue* cmd_q_ = nullptr;
  uint32_t cmd_index_ = 0;
  int cmd_fd_ = -1;
  uint64_t cmd_arg_ = 0;
  bool cmd_done_ = false;
  int cmd_result_ = 0;
  std::atomic<bool> cmd_pending_{false};
  // How long an emptied ring is polled before asking for a kick ($SPINDLE_VHOST_POLL_NS).
  uint64_t poll_ns_ = PollNsFromEnv();

  // Worker-thread state.
  std::vector<Queue*> queues_;
  // The memory of the queue being served (set by Serve and at attach).
  const std::vector<Span>* spans_ = nullptr;
  uint8_t* mem_ = nullptr;
  bool paused_ = false;
  Elem e_;
  std::vector<iovec> data_;
  // MappedRw's scratch (reused, no allocation per request): host runs, one run's iov.
  struct HostRun {
    uint64_t host, len;
  };
  std::vector<HostRun> runs_;
  std::vector<iovec> slice_;
};

}  // namespace vhostblk
}  // namespace spindle
