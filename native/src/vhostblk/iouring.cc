// The worker's io_uring (see iouring.h): setup, SQE preparation order,
// submission and CQE reaping over the shared rings.
#include "iouring.h"

#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

// Spelled out for older UAPI headers; a kernel without one rejects it (EINVAL).
#ifndef IORING_SETUP_CQSIZE
#define IORING_SETUP_CQSIZE (1U << 3)  // 5.5
#endif
#ifndef IORING_SETUP_SUBMIT_ALL
#define IORING_SETUP_SUBMIT_ALL (1U << 7)  // 5.18
#endif

namespace spindle {
namespace vhostblk {

int Uring::Open(unsigned sq_entries, unsigned cq_entries) {
  // SUBMIT_ALL: an SQE that fails early must not strand the rest of the batch
  // in the SQ; CQSIZE: room for many more requests in flight than SQEs per
  // io_uring_enter.  Each is dropped if the kernel refuses it.
  int e = r_.Open(sq_entries, cq_entries, {IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL, IORING_SETUP_CQSIZE, 0});
  if (e < 0) return e;
  local_tail_ = submitted_tail_ = *r_.sq_tail;
  return 0;
}

void Uring::Close() { r_.Close(); }

io_uring_sqe* Uring::Get() {
  if (local_tail_ - __atomic_load_n(r_.sq_head, __ATOMIC_ACQUIRE) >= r_.sq_entries) return nullptr;
  io_uring_sqe* sqe = &r_.sqes[local_tail_ & r_.sq_mask];
  memset(sqe, 0, sizeof *sqe);
  local_tail_++;
  return sqe;
}

int Uring::Submit() {
  unsigned todo = local_tail_ - submitted_tail_;
  if (todo == 0) return 0;
  __atomic_store_n(r_.sq_tail, local_tail_, __ATOMIC_RELEASE);
  while (todo > 0) {
    int n = UringEnter(r_.fd, todo, 0, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      // EAGAIN (no memory for requests) / EBUSY (CQ overflow; the worker caps
      // what is in flight at the CQ size, so not expected): transient, retry.
      if (errno == EAGAIN || errno == EBUSY) {
        timespec t{0, 50000};
        nanosleep(&t, nullptr);
        continue;
      }
      return -errno;
    }
    if (n == 0) break;
    todo -= (unsigned)n;
    submitted_tail_ += (unsigned)n;
  }
  return 0;
}

unsigned Uring::Take(io_uring_cqe* out, unsigned max) {
  uint32_t head = *r_.cq_head, tail = __atomic_load_n(r_.cq_tail, __ATOMIC_ACQUIRE);
  unsigned n = 0;
  for (; head != tail && n < max; head++, n++) out[n] = r_.cqes[head & r_.cq_mask];
  __atomic_store_n(r_.cq_head, head, __ATOMIC_RELEASE);
  return n;
}

void Uring::Wait() {
  Submit();
  if (Ready()) return;
  UringEnter(r_.fd, 0, 1, IORING_ENTER_GETEVENTS);  // EINTR: the caller looks again
}

}  // namespace vhostblk
}  // namespace spindle
