// The native vhost-user-blk worker's queues (vhost-blk-ring-driver.ts sets up guest memory,
// the ring driver and the disk): broken rings, notifications (EVENT_IDX, NO_INTERRUPT),
// remove/re-add, pause/resume, kick, argument checks, teardown, and a micro-benchmark.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { closeFd, eventfd, eventfdRead, eventfdWrite } from '../../src/native/unix-fd.js';
import { VhostBlkWorker } from '../../src/native/vhost-blk-worker.js';
import {
  SPAN_A, HOLE, LAYOUT, DISK_SECTORS, T_IN, T_FLUSH, T_GET_ID, S_OK, F_NEXT, F_INDIRECT, fdCount, turn, until, layout,
  u8, type Rig, rig, guest, cleanups, useWorkerRig,
} from './vhost-blk-ring-driver.js';

useWorkerRig();

/** A request the worker completes at once (no I/O). */
const noop = (r: Rig): { head: number; status: number } => r.request(T_GET_ID, 0, [[r.mem.take(20), 20, true]]);

describe('VhostBlkWorker', () => {
  describe('broken rings stop the queue', () => {
    const cases: [string, (r: Rig) => void, RegExp][] = [
      ['avail index jump', (r) => { r.drv.availIdx += r.drv.num + 1; }, /moved by 17/],
      ['head beyond the queue', (r) => r.drv.addRawHead(16), /head 16 is beyond/],
      ['head reused within a batch', (r) => {
        const { head } = r.request(T_FLUSH, 0, []);
        r.drv.addRawHead(head);
      }, /again while in flight/],
      ['indirect table in the hole', (r) => {
        r.drv.writeDesc(r.drv.desc, 0, HOLE, 32, F_INDIRECT, 0);
        r.drv.addRawHead(0);
      }, /indirect table is not inside/],
      ['indirect table of a bad length', (r) => {
        r.drv.writeDesc(r.drv.desc, 0, r.mem.take(64), 24, F_INDIRECT, 0);
        r.drv.addRawHead(0);
      }, /length 24 is invalid/],
      ['nested indirect', (r) => {
        const t = r.mem.take(64);
        r.drv.writeDesc(t, 0, r.mem.take(64), 32, F_INDIRECT, 0);
        r.drv.writeDesc(r.drv.desc, 0, t, 32, F_INDIRECT, 0);
        r.drv.addRawHead(0);
      }, /nested indirect/],
      ['descriptor loop', (r) => {
        const b = r.mem.take(16);
        r.drv.writeDesc(r.drv.desc, 0, b, 16, F_NEXT, 1);
        r.drv.writeDesc(r.drv.desc, 1, b, 16, F_NEXT, 0);
        r.drv.addRawHead(0);
      }, /loop/],
      ['next beyond the table', (r) => {
        r.drv.writeDesc(r.drv.desc, 0, r.mem.take(16), 16, F_NEXT, 99);
        r.drv.addRawHead(0);
      }, /next index 99/],
    ];
    for (const [name, breakIt, why] of cases) {
      it(name, async () => {
        const r = rig({ num: 16 });
        const good = r.request(T_IN, 0, [[r.mem.take(512), 512, true]]);
        r.drv.publish();
        eventfdWrite(r.kick);
        await until('the first request', () => r.drv.usedIdx === 1);
        expect(u8[good.status]).toBe(S_OK);
        const snapshot = guest(SPAN_A[1] - 8192, 8192);
        breakIt(r);
        r.drv.publish();
        eventfdWrite(r.kick);
        await until('broken', () => r.w.stats(0).broken !== null);
        expect(r.w.stats(0).broken).toMatch(why);
        expect(r.w.brokenQueues()).toEqual([0]);
        expect(guest(SPAN_A[1] - 8192, 8192).equals(snapshot)).toBe(true);
        // Stays stopped; removeQueue still works and reports the position.
        eventfdWrite(r.kick);
        r.w.pause();
        r.w.resume();
        const pos = r.w.removeQueue(0);
        expect(pos.broken).toMatch(why);
        expect(pos.usedIdx).toBe(r.drv.usedIdx);
      });
    }

    it('rings outside guest memory', async () => {
      const r = rig({ add: false });
      r.w.addQueue(1, {
        num: 16, desc: HOLE, avail: 0x8000, used: 0x9000, lastAvail: 0, usedIdx: 0, eventIdx: false,
        kickFd: r.kick, callFd: -1, fd: r.file, capacitySectors: DISK_SECTORS, readOnly: false, serial: '', writeCache: true,
      });
      expect(r.w.stats(1).broken).toMatch(/rings are not inside/);
    });
  });

  it('EVENT_IDX: writes avail_event and signals only when used_event asks', async () => {
    // GET_ID: served without I/O, so each kick's chains complete in its batch (a flush may
    // complete later, from the worker's io_uring).
    const r = rig({ eventIdx: true });
    r.drv.usedEvent = 5; // interrupt when the used index passes 5
    noop(r);
    await r.run();
    expect(r.drv.availEvent).toBe(1);
    r.w.pause(); // the batch (and its call decision) is over
    r.w.resume();
    expect(eventfdRead(r.call)).toBe(0);
    expect(r.w.stats(0)).toMatchObject({ calls: 0, batches: 1 });

    r.drv.usedEvent = 1; // the next completion (1 -> 2) crosses it
    noop(r);
    await r.run();
    await until('the call', () => r.w.stats(0).calls === 1);
    expect(eventfdRead(r.call)).toBe(1);
    expect(r.drv.availEvent).toBe(2);

    // Several chains in one kick: one used-index publication, one call.
    r.drv.usedEvent = 2;
    for (let i = 0; i < 4; i++) noop(r);
    await r.run();
    await until('the call', () => r.w.stats(0).calls === 2);
    expect(eventfdRead(r.call)).toBe(1);
    expect(r.w.stats(0)).toMatchObject({ batches: 3, lastAvail: 6, usedIdx: 6 });
    // After a batch of several the worker polls the ring a while before it asks for the
    // next kick; a command ends the poll, and runs only once the batch is over.
    r.w.pause();
    r.w.resume();
    expect(r.drv.availEvent).toBe(6);
  });

  it('without EVENT_IDX honours VRING_AVAIL_F_NO_INTERRUPT; setCallFd replaces the call fd', async () => {
    const r = rig();
    r.drv.flags = 1;
    r.request(T_FLUSH, 0, []);
    await r.run();
    r.w.pause();
    r.w.resume();
    expect(eventfdRead(r.call)).toBe(0);
    r.drv.flags = 0;
    const other = eventfd();
    cleanups.push(() => closeFd(other));
    r.w.setCallFd(0, other);
    r.request(T_FLUSH, 0, []);
    await r.run();
    await until('the call', () => r.w.stats(0).calls === 1);
    expect(eventfdRead(other)).toBe(1);
    expect(eventfdRead(r.call)).toBe(0);
    r.w.setCallFd(0, -1);
    r.request(T_FLUSH, 0, []);
    await r.run();
    expect(r.w.stats(0).calls).toBe(1);
  });

  it('removeQueue returns the position and a re-added queue continues from it', async () => {
    const r = rig();
    for (let i = 0; i < 3; i++) r.request(T_IN, i, [[r.mem.take(512), 512, true]]);
    await r.run();
    const pos = r.w.removeQueue(0);
    expect(pos).toMatchObject({ lastAvail: 3, usedIdx: 3, requests: 3, bytesRead: 1536, errors: 0, broken: null });
    expect(() => r.w.stats(0)).toThrow(/not attached/);
    // Two chains become available while nobody serves the ring.
    const a = r.request(T_IN, 10, [[r.mem.take(512, 'A', 0), 512, true]]);
    const b = r.request(T_IN, 11, [[r.mem.take(512, 'A', 0), 512, true]]);
    r.drv.publish();
    eventfdWrite(r.kick);
    for (let i = 0; i < 20; i++) await turn();
    expect(r.drv.usedIdx).toBe(3);
    r.w.addQueue(0, {
      num: r.drv.num, desc: r.drv.desc, avail: r.drv.avail, used: r.drv.used, lastAvail: pos.lastAvail, usedIdx: pos.usedIdx,
      eventIdx: false, kickFd: r.kick, callFd: r.call, fd: r.file, capacitySectors: DISK_SECTORS, readOnly: false, serial: '', writeCache: true,
    });
    await until('served at once on re-add', () => r.drv.usedIdx === 5);
    expect(r.drv.reap().map((e) => e.id).sort()).toEqual([a.head, b.head].sort()); // in any order (async I/O)
    expect([u8[a.status], u8[b.status]]).toEqual([S_OK, S_OK]);
    expect(r.w.stats(0)).toMatchObject({ lastAvail: 5, usedIdx: 5, requests: 2 });
  });

  it('pause(): nothing is processed until resume()', async () => {
    const r = rig();
    r.w.pause();
    const x = r.request(T_IN, 0, [[r.mem.take(512), 512, true]]);
    r.drv.publish();
    eventfdWrite(r.kick);
    r.w.kick(0);
    for (let i = 0; i < 50; i++) await turn();
    expect(r.drv.usedIdx).toBe(0);
    expect(u8[x.status]).toBe(0xff);
    expect(r.w.stats(0).requests).toBe(0);
    r.w.resume();
    await until('served after resume', () => r.drv.usedIdx === 1);
    expect(u8[x.status]).toBe(S_OK);
  });

  it('kick(index) processes without the driver kicking', async () => {
    const r = rig();
    r.request(T_FLUSH, 0, []);
    r.drv.publish();
    r.w.kick(0);
    await until('served', () => r.drv.usedIdx === 1);
  });

  it('argument checks', () => {
    const r = rig({ add: false });
    expect(() => r.w.stats(0)).toThrow(/not attached/);
    const base = {
      num: 16, desc: r.drv.desc, avail: r.drv.avail, used: r.drv.used, lastAvail: 0, usedIdx: 0, eventIdx: false,
      kickFd: r.kick, callFd: -1, fd: r.file, capacitySectors: DISK_SECTORS, readOnly: false, serial: '', writeCache: true,
    };
    expect(() => r.w.addQueue(0, { ...base, num: 12 })).toThrow(/power of 2/);
    expect(() => r.w.addQueue(0, { ...base, serial: 'x'.repeat(21) })).toThrow(/20 bytes/);
    expect(() => r.w.addQueue(0, { ...base, kickFd: 99999 })).toThrow(/dup/);
    r.w.addQueue(0, base);
    expect(() => r.w.addQueue(0, base)).toThrow(/already attached/);
    expect(() => r.w.setMemory(layout, [SPAN_A])).toThrow(/queues are attached/);
    const w2 = new VhostBlkWorker();
    expect(() => w2.setMemory(layout, [[0, LAYOUT + 1]])).toThrow(/not inside the layout/);
    w2.destroy();
    r.w.destroy();
    r.w.destroy();
    expect(() => r.w.kick(0)).toThrow(/destroyed/);
  });

  it('destroy joins the thread and no fd leaks', async () => {
    const before = fdCount();
    for (let round = 0; round < 3; round++) {
      const r = rig();
      r.request(T_IN, 0, [[r.mem.take(512), 512, true]]);
      await r.run();
      r.w.setCallFd(0, r.call);
      const extra = eventfd();
      r.w.setCallFd(0, extra);
      closeFd(extra);
      if (round === 1) r.w.removeQueue(0);
      r.close();
    }
    expect(fdCount()).toBe(before);
  });

  it('micro-benchmark: 4 KiB reads at depth 32 from a page-cached file (prints only)', async () => {
    const depth = 32;
    const r = rig({ num: 128, eventIdx: true });
    readFileSync(r.path); // page-cached
    const slots: { hdr: number; buf: number; st: number }[] = [];
    const dv = new DataView(layout);
    for (let i = 0; i < depth; i++) {
      const hdr = r.mem.take(16);
      const st = r.mem.take(1);
      const buf = r.mem.take(4096, i % 2 ? 'B' : 'A');
      dv.setUint32(hdr, T_IN, true);
      dv.setBigUint64(hdr + 8, BigInt((i * 8) % (DISK_SECTORS - 8)), true);
      slots.push({ hdr, buf, st });
    }
    const heads = new Map<number, number>();
    const post = (i: number): void => {
      const s = slots[i]!;
      heads.set(r.drv.add([[s.hdr, 16, false], [s.buf, 4096, true], [s.st, 1, true]]), i);
    };
    for (let i = 0; i < depth; i++) post(i);
    r.drv.usedEvent = 0;
    r.drv.publish();
    eventfdWrite(r.kick);
    const ms = 1000;
    const t0 = process.hrtime.bigint();
    const end = Date.now() + ms;
    let done = 0;
    let kicks = 0;
    let spins = 0;
    const idx16 = new Uint16Array(layout);
    while (Date.now() < end) {
      const used = r.drv.reap();
      if (used.length === 0) {
        // Spin on the used index (the worker runs on its own thread), yielding to the event
        // loop now and then; the call eventfd is only drained.
        if (++spins % 64 === 0) {
          eventfdRead(r.call);
          await turn();
        }
        continue;
      }
      done += used.length;
      for (const u of used) {
        const i = heads.get(u.id)!;
        heads.delete(u.id);
        post(i);
      }
      r.drv.usedEvent = r.drv.lastUsed;
      const prev = Atomics.load(idx16, (r.drv.avail + 2) / 2);
      r.drv.publish();
      // Kick only when the device asked (vring_need_event on avail_event), reading avail_event
      // after the publication (2.7.10): read before it, a device that just went to sleep is missed.
      const old = Atomics.load(idx16, (r.drv.used + 4 + 8 * r.drv.num) / 2);
      if (((r.drv.availIdx - old - 1) & 0xffff) < ((r.drv.availIdx - prev) & 0xffff)) {
        eventfdWrite(r.kick);
        kicks++;
      }
    }
    const secs = Number(process.hrtime.bigint() - t0) / 1e9;
    const s = r.w.stats(0);
    console.log(`vhost-blk worker: ${(done / secs / 1e6).toFixed(3)}M req/s (4 KiB reads, depth ${depth}, ${secs.toFixed(2)} s; ` +
      `worker requests ${s.requests}, batches ${s.batches}, calls ${s.calls}, kicks ${kicks}; ` +
      `worker busy ${(s.busyNs / 1e6).toFixed(0)} ms = ${(s.requests / (s.busyNs / 1e9) / 1e6).toFixed(3)}M req/s of its own time)`);
    expect(done).toBeGreaterThan(0);
    expect(s.errors).toBe(0);
  });
});
