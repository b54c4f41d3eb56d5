// Requests whose I/O goes to the worker's io_uring (see the I/O note in
// worker.h): the RWF_NOWAIT inline try, the per-head slots, submission with
// backpressure, CQE handling (short transfers, EOF, errors), completion and
// publication, and the wait commands do for what is in flight.
#include <fcntl.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "io.h"
#include "worker.h"

#ifndef RWF_NOWAIT
#define RWF_NOWAIT 0x00000008  // linux/fs.h, 4.14
#endif

namespace spindle {
namespace vhostblk {

namespace {
// SQEs per io_uring_enter (a batch submits once; a fuller SQ is submitted
// early), and CQ room = how many SQEs may be in flight.  The small pair is
// for kernels that charge rings to a small RLIMIT_MEMLOCK (before 5.12).
constexpr unsigned kSqEntries = 256, kCqEntries = 4096, kSqSmall = 32, kCqSmall = 256;
// The thread pool: threads, and SQEs in flight (QEMU's pool grows to 64 threads).
constexpr unsigned kPoolThreads = 8, kPoolDepth = 256;

// user_data: queue index (< 1024) << 48 | head (< 32768) << 32 | part.
uint64_t Key(uint32_t queue, uint16_t head, uint32_t part) {
  return (uint64_t)queue << 48 | (uint64_t)head << 32 | part;
}
}  // namespace

IoMode Worker::IoModeFromEnv() {
  const char* v = getenv("SPINDLE_VHOST_IO");
  if (v && strcmp(v, "sync") == 0) return IoMode::kSync;
  if (v && strcmp(v, "async") == 0) return IoMode::kAsync;
  return IoMode::kAuto;
}

// Start's part: the ring, its eventfd in the epoll set.  If the kernel
// refuses io_uring (ENOSYS, EPERM under seccomp...), a thread pool; if even
// that fails, synchronous I/O.  0 or -errno (epoll failed).
int Worker::StartAio() {
  io_mode_ = IoModeFromEnv();
  if (io_mode_ == IoMode::kSync) return 0;
  std::unique_ptr<IoRing> r;
  const char* force = getenv("SPINDLE_VHOST_RING");
  if (!(force && strcmp(force, "threads") == 0)) {
    std::unique_ptr<Uring> u(new Uring());
    if (u->Open(kSqEntries, kCqEntries) == 0 || u->Open(kSqSmall, kCqSmall) == 0) r = std::move(u);
  }
  if (!r) {
    std::unique_ptr<PoolRing> p(new PoolRing());
    if (p->Open(kPoolThreads, kSqEntries, kPoolDepth) == 0) r = std::move(p);
  }
  if (!r) {
    io_mode_ = IoMode::kSync;
    return 0;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kAioKey;
  if (epoll_ctl(ep_, EPOLL_CTL_ADD, r->event_fd(), &ev) < 0) return -errno;
  ring_ = std::move(r);
  touched_.reserve(kMaxQueues);
  return 0;
}

// A new queue's slots (JS thread, before kAdd).  The small reservations keep
// the common request (a few segments, one run) from allocating even once.
void AllocAioSlots(Queue* q) {
  q->aio.resize(q->num);
  for (AioSlot& s : q->aio) {
    s.iov.reserve(8);
    s.parts.reserve(2);
  }
  int fl = fcntl(q->fd, F_GETFL);
  q->direct = fl >= 0 && (fl & O_DIRECT) != 0;  // NOWAIT would still wait for the device
}

// The transfer with RWF_NOWAIT, on this thread.  Advances (*iov, *cnt, *off)
// past what was done.  0: all done (a read that met EOF zero-filled the
// rest); 1: the rest would block (or NOWAIT is unsupported): submit it;
// -errno: failed.
int Worker::TryInline(Queue* q, iovec** iov, size_t* cnt, uint64_t* off, bool write) {
  while (*cnt > 0) {
    int n = *cnt > (size_t)IOV_MAX ? IOV_MAX : (int)*cnt;
    ssize_t r = write ? pwritev2(q->fd, *iov, n, (off_t)*off, RWF_NOWAIT)
                      : preadv2(q->fd, *iov, n, (off_t)*off, RWF_NOWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return 1;
      if (errno == EOPNOTSUPP) {  // e.g. ext4 buffered writes: not worth asking again
        (write ? q->nowait_write : q->nowait_read) = false;
        return 1;
      }
      return -errno;
    }
    if (r == 0) {
      if (write) return 1;  // no progress: the ring tries (and reports) it
      ZeroIov(*iov, *cnt);  // EOF: zeroes, as RwFull
      *cnt = 0;
      return 0;
    }
    *off += (uint64_t)r;
    AdvanceIov(iov, cnt, (size_t)r);  // a short count: try the rest (EOF answers 0)
  }
  return 0;
}

// Copies [iov, +cnt) into the slot as READV/WRITEV parts of at most IOV_MAX
// segments, the first at `off`.
void Worker::AddParts(AioSlot& s, const iovec* iov, size_t cnt, uint64_t off) {
  while (cnt > 0) {
    AioPart p{off, 0, (uint32_t)s.iov.size(), 0, false};
    for (; cnt > 0 && p.count < (uint32_t)IOV_MAX; iov++, cnt--) {
      if (iov->iov_len == 0) continue;
      s.iov.push_back(*iov);
      p.count++;
      p.bytes += iov->iov_len;
    }
    if (p.count == 0) return;
    off += p.bytes;
    s.parts.push_back(p);
  }
}

// A read/write of `bytes` in data_ at [off, ...) (a mapped queue: through
// runs_).  Returns its status if done here, or kAsync.
uint8_t Worker::ReadWrite(Queue* q, uint16_t head, uint64_t off, uint64_t bytes, bool write) {
  AioSlot& s = q->aio[head];  // empty while not in flight
  bool try_inline = io_mode_ == IoMode::kAuto && !q->direct;
  int err = 0;
  auto transfer = [&](iovec* iov, size_t cnt, uint64_t at) {
    if (try_inline) {
      if (write ? q->nowait_write : q->nowait_read) {
        int r = TryInline(q, &iov, &cnt, &at, write);
        if (r <= 0) {
          err = r;
          return;
        }
      }
      // No NOWAIT for buffered writes (ext4): a page-cache write is a copy, and
      // io_uring's hand-off to its io-wq threads cost more than it saved
      // (cached 4 KiB writes at depth 32: 0.17M -> 0.09M req/s).
      if (write && !q->nowait_write) {
        err = RwFull(q->fd, iov, cnt, at, true);
        return;
      }
    }
    AddParts(s, iov, cnt, at);
  };
  if (!q->map) {
    transfer(data_.data(), data_.size(), off);
  } else {
    size_t i = 0, skip = 0;  // cursor in data_, which holds exactly the runs' bytes
    for (const HostRun& r : runs_) {
      slice_.clear();
      SliceIov(data_, &i, &skip, r.len, &slice_);
      transfer(slice_.data(), slice_.size(), r.host);
      if (err) break;
    }
  }
  // Nothing is submitted yet, so a failure drops the parts collected so far.
  if (err) {
    s.iov.clear();
    s.parts.clear();
    return S_IOERR;
  }
  bool write_through = write && !q->write_cache.load(std::memory_order_relaxed);
  if (s.parts.empty() && !write_through) {  // all done inline: the cheap, common case
    (write ? q->bytes_written : q->bytes_read).fetch_add(bytes, std::memory_order_relaxed);
    return S_OK;
  }
  if (write_through) s.parts.push_back({0, 0, 0, 0, true});
  s.write = write;
  s.bytes = bytes;
  return SubmitSlot(q, head, s);
}

// FLUSH on a raw queue: FSYNC(DATASYNC) behind everything on the ring.
uint8_t Worker::FlushAsync(Queue* q, uint16_t head) {
  AioSlot& s = q->aio[head];
  s.parts.push_back({0, 0, 0, 0, true});
  s.write = false;
  s.bytes = 0;
  return SubmitSlot(q, head, s);
}

// Puts the slot's parts on the ring; kAsync, or the status if the request
// had to be done synchronously (more parts than the ring can ever hold).
uint8_t Worker::SubmitSlot(Queue* q, uint16_t head, AioSlot& s) {
  uint32_t n = (uint32_t)s.parts.size();
  s.data_err = s.sync_err = s.resync = false;
  if (n > ring_->cq_entries()) {
    int e = 0;
    for (AioPart& p : s.parts)
      if (e == 0) e = p.fsync ? Fdatasync(q->fd) : RwFull(q->fd, &s.iov[p.first], p.count, p.off, s.write);
    s.iov.clear();
    s.parts.clear();
    if (e < 0) return S_IOERR;
    (s.write ? q->bytes_written : q->bytes_read).fetch_add(s.bytes, std::memory_order_relaxed);
    return S_OK;
  }
  // Backpressure: no more SQEs in flight than the CQ holds (no overflow).
  while (aio_sqes_ + n > ring_->cq_entries()) {
    ring_->Wait();
    ReapAio();
  }
  s.status = StatusAt();
  s.len = (uint32_t)e_.in_bytes;
  s.pending = n;
  q->inflight[head] = kInAio;
  q->aio_inflight++;
  q->in_async.fetch_add(1, std::memory_order_relaxed);
  aio_reqs_++;
  aio_sqes_ += n;
  for (uint32_t k = 0; k < n; k++) PrepPart(q, head, k);
  return kAsync;
}

void Worker::PrepPart(Queue* q, uint16_t head, uint32_t k) {
  io_uring_sqe* sqe;
  while (!(sqe = ring_->Get())) ring_->Submit();  // SQ full: hand it over, go on
  AioSlot& s = q->aio[head];
  const AioPart& p = s.parts[k];
  sqe->fd = q->fd;
  sqe->user_data = Key(q->index, head, k);
  if (p.fsync) {
    sqe->opcode = IORING_OP_FSYNC;
    sqe->fsync_flags = IORING_FSYNC_DATASYNC;
    // A flush covers the writes completed before it, which are in the page
    // cache: no ordering needed, and none wanted (a drain would hold every
    // ring of this worker).  Write-through with data parts on the ring: after
    // them (and, being a drain, after everything else before it; rare).
    sqe->flags = s.parts.size() > 1 ? IOSQE_IO_DRAIN : 0;
  } else {
    sqe->opcode = s.write ? IORING_OP_WRITEV : IORING_OP_READV;
    sqe->addr = (uint64_t)(uintptr_t)&s.iov[p.first];
    sqe->len = p.count;
    sqe->off = p.off;
  }
}

// Handles every CQE there is, then publishes (and calls) once per queue that
// completed something, except the queue whose batch is in progress.
void Worker::ReapAio() {
  uint8_t* mem = mem_;
  const std::vector<Span>* spans = spans_;
  io_uring_cqe cqes[64];
  for (;;) {
    unsigned n = ring_->Take(cqes, 64);
    if (n == 0) {
      if (!ring_->Unsubmitted()) break;
      ring_->Submit();  // rests of short transfers (which may complete at once)
      continue;
    }
    for (unsigned i = 0; i < n; i++) OnCqe(cqes[i].user_data, cqes[i].res);
  }
  for (Queue* t : touched_) {
    t->aio_touched = false;
    if (t == serving_) continue;  // its batch end publishes
    mem_ = t->mem;
    spans_ = &t->spans;
    Publish(t);
  }
  touched_.clear();
  mem_ = mem;
  spans_ = spans;
}

void Worker::OnCqe(uint64_t key, int32_t res) {
  aio_sqes_--;
  uint32_t qi = (uint32_t)(key >> 48), k = (uint32_t)key;
  uint16_t head = (uint16_t)(key >> 32);
  Queue* q = qi < queues_.size() ? queues_[qi] : nullptr;
  // Cannot happen: a queue leaves only once its ring I/O is done.
  if (!q || head >= q->aio.size() || q->inflight[head] != kInAio) return;
  AioSlot& s = q->aio[head];
  AioPart& p = s.parts[k];
  if (p.fsync) {
    if (res < 0) s.sync_err = true;
  } else if (res < 0) {
    s.data_err = true;
  } else if ((uint64_t)res < p.bytes) {
    iovec* v = &s.iov[p.first];
    size_t c = p.count;
    AdvanceIov(&v, &c, (size_t)res);
    if (res == 0) {
      if (s.write)
        s.data_err = true;  // no progress
      else
        ZeroIov(v, c);  // EOF: the rest reads as zeroes
    } else {
      // Short (EOF ahead, or the kernel stopped early): submit the rest.  A
      // queued FSYNC may already be past it: Finish syncs once more.
      p.first = (uint32_t)(v - s.iov.data());
      p.count = (uint32_t)c;
      p.off += (uint64_t)res;
      p.bytes -= (uint64_t)res;
      if (s.write && s.parts.back().fsync) s.resync = true;
      PrepPart(q, head, k);
      aio_sqes_++;
      return;
    }
  }
  if (--s.pending == 0) FinishAio(q, head);
}

// The last CQE of `head` arrived: status byte, counters, used element (the
// caller publishes).  A broken queue gets nothing more written.
void Worker::FinishAio(Queue* q, uint16_t head) {
  AioSlot& s = q->aio[head];
  if (s.resync && !s.data_err && !s.sync_err && Fdatasync(q->fd) < 0) s.sync_err = true;
  uint8_t st = s.data_err || s.sync_err ? S_IOERR : S_OK;
  if (!s.data_err && s.bytes) (s.write ? q->bytes_written : q->bytes_read).fetch_add(s.bytes, std::memory_order_relaxed);
  q->requests.fetch_add(1, std::memory_order_relaxed);
  q->async_requests.fetch_add(1, std::memory_order_relaxed);
  if (st != S_OK) q->errors.fetch_add(1, std::memory_order_relaxed);
  q->inflight[head] = 0;
  q->aio_inflight--;
  aio_reqs_--;
  s.iov.clear();  // capacity kept for the next request of this head
  s.parts.clear();
  if (!q->dead) {
    *s.status = st;
    mem_ = q->mem;
    spans_ = &q->spans;
    q->stamp[head] = q->batch;  // not visible to the driver until published
    PushUsed(q, head, s.len);
    if (!q->aio_touched) {
      q->aio_touched = true;
      touched_.push_back(q);
    }
  }
  q->in_async.fetch_sub(1, std::memory_order_relaxed);
}

// For commands: returns once no request of q (null: of any queue) has I/O
// on the ring, completing (and publishing) them meanwhile.
void Worker::DrainAio(Queue* q) {
  if (!ring_) return;
  while (q ? q->aio_inflight > 0 : aio_reqs_ > 0) {
    ring_->Wait();
    ReapAio();
  }
}

}  // namespace vhostblk
}  // namespace spindle
