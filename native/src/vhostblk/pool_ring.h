// PoolRing: the IoRing contract (iouring.h) served by threads doing
// preadv/pwritev/fdatasync, where io_uring is missing or refused (old
// kernels, seccomp profiles that block it).  SQEs are taken in order; one
// with IOSQE_IO_DRAIN starts once everything before it has completed, and
// nothing after it starts until it has.  Each CQE is signalled on an eventfd.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "iouring.h"

namespace spindle {
namespace vhostblk {

class PoolRing : public IoRing {
 public:
  PoolRing() = default;
  ~PoolRing() override { Close(); }
  PoolRing(const PoolRing&) = delete;
  PoolRing& operator=(const PoolRing&) = delete;

  // 0 or -errno (eventfd, thread creation).
  int Open(unsigned threads, unsigned sq_entries, unsigned cq_entries);
  // Finishes what was submitted, then joins the threads.
  void Close();

  int event_fd() const override { return event_fd_; }
  unsigned cq_entries() const override { return cq_entries_; }
  io_uring_sqe* Get() override;
  int Submit() override;
  bool Unsubmitted() const override { return prepared_ > 0; }
  bool Ready() const override { return ready_.load(std::memory_order_acquire) > 0; }
  unsigned Take(io_uring_cqe* out, unsigned max) override;
  void Wait() override;
  const char* name() const override { return "threads"; }

 private:
  void Run();
  bool Startable() const;
  static int32_t Execute(const io_uring_sqe& sqe);

  int event_fd_ = -1;
  unsigned cq_entries_ = 0;
  std::vector<io_uring_sqe> sq_;  // prepared, not yet submitted (worker only)
  unsigned prepared_ = 0;
  std::mutex mu_;
  std::condition_variable work_, done_cv_;
  std::deque<io_uring_sqe> queue_;  // submitted, not started
  std::deque<io_uring_cqe> done_;   // completed, not taken
  std::atomic<size_t> ready_{0};    // done_.size()
  unsigned running_ = 0;
  bool draining_ = false;  // a drain SQE runs: nothing else starts
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace vhostblk
}  // namespace spindle
