// UringRings (see uring_rings.h): io_uring_setup, the three mappings, the
// eventfd.
#include "uring_rings.h"

#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace spindle {

int UringEnter(int fd, unsigned submit, unsigned min_complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, nullptr, 0);
}

int UringRegister(int fd, unsigned op, const void* arg, unsigned n) {
  return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

namespace {
void* Map(int fd, size_t len, off_t what) {
  void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, what);
  return p == MAP_FAILED ? nullptr : p;
}
}  // namespace

int UringRings::Open(unsigned sq_want, unsigned cq_want, std::initializer_list<unsigned> flag_sets) {
  io_uring_params p;
  for (unsigned flags : flag_sets) {
    memset(&p, 0, sizeof p);
    p.flags = flags;
    p.cq_entries = cq_want;
    fd = (int)syscall(__NR_io_uring_setup, sq_want, &p);
    if (fd >= 0 || errno != EINVAL) break;
  }
  if (fd < 0) return -errno;
  setup_flags = p.flags;

  sq_len_ = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
  cq_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
  bool single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
  if (single && cq_len_ > sq_len_) sq_len_ = cq_len_;
  if (!(sq_map_ = Map(fd, sq_len_, IORING_OFF_SQ_RING))) return Close(), -ENOMEM;
  cq_map_ = single ? sq_map_ : Map(fd, cq_len_, IORING_OFF_CQ_RING);
  if (!cq_map_) return Close(), -ENOMEM;
  sqes_len_ = p.sq_entries * sizeof(io_uring_sqe);
  if (!(sqes = (io_uring_sqe*)Map(fd, sqes_len_, IORING_OFF_SQES))) return Close(), -ENOMEM;

  uint8_t* sq = (uint8_t*)sq_map_;
  sq_head = (uint32_t*)(sq + p.sq_off.head);
  sq_tail = (uint32_t*)(sq + p.sq_off.tail);
  sq_mask = *(uint32_t*)(sq + p.sq_off.ring_mask);
  sq_entries = p.sq_entries;
  uint32_t* array = (uint32_t*)(sq + p.sq_off.array);
  for (uint32_t i = 0; i < p.sq_entries; i++) array[i] = i;

  uint8_t* cq = (uint8_t*)cq_map_;
  cq_head = (uint32_t*)(cq + p.cq_off.head);
  cq_tail = (uint32_t*)(cq + p.cq_off.tail);
  cq_mask = *(uint32_t*)(cq + p.cq_off.ring_mask);
  cq_entries = p.cq_entries;
  cqes = (io_uring_cqe*)(cq + p.cq_off.cqes);

  event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (event_fd < 0 || UringRegister(fd, IORING_REGISTER_EVENTFD, &event_fd, 1) < 0) {
    int e = -errno;
    Close();
    return e;
  }
  return 0;
}

void UringRings::Close() {
  if (sqes) munmap(sqes, sqes_len_);
  if (cq_map_ && cq_map_ != sq_map_) munmap(cq_map_, cq_len_);
  if (sq_map_) munmap(sq_map_, sq_len_);
  if (fd >= 0) close(fd);
  if (event_fd >= 0) close(event_fd);
  sqes = nullptr;
  sq_map_ = cq_map_ = nullptr;
  fd = event_fd = -1;
}

}  // namespace spindle
