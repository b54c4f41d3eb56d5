// io_uring backend of the engine, over UringRings (uring_rings.h: raw
// syscalls and the UAPI header only, no liburing).
#include <linux/capability.h>
#include <linux/io_uring.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "common.h"
#include "uring_rings.h"

// Newer features, defined here so the addon builds against older UAPI headers;
// a kernel that lacks one rejects it (EINVAL) and we carry on without it.
#ifndef IORING_SETUP_SUBMIT_ALL
#define IORING_SETUP_SUBMIT_ALL (1U << 7)      // 5.18
#endif

namespace spindle {
namespace {

// Register opcodes and argument layouts (ABI, spelled out for old headers).
constexpr unsigned kRegBuffers2 = 15;       // 5.13; sparse flag 5.19
constexpr unsigned kRegBuffersUpdate = 16;  // 5.13
constexpr uint32_t kRsrcSparse = 1;
struct RsrcRegister {  // struct io_uring_rsrc_register
  uint32_t nr, flags;
  uint64_t resv2, data, tags;
};
struct RsrcUpdate2 {  // struct io_uring_rsrc_update2
  uint32_t offset, resv;
  uint64_t data, tags;
  uint32_t nr, resv2;
};
static_assert(sizeof(RsrcRegister) == 32 && sizeof(RsrcUpdate2) == 32, "io_uring rsrc ABI");

// Fixed-buffer table size: slab ids index it directly (ids are dense and
// never reused); slabs beyond it simply use plain READ/WRITE.
constexpr uint32_t kFixedSlots = 1024;

// Registered buffers are charged to RLIMIT_MEMLOCK per ring unless the
// process has CAP_IPC_LOCK, and so are the rings themselves on some kernels:
// pinning slabs under a finite limit could make the next io_uring_setup fail.
// So fixed buffers are only used where pinning is not counted.
bool PinningIsFree() {
  rlimit rl;
  if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0 && rl.rlim_cur == RLIM_INFINITY) return true;
  __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
  memset(data, 0, sizeof data);
  if (syscall(SYS_capget, &hdr, data) != 0) return false;
  return (data[CAP_IPC_LOCK / 32].effective & (1U << (CAP_IPC_LOCK % 32))) != 0;
}

template <typename T>
T LoadAcquire(const T* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
template <typename T>
void StoreRelease(T* p, T v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

class UringBackend : public Backend {
 public:
  ~UringBackend() override { Close(); }

  int Open(unsigned entries, uint32_t opts, const std::vector<Slab>& slabs) {
    // SUBMIT_ALL: one bad SQE (e.g. a closed fd) must not strand the rest of
    // the batch in the SQ. Older kernels reject the flag; retry without it.
    // (COOP_TASKRUN, SINGLE_ISSUER and a registered ring fd were measured:
    // no difference here, where buffered reads complete inline, so left out.)
    int e = r_.Open(entries, 0, {IORING_SETUP_SUBMIT_ALL, 0});
    if (e < 0) return -e;
    local_tail_ = submitted_tail_ = *r_.sq_tail;
    // Optional; any failure just leaves fixed buffers off.
    if (!(opts & kNoFixedBuffers) && PinningIsFree()) RegisterBuffers(slabs);
    return 0;
  }

  void AddSlab(uint32_t id, const Slab& s) override {
    if (id >= fixed_slots_) return;
    iovec v = {s.base, s.size};
    RsrcUpdate2 u;
    memset(&u, 0, sizeof u);
    u.offset = id;
    u.data = (uint64_t)(uintptr_t)&v;
    u.nr = 1;
    // Fails e.g. past RLIMIT_MEMLOCK (ENOMEM) without CAP_IPC_LOCK: that slab
    // then goes through plain READ/WRITE.
    if (UringRegister(r_.fd, kRegBuffersUpdate, &u, sizeof u) == 1) fixed_ok_[id] = 1;
  }

  void Features(uint32_t* setup_flags, uint32_t* fixed_slots) const override {
    *setup_flags = r_.setup_flags;
    *fixed_slots = fixed_slots_;
  }

  int EventFd() const override { return r_.event_fd; }

  bool Prepare(const Request& r) override {
    if (local_tail_ - LoadAcquire(r_.sq_head) >= r_.sq_entries) return false;
    io_uring_sqe* sqe = &r_.sqes[local_tail_ & r_.sq_mask];
    memset(sqe, 0, sizeof *sqe);
    sqe->fd = r.fd;
    sqe->user_data = (uint64_t)(uint32_t)r.id;
    switch (r.op) {
      case OP_READ:
      case OP_WRITE:
        if ((uint32_t)r.slab < fixed_slots_ && fixed_ok_[r.slab]) {
          // Registered slab: the kernel skips the user-address import and
          // page pinning (for O_DIRECT) and uses its own page list.
          sqe->opcode = r.op == OP_READ ? IORING_OP_READ_FIXED : IORING_OP_WRITE_FIXED;
          sqe->buf_index = (uint16_t)r.slab;
          fixed++;
        } else {
          sqe->opcode = r.op == OP_READ ? IORING_OP_READ : IORING_OP_WRITE;
        }
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
    StoreRelease(r_.sq_tail, local_tail_);
    while (todo > 0) {
      int n = UringEnter(r_.fd, todo, 0, 0);
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
    uint32_t head = *r_.cq_head;
    uint32_t tail = LoadAcquire(r_.cq_tail);
    int n = 0;
    while (head != tail && n < cap) {
      const io_uring_cqe& c = r_.cqes[head & r_.cq_mask];
      out[2 * n] = (int32_t)c.user_data;
      out[2 * n + 1] = c.res;
      n++;
      head++;
    }
    StoreRelease(r_.cq_head, head);
    return n;
  }

  void Shutdown(int inflight) override {
    Flush();
    for (;;) {
      uint32_t ready = LoadAcquire(r_.cq_tail) - *r_.cq_head;
      if ((int)ready >= inflight) break;
      if (UringEnter(r_.fd, 0, (unsigned)inflight, IORING_ENTER_GETEVENTS) < 0 &&
          errno != EINTR)
        break;
    }
  }

 private:
  // A sparse fixed-buffer table that every slab, now and later, is entered
  // into (slabs are shared by all engines of the env).
  void RegisterBuffers(const std::vector<Slab>& slabs) {
    RsrcRegister r;
    memset(&r, 0, sizeof r);
    r.nr = kFixedSlots;
    r.flags = kRsrcSparse;
    int rc = UringRegister(r_.fd, kRegBuffers2, &r, sizeof r);
    if (rc < 0 && errno == EINVAL) {
      // Before 5.19: no sparse flag, but empty (NULL, 0) entries are allowed.
      std::vector<iovec> empty(kFixedSlots, iovec{nullptr, 0});
      r.flags = 0;
      r.data = (uint64_t)(uintptr_t)empty.data();
      rc = UringRegister(r_.fd, kRegBuffers2, &r, sizeof r);
    }
    if (rc < 0) return;
    fixed_ok_.assign(kFixedSlots, 0);
    fixed_slots_ = kFixedSlots;
    for (size_t i = 0; i < slabs.size() && i < kFixedSlots; i++) AddSlab((uint32_t)i, slabs[i]);
  }

  void Close() { r_.Close(); }

  UringRings r_;
  uint32_t fixed_slots_ = 0;
  std::vector<uint8_t> fixed_ok_;  // per slab id: registered in this ring
  uint32_t local_tail_ = 0, submitted_tail_ = 0;
};

}  // namespace

Backend* CreateUringBackend(unsigned entries, uint32_t flags, const std::vector<Slab>& slabs, int* err) {
  UringBackend* b = new UringBackend();
  int e = b->Open(entries, flags, slabs);
  if (e != 0) {
    delete b;
    *err = e;
    return nullptr;
  }
  return b;
}

}  // namespace spindle
