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
// barrier() are prompt under load and never see a request half done (those
// with I/O on the ring are waited for, see below).  While paused nothing new
// is popped, but completions of forwarded requests are still pushed.
// Counters are atomics the JS thread may read at any time.
//
// I/O: $SPINDLE_VHOST_IO (read at worker start) picks the policy.
// - auto (default): a read first tries preadv2(RWF_NOWAIT) inline, so a
//   page-cache hit costs what a plain preadv does; what would block (EAGAIN,
//   or a short count that is not EOF) goes to the worker's io_uring (aio.cc)
//   as READV of the rest.  Writes likewise with pwritev2(RWF_NOWAIT); where
//   the file system refuses NOWAIT for buffered writes (ext4: EOPNOTSUPP,
//   remembered per queue) they are done inline, as before: the copy costs
//   less than io-wq's hand-off.  O_DIRECT files skip the inline try.  Every
//   fdatasync (flush, and write-through after a write when the write cache
//   is off) is an FSYNC(DATASYNC) SQE; only write-through with data on the
//   ring orders it after them (IO_DRAIN).
// - async: everything above goes to the ring, no inline try (tests use it).
// - where io_uring_setup is refused (ENOSYS, EPERM under seccomp), or with
//   $SPINDLE_VHOST_RING=threads, a pool of threads (pool_ring.h) takes the
//   same SQEs: QEMU's aio=threads.
// - sync: synchronous preadv/pwritev/fdatasync on this thread.
// Discard and write-zeroes (fallocate) stay synchronous.  A request with
// I/O on the ring keeps what it needs in its head's slot (Queue::aio,
// preallocated: no allocation per request) and stays in flight (a head the
// driver makes available again breaks the queue) until its last CQE: then its
// status byte is written, the used element pushed, and the queue published
// once per round of CQEs.  CQEs are reaped when the ring's eventfd wakes the
// epoll loop, at each batch start and after each Serve.  Commands that need
// "no request doing I/O" (pause, barrier, quit: none at all; removeQueue,
// setCapacity: none on that queue) first wait for the ring's requests,
// completing them meanwhile; the JS thread blocks for that long.  At most
// cq_entries SQEs are in flight: beyond, the worker waits for completions
// (backpressure); a request that alone needs more is done synchronously.
// IO_DRAIN is ring-wide, so it is kept to that rare case: it would hold
// back later SQEs of every queue of this worker.
//
// Inflight tracking (vhost-user INFLIGHT_SHMFD): with a record (Queue::ilog,
// the queue's region of the buffer the front-end keeps), a popped head is
// stamped and flagged before it runs, a pushed one linked into the batch the
// next Publish stores, and the batch unflagged after the used index store
// (src/export/vhost-user/inflight.ts has the layout and the recovery).  Heads
// a dead back-end left in flight (Queue::resubmit) are served before the
// avail ring.
//
// Not done here (the TS path must serve the device instead): dirty-page
// logging (VHOST_F_LOG_ALL, migration), packed rings.
//
// Files: worker.h (this: shared types and the Worker class), worker.cc (the
// thread, its epoll loop and commands), ring.cc (serving the split rings),
// coalesce.cc (holding calls: interrupt coalescing), request.cc (executing virtio-blk requests), forward.cc (mapped I/O, the
// forward and completion rings), aio.cc (requests on the io_uring),
// iouring.h/iouring.cc (the ring itself), pool_ring.h/.cc (its thread-pool
// stand-in), io.h (the synchronous helpers),
// map.h/map.cc (the cluster map and its JS class), napi.cc (the worker's JS
// class).
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

#include "iouring.h"
#include "pool_ring.h"
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
// Request()'s answer for "its I/O is on the io_uring": the last CQE completes it.
constexpr uint8_t kAsync = 0xfe;
// Queue::inflight values: why a popped head has no used element yet.
enum : uint8_t { kInFwd = 1, kInAio = 2 };

enum class IoMode : uint8_t { kSync, kAsync, kAuto };
// epoll data: the control eventfd, the io_uring's eventfd, a queue's index
// for its kick fd, | kCplBit for its completion eventfd.
constexpr uint64_t kCtlKey = ~(uint64_t)0;
constexpr uint64_t kAioKey = ~(uint64_t)1;
constexpr uint64_t kCplBit = (uint64_t)1 << 32;

// Forward ring slots (Int32Array indices; see the header comment).
enum : uint32_t { kFwdProd = 0, kFwdCons = 1, kCplProd = 2, kCplCons = 3, kFwdEntries = 16 };

// The inflight record's layout (one queue's region; see Queue::ilog).
enum : uint32_t {
  kLogLastBatch = 12, kLogUsedIdx = 14, kLogHeader = 16, kLogDesc = 16,  // header; entry size
  kLogInflight = 0, kLogNext = 6, kLogCounter = 8,                       // within an entry
};

struct Span {
  uint64_t start, end;
};

// One SQE of an async request: a READV/WRITEV of iov[first, +count) at off
// (bytes left to transfer), or the FSYNC.
struct AioPart {
  uint64_t off, bytes;
  uint32_t first, count;
  bool fsync;
};

// A request whose I/O is on the ring (Queue::aio[head]).  Vectors keep their
// capacity from request to request: after warm-up nothing is allocated.
struct AioSlot {
  uint8_t* status = nullptr;
  uint32_t len = 0;      // used length
  uint32_t pending = 0;  // parts whose CQE has not arrived
  uint64_t bytes = 0;    // data bytes, counted at completion
  bool write = false;
  bool data_err = false, sync_err = false;
  bool resync = false;  // a write part was resubmitted after its FSYNC was queued
  std::vector<iovec> iov;  // own copy: e_ and data_ are reused by the next request
  std::vector<AioPart> parts;
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
  // Interrupt coalescing (ring.cc): a call owed to the driver, held or not;
  // when the hold began, how many batches joined it, how many more holds
  // may find none before holding stops, the probes' cadence, the driver's
  // recent gap between chains.
  bool call_owed = false, held = false;
  uint8_t hold_trust = 0;
  uint16_t hold_probe = 0, probe_every = 64;  // calls since the last probe; ring.cc kProbeFirst
  uint32_t hold_gain = 0;
  uint64_t owed_since = 0, gap_ns = 0;
  int kick_fd = -1, call_fd = -1, err_fd = -1, fd = -1;
  uint64_t capacity = 0;  // sectors
  uint64_t block_mask = 0;  // logical block size in sectors, less one: requests start and end on it
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
  std::vector<uint8_t> inflight;  // per head: kInFwd (forwarded), kInAio (on the ring), or 0

  // vhost-user inflight tracking (src/export/vhost-user/inflight.ts has the
  // layout and the order of the steps), or null.  JS memory, kept alive by napi.cc.
  uint8_t* ilog = nullptr;
  uint64_t icounter = 0;                // the next taken chain's counter
  std::vector<uint16_t> resubmit;       // left in flight by a previous back-end: popped first
  size_t resubmit_at = 0;
  std::vector<uint16_t> ibatch;         // heads pushed since the last Publish

  // Requests on the io_uring (worker-owned; aio.cc).
  std::vector<AioSlot> aio;  // per head, sized at attach when the worker has a ring
  uint32_t aio_inflight = 0;
  bool aio_touched = false;  // pushed used elements not yet published (Reap)
  bool direct = false;       // O_DIRECT fd: no inline NOWAIT try
  bool nowait_read = true, nowait_write = true;  // cleared on EOPNOTSUPP

  std::atomic<bool> write_cache{true};
  std::atomic<bool> broken{false};
  std::string why;  // guarded by Worker::stats_mu_
  std::atomic<uint64_t> requests{0}, bytes_read{0}, bytes_written{0}, errors{0}, calls{0}, batches{0}, kicks{0};
  std::atomic<uint64_t> holds{0}, holds_joined{0};  // held calls; those a later batch joined
  std::atomic<uint64_t> busy_ns{0};  // time spent in Serve (worker-side cost)
  std::atomic<uint64_t> forwarded{0};
  std::atomic<uint32_t> in_forward{0};
  std::atomic<uint64_t> async_requests{0};  // served requests whose I/O went (partly) to the ring
  std::atomic<uint32_t> in_async{0};
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

// Sizes a new queue's Queue::aio (JS thread, before kAdd, if the worker has a ring).
void AllocAioSlots(Queue* q);

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
  // The effective I/O policy (sync if io_uring could not be set up); fixed by Start.
  IoMode io_mode() const { return io_mode_; }
  // What does the asynchronous I/O: "io_uring", "threads", or "sync" (none).
  const char* io_engine() const { return ring_ ? ring_->name() : "sync"; }

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
  static uint64_t EnvNs(const char* name, uint64_t dflt);
  static IoMode IoModeFromEnv();

  // ring.cc: bounds, ring access, batches, chain walking.
  bool Contains(uint64_t addr, uint64_t len) const;
  bool RingsValid(Queue* q) const;
  uint16_t Load16(uint64_t gpa, int order) const;
  void Store16(uint64_t gpa, uint16_t v, int order);
  static uint64_t Now();
  void Serve(Queue* q);
  void ServeRing(Queue* q);
  bool WorkArrived(Queue* q) const;
  bool Poll(Queue* q);
  void Publish(Queue* q, bool may_hold = false);
  void PushUsed(Queue* q, uint32_t head, uint32_t len);
  static void LogTaken(Queue* q, uint16_t head);
  static void LogPublished(Queue* q, uint16_t used_idx);
  int PopAndRun(Queue* q);
  bool Walk(Queue* q, uint16_t head, std::string* why);

  // coalesce.cc: holding a call while the driver keeps adding chains.
  bool WantHold(Queue* q);
  bool Linger(Queue* q, uint64_t since);
  bool OthersWaiting(const Queue* q);
  void Call(Queue* q);

  // request.cc: the virtio-blk request in e_.
  void CopyOut(uint8_t* dst, size_t skip, size_t n);
  uint64_t Gather(bool write);
  static bool InRange(const Queue* q, uint64_t sector, uint64_t count);
  uint8_t* StatusAt() const;
  uint8_t Run(Queue* q, uint16_t head);
  uint8_t Request(Queue* q, uint16_t head);
  uint8_t DiscardOrZero(Queue* q, bool discard);
  bool MapRuns(Queue* q, uint64_t off, uint64_t bytes, bool write);
  int MappedSync(Queue* q, bool write);

  // aio.cc: requests on the io_uring.
  int StartAio();
  uint8_t ReadWrite(Queue* q, uint16_t head, uint64_t off, uint64_t bytes, bool write);
  uint8_t FlushAsync(Queue* q, uint16_t head);
  int TryInline(Queue* q, iovec** iov, size_t* cnt, uint64_t* off, bool write);
  void AddParts(AioSlot& s, const iovec* iov, size_t cnt, uint64_t off);
  uint8_t SubmitSlot(Queue* q, uint16_t head, AioSlot& s);
  void PrepPart(Queue* q, uint16_t head, uint32_t k);
  void ReapAio();
  void OnCqe(uint64_t key, int32_t res);
  void FinishAio(Queue* q, uint16_t head);
  void DrainAio(Queue* q);

  // forward.cc: mapped queues.
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
  // Interrupt coalescing (ring.cc): the longest a held call waits for the
  // driver's next chain ($SPINDLE_VHOST_COALESCE_NS, 0: never held), and the
  // longest it is held in all.
  uint64_t coalesce_ns_ = EnvNs("SPINDLE_VHOST_COALESCE_NS", 100000);
  uint64_t coalesce_max_ns_ = 8 * coalesce_ns_;
  // $SPINDLE_VHOST_IO, then sync if the ring cannot be set up.
  IoMode io_mode_ = IoMode::kSync;
  std::unique_ptr<IoRing> ring_;  // io_uring, else a thread pool; null: synchronous I/O

  // Worker-thread state.
  std::vector<Queue*> queues_;
  // The memory of the queue being served (set by Serve and at attach).
  const std::vector<Span>* spans_ = nullptr;
  uint8_t* mem_ = nullptr;
  bool paused_ = false;
  // The queue whose batch is in progress: its used elements are published at
  // the batch end, not by ReapAio (a head pushed in a batch is not yet
  // visible to the driver, which PopAndRun's reuse check relies on).
  Queue* serving_ = nullptr;
  uint32_t aio_reqs_ = 0, aio_sqes_ = 0;  // requests / SQEs on the ring
  std::vector<Queue*> touched_;           // ReapAio: queues to publish
  Elem e_;
  std::vector<iovec> data_;
  // MapRuns' scratch (reused, no allocation per request): host runs, one run's iov.
  struct HostRun {
    uint64_t host, len;
  };
  std::vector<HostRun> runs_;
  std::vector<iovec> slice_;
};

}  // namespace vhostblk
}  // namespace spindle
