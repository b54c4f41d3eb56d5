// io_uring backend through raw syscalls and the UAPI header only (no liburing),
// so the addon builds on a machine without -dev packages.
#include <linux/io_uring.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common.h"

// Kernel headers older than 5.18 lack this flag; the kernel rejects it and we retry.
#ifndef IORING_SETUP_SUBMIT_ALL
#define IORING_SETUP_SUBMIT_ALL (1U << 7)
#endif

namespace spindle {
namespace {

int SysSetup(unsigned entries, io_uring_params* p) {
  return (int)syscall(__NR_io_uring_setup, entries, p);
}
int SysEnter(int fd, unsigned submit, unsigned min_complete, unsigned flags) {
  return (int)syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, nullptr, 0);
}
int SysRegister(int fd, unsigned op, const void* arg, unsigned n) {
  return (int)syscall(__NR_io_uring_register, fd, op, arg, n);
}

template <typename T>
T LoadAcquire(const T* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
template <typename T>
void StoreRelease(T* p, T v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

class UringBackend : public Backend {
 public:
  ~UringBackend() override { Close(); }

  int Open(unsigned entries) {
    io_uring_params p;
    memset(&p, 0, sizeof p);
    // SUBMIT_ALL: one bad SQE (e.g. a closed fd) must not strand the rest of
    // the batch in the SQ. Older kernels reject the flag; retry without it.
    p.flags = IORING_SETUP_SUBMIT_ALL;
    ring_fd_ = SysSetup(entries, &p);
    if (ring_fd_ < 0 && errno == EINVAL) {
      memset(&p, 0, sizeof p);
      ring_fd_ = SysSetup(entries, &p);
    }
    if (ring_fd_ < 0) return errno;

    sq_len_ = p.sq_off.array + p.sq_entries * sizeof(uint32_t);
    cq_len_ = p.cq_off.cqes + p.cq_entries * sizeof(io_uring_cqe);
    single_mmap_ = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single_mmap_ && cq_len_ > sq_len_) sq_len_ = cq_len_;
    sq_map_ = mmap(nullptr, sq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   ring_fd_, IORING_OFF_SQ_RING);
    if (sq_map_ == MAP_FAILED) { sq_map_ = nullptr; return errno; }
    if (single_mmap_) {
      cq_map_ = sq_map_;
    } else {
      cq_map_ = mmap(nullptr, cq_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                     ring_fd_, IORING_OFF_CQ_RING);
      if (cq_map_ == MAP_FAILED) { cq_map_ = nullptr; return errno; }
    }
    sqes_len_ = p.sq_entries * sizeof(io_uring_sqe);
    void* sqes = mmap(nullptr, sqes_len_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      ring_fd_, IORING_OFF_SQES);
    if (sqes == MAP_FAILED) return errno;
    sqes_ = (io_uring_sqe*)sqes;

    uint8_t* sq = (uint8_t*)sq_map_;
    sq_tail_ = (uint32_t*)(sq + p.sq_off.tail);
    sq_mask_ = *(uint32_t*)(sq + p.sq_off.ring_mask);
    sq_entries_ = p.sq_entries;
    // The SQ index array maps slot i to SQE i once; we then fill SQEs in ring
    // order and never touch the array again.
    uint32_t* array = (uint32_t*)(sq + p.sq_off.array);
    for (uint32_t i = 0; i < p.sq_entries; i++) array[i] = i;
    local_tail_ = submitted_tail_ = *sq_tail_;
    sq_head_ = (uint32_t*)(sq + p.sq_off.head);

    uint8_t* cq = (uint8_t*)cq_map_;
    cq_head_ = (uint32_t*)(cq + p.cq_off.head);
    cq_tail_ = (uint32_t*)(cq + p.cq_off.tail);
    cq_mask_ = *(uint32_t*)(cq + p.cq_off.ring_mask);
    cqes_ = (io_uring_cqe*)(cq + p.cq_off.cqes);

    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) return errno;
    if (SysRegister(ring_fd_, IORING_REGISTER_EVENTFD, &event_fd_, 1) < 0) return errno;
    return 0;
  }

  int EventFd() const override { return event_fd_; }

  bool Prepare(const Request& r) override {
    if (local_tail_ - LoadAcquire(sq_head_) >= sq_entries_) return false;
    io_uring_sqe* sqe = &sqes_[local_tail_ & sq_mask_];
    memset(sqe, 0, sizeof *sqe);
    sqe->fd = r.fd;
    sqe->user_data = (uint64_t)(uint32_t)r.id;
    switch (r.op) {
      case OP_READ:
      case OP_WRITE:
        sqe->opcode = r.op == OP_READ ? IORING_OP_READ : IORING_OP_WRITE;
        sqe->addr = (uint64_t)(uintptr_t)r.ptr;
        sqe->len = r.len;
        sqe->off = r.off;
        break;
      case OP_READV:
      case OP_WRITEV:
        sqe->opcode = r.op == OP_READV ? IORING_OP_READV : IORING_OP_WRITEV;
        sqe->addr = (uint64_t)(uintptr_t)r.iov;
        sqe->len = (uint32_t)r.nseg;
        sqe->off = r.off;
        break;
      case OP_FSYNC:
      case OP_FDATASYNC:
        sqe->opcode = IORING_OP_FSYNC;
        sqe->fsync_flags = r.op == OP_FDATASYNC ? IORING_FSYNC_DATASYNC : 0;
        break;
      case OP_FALLOCATE:
        // The fallocate SQE carries mode in len and length in addr.
        sqe->opcode = IORING_OP_FALLOCATE;
        sqe->off = r.off;
        sqe->addr = r.flen;
        sqe->len = (uint32_t)r.mode;
        break;
      default:
        sqe->opcode = IORING_OP_NOP;  // validated in JS; keeps ids consistent
        break;
    }
    local_tail_++;
    return true;
  }

  int Flush() override {
    unsigned todo = local_tail_ - submitted_tail_;
    if (todo == 0) return 0;
    StoreRelease(sq_tail_, local_tail_);
    while (todo > 0) {
      int n = SysEnter(ring_fd_, todo, 0, 0);
      enters++;
      if (n < 0) {
        if (errno == EINTR) continue;
        // EAGAIN/EBUSY: leave the rest in the SQ; the next Flush retries.
        return -errno;
      }
      if (n == 0) break;
      todo -= (unsigned)n;
      submitted_tail_ += (unsigned)n;
    }
    return 0;
  }

  bool HasUnsubmitted() const { return local_tail_ != submitted_tail_; }

  int Reap(int32_t* out, int cap) override {
    if (HasUnsubmitted()) Flush();
    uint32_t head = *cq_head_;
    uint32_t tail = LoadAcquire(cq_tail_);
    int n = 0;
    while (head != tail && n < cap) {
      const io_uring_cqe& c = cqes_[head & cq_mask_];
      out[2 * n] = (int32_t)c.user_data;
      out[2 * n + 1] = c.res;
      n++;
      head++;
    }
    StoreRelease(cq_head_, head);
    return n;
  }

  void Shutdown(int inflight) override {
    Flush();
    for (;;) {
      uint32_t ready = LoadAcquire(cq_tail_) - *cq_head_;
      if ((int)ready >= inflight) break;
      if (SysEnter(ring_fd_, 0, (unsigned)inflight, IORING_ENTER_GETEVENTS) < 0 &&
          errno != EINTR)
        break;
    }
  }

 private:
  void Close() {
    if (sqes_) munmap(sqes_, sqes_len_);
    if (cq_map_ && cq_map_ != sq_map_) munmap(cq_map_, cq_len_);
    if (sq_map_) munmap(sq_map_, sq_len_);
    if (ring_fd_ >= 0) close(ring_fd_);
    if (event_fd_ >= 0) close(event_fd_);
    sqes_ = nullptr;
    cq_map_ = sq_map_ = nullptr;
    ring_fd_ = event_fd_ = -1;
  }

  int ring_fd_ = -1, event_fd_ = -1;
  bool single_mmap_ = false;
  void *sq_map_ = nullptr, *cq_map_ = nullptr;
  size_t sq_len_ = 0, cq_len_ = 0, sqes_len_ = 0;
  io_uring_sqe* sqes_ = nullptr;
  uint32_t *sq_head_ = nullptr, *sq_tail_ = nullptr, sq_mask_ = 0, sq_entries_ = 0;
  uint32_t local_tail_ = 0, submitted_tail_ = 0;
  uint32_t *cq_head_ = nullptr, *cq_tail_ = nullptr, cq_mask_ = 0;
  io_uring_cqe* cqes_ = nullptr;
};

}  // namespace

Backend* CreateUringBackend(unsigned entries, int* err) {
  UringBackend* b = new UringBackend();
  int e = b->Open(entries);
  if (e != 0) {
    delete b;
    *err = e;
    return nullptr;
  }
  return b;
}

}  // namespace spindle
