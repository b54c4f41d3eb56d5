// Interrupt coalescing for VhostBlkWorker: whether a call owed at the end of
// a batch is held, the wait for the driver's next chain while it is, and the
// call itself (ring.cc's Publish owes it, ServeRing lingers).
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "worker.h"

namespace spindle {
namespace vhostblk {

// Interrupt coalescing.  A guest whose vCPU is the bottleneck (many
// requests in flight on a slow or busy CPU) adds its next chain while the
// interrupt for the last one is being taken, and pays an interrupt per
// request; holding the call until it pauses lets one interrupt cover many.  A
// guest waiting on each request adds nothing while the call is held and only
// loses time: so a call is held while holding pays (a chain joined one of the
// last kHoldTrust held calls), and otherwise only as a probe, once in
// kProbeFirst calls, less often after each probe that nothing joined.
// The driver counts as paused after 4 of its recent gaps between chains
// (within [kMinWindowNs, coalesce_ns_]); a call is held coalesce_max_ns_ at most.
constexpr uint16_t kProbeFirst = 64, kProbeMax = 1024;
constexpr uint8_t kHoldTrust = 8;
constexpr uint64_t kMinWindowNs = 4000;
constexpr uint64_t kSpinNs = 8000, kSliceNs = 10000;

bool Worker::WantHold(Queue* q) {
  if (!coalesce_ns_ || !q->event_idx) return false;
  if (q->hold_trust > 0) return true;
  if (++q->hold_probe < q->probe_every) return false;
  q->hold_probe = 0;
  q->gap_ns = coalesce_ns_ / 4;  // a probe waits the longest
  return true;
}

// Waits while a call is held, from `since` (the end of the last batch),
// spinning and then sleeping in slices: true when the driver adds a chain or
// a completion arrives in time.  False when it does not, or another queue of
// this worker or a command has work.
bool Worker::Linger(Queue* q, uint64_t since) {
  uint64_t window = std::max(kMinWindowNs, std::min(coalesce_ns_, 4 * q->gap_ns));
  uint64_t end = std::min(since + window, q->owed_since + coalesce_max_ns_);
  for (uint32_t round = 1;; round++) {
    for (int i = 0; i < 64; i++) {
      if (WorkArrived(q)) {
        q->gap_ns = (3 * q->gap_ns + (Now() - since)) / 4;
        return true;
      }
      __builtin_ia32_pause();
    }
    uint64_t now = Now();
    if (now >= end || cmd_pending_.load(std::memory_order_relaxed)) return false;
    // Past a short spin, sleep in slices: the chains that come meanwhile wait
    // a little, the guest does not (it is not waiting on them yet).
    bool sleep = now - since >= kSpinNs;
    if ((sleep || round % 16 == 0) && OthersWaiting(q)) return false;
    if (sleep) {
      timespec t{0, (long)std::min(kSliceNs, end - now)};
      nanosleep(&t, nullptr);
    }
  }
}

// Whether another queue of this worker was kicked or has completions: a peek
// at the epoll set (level-triggered, so the loop still sees them).  q's own
// fds, the io_uring's and the control eventfd's are left out: what they tell
// WorkArrived and cmd_pending_ tell first, and they stay readable after.
bool Worker::OthersWaiting(const Queue* q) {
  epoll_event evs[16];
  int n = epoll_wait(ep_, evs, 16, 0);
  for (int i = 0; i < n; i++) {
    uint64_t key = evs[i].data.u64;
    if (key != kCtlKey && key != kAioKey && (uint32_t)key != q->index) return true;
  }
  return false;
}

void Worker::Call(Queue* q) {
  if (q->held) {
    q->held = false;
    q->holds.fetch_add(1, std::memory_order_relaxed);
    if (q->hold_gain) {
      q->hold_trust = kHoldTrust;
      q->probe_every = kProbeFirst;
      q->holds_joined.fetch_add(1, std::memory_order_relaxed);
    } else if (q->hold_trust) {
      q->hold_trust--;
    } else {
      q->probe_every = std::min<uint16_t>(2 * q->probe_every, kProbeMax);
    }
  }
  q->call_owed = false;
  if (q->call_fd < 0) return;
  uint64_t one = 1;
  ssize_t w;
  do w = write(q->call_fd, &one, sizeof one);
  while (w < 0 && errno == EINTR);
  q->calls.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace vhostblk
}  // namespace spindle
