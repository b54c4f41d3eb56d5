// PoolRing (see pool_ring.h).
#include "pool_ring.h"

#include <sys/eventfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace spindle {
namespace vhostblk {

int PoolRing::Open(unsigned threads, unsigned sq_entries, unsigned cq_entries) {
  event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (event_fd_ < 0) return -errno;
  sq_.resize(sq_entries);
  cq_entries_ = cq_entries;
  try {
    for (unsigned i = 0; i < threads; i++) threads_.emplace_back([this] { Run(); });
  } catch (const std::system_error& e) {
    Close();
    return -(e.code().value() ? e.code().value() : EAGAIN);
  }
  return 0;
}

void PoolRing::Close() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  work_.notify_all();
  for (std::thread& t : threads_) t.join();
  threads_.clear();
  if (event_fd_ >= 0) close(event_fd_);
  event_fd_ = -1;
}

io_uring_sqe* PoolRing::Get() {
  if (prepared_ == sq_.size()) return nullptr;
  io_uring_sqe* sqe = &sq_[prepared_++];
  memset(sqe, 0, sizeof *sqe);
  return sqe;
}

int PoolRing::Submit() {
  if (prepared_ == 0) return 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.insert(queue_.end(), sq_.begin(), sq_.begin() + prepared_);
  }
  prepared_ = 0;
  work_.notify_all();
  return 0;
}

unsigned PoolRing::Take(io_uring_cqe* out, unsigned max) {
  if (!Ready()) return 0;
  std::lock_guard<std::mutex> g(mu_);
  unsigned n = 0;
  while (n < max && !done_.empty()) {
    out[n++] = done_.front();
    done_.pop_front();
  }
  ready_.store(done_.size(), std::memory_order_release);
  return n;
}

void PoolRing::Wait() {
  Submit();
  std::unique_lock<std::mutex> l(mu_);
  done_cv_.wait(l, [this] { return !done_.empty(); });
}

// The next SQE may start: none is draining, and a drain waits for the others.
bool PoolRing::Startable() const {
  if (queue_.empty() || draining_) return false;
  return !(queue_.front().flags & IOSQE_IO_DRAIN) || running_ == 0;
}

void PoolRing::Run() {
  std::unique_lock<std::mutex> l(mu_);
  for (;;) {
    work_.wait(l, [this] { return Startable() || (stop_ && queue_.empty()); });
    if (!Startable()) return;  // stopping, nothing left
    io_uring_sqe sqe = queue_.front();
    queue_.pop_front();
    bool drain = (sqe.flags & IOSQE_IO_DRAIN) != 0;
    running_++;
    if (drain) draining_ = true;
    l.unlock();
    int32_t res = Execute(sqe);
    l.lock();
    running_--;
    if (drain) draining_ = false;
    io_uring_cqe cqe{};
    cqe.user_data = sqe.user_data;
    cqe.res = res;
    done_.push_back(cqe);
    ready_.store(done_.size(), std::memory_order_release);
    done_cv_.notify_one();
    if (drain || (running_ == 0 && !queue_.empty())) work_.notify_all();  // a drain may start, or waiters after one
    uint64_t one = 1;
    ssize_t w = write(event_fd_, &one, sizeof one);
    (void)w;  // a full counter still wakes the worker
  }
}

int32_t PoolRing::Execute(const io_uring_sqe& sqe) {
  ssize_t r;
  const iovec* iov = (const iovec*)(uintptr_t)sqe.addr;
  do {
    switch (sqe.opcode) {
      case IORING_OP_READV:
        r = preadv(sqe.fd, iov, (int)sqe.len, (off_t)sqe.off);
        break;
      case IORING_OP_WRITEV:
        r = pwritev(sqe.fd, iov, (int)sqe.len, (off_t)sqe.off);
        break;
      case IORING_OP_FSYNC:
        r = (sqe.fsync_flags & IORING_FSYNC_DATASYNC) ? fdatasync(sqe.fd) : fsync(sqe.fd);
        break;
      default:
        return -EINVAL;
    }
  } while (r < 0 && errno == EINTR);
  return r < 0 ? -errno : (int32_t)r;
}

}  // namespace vhostblk
}  // namespace spindle
