// VhostBlkWorker's thread: start/stop, the epoll loop over kick fds, completion
// eventfds and the control eventfd, and the commands the JS thread hands it
// (see worker.h).
#include <pthread.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include "worker.h"

namespace spindle {
namespace vhostblk {


// Returns 0 or -errno.
int Worker::Start() {
  ctl_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (ctl_ < 0) return -errno;
  ep_ = epoll_create1(EPOLL_CLOEXEC);
  if (ep_ < 0) {
    int e = -errno;
    close(ctl_);
    ctl_ = -1;
    return e;
  }
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kCtlKey;
  if (epoll_ctl(ep_, EPOLL_CTL_ADD, ctl_, &ev) < 0) {
    int e = -errno;
    Close();
    return e;
  }
  int e = StartAio();
  if (e < 0) {
    Close();
    return e;
  }
  queues_.assign(kMaxQueues, nullptr);
  // Signals stay with Node's threads: the worker blocks them all (inherited
  // mask), so its syscalls are not interrupted and no handler runs on it.
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  thread_ = std::thread([this] { Loop(); });
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
  return 0;
}

// Stops the thread (after the batch in progress); closes every queue's fds.
// The JS side deletes the Queue objects.
void Worker::Stop() {
  if (thread_.joinable()) {
    Command(kQuit, nullptr, 0, -1);
    thread_.join();
  }
  Close();
}

// Executes a command on the worker thread; blocks until it is done.
int Worker::Command(CmdType type, Queue* q, uint32_t index, int fd, uint64_t arg) {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait(l, [this] { return cmd_ == kNone; });
  cmd_ = type;
  cmd_q_ = q;
  cmd_index_ = index;
  cmd_fd_ = fd;
  cmd_arg_ = arg;
  cmd_done_ = false;
  // Ends a poll at once and cuts the batch in progress short (the worker
  // clears it when it takes the command).
  cmd_pending_.store(true, std::memory_order_relaxed);
  uint64_t one = 1;
  ssize_t w = write(ctl_, &one, sizeof one);
  (void)w;
  cv_.wait(l, [this] { return cmd_done_; });
  int r = cmd_result_;
  cmd_ = kNone;
  cv_.notify_all();
  return r;
}

void Worker::Close() {
  if (ep_ >= 0) close(ep_);
  if (ctl_ >= 0) close(ctl_);
  ep_ = ctl_ = -1;
  ring_.reset();  // nothing in flight: kQuit waited for it
}

void Worker::Loop() {
  tid_.store((int)syscall(SYS_gettid));
  pthread_setname_np(pthread_self(), "spindle-iothrd");
  prctl(PR_SET_TIMERSLACK, 1000UL);  // a held call sleeps in slices of microseconds (ring.cc)
  epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(ep_, evs, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // cannot happen with a valid epoll fd
    }
    for (int i = 0; i < n; i++) {
      if (evs[i].data.u64 == kAioKey) {
        uint64_t v;
        ssize_t r = read(ring_->event_fd(), &v, sizeof v);  // before reaping: a later CQE signals again
        (void)r;
        ReapAio();  // even while paused: these were popped before
        continue;
      }
      if (evs[i].data.u64 == kCtlKey) {
        uint64_t v;
        ssize_t r = read(ctl_, &v, sizeof v);
        (void)r;
        if (!RunCommand()) return;
        continue;
      }
      uint32_t idx = (uint32_t)evs[i].data.u64;
      Queue* q = idx < queues_.size() ? queues_[idx] : nullptr;
      if (!q) continue;  // removed in this round
      uint64_t v;
      if (evs[i].data.u64 & kCplBit) {
        ssize_t r = read(q->complete_fd, &v, sizeof v);  // readable: does not block
        (void)r;
        Complete(q);  // even while paused: these were popped before
        continue;
      }
      ssize_t r = read(q->kick_fd, &v, sizeof v);  // readable: does not block
      if (r == (ssize_t)sizeof v) q->kicks.fetch_add(v, std::memory_order_relaxed);
      if (paused_) {
        q->resched = true;
        continue;
      }
      Serve(q);
    }
  }
}

// Returns false on kQuit.  The command completes before the queues it left
// to serve (Queue::resched) are served, so the JS thread is not held up.
bool Worker::RunCommand() {
  bool go_on = true;
  {
    std::unique_lock<std::mutex> l(mu_);
    if (cmd_ == kNone || cmd_done_) return true;
    // Taken: a batch may run to its end again (until the next command).
    cmd_pending_.store(false, std::memory_order_relaxed);
    go_on = Execute();
    cmd_done_ = true;
    cv_.notify_all();
  }
  if (go_on) ServeRescheduled();
  return go_on;
}

// Runs cmd_ (mu_ held); sets cmd_result_; false on kQuit.
bool Worker::Execute() {
  int result = 0;
  bool go_on = true;
  Queue* q = cmd_q_;
  switch (cmd_) {
    case kAdd: {
      queues_[q->index] = q;
      epoll_event ev{};
      ev.events = EPOLLIN;
      ev.data.u64 = q->index;
      if (epoll_ctl(ep_, EPOLL_CTL_ADD, q->kick_fd, &ev) < 0) {
        result = -errno;
        queues_[q->index] = nullptr;
        break;
      }
      if (q->complete_fd >= 0) {
        ev.data.u64 = kCplBit | q->index;
        if (epoll_ctl(ep_, EPOLL_CTL_ADD, q->complete_fd, &ev) < 0) {
          result = -errno;
          epoll_ctl(ep_, EPOLL_CTL_DEL, q->kick_fd, nullptr);
          queues_[q->index] = nullptr;
          break;
        }
      }
      mem_ = q->mem;
      spans_ = &q->spans;
      if (!q->dead && !RingsValid(q)) Break(q, "rings are not inside guest memory or are misaligned");
      q->resched = true;  // serve what is already available, as if kicked
      break;
    }
    case kRemove:
      DrainAio(q);  // the position handed back counts every request popped
      Complete(q);  // what JS finished goes to the guest; the rest is forgotten
      epoll_ctl(ep_, EPOLL_CTL_DEL, q->kick_fd, nullptr);
      if (q->complete_fd >= 0) epoll_ctl(ep_, EPOLL_CTL_DEL, q->complete_fd, nullptr);
      queues_[q->index] = nullptr;
      Detach(q);
      break;
    case kSetCall:
      if (q->call_fd >= 0) close(q->call_fd);
      q->call_fd = cmd_fd_;
      break;
    case kSetCapacity:
      DrainAio(q);  // no request checked against the old capacity still doing I/O
      q->capacity = cmd_arg_;
      break;
    case kPause:
      DrainAio(nullptr);
      paused_ = true;
      break;
    case kResume:
      paused_ = false;  // ServeRescheduled serves what was kicked meanwhile
      break;
    case kBarrier:  // between requests by construction; the ring's requests are waited for
      DrainAio(nullptr);
      break;
    case kQuit:
      DrainAio(nullptr);
      for (Queue*& x : queues_)
        if (x) {
          epoll_ctl(ep_, EPOLL_CTL_DEL, x->kick_fd, nullptr);
          if (x->complete_fd >= 0) epoll_ctl(ep_, EPOLL_CTL_DEL, x->complete_fd, nullptr);
          Detach(x);
          x = nullptr;
        }
      go_on = false;
      break;
    case kNone:
      break;
  }
  cmd_result_ = result;
  return go_on;
}

// Serves the queues that wait for it (unless paused).  A command arriving
// meanwhile cuts Serve short again, with resched set for the next round.
void Worker::ServeRescheduled() {
  if (paused_) return;
  for (Queue* q : queues_)
    if (q && q->resched && !cmd_pending_.load(std::memory_order_relaxed)) {
      q->resched = false;
      Serve(q);
    }
}

// The queue leaves the worker: every batch already published its used
// index; the position stays in q->pos; the dup'd fds are closed.
void Worker::Detach(Queue* q) {
  q->pos.store((uint32_t)q->last_avail | ((uint32_t)q->published << 16));
  for (int* f : {&q->kick_fd, &q->call_fd, &q->err_fd, &q->fd, &q->notify_fd, &q->complete_fd}) {
    if (*f >= 0) close(*f);
    *f = -1;
  }
}

void Worker::Break(Queue* q, const std::string& why) {
  q->dead = true;
  {
    std::lock_guard<std::mutex> g(stats_mu_);
    q->why = "queue " + std::to_string(q->index) + ": " + why;
  }
  q->broken.store(true);
  if (q->err_fd >= 0) {  // the front-end logs it (vhost-user's err eventfd)
    uint64_t one = 1;
    ssize_t w;
    do w = write(q->err_fd, &one, sizeof one);
    while (w < 0 && errno == EINTR);
  }
}

uint64_t Worker::EnvNs(const char* name, uint64_t dflt) {
  const char* v = getenv(name);
  return v && *v ? strtoull(v, nullptr, 10) : dflt;
}

uint64_t Worker::PollNsFromEnv() { return EnvNs("SPINDLE_VHOST_POLL_NS", 32000); }

}  // namespace vhostblk
}  // namespace spindle
