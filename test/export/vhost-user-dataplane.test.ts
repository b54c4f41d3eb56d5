// The vhost-user-blk data plane (src/export/vhost-user/dataplane.ts) against a real file: a
// VhostUserBlkExport on a raw file node, the TypeScript front-end of vhost-user-frontend.ts
// doing QEMU's start-up, and a minimal virtio-blk driver putting requests on split rings in
// memfd guest RAM, kicking eventfds and waiting on call eventfds. Requests are held in flight
// deterministically by the backend's I/O throttle on a virtual clock (blkdebug has no
// suspend/breakpoint in Spindle). This suite is the TypeScript path's: a raw file would go to
// the native worker (fast-path.ts), which vhost-user-fastpath.test.ts covers, and whose ring runs
// on another thread, so the exact kick and call sequences here would race.
process.env.SPINDLE_VHOST_FASTPATH = '0';

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { newConfig, setThrottleClock, Bucket, type ThrottleClock } from '../../src/backend/throttle.js';
import { configureGroup, ioLimitsDisable, ioLimitsEnable } from '../../src/backend/throttle-group.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import type { VhostUserBlkBackend } from '../../src/export/vhost-user/backend.js';
import { VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from '../../src/export/vhost-user/blk-features.js';
import { VhostUserBlkExport } from '../../src/export/vhost-user/export.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { closeFd, eventfd, eventfdRead, liveMappings, memfdCreate, mmapFd } from '../../src/native/unix-fd.js';
import {
  VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from '../../hw/virtio/virtio-blk-abi.js';
import { VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../hw/virtio/virtqueue.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import {
  BlkDriver, connect, fdCount, forget, type FrontEnd, frontEnds, guestRam, type GuestRamFd, HIGH, LOW, memTable, MiB,
  qemuStartup, QSIZE, RAM, ramOffset, releaseHeld, ringLayout, sleep, toClose, toUnmap, turns, until, vringAddr,
} from './vhost-user-frontend.js';

const dir = scratchDir('spindle-vhost-dp-');
let seq = 0;
const tmp = (name: string): string => join(dir, `${seq++}-${name}`);

const SIZE = 8 * MiB + 3 * 512; // not a power of two: the last sectors are their own case
const CAP = SIZE / 512;
const bit = (n: number): bigint => 1n << BigInt(n);

/** Virtual time for the throttle: queued requests go only when the test advances the clock. */
class VirtualClock implements ThrottleClock {
  t = 5_000_000_000;
  timers: { at: number; fn: () => void }[] = [];
  now(): number {
    return this.t;
  }
  schedule(fn: () => void, delayNs: number): unknown {
    const h = { at: this.t + delayNs, fn };
    this.timers.push(h);
    return h;
  }
  cancel(h: unknown): void {
    const i = this.timers.indexOf(h as { at: number; fn: () => void });
    if (i >= 0) this.timers.splice(i, 1);
  }
  advance(ns: number): void {
    const end = this.t + ns;
    for (;;) {
      const due = this.timers.filter((h) => h.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      this.timers.splice(this.timers.indexOf(due), 1);
      this.t = Math.max(this.t, due.at);
      due.fn();
    }
    this.t = end;
  }
}

const exportsOpen: VhostUserBlkExport[] = [];
const nodes: BlockNode[] = [];
let prevClock: ThrottleClock | null = null;

afterEach(async () => {
  for (const f of frontEnds.splice(0)) f.close();
  for (const e of exportsOpen.splice(0)) {
    await ioLimitsDisable(e.backend); // throttled requests go, so close() can wait for them
    await e.close();
  }
  if (prevClock) setThrottleClock(prevClock);
  prevClock = null;
  releaseHeld();
  for (const n of nodes.splice(0)) if (!n.deleted) unref(n);
  await settleCloses();
});

interface Rig {
  exp: VhostUserBlkExport;
  path: string;
  img: string;
  /** The file's expected content (updated by tests as they write). */
  disk: Buffer;
  ram: GuestRamFd;
  fe: FrontEnd;
  be: VhostUserBlkBackend;
  drv: BlkDriver[];
  kicks: number[];
  calls: number[];
  /** fds and mappings before the front-end connected (guest RAM and the listener included). */
  fds0: number;
  maps0: number;
}

interface RigOptions {
  numQueues?: number;
  writable?: boolean;
  /** Open the node read-only too (default: as the export). */
  nodeReadOnly?: boolean;
  acked?: (offered: bigint) => bigint;
  id?: string;
}

async function rig(o: RigOptions = {}): Promise<Rig> {
  const nq = o.numQueues ?? 1;
  const writable = o.writable ?? true;
  const ro = o.nodeReadOnly ?? !writable;
  const img = tmp('disk.raw');
  const disk = pattern(SIZE, 5);
  writeFileSync(img, disk);
  const node = await openNode({ driver: 'raw', 'read-only': ro, discard: 'unmap', file: { driver: 'file', filename: img, 'read-only': ro, discard: 'unmap' } });
  nodes.push(node);
  const path = tmp('vu.sock');
  const exp = new VhostUserBlkExport({ id: o.id ?? 'disk0', path, node, writable, numQueues: nq });
  exportsOpen.push(exp);
  const ram = guestRam();
  const fds0 = fdCount();
  const maps0 = liveMappings();
  return { ...(await session(exp, path, ram, nq, o.acked)), exp, path, img, disk: Buffer.from(disk), ram, fds0, maps0 };
}

/** A front-end session: QEMU's start-up, then a driver per queue (rings cleaned first). */
async function session(exp: VhostUserBlkExport, path: string, ram: GuestRamFd, nq: number, acked?: (f: bigint) => bigint) {
  const drv = Array.from({ length: nq }, (_, i) => new BlkDriver(ram, i));
  const { fe, be } = await connect(exp, path);
  const { kicks, calls } = await qemuStartup(fe, ram.fd, nq, { length: SIZE, acked: acked ?? ((f) => f) });
  drv.forEach((d, i) => d.attach(kicks[i]!, calls[i]!, be.hasFeature(VIRTIO_RING_F_EVENT_IDX)));
  return { fe, be, drv, kicks, calls };
}

const fileNow = (r: Rig): Buffer => readFileSync(r.img);
const fill = (len: number, seed: number): Uint8Array => new Uint8Array(pattern(len, seed));
/** A discard / write-zeroes segment (struct virtio_blk_discard_write_zeroes). */
function dwz(sector: number, count: number, flags = 0): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(sector), true);
  v.setUint32(8, count, true);
  v.setUint32(12, flags, true);
  return b;
}

/** Throttle the export's backend to one operation a second on a virtual clock. */
function holdRequests(r: Rig): VirtualClock {
  const vclock = new VirtualClock();
  prevClock ??= setThrottleClock(vclock);
  ioLimitsEnable(r.exp.backend, `vu-${seq++}`);
  const cfg = newConfig();
  cfg.buckets[Bucket.OPS_TOTAL]!.avg = 1; // the bucket holds 0.1 op: one request goes, the next waits 1 s
  configureGroup(r.exp.backend.throttle!, cfg);
  return vclock;
}
const SEC = 1e9;

describe('vhost-user-blk data plane: reads and writes through the rings', () => {
  it('writes multi-segment buffers at the end of the disk, reads them back, and the file has them', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const data = fill(3584, 11); // 7 sectors in segments of 512, 1024 and 2048 bytes
    const w = await q.submit(VIRTIO_BLK_T_OUT, CAP - 7, [
      { len: 512, data: data.subarray(0, 512) }, { len: 1024, data: data.subarray(512, 1536) }, { len: 2048, data: data.subarray(1536) },
    ]);
    expect(w.status).toBe(VIRTIO_BLK_S_OK);
    expect(w.len).toBe(1); // only the status byte was written into the chain
    r.disk.set(data, SIZE - 3584);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    // Read back in differently split buffers (device-writable), status in its own descriptor.
    const rd = await q.submit(VIRTIO_BLK_T_IN, CAP - 7, [{ len: 2048 }, { len: 512 }, { len: 1024 }]);
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(rd.len).toBe(3584 + 1);
    expect(Buffer.concat(rd.data).equals(Buffer.from(data))).toBe(true);
    // A read from the middle of the file sees the file's bytes.
    const mid = await q.submit(VIRTIO_BLK_T_IN, 1000, [{ len: 4096 }]);
    expect(Buffer.from(mid.data[0]!).equals(r.disk.subarray(1000 * 512, 1000 * 512 + 4096))).toBe(true);
    // Each completion interrupted the driver (it waits on the call eventfd), and nothing else went wrong.
    expect(q.calls).toBeGreaterThanOrEqual(3);
    expect(q.errors).toEqual([]);
    expect(r.be.errors).toEqual([]);
    expect(q.usedIdx).toBe(7 + 3);
  });

  it('a request past the end of the disk fails with IOERR and touches neither the buffer nor the file', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    for (const [sector, len] of [[CAP - 1, 1024], [CAP, 512], [2 ** 40, 512]] as const) {
      const buf = q.alloc(len, 512);
      q.bytes(buf, len).fill(0xee);
      const c = await q.submit(VIRTIO_BLK_T_IN, sector, [{ gpa: buf, len }]);
      expect(c.status, `read at ${sector}`).toBe(VIRTIO_BLK_S_IOERR);
      expect(c.data[0]!.every((b) => b === 0xee)).toBe(true);
      const w = await q.submit(VIRTIO_BLK_T_OUT, sector, [{ len, data: fill(len, 3) }]);
      expect(w.status, `write at ${sector}`).toBe(VIRTIO_BLK_S_IOERR);
    }
    // Not a multiple of the sector size.
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 513 }])).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    // The queue still works afterwards.
    expect((await q.submit(VIRTIO_BLK_T_IN, CAP - 1, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
  });

  it('GET_ID returns the export id as serial (20 bytes, truncated, zero-padded); FLUSH and unknown types', async () => {
    const r = await rig({ id: 'vhost-user-dataplane-export' });
    const q = r.drv[0]!;
    const c = await q.submit(VIRTIO_BLK_T_GET_ID, 0, [{ len: 7 }, { len: 13 }]);
    expect(c.status).toBe(VIRTIO_BLK_S_OK);
    expect(Buffer.concat(c.data).toString('latin1')).toBe('vhost-user-dataplane');
    const r2 = await rig({ id: 'd1' });
    const id = await r2.drv[0]!.submit(VIRTIO_BLK_T_GET_ID, 0, [{ len: 20, data: new Uint8Array(20).fill(0x55) }]);
    expect([...id.data[0]!]).toEqual([0x64, 0x31, ...new Array<number>(18).fill(0)]);
    expect((await q.submit(VIRTIO_BLK_T_FLUSH, 0)).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q.submit(99, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_UNSUPP);
  });

  it('indirect descriptors: one ring descriptor per request, mixed with direct chains', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    expect(r.be.hasFeature(VIRTIO_RING_F_INDIRECT_DESC)).toBe(true);
    const a = fill(4 * 512, 21);
    const b = fill(2 * 512, 22);
    // Both in flight at once, one kick.
    const old = q.availIndex;
    const pa = q.post(VIRTIO_BLK_T_OUT, 64, [0, 1, 2, 3].map((i) => ({ len: 512, data: a.subarray(512 * i, 512 * (i + 1)) })), { indirect: true });
    const pb = q.post(VIRTIO_BLK_T_OUT, 128, [{ len: 1024, data: b }]);
    expect(pb.head).toBe(pa.head + 1); // the indirect request took one descriptor of the ring
    expect(q.needsKick(old)).toBe(true);
    q.kick();
    expect((await q.wait(pa)).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q.wait(pb)).status).toBe(VIRTIO_BLK_S_OK);
    r.disk.set(a, 64 * 512);
    r.disk.set(b, 128 * 512);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    const rd = await q.submit(VIRTIO_BLK_T_IN, 64, [{ len: 1536 }, { len: 512 }], { indirect: true });
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(rd.len).toBe(2049);
    expect(Buffer.concat(rd.data).equals(Buffer.from(a))).toBe(true);
  });
});

describe('notification suppression (virtio 1.x 2.7.7, 2.7.10)', () => {
  it('EVENT_IDX: the back-end publishes avail_event; a request needing a kick waits for it, one not needing a kick is still served', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    expect(r.be.hasFeature(VIRTIO_RING_F_EVENT_IDX)).toBe(true);
    // Starting the ring looked at it (nothing available) and asked for a kick at the base.
    expect(q.availEvent).toBe(7);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(q.availEvent).toBe(8);
    // Published, but avail_event says a kick is needed and none came: the device need not
    // look (it does not poll), and does not.
    const calls0 = q.calls;
    const b = q.post(VIRTIO_BLK_T_IN, 1, [{ len: 512 }]);
    expect(q.needsKick(8)).toBe(true);
    await turns(10);
    await sleep(20);
    q.poll();
    expect(q.completed(b)).toBeUndefined();
    expect(q.usedIdx).toBe(8);
    expect(q.calls).toBe(calls0);
    q.kick();
    expect((await q.wait(b)).status).toBe(VIRTIO_BLK_S_OK);
    expect(q.availEvent).toBe(9);
    // C needs a kick; D, published before the device ran, does not (avail_event is still 9):
    // vring_need_event says the device will see it, so it must serve D without another kick.
    const kicks0 = q.kicks;
    const c = q.post(VIRTIO_BLK_T_IN, 2, [{ len: 512 }]);
    expect(q.needsKick(9)).toBe(true);
    q.kick();
    const d = q.post(VIRTIO_BLK_T_IN, 3, [{ len: 512 }]);
    expect(q.needsKick(10)).toBe(false);
    expect((await q.wait(c)).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q.wait(d, 'D (published without a kick)')).status).toBe(VIRTIO_BLK_S_OK);
    expect(q.kicks).toBe(kicks0 + 1);
    expect(q.availEvent).toBe(11);
  });

  it('EVENT_IDX: used_event suppresses interrupts: three completions, one call when the third is used', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }]); // used idx 8
    q.holdUsedEvent = true;
    q.w16(q.usedEventAddr, 8 + 2); // interrupt when the used entry at index 10 is written
    const calls0 = q.calls;
    const old = q.availIndex;
    const ps = [0, 1, 2].map((i) => q.post(VIRTIO_BLK_T_OUT, 200 + i, [{ len: 512, data: fill(512, 30 + i) }]));
    expect(q.needsKick(old)).toBe(true);
    q.kick();
    // The one interrupt comes when the third entry is used: the other two are there by then.
    expect((await q.wait(ps[2]!)).status).toBe(VIRTIO_BLK_S_OK);
    for (const p of ps.slice(0, 2)) expect(q.completed(p)?.status).toBe(VIRTIO_BLK_S_OK);
    expect(q.usedIdx).toBe(11);
    expect(q.calls - calls0).toBe(1);
    // used_event behind the used index by more than the batch: no interrupt at all.
    q.w16(q.usedEventAddr, 5);
    const p = q.post(VIRTIO_BLK_T_IN, 0, [{ len: 512 }]);
    q.kick();
    await until('used entry', () => q.usedIdx === 12);
    await turns(5);
    expect(eventfdRead(q.callFd)).toBe(0);
    q.collect();
    expect(q.completed(p)?.status).toBe(VIRTIO_BLK_S_OK);
  });

  it('without EVENT_IDX: avail_event is not written and VRING_AVAIL_F_NO_INTERRUPT suppresses calls', async () => {
    const r = await rig({ acked: (f) => f & ~bit(VIRTIO_RING_F_EVENT_IDX) });
    const q = r.drv[0]!;
    expect(r.be.hasFeature(VIRTIO_RING_F_EVENT_IDX)).toBe(false);
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(q.availEvent).toBe(0); // the driver zeroed it; the device has no business there
    q.w16(q.avail, VRING_AVAIL_F_NO_INTERRUPT);
    const calls0 = q.calls;
    const p = q.post(VIRTIO_BLK_T_IN, 1, [{ len: 512 }]);
    q.kick();
    await until('used entry', () => q.usedIdx === 9);
    await turns(5);
    expect(eventfdRead(q.callFd)).toBe(0);
    expect(q.calls).toBe(calls0);
    q.collect();
    expect(q.completed(p)?.status).toBe(VIRTIO_BLK_S_OK);
    q.w16(q.avail, 0);
    expect((await q.submit(VIRTIO_BLK_T_IN, 2, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
  });
});

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
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const used0 = q.usedIdx;
    q.publishHead(500); // not a descriptor of a 128-entry table
    q.kick();
    await turns(10);
    await sleep(20);
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

describe('discard, write-zeroes and read-only exports', () => {
  it('writable: DISCARD and WRITE_ZEROES offered; zeroes land in the file; bad segments are refused', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    expect(r.be.offeredFeatures & bit(VIRTIO_BLK_F_DISCARD)).not.toBe(0n);
    expect(r.be.offeredFeatures & bit(VIRTIO_BLK_F_WRITE_ZEROES)).not.toBe(0n);
    expect(r.be.offeredFeatures & bit(VIRTIO_BLK_F_RO)).toBe(0n);
    expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(100, 8) }])).status).toBe(VIRTIO_BLK_S_OK);
    r.disk.fill(0, 100 * 512, 108 * 512);
    expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(CAP - 3, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) }], { indirect: true })).status).toBe(VIRTIO_BLK_S_OK);
    r.disk.fill(0, SIZE - 3 * 512);
    expect(fileNow(r).equals(r.disk)).toBe(true);
    // Discard: OK; whatever it does to the range, nothing around it changes.
    expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(4096, 2048) }])).status).toBe(VIRTIO_BLK_S_OK);
    const f = fileNow(r);
    expect(f.subarray(0, 4096 * 512).equals(r.disk.subarray(0, 4096 * 512))).toBe(true);
    expect(f.subarray(6144 * 512).equals(r.disk.subarray(6144 * 512))).toBe(true);
    r.disk.set(f.subarray(4096 * 512, 6144 * 512), 4096 * 512);
    // virtio 1.x 5.2.6.2: UNSUPP for discard with the unmap flag, and for unknown flags.
    expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) }])).status).toBe(VIRTIO_BLK_S_UNSUPP);
    expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(0, 1, 2) }])).status).toBe(VIRTIO_BLK_S_UNSUPP);
    // Past the end: IOERR.
    expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(CAP - 1, 2) }])).status).toBe(VIRTIO_BLK_S_IOERR);
    expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(CAP, 1) }])).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(fileNow(r).equals(r.disk)).toBe(true);
  });

  it('writable but DISCARD / WRITE_ZEROES not acked by the driver: UNSUPP, file unchanged', async () => {
    const r = await rig({ acked: (f) => f & ~bit(VIRTIO_BLK_F_DISCARD) & ~bit(VIRTIO_BLK_F_WRITE_ZEROES) });
    const q = r.drv[0]!;
    expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(0, 8) }])).status).toBe(VIRTIO_BLK_S_UNSUPP);
    expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(0, 8) }])).status).toBe(VIRTIO_BLK_S_UNSUPP);
    expect(fileNow(r).equals(r.disk)).toBe(true);
  });

  for (const nodeReadOnly of [true, false]) {
    it(`read-only export (${nodeReadOnly ? 'read-only' : 'writable'} node): RO offered, no discard/write-zeroes, writes fail, file unchanged`, async () => {
      const r = await rig({ writable: false, nodeReadOnly });
      const q = r.drv[0]!;
      expect(r.be.offeredFeatures & bit(VIRTIO_BLK_F_RO)).not.toBe(0n);
      expect(r.be.offeredFeatures & (bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES))).toBe(0n);
      expect(r.be.hasFeature(VIRTIO_BLK_F_RO)).toBe(true);
      // Acking what was not offered is refused (REPLY_ACK 1), so the driver cannot get discard.
      expect(await r.fe.ack(P.VHOST_USER_SET_FEATURES, P.u64Payload(r.be.ackedFeatures | bit(VIRTIO_BLK_F_DISCARD)))).toBe(1n);
      expect((await q.submit(VIRTIO_BLK_T_OUT, 0, [{ len: 4096, data: fill(4096, 40) }])).status).toBe(VIRTIO_BLK_S_IOERR);
      expect((await q.submit(VIRTIO_BLK_T_OUT, CAP - 1, [{ len: 512, data: fill(512, 41) }], { indirect: true })).status).toBe(VIRTIO_BLK_S_IOERR);
      expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(0, 8) }])).status).toBe(VIRTIO_BLK_S_UNSUPP);
      expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(0, 8) }])).status).toBe(VIRTIO_BLK_S_UNSUPP);
      const rd = await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 4096 }]);
      expect(rd.status).toBe(VIRTIO_BLK_S_OK);
      expect(Buffer.from(rd.data[0]!).equals(r.disk.subarray(0, 4096))).toBe(true);
      expect(fileNow(r).equals(r.disk)).toBe(true);
    });
  }
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
    // QEMU's vhost_dev_start again: num, base, addr, kick (a new eventfd), call, enable.
    const l = ringLayout(0);
    expect(await r.fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(0, QSIZE))).toBe(0n);
    expect(await r.fe.ack(P.VHOST_USER_SET_VRING_BASE, P.vringStatePayload(0, base))).toBe(0n);
    expect(await r.fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, l.desc, l.used, l.avail))).toBe(0n);
    const kick = eventfd();
    toClose.push(kick);
    expect(await r.fe.ack(P.VHOST_USER_SET_VRING_KICK, P.u64Payload(0), [kick])).toBe(0n);
    expect(await r.fe.ack(P.VHOST_USER_SET_VRING_ENABLE, P.vringStatePayload(0, 1))).toBe(0n);
    q.kickFd = kick;
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
    r.fe.close();
    frontEnds.splice(frontEnds.indexOf(r.fe), 1);
    for (const fd of [...r.kicks, ...r.calls]) {
      forget(fd);
      closeFd(fd);
    }
    await until('the session ending', () => r.be.closed);
    expect(r.exp.session).toBeNull();
    // The request still uses guest memory: the mapping is held until it completes.
    expect(liveMappings()).toBe(r.maps0 + 1);
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
    s.fe.close();
    frontEnds.length = 0;
    for (const fd of [...s.kicks, ...s.calls]) {
      forget(fd);
      closeFd(fd);
    }
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
