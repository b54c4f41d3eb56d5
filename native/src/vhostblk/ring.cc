// The split-ring side of VhostBlkWorker: serving a queue in batches, polling,
// publishing the used index and owing a call (coalesce.cc makes it), popping
// a chain and walking its descriptors with every address checked against the
// guest memory spans.
// A batch also pushes the completions JavaScript returned (forward.cc).
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "worker.h"

namespace spindle {
namespace vhostblk {

constexpr uint32_t kMaxIndirect = 1024;  // VIRTQUEUE_MAX_SIZE in virtqueue.ts

constexpr uint16_t VRING_DESC_F_NEXT = 1;
constexpr uint16_t VRING_DESC_F_WRITE = 2;
constexpr uint16_t VRING_DESC_F_INDIRECT = 4;
constexpr uint16_t VRING_AVAIL_F_NO_INTERRUPT = 1;

bool Worker::Contains(uint64_t addr, uint64_t len) const {
  if (len == 0 || !spans_) return false;
  for (const Span& s : *spans_)
    if (addr >= s.start && addr < s.end && len <= s.end - addr) return true;
  return false;
}

bool Worker::RingsValid(Queue* q) const {
  uint64_t n = q->num;
  return n > 0 && (n & (n - 1)) == 0 && q->desc % 16 == 0 && q->avail % 2 == 0 && q->used % 4 == 0 &&
         Contains(q->desc, 16 * n) && Contains(q->avail, 6 + 2 * n) && Contains(q->used, 6 + 8 * n);
}

uint16_t Worker::Load16(uint64_t gpa, int order) const {
  return __atomic_load_n((const uint16_t*)(mem_ + gpa), order);
}

void Worker::Store16(uint64_t gpa, uint16_t v, int order) {
  __atomic_store_n((uint16_t*)(mem_ + gpa), v, order);
}

// Serves q until its avail ring is empty (or it breaks), one used-index
// publication and at most one call per batch of at most `num` chains.
uint64_t Worker::Now() {
  timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

void Worker::Serve(Queue* q) {
  if (q->dead || paused_) return;
  q->resched = false;
  mem_ = q->mem;
  spans_ = &q->spans;
  uint64_t t0 = Now();
  serving_ = q;
  ServeRing(q);
  serving_ = nullptr;
  Complete(q);  // what JavaScript returned during the last batch goes out now
  if (aio_reqs_) ReapAio();  // CQEs that came in meanwhile, without waiting for epoll
  q->busy_ns.fetch_add(Now() - t0, std::memory_order_relaxed);
}

void Worker::ServeRing(Queue* q) {
  uint32_t served = 0;
  for (;;) {
    uint32_t done = 0;
    q->batch++;
    if (q->batch == 0) {  // wrapped: old stamps could alias
      std::fill(q->stamp.begin(), q->stamp.end(), 0);
      q->batch = 1;
    }
    TakeCompletions(q);  // published with this batch
    if (aio_reqs_) ReapAio();  // so are q's CQEs; other queues are published at once
    bool cut = false;
    while (done < q->num && !q->dead) {
      // A command waits for us: end the batch here, serve again after it.
      if (cmd_pending_.load(std::memory_order_relaxed)) {
        cut = true;
        break;
      }
      int r = PopAndRun(q);
      if (r <= 0) break;
      done++;
    }
    if (ring_ && ring_->Unsubmitted()) ring_->Submit();  // one io_uring_enter per batch
    Publish(q, true);
    EndForwardBatch(q);
    served += done;
    if (q->dead || cut) {
      if (q->call_owed) Call(q);
      q->resched = cut;
      return;
    }
    if (done >= q->num) continue;
    if (q->call_owed) {  // held (Publish calls at once otherwise)
      if (Linger(q, Now())) {
        q->hold_gain++;
        continue;
      }
      Call(q);
    }
    // Empty.  A driver with requests in flight adds more soon: look for them a
    // little while before asking for a kick, which costs the guest an exit
    // (QEMU's iothread polling, poll-max-ns).  Only after a batch of several:
    // at queue depth 1 nothing comes until the guest saw the completion.
    if (served > 1 && poll_ns_ > 0 && q->event_idx && Poll(q)) continue;
    if (!q->event_idx) return;
    // virtio 1.x 2.7.10: ask for the next kick, then look again, or a chain
    // added while we were asking goes unnoticed.
    Store16(q->used + 4 + 8 * (uint64_t)q->num, q->last_avail, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (Load16(q->avail + 2, __ATOMIC_ACQUIRE) == q->last_avail) return;
  }
}

// The avail index moved, or a completion (from JavaScript or the ring) is there.
bool Worker::WorkArrived(Queue* q) const {
  return Load16(q->avail + 2, __ATOMIC_ACQUIRE) != q->last_avail || CompletionsPending(q) ||
         (aio_reqs_ && ring_->Ready());
}

// Spins up to poll_ns_ for the avail index to move or a completion (from
// JavaScript or the ring) to arrive; true if either did.
bool Worker::Poll(Queue* q) {
  uint64_t end = Now() + poll_ns_;
  do {
    for (int i = 0; i < 64; i++) {
      if (WorkArrived(q)) return true;
      __builtin_ia32_pause();
    }
  } while (Now() < end && !cmd_pending_.load(std::memory_order_relaxed));
  return false;
}

// Publishes the used elements pushed since the last call and calls if the
// driver asked for it, or, at the end of a batch (may_hold), holds the call
// for ServeRing to linger on.
void Worker::Publish(Queue* q, bool may_hold) {
  if (q->used_idx != q->published) {
    uint16_t old = q->published, now = q->used_idx;
    Store16(q->used + 2, now, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);  // 2.7.7: the flag/event read must not pass the store
    q->published = now;
    if (q->ilog) LogPublished(q, now);
    bool notify;
    if (q->event_idx) {
      uint16_t ev = Load16(q->avail + 4 + 2 * (uint64_t)q->num, __ATOMIC_RELAXED);
      notify = (uint16_t)(now - ev - 1) < (uint16_t)(now - old);  // vring_need_event
    } else {
      notify = !(Load16(q->avail, __ATOMIC_RELAXED) & VRING_AVAIL_F_NO_INTERRUPT);
    }
    if (notify && !q->call_owed) {
      q->call_owed = true;
      q->held = may_hold && WantHold(q);
      if (q->held) {
        q->owed_since = Now();
        q->hold_gain = 0;
      }
    }
    q->batches.fetch_add(1, std::memory_order_relaxed);
  }
  if (q->call_owed && !(may_hold && q->held)) Call(q);
  q->pos.store((uint32_t)q->last_avail | ((uint32_t)q->published << 16), std::memory_order_release);
}

// Used element, published by the next Publish.
void Worker::PushUsed(Queue* q, uint32_t head, uint32_t len) {
  uint8_t* slot = mem_ + q->used + 4 + 8 * (uint64_t)(q->used_idx % q->num);
  memcpy(slot, &head, 4);
  memcpy(slot + 4, &len, 4);
  q->used_idx++;
  if (q->ilog) {  // link it into the batch the next used index publishes
    uint8_t* d = q->ilog + kLogHeader + kLogDesc * (uint64_t)head;
    uint16_t last = __atomic_load_n((uint16_t*)(q->ilog + kLogLastBatch), __ATOMIC_RELAXED);
    __atomic_store_n((uint16_t*)(d + kLogNext), last, __ATOMIC_RELAXED);
    __atomic_store_n((uint16_t*)(q->ilog + kLogLastBatch), (uint16_t)head, __ATOMIC_RELEASE);
    q->ibatch.push_back((uint16_t)head);
  }
}

// Inflight record: stamp the order, then flag the head (a death in between
// leaves it unflagged: it was never started, and its avail entry is read again).
void Worker::LogTaken(Queue* q, uint16_t head) {
  uint8_t* d = q->ilog + kLogHeader + kLogDesc * (uint64_t)head;
  __atomic_store_n((uint64_t*)(d + kLogCounter), q->icounter++, __ATOMIC_RELAXED);
  __atomic_store_n(d + kLogInflight, (uint8_t)1, __ATOMIC_RELEASE);
}

// The used index covering the batch is stored: unflag it, then record the index.
void Worker::LogPublished(Queue* q, uint16_t used_idx) {
  for (uint16_t h : q->ibatch)
    __atomic_store_n(q->ilog + kLogHeader + kLogDesc * (uint64_t)h + kLogInflight, (uint8_t)0, __ATOMIC_RELEASE);
  q->ibatch.clear();
  __atomic_store_n((uint16_t*)(q->ilog + kLogUsedIdx), used_idx, __ATOMIC_RELEASE);
}

// 1: a chain was popped and completed or forwarded; 0: ring empty; -1: the
// queue broke.
int Worker::PopAndRun(Queue* q) {
  uint32_t n = q->num;
  uint16_t head;
  bool resubmit = q->resubmit_at < q->resubmit.size();
  if (resubmit) {
    head = q->resubmit[q->resubmit_at];
  } else {
    uint16_t avail_idx = Load16(q->avail + 2, __ATOMIC_ACQUIRE);
    uint16_t count = (uint16_t)(avail_idx - q->last_avail);
    if (count == 0) return 0;
    if (count > n) {
      Break(q, "avail index moved by " + std::to_string(count) + ", more than the queue size " + std::to_string(n));
      return -1;
    }
    head = Load16(q->avail + 4 + 2 * (uint64_t)(q->last_avail % n), __ATOMIC_RELAXED);
  }
  if (head >= n) {
    Break(q, "head " + std::to_string(head) + " is beyond the queue size " + std::to_string(n));
    return -1;
  }
  // A head pushed in this batch is not yet visible to the driver as used; a
  // forwarded one is not used until JavaScript completes it, one on the ring
  // until its last CQE.
  if (q->stamp[head] == q->batch || q->inflight[head]) {
    Break(q, "head " + std::to_string(head) + " made available again while in flight");
    return -1;
  }
  std::string why;
  if (!Walk(q, head, &why)) {
    Break(q, why);
    return -1;
  }
  q->stamp[head] = q->batch;
  if (resubmit)
    q->resubmit_at++;
  else
    q->last_avail++;
  if (q->ilog) LogTaken(q, head);
  uint8_t status = Run(q, head);
  if (status == kForward) return Forward(q, head) ? 1 : -1;
  if (status == kAsync) return 1;  // ReapAio pushes it
  PushUsed(q, head, (uint32_t)e_.in_bytes);
  q->requests.fetch_add(1, std::memory_order_relaxed);
  if (status != S_OK) q->errors.fetch_add(1, std::memory_order_relaxed);
  return 1;
}

// Reads the chain of `head` into e_; false (and *why) if the ring is broken.
bool Worker::Walk(Queue* q, uint16_t head, std::string* why) {
  Elem& e = e_;
  e.Clear();
  uint64_t table = q->desc;
  uint32_t table_len = q->num, limit = q->num, i = head, count = 0;
  bool indirect = false;
  for (;;) {
    if (++count > limit) {
      *why = "descriptor chain of head " + std::to_string(head) + " is longer than its table (a loop?)";
      return false;
    }
    const uint8_t* d = mem_ + table + 16 * (uint64_t)i;
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
    memcpy(&addr, d, 8);
    memcpy(&len, d + 8, 4);
    memcpy(&flags, d + 12, 2);
    memcpy(&next, d + 14, 2);
    if (flags & VRING_DESC_F_INDIRECT) {
      if (indirect) return *why = "nested indirect descriptor", false;
      if (count != 1) return *why = "indirect descriptor not at the head of its chain", false;
      if (flags & VRING_DESC_F_NEXT) return *why = "indirect descriptor with NEXT set", false;
      if (len == 0 || len % 16 != 0 || len / 16 > kMaxIndirect)
        return *why = "indirect table length " + std::to_string(len) + " is invalid", false;
      if (!Contains(addr, len)) return *why = "indirect table is not inside guest memory", false;
      table = addr;
      table_len = limit = len / 16;
      i = 0;
      count = 0;
      indirect = true;
      continue;
    }
    bool wr = (flags & VRING_DESC_F_WRITE) != 0;
    if (!wr && !e.in.empty()) {
      e.fault = true;  // device-readable after device-writable: fail the request
      return true;
    }
    if (len == 0 || !Contains(addr, len)) {
      e.fault = true;
    } else if (wr) {
      e.in.push_back({mem_ + addr, len});
      e.in_bytes += len;
    } else {
      e.out.push_back({mem_ + addr, len});
      e.out_bytes += len;
    }
    if (!(flags & VRING_DESC_F_NEXT)) return true;
    if (next >= table_len) {
      *why = "next index " + std::to_string(next) + " is beyond the table of " + std::to_string(table_len);
      return false;
    }
    i = next;
  }
}

}  // namespace vhostblk
}  // namespace spindle
