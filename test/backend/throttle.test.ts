// I/O throttling on the backend's I/O path (QEMU's throttle.c / throttle-groups.c model),
// driven by a virtual clock: rates, bursts, iops_size, groups taking turns, removing limits,
// drained sections, media change. No real sleeps; times are relative to the test's start.
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import type { BackendIO } from '../../src/backend/io.js';
import { newConfig, setThrottleClock, Bucket, checkConfig, type ThrottleClock, type ThrottleConfig } from '../../src/backend/throttle.js';
import { configureGroup, findThrottleGroup, ioLimitsDisable, ioLimitsEnable } from '../../src/backend/throttle-group.js';
import { drainedBegin, drainedEnd } from '../../src/block/drain.js';
import { openNode, unref } from '../../src/block/graph.js';
import { VirtualClock as BaseClock } from '../helpers/virtual-clock.js';

/** Virtual time whose advance lets completions run after each timer. */
class VirtualClock extends BaseClock {
  constructor() {
    super(7_000_000_000);
  }
  override async advance(ns: number): Promise<void> {
    const end = this.t + ns;
    for (let fn = this.nextDue(end); fn; fn = this.nextDue(end)) {
      fn();
      await settle();
    }
    this.t = end;
    await settle();
  }
}
const SEC = 1e9;
const settle = async (): Promise<void> => {
  for (let i = 0; i < 3; i++) await new Promise<void>((r) => setImmediate(r));
};

let vclock: VirtualClock;
let prev: ThrottleClock;
beforeEach(() => {
  vclock = new VirtualClock();
  prev = setThrottleClock(vclock);
});
const cleanup: (() => Promise<void> | void)[] = [];
afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
  setThrottleClock(prev);
});

let n = 0;
async function disk(): Promise<{ be: BlockBackend; io: BackendIO }> {
  const node = await openNode({ driver: 'null-co', size: 1 << 30 });
  const be = createBackend({ name: `thr${n++}` }, node);
  unref(node);
  const dev = { id: `dev-${be.name}` };
  const io = be.attachDevice(dev);
  cleanup.push(async () => {
    await ioLimitsDisable(be);
    be.detachDevice(dev);
    if (!be.dead) be.unref();
  });
  return { be, io };
}

function limits(set: Partial<Record<'bps' | 'bps_rd' | 'bps_wr' | 'iops' | 'iops_rd' | 'iops_wr', [avg: number, max?: number, len?: number]>>, opSize = 0): ThrottleConfig {
  const cfg = newConfig();
  const idx = { bps: Bucket.BPS_TOTAL, bps_rd: Bucket.BPS_READ, bps_wr: Bucket.BPS_WRITE, iops: Bucket.OPS_TOTAL, iops_rd: Bucket.OPS_READ, iops_wr: Bucket.OPS_WRITE };
  for (const [k, v] of Object.entries(set)) {
    const b = cfg.buckets[idx[k as keyof typeof idx]]!;
    b.avg = v[0];
    b.max = v[1] ?? 0;
    b.burstLength = v[2] ?? 1;
  }
  cfg.opSize = opSize;
  expect(checkConfig(cfg)).toBeNull();
  return cfg;
}

function throttle(be: BlockBackend, cfg: ThrottleConfig, group = be.name): void {
  if (!be.throttle) ioLimitsEnable(be, group);
  configureGroup(be.throttle!, cfg);
}

/** Issues `count` reads (or writes) of `bytes`; the returned log records completions in order. */
function issue(io: BackendIO, count: number, bytes = 4096, tag = '', write = false, log: string[] = []): string[] {
  for (let i = 0; i < count; i++) {
    const buf = new Uint8Array(bytes);
    const cb = (e: unknown): void => void log.push(e ? `${tag}${i}!` : `${tag}${i}`);
    if (write) io.writev(i * bytes, bytes, [buf], 0, cb);
    else io.readv(i * bytes, bytes, [buf], 0, cb);
  }
  return log;
}

describe('throttle: rates (leaky buckets)', () => {
  it('iops=10 lets 10 requests a second through and queues the rest, in order', async () => {
    const { be, io } = await disk();
    throttle(be, limits({ iops: [10] }));
    const log = issue(io, 40);
    await settle();
    // QEMU's bucket holds avg/10 = 1 operation before it makes requests wait: two go at once.
    expect(log.length).toBe(2);
    expect(be.throttle!.pending).toBe(38);
    await vclock.advance(SEC);
    expect(log.length).toBe(12);
    await vclock.advance(SEC);
    expect(log.length).toBe(22);
    await vclock.advance(SEC / 2);
    expect(log.length).toBe(27);
    expect(log).toEqual(Array.from({ length: 27 }, (_, i) => `${i}`));
    expect(be.inFlight).toBe(13); // the queued requests count as in flight, as in QEMU
  });

  it('bps limits by bytes: requests twice as large go half as often', async () => {
    const { be, io } = await disk();
    throttle(be, limits({ bps: [655360] }));
    const small = issue(io, 60, 65536, 's');
    await settle();
    await vclock.advance(SEC);
    const after1 = small.length;
    await vclock.advance(2 * SEC);
    expect(small.length - after1).toBe(20); // 10 a second
    await ioLimitsDisable(be);
    throttle(be, limits({ bps: [655360] }));
    const big = issue(io, 60, 131072, 'b');
    await settle();
    await vclock.advance(SEC);
    const b1 = big.length;
    await vclock.advance(2 * SEC);
    expect(big.length - b1).toBe(10); // 5 a second
  });

  it('reads and writes wait in separate queues: iops_rd does not hold writes', async () => {
    const { be, io } = await disk();
    throttle(be, limits({ iops_rd: [10] }));
    const log = issue(io, 10, 4096, 'r');
    issue(io, 5, 4096, 'w', true, log);
    await settle();
    expect(log).toEqual(['r0', 'r1', 'w0', 'w1', 'w2', 'w3', 'w4']);
    expect(be.throttle!.queues[0].length).toBe(8);
    expect(be.throttle!.queues[1].length).toBe(0);
  });

  it('bps_max with bps_max_length allows a burst at bps_max, then settles to bps', async () => {
    const { be, io } = await disk();
    // 10 requests a second on average, bursts at 50 a second for up to 2 seconds.
    throttle(be, limits({ bps: [40960, 204800, 2] }));
    const log = issue(io, 400);
    await settle();
    const at0 = log.length;
    expect(at0).toBeGreaterThan(2); // more than the unburst bucket (avg/10) lets through
    await vclock.advance(SEC);
    const first = log.length;
    expect(first).toBeGreaterThanOrEqual(50);
    expect(first).toBeLessThanOrEqual(60);
    await vclock.advance(4 * SEC);
    const settled = log.length;
    await vclock.advance(SEC);
    expect(log.length - settled).toBe(10);
    // The whole burst stayed within bps_max * bps_max_length beyond the average.
    expect(settled).toBeLessThanOrEqual(5 * 10 + 100 + 10);
  });

  it('iops_size: a request larger than iops_size counts as several operations', async () => {
    const { be, io } = await disk();
    throttle(be, limits({ iops: [10] }, 4096));
    const big = issue(io, 40, 16384, 'b');
    await settle();
    await vclock.advance(2 * SEC);
    const b = big.length;
    await vclock.advance(4 * SEC);
    expect(big.length - b).toBe(10); // 4 operations each: 2.5 a second
    await ioLimitsDisable(be);
    throttle(be, limits({ iops: [10] }, 4096));
    const small = issue(io, 80, 4096, 's');
    await settle();
    await vclock.advance(2 * SEC);
    const s = small.length;
    await vclock.advance(4 * SEC);
    expect(small.length - s).toBe(40);
  });
});

describe('throttle groups', () => {
  it('two backends in one group share the limit and take turns', async () => {
    const a = await disk();
    const b = await disk();
    throttle(a.be, limits({ iops: [10] }), 'shared');
    ioLimitsEnable(b.be, 'shared');
    expect(b.be.throttle!.group).toBe(a.be.throttle!.group);
    expect(b.be.throttle!.config.buckets[Bucket.OPS_TOTAL]!.avg).toBe(10); // joined the group's limits
    const log = issue(a.io, 10, 4096, 'a');
    issue(b.io, 10, 4096, 'b', false, log);
    await settle();
    expect(log).toEqual(['a0', 'a1']);
    await vclock.advance(SEC);
    expect(log.length).toBe(12); // 10 a second between them, not 10 each
    expect(log.slice(2)).toEqual(['a2', 'b0', 'a3', 'b1', 'a4', 'b2', 'a5', 'b3', 'a6', 'b4']);
    expect(findThrottleGroup('shared')?.members.length).toBe(2);
  });

  it('removing the limits releases everything queued at once', async () => {
    const { be, io } = await disk();
    throttle(be, limits({ iops: [1] }));
    const log = issue(io, 30);
    issue(io, 5, 4096, 'w', true, log);
    await settle();
    expect(log.length).toBeLessThan(5);
    await ioLimitsDisable(be);
    await settle();
    expect(log.length).toBe(35);
    expect(log.filter((x) => !x.startsWith('w'))).toEqual(Array.from({ length: 30 }, (_, i) => `${i}`));
    expect(be.throttle).toBeNull();
    expect(findThrottleGroup(be.name)).toBeUndefined();
    expect(vclock.timers.length).toBe(0);
  });
});

describe('throttle and the backend', () => {
  it('a drained section releases throttled requests without waiting, and limits apply again after it', async () => {
    const { be, io } = await disk();
    throttle(be, limits({ iops: [10] }));
    const log = issue(io, 20);
    await settle();
    expect(log.length).toBe(2);
    const root = be.root!.node;
    let drained = false;
    const p = drainedBegin(root).then(() => void (drained = true));
    // No virtual time passes: the drain completes because the queue was released.
    await settle();
    expect(drained).toBe(true);
    expect(log.length).toBe(20);
    await p;
    // Requests made while drained wait for the section's end, then meet the limits again.
    issue(io, 5, 4096, 'late', false, log);
    await settle();
    expect(log.length).toBe(20);
    drainedEnd(root);
    await settle();
    expect(log.length).toBe(20); // the bucket is full of the released requests
    await vclock.advance(3 * SEC);
    expect(log.slice(20)).toEqual(['late0', 'late1', 'late2', 'late3', 'late4']);
  });

  it('limits belong to the backend: they survive removeNode() + insertNode()', async () => {
    const { be, io } = await disk();
    throttle(be, limits({ iops: [10] }), 'keep');
    const log = issue(io, 10);
    await settle();
    expect(log.length).toBe(2);
    await be.removeNode(); // drained: the queued requests went to the old medium first
    expect(log.length).toBe(10);
    expect(log.every((x) => !x.endsWith('!'))).toBe(true);
    const node = await openNode({ driver: 'null-co', size: 1 << 20 });
    be.insertNode(node);
    unref(node);
    expect(be.throttle?.group.name).toBe('keep');
    await vclock.advance(10 * SEC); // let the buckets empty
    const log2 = issue(io, 10);
    await settle();
    expect(log2.length).toBe(2);
    await vclock.advance(SEC / 2);
    expect(log2.length).toBe(7);
  });
});
