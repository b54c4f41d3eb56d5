// A minimal io_uring for one VhostBlkWorker thread, through raw syscalls and
// the kernel's UAPI header only (no liburing), like the engine's uring.cc.
// Single-threaded: only the worker prepares, submits and reaps (Open/Close
// happen before the thread starts / after it is joined).  CQEs are signalled
// on an eventfd registered with the ring, which the worker's epoll watches.
#pragma once

#include <linux/io_uring.h>

#include <cstddef>
#include <cstdint>

namespace spindle {
namespace vhostblk {

class Uring {
 public:
  Uring() = default;
  ~Uring() { Close(); }
  Uring(const Uring&) = delete;
  Uring& operator=(const Uring&) = delete;

  // 0 or -errno (ENOSYS, EPERM under seccomp or io_uring_disabled, ...).
  int Open(unsigned sq_entries, unsigned cq_entries);
  void Close();

  int event_fd() const { return event_fd_; }
  unsigned cq_entries() const { return cq_entries_; }

  // The next SQE, zeroed, or nullptr if the SQ is full (Submit, then retry).
  io_uring_sqe* Get();
  // Hands every prepared SQE to the kernel; 0 or -errno (the SQEs stay queued).
  int Submit();
  bool Unsubmitted() const { return local_tail_ != submitted_tail_; }
  // CQEs waiting to be taken (a load of the shared tail: no syscall).
  bool Ready() const { return __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE) != *cq_head_; }
  // Copies up to `max` CQEs out and frees their slots; returns how many.
  unsigned Take(io_uring_cqe* out, unsigned max);
  // Submits what is prepared and blocks until at least one CQE is ready (or a
  // signal/task work interrupts the wait: the caller re-checks).
  void Wait();

 private:
  int ring_fd_ = -1, event_fd_ = -1;
  void *sq_map_ = nullptr, *cq_map_ = nullptr;
  size_t sq_len_ = 0, cq_len_ = 0, sqes_len_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  uint32_t *sq_head_ = nullptr, *sq_tail_ = nullptr, sq_mask_ = 0, sq_entries_ = 0;
  uint32_t local_tail_ = 0, submitted_tail_ = 0;
  uint32_t *cq_head_ = nullptr, *cq_tail_ = nullptr, cq_mask_ = 0, cq_entries_ = 0;
  io_uring_cqe* cqes_ = nullptr;
};

}  // namespace vhostblk
}  // namespace spindle
