// The worker's io_uring (see iouring.h): setup, SQE preparation order,
// submission and CQE reaping over the shared rings.
#include "iouring.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
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

namespace {
int Setup(unsigned entries, io_uring_params* p) { return (int)syscall(__NR_io_uring_setup, entries, p); }
int Enter(int fd, unsigned submit, unsigned min_complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, nullptr, 0);
}
void* Map(int fd, size_t len, off_t what) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, what);
  return p == MAP_FAILED ? nullptr : p;
}
}  // namespace

int Uring::Open(unsigned sq_entries, unsigned cq_entries) {
  io_uring_params p;
  // SUBMIT_ALL: an SQE that fails early must not strand the rest of the batch
  // in the SQ; CQSIZE: room for many more requests in flight than SQEs per
  // io_uring_enter.  Each is dropped if the kernel refuses it.
  const unsigned tries[] = {IORING_SETUP_CQSIZE | IORING_SETUP_SUBMIT_ALL, IORING_SETUP_CQSIZE, 0};
  for (unsigned flags : tries) {
    memset(&p, 0, sizeof p);
    p.flags = flags;
    p.cq_entries = cq_entries;
    ring_fd_ = Setup(sq_entries, &p);
    if (ring_fd_ >= 0 || errno != EINVAL) break;
  }
  if (ring_fd_ < 0) return -errno;

  sq_len_ = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
  cq_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
  bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single && cq_len_ > sq_len_) sq_len_ = cq_len_;
  if (!(sq_map_ = Map(ring_fd_, sq_len_, IORING_OFF_SQ_RING))) return Close(), -ENOMEM;
  cq_map_ = single ? sq_map_ : Map(ring_fd_, cq_len_, IORING_OFF_CQ_RING);
  if (!cq_map_) return Close(), -ENOMEM;
  sqes_len_ = p.sq_entries * sizeof(io_uring_sqe);
  if (!(sqes_ = (io_uring_sqe*)Map(ring_fd_, sqes_len_, IORING_OFF_SQES))) return Close(), -ENOMEM;

  uint8_t* sq = (uint8_t*)sq_map_;
  sq_head_ = (uint32_t*)(sq + p.sq_off.head);
  sq_tail_ = (uint32_t*)(sq + p.sq_off.tail);
  sq_mask_ = *(uint32_t*)(sq + p.sq_off.ring_mask);
  sq_entries_ = p.sq_entries;
  // Slot i of the index array names SQE i, once: SQEs are then filled in ring order.
  uint32_t* array = (uint32_t*)(sq + p.sq_off.array);
  for (uint32_t i = 0; i < p.sq_entries; i++) array[i] = i;
  local_tail_ = submitted_tail_ = *sq_tail_;

  uint8_t* cq = (uint8_t*)cq_map_;
  cq_head_ = (uint32_t*)(cq + p.cq_off.head);
  cq_tail_ = (uint32_t*)(cq + p.cq_off.tail);
  cq_mask_ = *(uint32_t*)(cq + p.cq_off.ring_mask);
  cq_entries_ = p.cq_entries;
  cqes_ = (io_uring_cqe*)(cq + p.cq_off.cqes);

  event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd_ < 0 || syscall(__NR_io_uring_register, ring_fd_, IORING_REGISTER_EVENTFD, &event_fd_, 1) < 0) {
    int e = -errno;
    Close();
    return e;
  }
  return 0;
}

void Uring::Close() {
  if (sqes_) munmap(sqes_, sqes_len_);
  if (cq_map_ && cq_map_ != sq_map_) munmap(cq_map_, cq_len_);
  if (sq_map_) munmap(sq_map_, sq_len_);
  if (ring_fd_ >= 0) close(ring_fd_);
  if (event_fd_ >= 0) close(event_fd_);
  sqes_ = nullptr;
  sq_map_ = cq_map_ = nullptr;
  ring_fd_ = event_fd_ = -1;
}

io_uring_sqe* Uring::Get() {
  if (local_tail_ - __atomic_load_n(sq_head_, __ATOMIC_ACQUIRE) >= sq_entries_) return nullptr;
  io_uring_sqe* sqe = &sqes_[local_tail_ & sq_mask_];
  memset(sqe, 0, sizeof *sqe);
  local_tail_++;
  return sqe;
}

int Uring::Submit() {
  unsigned todo = local_tail_ - submitted_tail_;
  if (todo == 0) return 0;
  __atomic_store_n(sq_tail_, local_tail_, __ATOMIC_RELEASE);
  while (todo > 0) {
    int n = Enter(ring_fd_, todo, 0, 0);
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
  uint32_t head = *cq_head_, tail = __atomic_load_n(cq_tail_, __ATOMIC_ACQUIRE);
  unsigned n = 0;
  for (; head != tail && n < max; head++, n++) out[n] = cqes_[head & cq_mask_];
  __atomic_store_n(cq_head_, head, __ATOMIC_RELEASE);
  return n;
}

void Uring::Wait() {
  Submit();
  if (Ready()) return;
  Enter(ring_fd_, 0, 1, IORING_ENTER_GETEVENTS);  // EINTR: the caller looks again
}

}  // namespace vhostblk
}  // namespace spindle
