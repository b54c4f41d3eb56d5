// Thread-pool backend for hosts without io_uring: a few workers run plain
// preadv/pwritev/fdatasync/fallocate; results go to a mutex-protected list and
// an eventfd wakes the JS thread (same uv_poll path as io_uring).
#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "common.h"

namespace spindle {

int32_t RunSync(const Request& r) {
  ssize_t n;
  do {
    switch (r.op) {
      case OP_READ: n = pread(r.fd, r.ptr, r.len, (off_t)r.off); break;
      case OP_WRITE: n = pwrite(r.fd, r.ptr, r.len, (off_t)r.off); break;
      case OP_READV: n = preadv(r.fd, r.iov, r.nseg, (off_t)r.off); break;
      case OP_WRITEV: n = pwritev(r.fd, r.iov, r.nseg, (off_t)r.off); break;
      case OP_FSYNC: n = fsync(r.fd); break;
      case OP_FDATASYNC: n = fdatasync(r.fd); break;
      case OP_FALLOCATE: n = fallocate(r.fd, r.mode, (off_t)r.off, (off_t)r.flen); break;
      default: errno = EINVAL; n = -1; break;
    }
  } while (n < 0 && errno == EINTR);
  // Like io_uring: one syscall per request, a short transfer is reported as is.
  return n < 0 ? -errno : (int32_t)n;
}

namespace {

class PoolBackend : public Backend {
 public:
  ~PoolBackend() override {
    Stop();
    if (event_fd_ >= 0) close(event_fd_);
  }

  int Open(unsigned threads) {
    event_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (event_fd_ < 0) return errno;
    for (unsigned i = 0; i < threads; i++) workers_.emplace_back([this] { Work(); });
    return 0;
  }

  int EventFd() const override { return event_fd_; }

  // Requests are staged locally and handed over under one lock in Flush().
  bool Prepare(const Request& r) override {
    staged_.push_back(r);
    return true;
  }

  int Flush() override {
    if (staged_.empty()) return 0;
    size_t n = staged_.size();
    {
      std::lock_guard<std::mutex> lock(jobs_mu_);
      for (const Request& r : staged_) jobs_.push_back(r);
    }
    staged_.clear();
    if (n == 1) jobs_cv_.notify_one(); else jobs_cv_.notify_all();
    enters++;
    return 0;
  }

  int Reap(int32_t* out, int cap) override {
    std::lock_guard<std::mutex> lock(done_mu_);
    int n = 0;
    while (!done_.empty() && n < cap) {
      out[2 * n] = done_.front().first;
      out[2 * n + 1] = done_.front().second;
      done_.pop_front();
      n++;
    }
    return n;
  }

  void Shutdown(int inflight) override {
    Flush();
    std::unique_lock<std::mutex> lock(done_mu_);
    done_cv_.wait(lock, [&] { return (int)done_.size() >= inflight; });
    lock.unlock();
    Stop();
  }

 private:
  void Work() {
    std::unique_lock<std::mutex> lock(jobs_mu_);
    for (;;) {
      jobs_cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
      if (stop_) return;
      Request r = jobs_.front();
      jobs_.pop_front();
      lock.unlock();
      int32_t res = RunSync(r);
      bool was_empty;
      {
        std::lock_guard<std::mutex> dl(done_mu_);
        was_empty = done_.empty();
        done_.emplace_back(r.id, res);
      }
      done_cv_.notify_all();
      // One wakeup per non-empty period: the JS side drains the whole list
      // after reading the eventfd, so later pushes are picked up as well.
      if (was_empty) {
        uint64_t one = 1;
        ssize_t w = write(event_fd_, &one, sizeof one);
        (void)w;
      }
      lock.lock();
    }
  }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(jobs_mu_);
      if (stop_) return;
      stop_ = true;
    }
    jobs_cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  int event_fd_ = -1;
  std::vector<Request> staged_;
  std::vector<std::thread> workers_;
  std::mutex jobs_mu_;
  std::condition_variable jobs_cv_;
  std::deque<Request> jobs_;
  bool stop_ = false;
  std::mutex done_mu_;
  std::condition_variable done_cv_;
  std::deque<std::pair<int32_t, int32_t>> done_;
};

}  // namespace

Backend* CreatePoolBackend(unsigned entries, unsigned threads, int* err) {
  (void)entries;
  PoolBackend* b = new PoolBackend();
  int e = b->Open(threads);
  if (e != 0) {
    delete b;
    *err = e;
    return nullptr;
  }
  return b;
}

}  // namespace spindle
