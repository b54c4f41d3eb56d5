// The forwarding side of a mapped queue (see worker.h): heads the worker does
// not serve go into the forward ring for JavaScript, and the (head, used len)
// pairs JavaScript returns become used elements pushed by the worker.
// The ring is JS memory read concurrently by JavaScript (Atomics): the other
// side's counter is read with acquire, ours is published with release after
// the entries.
#include <unistd.h>

#include <cerrno>
#include <string>

#include "worker.h"

namespace spindle {
namespace vhostblk {

namespace {
uint32_t LoadAcquire(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
uint32_t LoadRelaxed(const uint32_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
void StoreRelaxed(uint32_t* p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
void StoreRelease(uint32_t* p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
}  // namespace

// Hands `head` (popped, chain walked, nothing written) to JavaScript; false
// if the queue broke.
bool Worker::Forward(Queue* q, uint16_t head) {
  uint32_t n = q->num;
  // At most `num` heads are in flight, so the ring only fills if JavaScript
  // completed heads it never took from it.
  if (q->fwd_prod - LoadAcquire(q->fring + kFwdCons) >= n) {
    Break(q, "forward ring is full (completions for requests JavaScript has not taken?)");
    return false;
  }
  StoreRelaxed(q->fring + kFwdEntries + q->fwd_prod % n, head);
  q->fwd_prod++;
  q->inflight[head] = kInFwd;
  q->in_forward.fetch_add(1, std::memory_order_relaxed);
  q->forwarded.fetch_add(1, std::memory_order_relaxed);
  q->fwd_batch = true;
  return true;
}

// After a batch: publishes what it forwarded and tells JavaScript, once.
void Worker::EndForwardBatch(Queue* q) {
  if (!q->fwd_batch) return;
  q->fwd_batch = false;
  StoreRelease(q->fring + kFwdProd, q->fwd_prod);
  uint64_t one = 1;
  ssize_t w;
  do w = write(q->notify_fd, &one, sizeof one);
  while (w < 0 && errno == EINTR);
}

bool Worker::CompletionsPending(const Queue* q) const {
  return q->fring && !q->dead && LoadAcquire(q->fring + kCplProd) != q->cpl_cons;
}

// Pushes the used elements of the completions JavaScript added; the caller
// publishes them.  A completion for a head not forwarded breaks the queue.
void Worker::TakeCompletions(Queue* q) {
  if (!q->fring || q->dead) return;
  uint32_t n = q->num, prod = LoadAcquire(q->fring + kCplProd), count = prod - q->cpl_cons;
  if (count == 0) return;
  if (count > n) {
    Break(q, "completion ring holds " + std::to_string(count) + " entries, more than the queue size " + std::to_string(n));
    return;
  }
  const uint32_t* cpl = q->fring + kFwdEntries + n;
  for (; q->cpl_cons != prod; q->cpl_cons++) {
    const uint32_t* c = cpl + 2 * (q->cpl_cons % n);
    uint32_t head = LoadRelaxed(c), len = LoadRelaxed(c + 1);
    if (head >= n || q->inflight[head] != kInFwd) {
      Break(q, "completion for head " + std::to_string(head) + " that was not forwarded");
      break;
    }
    q->inflight[head] = 0;
    q->in_forward.fetch_sub(1, std::memory_order_relaxed);
    // Not yet visible to the driver: making it available again before the
    // next publication is a driver bug (as for a head served natively).
    q->stamp[head] = q->batch;
    PushUsed(q, head, len);
  }
  StoreRelease(q->fring + kCplCons, q->cpl_cons);
}

// Completions outside a batch (the completion eventfd, removeQueue, the end
// of Serve): pushed and published at once, paused or not.
void Worker::Complete(Queue* q) {
  if (!CompletionsPending(q)) return;
  mem_ = q->mem;
  spans_ = &q->spans;
  TakeCompletions(q);
  Publish(q);
}

}  // namespace vhostblk
}  // namespace spindle
