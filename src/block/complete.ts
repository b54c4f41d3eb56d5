/**
 * Completing requests that need no I/O (null-co, zero clusters): never inside the call that
 * issued them, and without starving the event loop. Up to BURST complete from a microtask
 * between two turns of the loop; past that they wait for one setImmediate batch, so a caller
 * that resubmits from its callback still lets timers and I/O run.
 * Context: I/O layer (drivers).
 */
import type { IoCallback, IoVec } from './types.js';

const BURST = 16;
let burst = 0;
let pending: IoCallback[] = [];
let scheduled = false;

function flush(): void {
  const batch = pending;
  pending = [];
  scheduled = false;
  burst = 0;
  for (let i = 0; i < batch.length; i++) batch[i]!(null);
}

let micro: IoCallback[] = [];
let microScheduled = false;

function drainMicro(): void {
  const batch = micro;
  micro = [];
  microScheduled = false;
  for (let i = 0; i < batch.length; i++) batch[i]!(null);
}

/** Completes `cb` successfully, soon. */
export function completeSoon(cb: IoCallback): void {
  if (!scheduled) {
    scheduled = true;
    setImmediate(flush);
  }
  if (burst < BURST) {
    burst++;
    micro.push(cb);
    if (!microScheduled) {
      microScheduled = true;
      queueMicrotask(drainMicro);
    }
  } else {
    pending.push(cb);
  }
}

/** Fills the first `bytes` of a vector with zeroes. */
export function zeroIov(iov: IoVec, bytes: number): void {
  let left = bytes;
  for (const seg of iov) {
    const n = Math.min(seg.length, left);
    seg.fill(0, 0, n);
    left -= n;
    if (!left) break;
  }
}
