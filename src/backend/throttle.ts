/**
 * I/O throttling arithmetic: QEMU's leaky buckets (util/throttle.c), with its validation
 * messages, and the clock the throttle and the statistics read.
 *
 * Context: any AioContext; pure functions on plain objects, no I/O. Six buckets per state
 * (bytes and operations: total, read, write); a request adds its bytes and its units
 * (one, or bytes / iops_size when larger) to the buckets of its direction, and the buckets
 * leak at `avg` per second. A bucket holding more than its size makes the next request
 * wait `extra / avg` seconds. With a burst rate (`max`), the size is `max * burst_length`
 * and a second level leaking at `max` keeps the burst itself to `max` per second.
 *
 *   request ──account──> [level] ──leaks avg/s──>   wait = (level - size) / avg
 */

/** Buckets, in QEMU's order (BucketType). */
export const enum Bucket { BPS_TOTAL, BPS_READ, BPS_WRITE, OPS_TOTAL, OPS_READ, OPS_WRITE }
export const BUCKETS = 6;
/** Directions, as QEMU's ThrottleDirection. */
export const enum Dir { READ, WRITE }

/** THROTTLE_VALUE_MAX: the largest rate or burst rate accepted. */
export const THROTTLE_VALUE_MAX = 1_000_000_000_000_000;
const NS_PER_SEC = 1e9;

/** One limit and its state (QEMU's LeakyBucket). */
export interface LeakyBucket {
  /** Average rate per second; 0: this bucket does not limit. */
  avg: number;
  /** Burst rate per second; 0: no burst beyond avg/10. */
  max: number;
  /** Seconds a burst at `max` may last (1 by default). */
  burstLength: number;
  level: number;
  burstLevel: number;
}

/** A throttling configuration and its buckets' levels (QEMU's ThrottleConfig). */
export interface ThrottleConfig {
  readonly buckets: LeakyBucket[];
  /** iops_size: a request larger than this counts as bytes / opSize operations; 0: off. */
  opSize: number;
}

/** QEMU's throttle_config_init: no limit, burst length 1. */
export function newConfig(): ThrottleConfig {
  const buckets: LeakyBucket[] = [];
  for (let i = 0; i < BUCKETS; i++) buckets.push({ avg: 0, max: 0, burstLength: 1, level: 0, burstLevel: 0 });
  return { buckets, opSize: 0 };
}

/** A copy of the limits (levels zeroed). */
export function copyConfig(c: ThrottleConfig): ThrottleConfig {
  return { buckets: c.buckets.map((b) => ({ avg: b.avg, max: b.max, burstLength: b.burstLength, level: 0, burstLevel: 0 })), opSize: c.opSize };
}

/** throttle_enabled: whether any bucket limits. */
export function throttleEnabled(c: ThrottleConfig): boolean {
  for (const b of c.buckets) if (b.avg > 0) return true;
  return false;
}

/**
 * throttle_is_valid: null if `c` is acceptable, else QEMU's message. Values arrive as QMP
 * integers; a negative one is what QEMU sees as a huge unsigned value, and it is worded so.
 */
export function checkConfig(c: ThrottleConfig): string | null {
  const b = c.buckets;
  const both = (t: number, r: number, w: number): boolean => t !== 0 && (r !== 0 || w !== 0);
  if (
    both(b[Bucket.BPS_TOTAL]!.avg, b[Bucket.BPS_READ]!.avg, b[Bucket.BPS_WRITE]!.avg) ||
    both(b[Bucket.OPS_TOTAL]!.avg, b[Bucket.OPS_READ]!.avg, b[Bucket.OPS_WRITE]!.avg) ||
    both(b[Bucket.BPS_TOTAL]!.max, b[Bucket.BPS_READ]!.max, b[Bucket.BPS_WRITE]!.max) ||
    both(b[Bucket.OPS_TOTAL]!.max, b[Bucket.OPS_READ]!.max, b[Bucket.OPS_WRITE]!.max)
  ) {
    return 'bps/iops/max total values and read/write values cannot be used at the same time';
  }
  if (c.opSize !== 0 && !b[Bucket.OPS_TOTAL]!.avg && !b[Bucket.OPS_READ]!.avg && !b[Bucket.OPS_WRITE]!.avg) {
    return 'iops size requires an iops value to be set';
  }
  for (const k of b) {
    if (k.avg < 0 || k.max < 0 || k.avg > THROTTLE_VALUE_MAX || k.max > THROTTLE_VALUE_MAX) {
      return `bps/iops/max values must be within [0, ${THROTTLE_VALUE_MAX}]`;
    }
    if (k.burstLength === 0) return 'the burst length cannot be 0';
    if (k.burstLength !== 1 && !k.max) return 'burst length set without burst rate';
    if (k.max && (k.burstLength < 0 || k.burstLength > Math.floor(THROTTLE_VALUE_MAX / k.max))) return 'burst length too high for this burst rate';
    if (k.max && !k.avg) return 'bps_max/iops_max require corresponding bps/iops values';
    if (k.max && k.max < k.avg) return 'bps_max/iops_max cannot be lower than bps/iops';
  }
  return null;
}

/** throttle_leak_bucket. */
function leakBucket(k: LeakyBucket, deltaNs: number): void {
  k.level = Math.max(k.level - (k.avg * deltaNs) / NS_PER_SEC, 0);
  if (k.burstLength > 1) k.burstLevel = Math.max(k.burstLevel - (k.max * deltaNs) / NS_PER_SEC, 0);
}

/** throttle_compute_wait: nanoseconds this bucket makes the next request wait (0: none). */
export function bucketWait(k: LeakyBucket): number {
  if (!k.avg) return 0;
  let size: number;
  let burstSize: number;
  if (!k.max) {
    // No burst rate: still let short bursts through (avg/10), or every other request waits.
    size = k.avg / 10;
    burstSize = 0;
  } else {
    size = k.max * k.burstLength;
    burstSize = k.max / 10;
  }
  let extra = k.level - size;
  if (extra > 0) return Math.trunc((extra * NS_PER_SEC) / k.avg);
  if (k.burstLength > 1) {
    extra = k.burstLevel - burstSize;
    if (extra > 0) return Math.trunc((extra * NS_PER_SEC) / k.max);
  }
  return 0;
}

/** The buckets a direction checks and fills: [bytes total, ops total, bytes dir, ops dir]. */
const CHECK: readonly (readonly Bucket[])[] = [
  [Bucket.BPS_TOTAL, Bucket.OPS_TOTAL, Bucket.BPS_READ, Bucket.OPS_READ],
  [Bucket.BPS_TOTAL, Bucket.OPS_TOTAL, Bucket.BPS_WRITE, Bucket.OPS_WRITE],
];

/** A throttle state: one config and when it last leaked (QEMU's ThrottleState). */
export interface ThrottleState {
  cfg: ThrottleConfig;
  previousLeak: number;
}

/** throttle_do_leak + throttle_compute_wait_for: how long a request of `dir` must wait, in ns. */
export function computeWait(ts: ThrottleState, dir: Dir, now: number): number {
  const delta = now - ts.previousLeak;
  ts.previousLeak = now;
  const b = ts.cfg.buckets;
  if (delta > 0) for (let i = 0; i < BUCKETS; i++) leakBucket(b[i]!, delta);
  const check = CHECK[dir]!;
  let max = 0;
  for (let i = 0; i < 4; i++) {
    const w = bucketWait(b[check[i]!]!);
    if (w > max) max = w;
  }
  return max;
}

/** throttle_account: the request goes; its bytes and units fill its direction's buckets. */
export function account(ts: ThrottleState, dir: Dir, bytes: number): void {
  const cfg = ts.cfg;
  const units = cfg.opSize && bytes > cfg.opSize ? bytes / cfg.opSize : 1;
  const check = CHECK[dir]!;
  for (let i = 0; i < 4; i++) {
    const k = cfg.buckets[check[i]!]!;
    const n = i & 1 ? units : bytes;
    k.level += n;
    if (k.burstLength > 1) k.burstLevel += n;
  }
}

/** The clock the throttle and the statistics read, and the timers the throttle arms. */
export interface ThrottleClock {
  /** Nanoseconds on a monotonic clock. */
  now(): number;
  /** Calls `fn` after `delayNs` nanoseconds (like setTimeout); the handle is for `cancel`. */
  schedule(fn: () => void, delayNs: number): unknown;
  cancel(handle: unknown): void;
}

export const realClock: ThrottleClock = {
  now: () => performance.now() * 1e6,
  schedule: (fn, ns) => setTimeout(fn, Math.ceil(ns / 1e6)),
  cancel: (h) => clearTimeout(h as ReturnType<typeof setTimeout>),
};

/** The clock in use (tests install a virtual one). */
export let clock: ThrottleClock = realClock;

/** Installs a clock (tests); returns the previous one. Context: main loop. */
export function setThrottleClock(c: ThrottleClock): ThrottleClock {
  const old = clock;
  clock = c;
  return old;
}
