// vhost-user inflight I/O tracking (specs/vhost-user.rst, "Inflight I/O tracking"; the
// back-end's side is src/export/vhost-user/inflight.ts and the native worker's ring.cc).
// A back-end that completes out of order and dies leaves chains in flight that the used index
// does not describe; the next back-end must resubmit exactly those, once, and not re-read the
// avail entries before them. The record's layout is written and read here independently of
// the back-end's code, so both must agree with the spec's.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from '../../hw/virtio/virtio-blk-abi.js';
import { VIRTIO_RING_F_EVENT_IDX } from '../../src/export/vhost-user/blk-features.js';
import { InflightQueue, inflightRegionSize } from '../../src/export/vhost-user/inflight.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { liveMappings, memfdCreate, mmapFd } from '../../src/native/unix-fd.js';
import { ok, qemuImg } from '../cli/helpers.js';
import { BlkDriver, type Pending } from './vhost-user-blk-driver.js';
import { exportRig, fill, onPath, SIZE, useExportRig } from './vhost-user-export-rig.js';
import {
  connect, getInflight, type Inflight, killFrontEnd, QSIZE, qemuStartup, restartRing, setInflight, toClose, toUnmap, until,
} from './vhost-user-frontend.js';

useExportRig();

// The spec's split-ring region: header (u64 features, u16 version, u16 desc_num,
// u16 last_batch_head, u16 used_idx), then per head 16 bytes (u8 inflight, 5 pad, u16 next, u64 counter).
const REGION = Math.ceil((16 + 16 * QSIZE) / 64) * 64;
class Region {
  readonly dv: DataView;
  constructor(buffer: ArrayBuffer, queue = 0) {
    this.dv = new DataView(buffer, queue * REGION, REGION);
  }
  get version(): number { return this.dv.getUint16(8, true); }
  get lastBatchHead(): number { return this.dv.getUint16(12, true); }
  get usedIdx(): number { return this.dv.getUint16(14, true); }
  flagged(): number[] {
    const out: number[] = [];
    for (let h = 0; h < QSIZE; h++) if (this.dv.getUint8(16 + 16 * h)) out.push(h);
    return out;
  }
  counter(h: number): number { return Number(this.dv.getBigUint64(16 + 16 * h + 8, true)); }
  /** Writes a record as a back-end that died would have left it. */
  set(o: { usedIdx: number; lastBatchHead: number; heads: { head: number; inflight: boolean; counter: number; next?: number }[] }): void {
    this.dv.setUint16(8, 1, true);
    this.dv.setUint16(10, QSIZE, true);
    this.dv.setUint16(12, o.lastBatchHead, true);
    this.dv.setUint16(14, o.usedIdx, true);
    for (const h of o.heads) {
      this.dv.setUint8(16 + 16 * h.head, h.inflight ? 1 : 0);
      this.dv.setUint16(16 + 16 * h.head + 6, h.next ?? 0, true);
      this.dv.setBigUint64(16 + 16 * h.head + 8, BigInt(h.counter), true);
    }
  }
}

describe('the inflight record (InflightQueue)', () => {
  const fresh = (): { q: InflightQueue; r: Region } => {
    const buffer = new ArrayBuffer(inflightRegionSize(QSIZE));
    expect(buffer.byteLength).toBe(REGION);
    return { q: new InflightQueue(buffer, 0, QSIZE), r: new Region(buffer) };
  };

  it('a fresh region is initialised and popping starts at the base; taken, pushed and published chains are recorded as the spec orders them', () => {
    const { q, r } = fresh();
    expect(q.recover(QSIZE, 40, 38)).toEqual({ resubmit: [], lastAvail: 40, problems: [] });
    expect([r.version, r.usedIdx, r.dv.getUint16(10, true)]).toEqual([1, 38, QSIZE]);
    for (const h of [5, 2, 9]) q.taken(h);
    expect(r.flagged()).toEqual([2, 5, 9]);
    expect([r.counter(5), r.counter(2), r.counter(9)]).toEqual([0, 1, 2]);
    q.pushed(2); // completed out of order
    q.pushed(9);
    expect(r.flagged()).toEqual([2, 5, 9]); // not published yet: still in flight
    expect(r.lastBatchHead).toBe(9);
    expect(r.dv.getUint16(16 + 16 * 9 + 6, true)).toBe(2); // the batch list: 9 -> 2
    q.published(40);
    expect(r.flagged()).toEqual([5]);
    expect(r.usedIdx).toBe(40);
  });

  it('recovery resubmits what was in flight oldest first, after the avail entries those took', () => {
    const { q, r } = fresh();
    r.set({ usedIdx: 100, lastBatchHead: 3, heads: [{ head: 7, inflight: true, counter: 12 }, { head: 3, inflight: false, counter: 10 }, { head: 1, inflight: true, counter: 11 }] });
    expect(q.recover(QSIZE, 100, 100)).toEqual({ resubmit: [1, 7], lastAvail: 102, problems: [] });
    // The next chain taken is ordered after them.
    q.taken(4);
    expect(r.counter(4)).toBe(13);
  });

  it('a back-end that died between storing the used index and clearing the batch: the batch list says which heads the index covered', () => {
    const { q, r } = fresh();
    // Batch 3 -> 6 was published (used index 102) but the flags and used_idx were not updated.
    r.set({ usedIdx: 100, lastBatchHead: 3, heads: [
      { head: 3, inflight: true, counter: 4, next: 6 }, { head: 6, inflight: true, counter: 2, next: 0 }, { head: 0, inflight: true, counter: 3 },
    ] });
    expect(q.recover(QSIZE, 102, 102)).toEqual({ resubmit: [0], lastAvail: 103, problems: [] });
    expect(r.flagged()).toEqual([0]);
    expect(r.usedIdx).toBe(102);
  });

  it('entries the ring cannot have are dropped and reported, not resubmitted', () => {
    const { q, r } = fresh();
    r.set({ usedIdx: 9, lastBatchHead: 0, heads: [{ head: 100, inflight: true, counter: 1 }, { head: 2, inflight: true, counter: 2 }] });
    const rec = q.recover(64, 9, 9); // the ring is smaller than the record
    expect(rec.resubmit).toEqual([2]);
    expect(rec.problems).toEqual(['head 100 is recorded in flight but the ring has 64 entries']);
    expect(r.flagged()).toEqual([2]);
  });
});

describe('GET_INFLIGHT_FD / SET_INFLIGHT_FD', () => {
  it('the back-end allocates a zeroed buffer of one region per queue, and records in it as the rings run', async () => {
    const r = await exportRig('raw', { numQueues: 2 });
    const inf = r.inflight!;
    expect(inf.size).toBe(2 * REGION);
    const q = r.drv[1]!;
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const reg = new Region(inf.buffer, 1);
    await until('the record published', () => reg.usedIdx === q.usedIdx);
    expect([reg.version, reg.flagged()]).toEqual([1, []]);
    expect(new Region(inf.buffer, 0).version).toBe(1); // ring 0 started too, nothing taken
  });

  it('the native worker records the chains it forwards as in flight, in the order it took them, until their used index is published', async () => {
    const r = await exportRig('qcow2', { qcow2: (_raw, q) => void ok(qemuImg('create', '-q', '-f', 'qcow2', q, String(SIZE))) });
    const q = r.drv[0]!;
    const reg = new Region(r.inflight!.buffer);
    const ps = [0, 1, 2, 3].map((i) => q.post(VIRTIO_BLK_T_OUT, (30 + i) * 128, [{ len: 8192, data: fill(8192, 120 + i) }]));
    q.kick();
    // This thread blocks until the worker has taken all four (fresh clusters: forwarded here,
    // where nothing runs while we spin).
    const end = Date.now() + 3000;
    while (reg.flagged().length < 4 && Date.now() < end);
    const heads = ps.map((p) => p.head);
    expect(reg.flagged()).toEqual([...heads].sort((x, y) => x - y));
    const counters = heads.map((h) => reg.counter(h));
    expect(counters).toEqual([...counters].sort((x, y) => x - y));
    expect(new Set(counters).size).toBe(4);
    for (const p of ps) expect((await q.wait(p)).status).toBe(VIRTIO_BLK_S_OK);
    await until('the record published', () => reg.usedIdx === q.usedIdx);
    expect(reg.flagged()).toEqual([]);
  });

  for (const ts of [false, true]) {
    it(`a device reset's new buffer: once the ring restarts on it, the old one is unmapped (${ts ? 'TypeScript data plane' : 'native worker'})`, async () => {
      if (ts) onPath({ fastPath: '0' });
      const r = await exportRig('raw');
      expect(r.exp.onFastPath).toBe(!ts);
      const q = r.drv[0]!;
      expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
      // QEMU's reset: the ring stops, a new buffer is asked for and handed back, the ring restarts.
      const vb = await r.fe.call(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(0, 0));
      const base = P.dataView(vb).getUint32(4, true);
      const maps = liveMappings();
      const next = await getInflight(r.fe, 1);
      await setInflight(r.fe, next);
      expect(liveMappings()).toBe(maps + 2); // ours, the back-end's; its old one is still held
      q.kickFd = await restartRing(r.fe, 0, base);
      expect(liveMappings()).toBe(maps + 1); // the old one went
      expect((await q.submit(VIRTIO_BLK_T_IN, 1, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
      const reg = new Region(next.buffer);
      await until('the new record published', () => reg.usedIdx === q.usedIdx);
      expect(reg.version).toBe(1);
    });
  }

  it('is refused when not negotiated, and for a bad description; a replaced buffer is unmapped', async () => {
    const r = await exportRig('raw');
    // Queue size not a power of two: refused (REPLY_ACK failure).
    const bad = new Uint8Array(24);
    P.dataView(bad).setUint16(16, 1, true);
    P.dataView(bad).setUint16(18, 100, true);
    expect(await r.fe.ack(P.VHOST_USER_GET_INFLIGHT_FD, bad)).toBe(1n);
    expect(r.be.errors.at(-1)).toMatch(/GET_INFLIGHT_FD: queue size 100 is not a power of 2/);
    // A buffer too small for what it claims.
    const small = new Uint8Array(24);
    P.dataView(small).setBigUint64(0, 64n, true);
    P.dataView(small).setUint16(16, 1, true);
    P.dataView(small).setUint16(18, QSIZE, true);
    expect(await r.fe.ack(P.VHOST_USER_SET_INFLIGHT_FD, small, [r.inflight!.fd])).toBe(1n);
    expect(r.be.errors.at(-1)).toMatch(/mmap size 64 is less than/);
    // A file shorter than it claims (a store past its end would raise SIGBUS).
    const short = memfdCreate('short-inflight', 64);
    toClose.push(short);
    P.dataView(small).setBigUint64(0, BigInt(REGION), true);
    expect(await r.fe.ack(P.VHOST_USER_SET_INFLIGHT_FD, small, [short])).toBe(1n);
    expect(r.be.errors.at(-1)).toMatch(/the fd holds 64 bytes, less than \[0, \+2112\)/);
    // A new buffer replaces the old one, which goes once the ring stops writing it.
    const maps = liveMappings();
    const next = await getInflight(r.fe, 1);
    expect(liveMappings()).toBe(maps + 2); // ours and the back-end's; its old one is still held by ring 0
    await setInflight(r.fe, next);
    expect(liveMappings()).toBe(maps + 2);
    expect(r.be.inflight?.queue(0)).not.toBeNull();
  });

  it('without the protocol feature the request closes the session', async () => {
    const r = await exportRig('raw');
    killFrontEnd(r.fe, [...r.kicks, ...r.calls], r.inflight);
    await until('the session ending', () => r.be.closed);
    const { fe, be } = await connect(r.exp, r.exp.path);
    await qemuStartup(fe, r.ram.fd, 1, { length: SIZE, inflight: 'off' });
    fe.send(P.VHOST_USER_GET_INFLIGHT_FD, new Uint8Array(24));
    await until('the session ending', () => be.closed);
    expect(be.errors.at(-1)).toMatch(/INFLIGHT_SHMFD protocol feature not negotiated/);
  });
});

/**
 * The previous back-end died with this state: avail [A, B, C] from index 7; it completed B
 * (used index 8) while A and C were in flight. `torn`: it died after storing the used index but
 * before clearing B's flag and recording used_idx. QEMU reconnects with the base at the used
 * index (8) and the buffer it kept.
 */
async function afterCrash(format: 'raw' | 'qcow2', torn: boolean) {
  const r = await exportRig(format, format === 'qcow2' ? { qcow2: (_raw, q) => void ok(qemuImg('create', '-q', '-f', 'qcow2', q, String(SIZE))) } : {});
  killFrontEnd(r.fe, [...r.kicks, ...r.calls], r.inflight);
  await until('the session ending', () => r.be.closed);

  const q = new BlkDriver(r.ram, 0); // avail and used at 7
  const a = q.post(VIRTIO_BLK_T_OUT, 64, [{ len: 4096, data: fill(4096, 201) }]);
  const marker = new Uint8Array(4096).fill(0xee);
  const b = q.post(VIRTIO_BLK_T_IN, 0, [{ len: 4096, data: marker }]); // a read: its buffer shows a second run
  const c = q.post(VIRTIO_BLK_T_OUT, 2048, [{ len: 8192, data: fill(8192, 202) }]);
  // B's completion, as the dead back-end wrote it.
  q.bytes(b.statusGpa, 1)[0] = VIRTIO_BLK_S_OK;
  const slot = P.dataView(q.bytes(q.used + 4 + 8 * (7 % QSIZE), 8));
  slot.setUint32(0, b.head, true);
  slot.setUint32(4, 4097, true);
  q.w16(q.used + 2, 8);
  q.w16(q.usedEventAddr, 8); // interrupt me after B

  const fd = memfdCreate('test-inflight', REGION);
  toClose.push(fd);
  const buffer = mmapFd(fd, REGION);
  toUnmap.push(buffer);
  const reg = new Region(buffer);
  reg.set({
    usedIdx: torn ? 7 : 8, lastBatchHead: b.head,
    heads: [{ head: a.head, inflight: true, counter: 30 }, { head: b.head, inflight: torn, counter: 31 }, { head: c.head, inflight: true, counter: 32 }],
  });
  const inflight: Inflight = { fd, size: REGION, numQueues: 1, queueSize: QSIZE, buffer };
  const { fe, be } = await connect(r.exp, r.exp.path);
  const { kicks, calls } = await qemuStartup(fe, r.ram.fd, 1, { length: SIZE, inflight, base: () => 8 });
  q.attach(kicks[0]!, calls[0]!, be.hasFeature(VIRTIO_RING_F_EVENT_IDX));
  return { r, q, a, b, c, marker, reg, be };
}

async function checkRecovered(s: Awaited<ReturnType<typeof afterCrash>>): Promise<void> {
  const { q, a, b, c, marker, reg, be } = s;
  const done = new Map<Pending, number>();
  for (const p of [a, c]) done.set(p, (await q.wait(p)).status);
  expect([...done.values()]).toEqual([VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK]);
  expect(q.completed(b)?.status).toBe(VIRTIO_BLK_S_OK); // B: the dead back-end's completion...
  expect(q.bytes(b.segs[0]!.gpa, 4096)).toEqual(marker); // ...and not run again
  // New requests go on after them.
  const d = await q.submit(VIRTIO_BLK_T_IN, 64, [{ len: 4096 }]);
  expect(d.status).toBe(VIRTIO_BLK_S_OK);
  expect(d.data[0]).toEqual(fill(4096, 201));
  expect((await q.submit(VIRTIO_BLK_T_IN, 2048, [{ len: 8192 }])).data[0]).toEqual(fill(8192, 202));
  expect(q.errors).toEqual([]); // no used id twice, none that was not in flight
  expect(q.usedIdx).toBe(12);
  await until('the record published', () => reg.usedIdx === 12);
  expect(reg.flagged()).toEqual([]);
  expect(be.errors).toEqual([]);
}

describe('a back-end restarted under a running guest resubmits what the dead one left in flight', () => {
  for (const torn of [false, true]) {
    const how = torn ? ' (it died between publishing a batch and clearing it)' : '';
    it(`TypeScript data plane${how}`, async () => {
      onPath({ fastPath: '0' });
      const s = await afterCrash('raw', torn);
      expect(s.r.exp.onFastPath).toBe(false);
      await checkRecovered(s);
      const img = readFileSync(s.r.img);
      expect(img.subarray(64 * 512, 64 * 512 + 4096)).toEqual(Buffer.from(fill(4096, 201)));
    });

    it(`native worker, raw${how}`, async () => {
      const s = await afterCrash('raw', torn);
      expect(s.r.exp.onFastPath).toBe(true);
      await checkRecovered(s);
      const img = readFileSync(s.r.img);
      expect(img.subarray(2048 * 512, 2048 * 512 + 8192)).toEqual(Buffer.from(fill(8192, 202)));
    });

    it(`native worker forwarding to the block layer, qcow2${how}`, async () => {
      const s = await afterCrash('qcow2', torn);
      expect(s.r.exp.onFastPath).toBe(true);
      await checkRecovered(s);
      expect(s.r.node.stats.wrOps).toBe(2); // A and C, once each
    });
  }
});
