// Interrupt coalescing in the native vhost-user-blk worker (ring.cc): a driver that keeps
// adding chains without waiting for interrupts gets one call for several completions; a
// driver that waits for the call after each request is called for every one, and only the
// occasional probe is held; no held call is lost (a command or the window's end delivers it).
// $SPINDLE_VHOST_COALESCE_NS is read when a worker starts: each test sets it for its rig.
import { afterEach, describe, expect, it } from 'vitest';
import { eventfdRead, eventfdWrite } from '../../src/native/unix-fd.js';
import { T_GET_ID, type Rig, layout, rig, secondQueue, until, useWorkerRig } from './vhost-blk-ring-driver.js';

useWorkerRig();

const saved = process.env['SPINDLE_VHOST_COALESCE_NS'];
afterEach(() => {
  if (saved === undefined) delete process.env['SPINDLE_VHOST_COALESCE_NS'];
  else process.env['SPINDLE_VHOST_COALESCE_NS'] = saved;
});

function coalescingRig(ns: number): Rig {
  process.env['SPINDLE_VHOST_COALESCE_NS'] = String(ns);
  return rig({ eventIdx: true });
}

/** One request the worker completes at once (no I/O), published; kicks only when the worker
 * asked for it (vring_need_event on avail_event, read after the publication), as Linux does. */
function add(r: Rig): void {
  r.request(T_GET_ID, 0, [[r.mem.take(20), 20, true]]);
  const prev = (r.drv.availIdx - 1) & 0xffff;
  r.drv.publish();
  const ev = r.drv.availEvent;
  if (((r.drv.availIdx - ev - 1) & 0xffff) < ((r.drv.availIdx - prev) & 0xffff)) eventfdWrite(r.kick);
}

/** The driver reaps what is used and asks for an interrupt at the next completion. */
async function reap(r: Rig): Promise<void> {
  await until('the used index', () => r.drv.usedIdx === r.drv.availIdx);
  r.drv.reap();
  r.drv.usedEvent = r.drv.lastUsed;
}

describe('VhostBlkWorker interrupt coalescing', () => {
  it('a driver adding requests without waiting for interrupts gets fewer calls than completions', async () => {
    const r = coalescingRig(20_000_000);
    const n = 600;
    r.drv.usedEvent = 0;
    for (let i = 0; i < n; i++) {
      add(r);
      await reap(r);
    }
    const s = r.w.stats(0);
    expect(s.requests).toBe(n);
    // After a probe found the driver adding more, calls were held and others joined them.
    expect(s.holdsJoined).toBeGreaterThan(0);
    expect(s.calls).toBeLessThan(n - s.holdsJoined);
    // A command delivers a held call before it runs: none is owed afterwards, and the
    // completion that follows is called for, held or not.
    r.w.pause();
    r.w.resume();
    eventfdRead(r.call);
    const calls = r.w.stats(0).calls;
    add(r);
    await reap(r);
    await until('the call for the last completion', () => eventfdRead(r.call) > 0);
    expect(r.w.stats(0).calls).toBe(calls + 1);
  });

  it('a driver waiting for the call after each request is called for every completion', async () => {
    const r = coalescingRig(20_000_000);
    const n = 200;
    r.drv.usedEvent = 0;
    for (let i = 0; i < n; i++) {
      add(r);
      await until(`the call for request ${i}`, () => eventfdRead(r.call) > 0);
      await reap(r);
    }
    const s = r.w.stats(0);
    expect(s.requests).toBe(n);
    expect(s.calls).toBe(n);
    // Only probes were held, the 64th call, then 128 calls later (each probe that nothing
    // joined halves their rate), and nothing joined them.
    expect(s.holdsJoined).toBe(0);
    expect(s.holds).toBe(2);
  });

  it('a command delivers a held call before it runs', async () => {
    // Each completion's call is owed when the used index moves; the batch (and a probe's 20 ms
    // hold: the 64th call, then 128 calls later) ends at the pause, so the call has been made
    // when pause() returns.
    const r = coalescingRig(20_000_000);
    const n = 200;
    r.drv.usedEvent = 0;
    for (let i = 0; i < n; i++) {
      add(r);
      await until('the used index', () => r.drv.usedIdx === r.drv.availIdx);
      r.w.pause();
      expect(eventfdRead(r.call), `request ${i}`).toBe(1);
      r.w.resume();
      await reap(r);
    }
    const s = r.w.stats(0);
    expect(s.calls).toBe(n);
    expect(s.holds).toBeGreaterThanOrEqual(2); // the probes, cut short
  });

  it('another queue of the worker with work ends a hold', async () => {
    // A 100 s window: queue 0's probe (its 64th call) would hold the worker past the test's
    // timeout; queue 1's kick must end the hold, and queue 0 still gets its call.
    const r = coalescingRig(100_000_000_000);
    const { drv: drv1, kick: kick1 } = secondQueue(r, 1);
    r.drv.usedEvent = 0;
    for (let i = 0; i < 63; i++) {
      add(r);
      await until(`the call for request ${i}`, () => eventfdRead(r.call) > 0);
      await reap(r);
    }
    add(r); // its call is the probe
    await until('the used index', () => r.drv.usedIdx === r.drv.availIdx);
    const hdr = r.mem.take(16);
    new DataView(layout).setUint32(hdr, T_GET_ID, true);
    drv1.add([[hdr, 16, false], [r.mem.take(21), 21, true]]);
    drv1.publish();
    eventfdWrite(kick1);
    await until('queue 1 served', () => drv1.usedIdx === 1);
    await until('the held call', () => eventfdRead(r.call) > 0);
    expect(r.w.stats(0)).toMatchObject({ calls: 64, holds: 1, holdsJoined: 0 });
  });

  it('SPINDLE_VHOST_COALESCE_NS=0 holds no call', async () => {
    const r = coalescingRig(0);
    const n = 200;
    r.drv.usedEvent = 0;
    for (let i = 0; i < n; i++) {
      add(r);
      await reap(r);
    }
    // The used index is stored before the call is made: the last call may still be coming.
    await until('a call for every completion', () => r.w.stats(0).calls === n);
    expect(r.w.stats(0).holds).toBe(0);
  });
});
