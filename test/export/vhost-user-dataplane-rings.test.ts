// The vhost-user-blk data plane's rings and sessions on the TypeScript path (the rig and how
// requests are held: vhost-user-rig.ts): guest memory bounds and broken rings, GET_VRING_BASE
// with requests in flight, stop/restart, two queues, a front-end going away, a new memory table
// while rings run.
process.env.SPINDLE_VHOST_FASTPATH = '0'; // the TypeScript path: see vhost-user-rig.ts

import { describe, expect, it } from 'vitest';
import * as P from '../../src/export/vhost-user/protocol.js';
import { eventfd, eventfdRead, liveMappings, memfdCreate, mmapFd } from '../../src/native/unix-fd.js';
import {
  VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
} from '../../hw/virtio/virtio-blk-abi.js';
import { VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../hw/virtio/virtqueue.js';
import { BlkDriver } from './vhost-user-blk-driver.js';
import {
  fdCount, HIGH, killFrontEnd, LOW, memTable, MiB, RAM, ramOffset, restartRing, sleep, toClose, toUnmap, turns, until,
} from './vhost-user-frontend.js';
import { rig, session, fileNow, fill, holdRequests, SEC, useDataPlaneRig } from './vhost-user-rig.js';

useDataPlaneRig();

describe('guest memory bounds', () => {
  const HOLE = LOW.gpa + LOW.size; // between LOW and HIGH
  const RAM_END = HIGH.gpa + HIGH.size;

  it('a data buffer in the hole or past the end of RAM fails the request whole; no byte outside (or inside) is touched', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const good = q.alloc(512, 512);
    q.bytes(good, 512).fill(0xee);
    const before = new Uint8Array(r.ram.view); // a copy of all guest RAM
    const cases: [string, { gpa: number; len: number }][] = [
      ['in the hole', { gpa: HOLE, len: 512 }],
      ['straddling the end of LOW', { gpa: HOLE - 256, len: 512 }],
      ['straddling the end of RAM', { gpa: RAM_END - 256, len: 512 }],
      ['past the end of RAM', { gpa: RAM_END, len: 512 }],
      ['at 4 GiB - 512', { gpa: 2 ** 32 - 512, len: 512 }],
      ['beyond 4 GiB', { gpa: 2 ** 33, len: 512 }],
    ];
    for (const [what, bad] of cases) {
      // A read: one good buffer then the bad one; the good one must not be filled either.
      const rd = await q.submit(VIRTIO_BLK_T_IN, 0, [{ gpa: good, len: 512 }, bad]);
      expect(rd.status, what).toBe(VIRTIO_BLK_S_IOERR);
      expect(q.bytes(good, 512).every((b) => b === 0xee), what).toBe(true);
      // A write from the bad buffer: the file stays as it was.
      const wr = await q.submit(VIRTIO_BLK_T_OUT, 0, [bad]);
      expect(wr.status, what).toBe(VIRTIO_BLK_S_IOERR);
    }
    // Guest RAM changed only where the driver itself wrote (headers, status bytes, rings).
    const own = q.ownRanges.map(([a, b]) => [ramOffset(a, b - a), ramOffset(a, b - a) + b - a]);
    const changed: number[] = [];
    for (let i = 0; i < RAM; i++) if (r.ram.view[i] !== before[i] && !own.some(([a, b]) => i >= a! && i < b!)) changed.push(i);
    expect(changed).toEqual([]);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    expect(r.ram.view[RAM - 1]).toBe(0xa5);
    expect(r.be.closed).toBe(false);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
  });

  it('an indirect table outside RAM, a descriptor loop and a bad next index fail only their request', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const raw = (build: (d: (i: number, gpa: number, len: number, flags: number, next: number) => void) => number): Promise<number> => {
      const head = build((i, gpa, len, flags, next) => {
        const b = q.bytes(q.desc + 16 * i, 16);
        const v = new DataView(b.buffer, b.byteOffset, 16);
        v.setBigUint64(0, BigInt(gpa), true);
        v.setUint32(8, len, true);
        v.setUint16(12, flags, true);
        v.setUint16(14, next, true);
      });
      const usedBefore = q.usedIdx;
      q.publishHead(head);
      q.kick();
      return until('used entry', () => q.usedIdx === ((usedBefore + 1) & 0xffff)).then(() => {
        const e = q.usedElem(usedBefore);
        expect(e.id).toBe(head);
        return e.len;
      });
    };
    // These heads are above what the driver's allocator hands out in this test.
    const hdr = q.alloc(16);
    q.bytes(hdr, 16).fill(0);
    const status = q.alloc(1, 1);
    const st = (): number => q.bytes(status, 1)[0]!;
    q.bytes(status, 1)[0] = 0xff;
    await raw((d) => {
      d(100, HOLE, 48, 4 /* INDIRECT */, 0);
      return 100;
    });
    // No status byte is reachable (the table is the chain): nothing to check but the used entry.
    q.bytes(status, 1)[0] = 0xff;
    await raw((d) => {
      d(101, hdr, 16, VRING_DESC_F_NEXT, 102);
      d(102, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 101); // loops back
      return 101;
    });
    expect(st()).toBe(VIRTIO_BLK_S_IOERR);
    q.bytes(status, 1)[0] = 0xff;
    await raw((d) => {
      d(103, hdr, 16, VRING_DESC_F_NEXT, 104);
      d(104, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 500);
      return 103;
    });
    expect(st()).toBe(VIRTIO_BLK_S_IOERR);
    // Those used entries were not the driver's in-flight requests: forget them.
    q.resync();
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
  });

  it('a broken ring (head beyond the queue) stops being served; the session and the process stay up', async () => {
    const r = await rig({ numQueues: 2 });
    const q = r.drv[0]!;
    const err = eventfd();
    toClose.push(err);
    expect(await r.fe.ack(P.VHOST_USER_SET_VRING_ERR, P.u64Payload(0), [err])).toBe(0n);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const used0 = q.usedIdx;
    q.publishHead(500); // not a descriptor of a 128-entry table
    q.kick();
    // The front-end hears of it on the ring's err eventfd (QEMU logs it).
    await until('the err eventfd', () => eventfdRead(err) === 1);
    expect(r.be.errors.at(-1)).toMatch(/ring 0 broke: queue 0: head 500 is beyond the queue size 128/);
    await turns(10);
    expect(q.usedIdx).toBe(used0);
    // A good request after it is not served either: the device is broken until reset.
    const p = q.post(VIRTIO_BLK_T_IN, 0, [{ len: 512 }]);
    q.kick();
    await turns(10);
    await sleep(20);
    q.poll();
    expect(q.completed(p)).toBeUndefined();
    // The control plane still answers, and the export still has its session.
    expect(await r.fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(2n);
    expect(r.be.closed).toBe(false);
    expect(r.exp.session).toBe(r.be);
  });

  it('a memory table that no longer covers the rings stops them; the session stays up', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(await r.fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW]), [r.ram.fd])).toBe(0n);
    expect(r.be.rings[0]!.addr).toBeNull();
    const used0 = q.usedIdx;
    q.post(VIRTIO_BLK_T_IN, 0, [{ len: 512 }]);
    q.kick();
    await turns(10);
    await sleep(20);
    expect(q.usedIdx).toBe(used0);
    expect(await r.fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(1n);
    expect(r.be.closed).toBe(false);
  });
});

describe('kicks while requests are in flight', () => {
  it('EVENT_IDX: with a request in flight the device does not ask for a kick; its completion finds the next one', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const vclock = holdRequests(r);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK); // spends the throttle's budget
    expect(q.availEvent).toBe(8);
    const b = q.post(VIRTIO_BLK_T_IN, 1, [{ len: 512 }]);
    q.kick();
    await until('the throttle holding B', () => r.exp.backend.throttle!.pending === 1);
    // B was popped and is in flight: avail_event stays where it was, so C needs no kick.
    expect(q.availEvent).toBe(8);
    const kicks0 = q.kicks;
    const c = q.post(VIRTIO_BLK_T_IN, 2, [{ len: 512 }]);
    expect(q.needsKick(9)).toBe(false);
    vclock.advance(2 * SEC);
    expect((await q.wait(b)).status).toBe(VIRTIO_BLK_S_OK);
    // B's completion looked at the ring and took C (the throttle may hold it in turn).
    vclock.advance(2 * SEC);
    expect((await q.wait(c, 'C (never kicked)')).status).toBe(VIRTIO_BLK_S_OK);
    expect(q.kicks).toBe(kicks0);
    // Nothing in flight any more: the kick is asked for again, at the next index.
    expect(q.availEvent).toBe(10);
  });
});

describe('rings stopping, queues, sessions', () => {
  it('GET_VRING_BASE with a request in flight replies only after it completed into the used ring', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const vclock = holdRequests(r);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK); // takes the budget
    const data = fill(1024, 50);
    const b = q.post(VIRTIO_BLK_T_OUT, 300, [{ len: 1024, data }]);
    q.kick();
    await until('the throttle holding B', () => r.exp.backend.throttle!.pending === 1);
    r.fe.send(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(0, 0));
    r.fe.send(P.VHOST_USER_GET_QUEUE_NUM); // queued behind the deferred reply
    await turns(10);
    await sleep(20);
    expect(r.fe.replies).toEqual([]);
    expect(q.usedIdx).toBe(8);
    expect(r.be.rings[0]!.started).toBe(true);
    // Release B: it completes, its used entry is published, then the reply goes.
    let usedAtReply = -1;
    let elemAtReply = { id: -1, len: -1 };
    const replied = until('GET_VRING_BASE reply', () => {
      if (r.fe.replies.length > 0 && usedAtReply < 0) {
        usedAtReply = q.usedIdx;
        elemAtReply = q.usedElem(8);
      }
      return r.fe.replies.length > 0;
    });
    vclock.advance(2 * SEC);
    await replied;
    expect(usedAtReply).toBe(9);
    expect(elemAtReply).toEqual({ id: b.head, len: 1 });
    const vb = await r.fe.reply(P.VHOST_USER_GET_VRING_BASE);
    expect([...vb]).toEqual([...P.vringStatePayload(0, 9)]); // base 7 + the two requests popped
    expect(P.dataView(await r.fe.reply(P.VHOST_USER_GET_QUEUE_NUM)).getBigUint64(0, true)).toBe(1n);
    expect(r.be.rings[0]!.started).toBe(false);
    expect((await q.wait(b)).status).toBe(VIRTIO_BLK_S_OK);
    r.disk.set(data, 300 * 512);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    // A stopped ring is not served.
    const c = q.post(VIRTIO_BLK_T_IN, 0, [{ len: 512 }]);
    q.kick(); // the back-end closed its copy of the kick fd; ours still takes the write
    await turns(10);
    expect(q.completed(c)).toBeUndefined();
    expect(q.usedIdx).toBe(9);
  });

  it('stop and restart (a VM pause/resume): GET_VRING_BASE, then the ring set up again from that base', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const vb = await r.fe.call(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(0, 0));
    const base = P.dataView(vb).getUint32(4, true);
    expect(base).toBe(8);
    // QEMU's vhost_dev_start again, with a new kick eventfd.
    q.kickFd = await restartRing(r.fe, 0, base);
    const data = fill(1024, 90);
    expect((await q.submit(VIRTIO_BLK_T_OUT, 20, [{ len: 1024, data }])).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q.submit(VIRTIO_BLK_T_IN, 20, [{ len: 1024 }])).data[0]).toEqual(data);
    expect(q.usedIdx).toBe(10);
    expect(q.errors).toEqual([]);
  });

  it('GET_VRING_BASE right after a new SET_MEM_TABLE, with a request in flight on the old table, still waits for it', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const vclock = holdRequests(r);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const b = q.post(VIRTIO_BLK_T_OUT, 700, [{ len: 512, data: fill(512, 91) }]);
    q.kick();
    await until('the throttle holding B', () => r.exp.backend.throttle!.pending === 1);
    expect(await r.fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH]), [r.ram.fd, r.ram.fd])).toBe(0n);
    r.fe.send(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(0, 0));
    await turns(10);
    await sleep(20);
    // The front-end takes the ring back when the reply comes: B's used entry must be there by then.
    const early = r.fe.replies.length > 0 ? q.usedIdx : -1;
    vclock.advance(2 * SEC);
    const vb = await r.fe.reply(P.VHOST_USER_GET_VRING_BASE);
    expect(P.dataView(vb).getUint32(4, true)).toBe(9);
    // B is in flight on the device the new table retired: the reply still waits for it.
    expect(early).toBe(-1);
    expect((await q.wait(b)).status).toBe(VIRTIO_BLK_S_OK);
  });

  it('two queues are served independently: kicks, used rings, calls and GET_VRING_BASE per queue', async () => {
    const r = await rig({ numQueues: 2 });
    const [q0, q1] = r.drv as [BlkDriver, BlkDriver];
    expect(r.be.rings[1]!.lastAvailIdx).toBe(8);
    const d0 = fill(512, 60);
    const d1 = fill(512, 61);
    const p0 = q0.post(VIRTIO_BLK_T_OUT, 10, [{ len: 512, data: d0 }]); // no kick on queue 0
    const c1 = await q1.submit(VIRTIO_BLK_T_OUT, 11, [{ len: 512, data: d1 }]);
    expect(c1.status).toBe(VIRTIO_BLK_S_OK);
    expect(q1.usedIdx).toBe(9);
    expect(q0.usedIdx).toBe(7);
    expect(q0.completed(p0)).toBeUndefined();
    expect(eventfdRead(r.calls[0]!)).toBe(0);
    q0.kick();
    expect((await q0.wait(p0)).status).toBe(VIRTIO_BLK_S_OK);
    expect(q1.usedIdx).toBe(9);
    r.disk.set(d0, 10 * 512);
    r.disk.set(d1, 11 * 512);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    // Stop queue 1: queue 0 goes on.
    expect([...(await r.fe.call(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(1, 0)))]).toEqual([...P.vringStatePayload(1, 9)]);
    expect((await q0.submit(VIRTIO_BLK_T_IN, 11, [{ len: 512 }])).data[0]).toEqual(d1);
    expect(q0.errors).toEqual([]);
    expect(q1.errors).toEqual([]);
  });

  it('a front-end that goes away with a request in flight: the export survives, nothing leaks, a new session works', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const vclock = holdRequests(r);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const data = fill(2048, 70);
    q.post(VIRTIO_BLK_T_OUT, 400, [{ len: 2048, data }]);
    q.kick();
    await until('the throttle holding the write', () => r.exp.backend.throttle!.pending === 1);
    // QEMU is killed: the socket and its eventfds go.
    killFrontEnd(r.fe, [...r.kicks, ...r.calls], r.inflight);
    await until('the session ending', () => r.be.closed);
    expect(r.exp.session).toBeNull();
    // The request still uses guest memory and its inflight record: both are held until it completes.
    expect(liveMappings()).toBe(r.maps0 + 2);
    vclock.advance(2 * SEC);
    await until('the mapping released', () => liveMappings() === r.maps0);
    expect(fdCount()).toBe(r.fds0);
    // The write the guest made went to the file.
    r.disk.set(data, 400 * 512);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    // A new front-end (QEMU restarted) gets a fresh session on the same socket.
    const s = await session(r.exp, r.path, r.ram, 1);
    expect(s.be).not.toBe(r.be);
    expect(r.exp.sessions).toBe(2);
    vclock.advance(10 * SEC);
    const rd = await s.drv[0]!.submit(VIRTIO_BLK_T_IN, 400, [{ len: 2048 }]);
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(rd.data[0]).toEqual(data);
    // Everything closed: no fd or mapping left behind.
    killFrontEnd(s.fe, [...s.kicks, ...s.calls], s.inflight);
    await until('the second session ending', () => s.be.closed);
    expect(liveMappings()).toBe(r.maps0);
    expect(fdCount()).toBe(r.fds0);
  });

  it('a new SET_MEM_TABLE while rings run: the request in flight finishes on the old table, then requests go on the new one', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const vclock = holdRequests(r);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const data = fill(1024, 80);
    const b = q.post(VIRTIO_BLK_T_OUT, 500, [{ len: 1024, data }]);
    q.kick();
    await until('the throttle holding B', () => r.exp.backend.throttle!.pending === 1);
    // Hot-plug a third region (its own memfd) above HIGH.
    const EXTRA = { gpa: 0x20000000, size: MiB, uva: 0x7f1000000000, off: 0 };
    const extraFd = memfdCreate('hotplug', MiB);
    toClose.push(extraFd);
    const extraMap = mmapFd(extraFd, MiB);
    toUnmap.push(extraMap);
    const maps1 = liveMappings();
    q.extra.push({ gpa: EXTRA.gpa, view: new Uint8Array(extraMap) });
    expect(await r.fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH, EXTRA]), [r.ram.fd, r.ram.fd, extraFd])).toBe(0n);
    expect(liveMappings()).toBe(maps1 + 1); // the old table is held by B
    // C, on the new table, kicked while B is still in flight on the old one.
    const cData = fill(2048, 81);
    const c = q.post(VIRTIO_BLK_T_OUT, 600, [{ gpa: EXTRA.gpa + 4096, len: 2048, data: cData }]);
    q.kick();
    vclock.advance(2 * SEC);
    expect((await q.wait(b)).status).toBe(VIRTIO_BLK_S_OK);
    vclock.advance(2 * SEC);
    expect((await q.wait(c, 'C (buffer in the hot-plugged region)')).status).toBe(VIRTIO_BLK_S_OK);
    expect(liveMappings()).toBe(maps1);
    vclock.advance(2 * SEC);
    const rd = await q.submit(VIRTIO_BLK_T_IN, 600, [{ gpa: EXTRA.gpa + 65536, len: 2048 }]);
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(rd.data[0]).toEqual(cData);
    r.disk.set(data, 500 * 512);
    r.disk.set(cData, 600 * 512);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    // Every request made available was used exactly once, in one sequence.
    expect(q.usedIdx).toBe(q.availIndex);
    expect(q.outstanding).toBe(0);
    expect(q.errors).toEqual([]);
    expect(r.be.errors).toEqual([]);
  });
});
