// One io_uring instance's shared rings, set up through raw syscalls and the
// kernel's UAPI header only (no liburing, so the addon builds without -dev
// packages), mapped, and signalling an eventfd: what the engine's ring
// (uring.cc) and the vhost worker's (vhostblk/iouring.cc) have in common.
// Filling SQEs, submitting and reaping stay with each of them.
#pragma once

#include <linux/io_uring.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace spindle {

int UringEnter(int fd, unsigned submit, unsigned min_complete, unsigned flags);
int UringRegister(int fd, unsigned op, const void* arg, unsigned n);

struct UringRings {
  int fd = -1, event_fd = -1;
  uint32_t setup_flags = 0;  // those the kernel accepted
  io_uring_sqe* sqes = nullptr;
  uint32_t *sq_head = nullptr, *sq_tail = nullptr, sq_mask = 0, sq_entries = 0;
  uint32_t *cq_head = nullptr, *cq_tail = nullptr, cq_mask = 0, cq_entries = 0;
  io_uring_cqe* cqes = nullptr;

  UringRings() = default;
  ~UringRings() { Close(); }
  UringRings(const UringRings&) = delete;
  UringRings& operator=(const UringRings&) = delete;

  // Tries each set of setup flags in turn until the kernel takes one (EINVAL
  // means it lacks a flag); cq_entries counts with IORING_SETUP_CQSIZE.  The
  // SQ index array maps slot i to SQE i, once: SQEs are then filled in ring
  // order.  0 or -errno (ENOSYS, EPERM under seccomp or io_uring_disabled, ...).
  int Open(unsigned sq_entries, unsigned cq_entries, std::initializer_list<unsigned> flag_sets);
  void Close();

 private:
  void *sq_map_ = nullptr, *cq_map_ = nullptr;
  size_t sq_len_ = 0, cq_len_ = 0, sqes_len_ = 0;
};

}  // namespace spindle
