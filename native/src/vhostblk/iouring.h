// The asynchronous I/O of one VhostBlkWorker thread: an IoRing takes
// io_uring SQEs (READV, WRITEV, FSYNC; IOSQE_IO_DRAIN) and gives back CQEs,
// signalled on an eventfd the worker's epoll watches.  Two of them:
// - Uring: a minimal io_uring over UringRings (../uring_rings.h), as the
//   engine's uring.cc.
// - PoolRing (pool_ring.cc): the same contract served by a few threads doing
//   preadv/pwritev/fdatasync, for kernels or sandboxes without io_uring
//   (QEMU's aio=threads).
// Single-threaded on the worker's side: only the worker prepares, submits and
// reaps (Open/Close happen before the thread starts / after it is joined).
#pragma once

#include <linux/io_uring.h>

#include <cstddef>
#include <cstdint>

#include "../uring_rings.h"

namespace spindle {
namespace vhostblk {

class IoRing {
 public:
  virtual ~IoRing() = default;
  virtual int event_fd() const = 0;
  // How many SQEs may be in flight at once.
  virtual unsigned cq_entries() const = 0;
  // The next SQE, zeroed, or nullptr if the SQ is full (Submit, then retry).
  virtual io_uring_sqe* Get() = 0;
  // Hands every prepared SQE over; 0 or -errno (the SQEs stay queued).
  virtual int Submit() = 0;
  virtual bool Unsubmitted() const = 0;
  // CQEs waiting to be taken (no syscall).
  virtual bool Ready() const = 0;
  // Copies up to `max` CQEs out and frees their slots; returns how many.
  virtual unsigned Take(io_uring_cqe* out, unsigned max) = 0;
  // Submits what is prepared and blocks until at least one CQE is ready (or,
  // for io_uring, a signal/task work interrupts the wait: the caller re-checks).
  virtual void Wait() = 0;
  // "io_uring" or "threads".
  virtual const char* name() const = 0;
};

class Uring : public IoRing {
 public:
  Uring() = default;
  ~Uring() override { Close(); }
  Uring(const Uring&) = delete;
  Uring& operator=(const Uring&) = delete;

  // 0 or -errno (ENOSYS, EPERM under seccomp or io_uring_disabled, ...).
  int Open(unsigned sq_entries, unsigned cq_entries);
  void Close();

  int event_fd() const override { return r_.event_fd; }
  unsigned cq_entries() const override { return r_.cq_entries; }
  io_uring_sqe* Get() override;
  int Submit() override;
  bool Unsubmitted() const override { return local_tail_ != submitted_tail_; }
  // A load of the shared tail.
  bool Ready() const override { return __atomic_load_n(r_.cq_tail, __ATOMIC_ACQUIRE) != *r_.cq_head; }
  unsigned Take(io_uring_cqe* out, unsigned max) override;
  void Wait() override;
  const char* name() const override { return "io_uring"; }

 private:
  UringRings r_;
  uint32_t local_tail_ = 0, submitted_tail_ = 0;
};

}  // namespace vhostblk
}  // namespace spindle
