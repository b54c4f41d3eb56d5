/**
 * Per-backend I/O accounting for query-blockstats (QEMU's block/accounting.c): bytes,
 * operations, failures and total latency per kind of request, and when the backend was last
 * used. Counted by the I/O half at completion, into preallocated typed arrays.
 *
 * Context: `done` any AioContext (the I/O path, allocation-free); `toQmp` main loop.
 *
 * Timestamps come from `acctNow`, which reads the clock once per run of JavaScript (a batch of
 * completions and the submissions they trigger) rather than twice per request: two clock
 * reads cost ~80 ns a request, more than the rest of the backend layer. Latencies are thus
 * exact to the length of one such run (microseconds), where QEMU's are exact to the ns.
 */
import { clock } from './throttle.js';

let cachedNs = -1;
const expire = (): void => {
  cachedNs = -1;
};
/** A settled promise: `.then` on it is the cheapest way to run after the current job. */
const settled = Promise.resolve();

/**
 * The clock's time, read at most once per job (until the next microtask checkpoint).
 * (`queueMicrotask` costs twice as much as `.then`: Node wraps it for async_hooks.)
 */
export function acctNow(): number {
  if (cachedNs < 0) {
    cachedNs = clock.now();
    void settled.then(expire);
  }
  return cachedNs;
}

/** Kinds of request, as QEMU's BlockAcctType (write-zeroes counts as a write). */
export const enum Acct { READ, WRITE, FLUSH, UNMAP }

export class BlockAcctStats {
  readonly bytes = new Float64Array(4);
  readonly ops = new Float64Array(4);
  readonly failed = new Float64Array(4);
  readonly totalNs = new Float64Array(4);
  /** When the last request completed (ns on the throttle clock); -1: never. */
  lastAccessNs = -1;
  /** The end of the furthest successful write (bytes). */
  wrHighestOffset = 0;

  /**
   * block_account_one_io: a request of `type` started at `startNs` completed. Failed
   * requests count their latency too (account_failed is on).
   */
  done(type: Acct, offset: number, bytes: number, startNs: number, failed: boolean): void {
    const now = acctNow();
    if (failed) this.failed[type]++;
    else {
      this.bytes[type] += bytes;
      this.ops[type]++;
      if (type !== Acct.READ && type !== Acct.FLUSH && offset + bytes > this.wrHighestOffset) this.wrHighestOffset = offset + bytes;
    }
    this.totalNs[type] += now - startNs;
    this.lastAccessNs = now;
  }

  /** QEMU's BlockDeviceStats, as query-blockstats shows a backend's. Context: main loop. */
  toQmp(): Record<string, unknown> {
    const r = Math.round;
    const s: Record<string, unknown> = {
      rd_bytes: this.bytes[Acct.READ], wr_bytes: this.bytes[Acct.WRITE], unmap_bytes: this.bytes[Acct.UNMAP],
      rd_operations: this.ops[Acct.READ], wr_operations: this.ops[Acct.WRITE],
      flush_operations: this.ops[Acct.FLUSH], unmap_operations: this.ops[Acct.UNMAP],
      rd_total_time_ns: r(this.totalNs[Acct.READ]!), wr_total_time_ns: r(this.totalNs[Acct.WRITE]!),
      flush_total_time_ns: r(this.totalNs[Acct.FLUSH]!), unmap_total_time_ns: r(this.totalNs[Acct.UNMAP]!),
      wr_highest_offset: this.wrHighestOffset,
      rd_merged: 0, wr_merged: 0, unmap_merged: 0,
      failed_rd_operations: this.failed[Acct.READ], failed_wr_operations: this.failed[Acct.WRITE],
      failed_flush_operations: this.failed[Acct.FLUSH], failed_unmap_operations: this.failed[Acct.UNMAP],
      invalid_rd_operations: 0, invalid_wr_operations: 0, invalid_flush_operations: 0, invalid_unmap_operations: 0,
      account_invalid: true, account_failed: true,
      timed_stats: [],
    };
    if (this.lastAccessNs >= 0) s['idle_time_ns'] = Math.max(0, r(clock.now() - this.lastAccessNs));
    return s;
  }
}

/** The stats QEMU shows for a node (nodes do not account): zeros, accounting flags off. */
export function nodeStats(): Record<string, unknown> {
  const s = new BlockAcctStats().toQmp();
  s['account_invalid'] = false;
  s['account_failed'] = false;
  return s;
}
