// The native vhost-user-blk worker against real memory, real fds and its real thread: guest
// RAM is a memfd mapped with mmapLayout as two spans with a hole between (and reserved,
// unmapped space after them), a tiny split-ring driver written here fills descriptor table,
// avail ring (with used_event) and reads the used ring; the disk is a temp file.
import { closeSync, openSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { closeFd, eventfd, eventfdRead, eventfdWrite, memfdCreate, mmapLayout } from '../../src/native/unix-fd.js';
import { VhostBlkWorker } from '../../src/native/vhost-blk-worker.js';
import { pattern, tempDir } from './helpers.js';

const MiB = 1 << 20;
const SPAN_A: [number, number] = [0, MiB];
const SPAN_B: [number, number] = [2 * MiB, 3 * MiB];
const HOLE = MiB + 4096; // inside [1 MiB, 2 MiB): PROT_NONE
const BEYOND = 3 * MiB + 4096; // inside the layout, after the last span: PROT_NONE
const LAYOUT = 4 * MiB;
const DISK_SECTORS = 2048; // 1 MiB

const T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13;
const S_OK = 0, S_IOERR = 1, S_UNSUPP = 2;
const F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4;

const fdCount = (): number => readdirSync('/proc/self/fd').length;
const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

async function until(what: string, pred: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await turn();
  }
}

/** One descriptor of a chain: guest address, length, device-writable. */
type Seg = [addr: number, len: number, write: boolean];

/** A minimal split-ring driver over the layout. */
class Driver {
  readonly dv: DataView;
  readonly u8: Uint8Array;
  private readonly u16: Uint16Array;
  private free: number[] = [];
  private readonly chains = new Map<number, number[]>();
  availIdx = 0;
  lastUsed = 0;

  constructor(readonly mem: ArrayBuffer, readonly num: number, readonly desc: number, readonly avail: number, readonly used: number) {
    this.dv = new DataView(mem);
    this.u8 = new Uint8Array(mem);
    this.u16 = new Uint16Array(mem);
    this.u8.fill(0, desc, desc + 16 * num);
    this.u8.fill(0, avail, avail + 6 + 2 * num);
    this.u8.fill(0, used, used + 6 + 8 * num);
    for (let i = 0; i < num; i++) this.free.push(i);
  }

  /** Continue a ring at a position (after a re-add). */
  at(availIdx: number, lastUsed: number): void {
    this.availIdx = availIdx;
    this.lastUsed = lastUsed;
  }

  writeDesc(table: number, i: number, addr: number, len: number, flags: number, next: number): void {
    const d = table + 16 * i;
    this.dv.setUint32(d, addr % 2 ** 32, true);
    this.dv.setUint32(d + 4, Math.floor(addr / 2 ** 32), true);
    this.dv.setUint32(d + 8, len, true);
    this.dv.setUint16(d + 12, flags, true);
    this.dv.setUint16(d + 14, next, true);
  }

  /** Adds a chain (direct, or through an indirect table at `indirectAt`); returns its head. */
  add(segs: Seg[], indirectAt?: number): number {
    let idx: number[];
    if (indirectAt !== undefined) {
      idx = [this.free.shift()!];
      segs.forEach(([a, l, w], i) => this.writeDesc(indirectAt, i, a, l, (w ? F_WRITE : 0) | (i < segs.length - 1 ? F_NEXT : 0), i + 1));
      this.writeDesc(this.desc, idx[0]!, indirectAt, 16 * segs.length, F_INDIRECT, 0);
    } else {
      idx = segs.map(() => this.free.shift()!);
      segs.forEach(([a, l, w], i) => this.writeDesc(this.desc, idx[i]!, a, l, (w ? F_WRITE : 0) | (i < segs.length - 1 ? F_NEXT : 0), idx[i + 1] ?? 0));
    }
    const head = idx[0]!;
    this.chains.set(head, idx);
    this.dv.setUint16(this.avail + 4 + 2 * (this.availIdx % this.num), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    return head;
  }

  /** Puts a raw head into the avail ring (for broken-ring tests). */
  addRawHead(head: number): void {
    this.dv.setUint16(this.avail + 4 + 2 * (this.availIdx % this.num), head, true);
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }

  /** Publishes the avail index (a sequentially consistent store). */
  publish(idx = this.availIdx): void {
    Atomics.store(this.u16, (this.avail + 2) / 2, idx);
  }

  set flags(v: number) {
    this.dv.setUint16(this.avail, v, true);
  }
  set usedEvent(v: number) {
    this.dv.setUint16(this.avail + 4 + 2 * this.num, v, true);
  }
  get availEvent(): number {
    return this.dv.getUint16(this.used + 4 + 8 * this.num, true);
  }
  get usedIdx(): number {
    return Atomics.load(this.u16, (this.used + 2) / 2);
  }

  /** The used entries since the last reap; their descriptors are freed. */
  reap(): { id: number; len: number }[] {
    const out: { id: number; len: number }[] = [];
    const now = this.usedIdx;
    while (this.lastUsed !== now) {
      const e = this.used + 4 + 8 * (this.lastUsed % this.num);
      const id = this.dv.getUint32(e, true);
      out.push({ id, len: this.dv.getUint32(e + 4, true) });
      const c = this.chains.get(id);
      if (c) this.free.push(...c);
      this.chains.delete(id);
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }
}

/** Bump allocator of guest buffers in span A (after the rings) and span B. */
class Alloc {
  private a = 0x40000;
  private b = SPAN_B[0];
  constructor(private readonly u8: Uint8Array) {}
  take(n: number, span: 'A' | 'B' = 'A', fill = 0xee): number {
    const at = span === 'A' ? this.a : this.b;
    const next = (at + n + 15) & ~15;
    if (span === 'A') this.a = next;
    else this.b = next;
    this.u8.fill(fill, at, at + n);
    return at;
  }
}

let memfd = -1;
let layout: ArrayBuffer;
let u8: Uint8Array;
let dir: { dir: string; cleanup: () => void };

beforeAll(() => {
  dir = tempDir();
  memfd = memfdCreate('guest-ram', 2 * MiB);
  layout = mmapLayout(LAYOUT, [
    { fd: memfd, offset: 0, at: SPAN_A[0], size: MiB },
    { fd: memfd, offset: MiB, at: SPAN_B[0], size: MiB },
  ]);
  u8 = new Uint8Array(layout);
});

afterAll(() => {
  if (memfd >= 0) closeFd(memfd);
  dir.cleanup();
});

interface Rig {
  w: VhostBlkWorker;
  drv: Driver;
  mem: Alloc;
  kick: number;
  call: number;
  file: number;
  path: string;
  /** Adds a virtio-blk request: header, data segments, status byte; returns the status address. */
  request(type: number, sector: number, data: Seg[], opts?: { indirectAt?: number; hdrSplit?: boolean }): { head: number; status: number };
  /** Publishes, kicks, and waits for the used index to reach the avail index. */
  run(): Promise<{ id: number; len: number }[]>;
  close(): void;
}

const cleanups: (() => void)[] = [];
afterEach(() => {
  while (cleanups.length) cleanups.pop()!();
});

let fileSeq = 0;
function rig(o: { num?: number; eventIdx?: boolean; readOnly?: boolean; serial?: string; writeCache?: boolean; add?: boolean } = {}): Rig {
  const num = o.num ?? 64;
  const drv = new Driver(layout, num, 0x1000, 0x1000 + 16 * num, 0x1000 + 16 * num + 4096);
  u8.fill(0, 0x40000, SPAN_A[1]);
  u8.fill(0, SPAN_B[0], SPAN_B[1]);
  const mem = new Alloc(u8);
  const path = join(dir.dir, `disk${fileSeq++}.raw`);
  writeFileSync(path, pattern(7, DISK_SECTORS * 512));
  const file = openSync(path, 'r+');
  const kick = eventfd();
  const call = eventfd();
  const w = new VhostBlkWorker();
  w.setMemory(layout, [SPAN_A, SPAN_B]);
  const queue = (): void => w.addQueue(0, {
    num, desc: drv.desc, avail: drv.avail, used: drv.used, lastAvail: 0, usedIdx: 0, eventIdx: o.eventIdx ?? false,
    kickFd: kick, callFd: call, fd: file, capacitySectors: DISK_SECTORS, readOnly: o.readOnly ?? false,
    serial: o.serial ?? 'spindle-serial', writeCache: o.writeCache ?? true,
  });
  if (o.add !== false) queue();
  let closed = false;
  const r: Rig = {
    w, drv, mem, kick, call, file, path,
    request(type, sector, data, ro = {}) {
      const hdr = mem.take(16);
      const dv = new DataView(layout);
      dv.setUint32(hdr, type, true);
      dv.setUint32(hdr + 4, 0, true);
      dv.setBigUint64(hdr + 8, BigInt(sector), true);
      const status = mem.take(1, 'A', 0xff);
      const segs: Seg[] = ro.hdrSplit ? [[hdr, 5, false], [hdr + 5, 11, false]] : [[hdr, 16, false]];
      const head = drv.add([...segs, ...data, [status, 1, true]], ro.indirectAt);
      return { head, status };
    },
    async run() {
      drv.publish();
      eventfdWrite(kick);
      await until('the used index', () => drv.usedIdx === drv.availIdx);
      return drv.reap();
    },
    close() {
      if (closed) return;
      closed = true;
      w.destroy();
      closeSync(file);
      closeFd(kick);
      closeFd(call);
    },
  };
  cleanups.push(() => r.close());
  return r;
}

const fileBytes = (r: Rig, off: number, len: number): Buffer => readFileSync(r.path).subarray(off, off + len);
const guest = (addr: number, len: number): Buffer => Buffer.from(u8.subarray(addr, addr + len));

describe('VhostBlkWorker', () => {
  it('writes multi-segment data from both spans into the file and reads it back', async () => {
    const r = rig();
    const a = r.mem.take(1024, 'A');
    const b = r.mem.take(3072, 'B');
    const data = pattern(42, 4096);
    u8.set(data.subarray(0, 1024), a);
    u8.set(data.subarray(1024), b);
    const w1 = r.request(T_OUT, 8, [[a, 1024, false], [b, 3072, false]]);
    let used = await r.run();
    expect(used).toEqual([{ id: w1.head, len: 1 }]);
    expect(u8[w1.status]).toBe(S_OK);
    expect(fileBytes(r, 8 * 512, 4096).equals(data)).toBe(true);
    expect(fileBytes(r, 0, 4096).equals(pattern(7, 4096))).toBe(true); // neighbours intact

    // Read back into three segments (one in span B), with the header split across descriptors.
    const c = r.mem.take(512, 'A', 0);
    const d = r.mem.take(2048, 'B', 0);
    const e = r.mem.take(1536, 'A', 0);
    const rd = r.request(T_IN, 8, [[c, 512, true], [d, 2048, true], [e, 1536, true]], { hdrSplit: true });
    used = await r.run();
    expect(used).toEqual([{ id: rd.head, len: 4096 + 1 }]);
    expect(u8[rd.status]).toBe(S_OK);
    expect(Buffer.concat([guest(c, 512), guest(d, 2048), guest(e, 1536)]).equals(data)).toBe(true);
    const s = r.w.stats(0);
    expect(s).toMatchObject({ requests: 2, bytesRead: 4096, bytesWritten: 4096, errors: 0, lastAvail: 2, usedIdx: 2, broken: null });
  });

  it('serves chains through indirect tables, and the status byte shares a buffer with data', async () => {
    const r = rig();
    const table = r.mem.take(16 * 8, 'B');
    const x = r.mem.take(2048, 'A', 0);
    const y = r.mem.take(2048, 'B', 0);
    const { head, status } = r.request(T_IN, 100, [[x, 2048, true], [y, 2048, true]], { indirectAt: table });
    const used = await r.run();
    expect(used).toEqual([{ id: head, len: 4097 }]);
    expect(u8[status]).toBe(S_OK);
    expect(Buffer.concat([guest(x, 2048), guest(y, 2048)]).equals(fileBytes(r, 100 * 512, 4096))).toBe(true);

    // A write through an indirect table, data in both spans.
    const t2 = r.mem.take(16 * 8, 'A');
    const p = r.mem.take(1536, 'B');
    const q = r.mem.take(512, 'A');
    const data = pattern(9, 2048);
    u8.set(data.subarray(0, 1536), p);
    u8.set(data.subarray(1536), q);
    const wr = r.request(T_OUT, 300, [[p, 1536, false], [q, 512, false]], { indirectAt: t2 });
    expect(await r.run()).toEqual([{ id: wr.head, len: 1 }]);
    expect(u8[wr.status]).toBe(S_OK);
    expect(fileBytes(r, 300 * 512, 2048).equals(data)).toBe(true);

    // Data and status in one writable buffer of 512 + 1 bytes: status is its last byte.
    const hdr = r.mem.take(16);
    const dv = new DataView(layout);
    dv.setUint32(hdr, T_IN, true);
    dv.setBigUint64(hdr + 8, 3n, true);
    const buf = r.mem.take(513, 'A', 0xff);
    const h2 = r.drv.add([[hdr, 16, false], [buf, 513, true]]);
    expect(await r.run()).toEqual([{ id: h2, len: 513 }]);
    expect(u8[buf + 512]).toBe(S_OK);
    expect(guest(buf, 512).equals(fileBytes(r, 3 * 512, 512))).toBe(true);
  });

  it('GET_ID, FLUSH and unknown types', async () => {
    const r = rig({ serial: 'abc-123' });
    const id = r.mem.take(20, 'A', 0x55);
    const g = r.request(T_GET_ID, 0, [[id, 20, true]]);
    const f = r.request(T_FLUSH, 0, []);
    const u = r.request(99, 0, []);
    const used = await r.run();
    expect(used.map((e) => e.id)).toEqual([g.head, f.head, u.head]);
    expect(used[0]!.len).toBe(21);
    expect(u8[g.status]).toBe(S_OK);
    expect(guest(id, 20).equals(Buffer.concat([Buffer.from('abc-123'), Buffer.alloc(13)]))).toBe(true);
    expect(u8[f.status]).toBe(S_OK);
    expect(u8[u.status]).toBe(S_UNSUPP);
    expect(r.w.stats(0).errors).toBe(1);
  });

  it('DISCARD and WRITE_ZEROES (with and without UNMAP) zero the file; bad segments are refused', async () => {
    const r = rig({ writeCache: false });
    const seg = (sector: number, count: number, flags: number): number => {
      const s = r.mem.take(16);
      const dv = new DataView(layout);
      dv.setBigUint64(s, BigInt(sector), true);
      dv.setUint32(s + 8, count, true);
      dv.setUint32(s + 12, flags, true);
      return s;
    };
    const d = r.request(T_DISCARD, 0, [[seg(16, 8, 0), 16, false]]);
    const z = r.request(T_WRITE_ZEROES, 0, [[seg(64, 16, 0), 16, false]]);
    const zu = r.request(T_WRITE_ZEROES, 0, [[seg(128, 8, 1), 16, false]]);
    const du = r.request(T_DISCARD, 0, [[seg(200, 8, 1), 16, false]]); // UNMAP on a discard
    const two = r.mem.take(32);
    const d2 = r.request(T_DISCARD, 0, [[two, 32, false]]); // two segments
    const far = r.request(T_WRITE_ZEROES, 0, [[seg(DISK_SECTORS - 4, 8, 0), 16, false]]);
    const big = r.request(T_DISCARD, 0, [[seg(0, 0x400000, 0), 16, false]]);
    await r.run();
    expect([d, z, zu, du, d2, far, big].map((x) => u8[x.status])).toEqual([S_OK, S_OK, S_OK, S_UNSUPP, S_UNSUPP, S_IOERR, S_IOERR]);
    const disk = readFileSync(r.path);
    const orig = pattern(7, DISK_SECTORS * 512);
    expect(disk.length).toBe(orig.length);
    const zero = (s: number, n: number): boolean => disk.subarray(s * 512, (s + n) * 512).every((v) => v === 0);
    expect(zero(16, 8) && zero(64, 16) && zero(128, 8)).toBe(true);
    expect(disk.subarray(0, 16 * 512).equals(orig.subarray(0, 16 * 512))).toBe(true);
    expect(disk.subarray(24 * 512, 64 * 512).equals(orig.subarray(24 * 512, 64 * 512))).toBe(true);
    expect(disk.subarray(200 * 512, 208 * 512).equals(orig.subarray(200 * 512, 208 * 512))).toBe(true);
    expect(disk.subarray((DISK_SECTORS - 4) * 512).equals(orig.subarray((DISK_SECTORS - 4) * 512))).toBe(true);
  });

  it('out-of-range, misaligned and read-only requests fail with IOERR and leave the file alone', async () => {
    const r = rig({ readOnly: true });
    const a = r.mem.take(4096, 'A', 0x11);
    const e1 = r.request(T_IN, DISK_SECTORS - 4, [[a, 4096, true]]);
    const e2 = r.request(T_IN, 2 ** 52, [[a, 512, true]]);
    const e3 = r.request(T_IN, 0, [[a, 100, true]]);
    const e4 = r.request(T_OUT, 0, [[a, 512, false]]);
    const seg = r.mem.take(16, 'A', 0);
    new DataView(layout).setUint32(seg + 8, 8, true); // sector 0, 8 sectors, no flags
    const e5 = r.request(T_WRITE_ZEROES, 0, [[seg, 16, false]]);
    const ok = r.request(T_IN, DISK_SECTORS - 1, [[r.mem.take(512), 512, true]]);
    // No status byte at all: completed with IOERR, used len 0.
    const hdr = r.mem.take(16);
    const none = r.drv.add([[hdr, 16, false]]);
    const used = await r.run();
    expect([e1, e2, e3, e4, e5, ok].map((x) => u8[x.status])).toEqual([S_IOERR, S_IOERR, S_IOERR, S_IOERR, S_IOERR, S_OK]);
    expect(used.at(-1)).toEqual({ id: none, len: 0 });
    expect(readFileSync(r.path).equals(pattern(7, DISK_SECTORS * 512))).toBe(true);
    expect(r.w.stats(0)).toMatchObject({ requests: 7, errors: 6, broken: null });
  });

  it('buffers in the hole or beyond RAM fail the request without touching memory', async () => {
    const r = rig();
    const before = guest(SPAN_A[1] - 4096, 4096);
    const afterB = guest(SPAN_B[0], 64);
    const inHole = r.request(T_IN, 0, [[HOLE, 512, true]]);
    const straddle = r.request(T_IN, 0, [[SPAN_A[1] - 256, 512, true]]);
    const beyond = r.request(T_IN, 0, [[BEYOND, 512, true]]);
    const past = r.request(T_IN, 0, [[LAYOUT + 4096, 512, true]]);
    const huge = r.request(T_IN, 0, [[2 ** 50, 512, true]]);
    const zeroLen = r.request(T_IN, 0, [[r.mem.take(16), 0, true]]);
    const wrHole = r.request(T_OUT, 0, [[HOLE, 512, false]]);
    await r.run();
    expect([inHole, straddle, beyond, past, huge, zeroLen, wrHole].map((x) => u8[x.status])).toEqual(Array(7).fill(S_IOERR));
    expect(guest(SPAN_A[1] - 4096, 4096).equals(before)).toBe(true);
    expect(guest(SPAN_B[0], 64).equals(afterB)).toBe(true);
    expect(readFileSync(r.path).equals(pattern(7, DISK_SECTORS * 512))).toBe(true);
    expect(r.w.stats(0).broken).toBeNull();
  });

  it('a device-readable buffer after a device-writable one fails the request (IOERR), the ring goes on', async () => {
    const r = rig();
    const hdr = r.mem.take(16);
    new DataView(layout).setUint32(hdr, T_IN, true);
    const st = r.mem.take(1, 'A', 0xff);
    const h = r.drv.add([[hdr, 16, false], [st, 1, true], [r.mem.take(512), 512, false]]);
    const ok = r.request(T_FLUSH, 0, []);
    const used = await r.run();
    expect(used).toEqual([{ id: h, len: 1 }, { id: ok.head, len: 1 }]);
    expect([u8[st], u8[ok.status]]).toEqual([S_IOERR, S_OK]);
    expect(r.w.stats(0).broken).toBeNull();
  });

  it('serves two queues of one worker, each with its own file and eventfds', async () => {
    const r = rig();
    const drv2 = new Driver(layout, 16, 0x8000, 0x8000 + 256, 0x9000);
    const kick2 = eventfd();
    const call2 = eventfd();
    cleanups.push(() => {
      closeFd(kick2);
      closeFd(call2);
    });
    r.w.addQueue(3, {
      num: 16, desc: drv2.desc, avail: drv2.avail, used: drv2.used, lastAvail: 0, usedIdx: 0, eventIdx: true,
      kickFd: kick2, callFd: call2, fd: r.file, capacitySectors: 16, readOnly: true, serial: 'q3', writeCache: true,
    });
    const hdr = r.mem.take(16);
    new DataView(layout).setUint32(hdr, T_GET_ID, true);
    const id = r.mem.take(21, 'B', 0);
    drv2.add([[hdr, 16, false], [id, 21, true]]);
    const a = r.request(T_GET_ID, 0, [[r.mem.take(20, 'A', 0), 20, true]]);
    drv2.publish();
    eventfdWrite(kick2);
    const used = await r.run();
    await until('queue 3', () => drv2.usedIdx === 1);
    expect(u8[a.status]).toBe(S_OK);
    expect(used.length).toBe(1);
    expect(guest(id, 3).toString('latin1')).toBe('q3\0');
    expect(u8[id + 20]).toBe(S_OK);
    expect(r.w.stats(3)).toMatchObject({ requests: 1, lastAvail: 1, usedIdx: 1 });
    expect(r.w.stats(0)).toMatchObject({ requests: 1 });
    await until('queue 3 call', () => r.w.stats(3).calls === 1);
    expect(eventfdRead(call2)).toBe(1);
  });

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
    const r = rig({ eventIdx: true });
    r.drv.usedEvent = 5; // interrupt when the used index passes 5
    r.request(T_FLUSH, 0, []);
    await r.run();
    expect(r.drv.availEvent).toBe(1);
    r.w.pause(); // the batch (and its call decision) is over
    r.w.resume();
    expect(eventfdRead(r.call)).toBe(0);
    expect(r.w.stats(0)).toMatchObject({ calls: 0, batches: 1 });

    r.drv.usedEvent = 1; // the next completion (1 -> 2) crosses it
    r.request(T_FLUSH, 0, []);
    await r.run();
    await until('the call', () => r.w.stats(0).calls === 1);
    expect(eventfdRead(r.call)).toBe(1);
    expect(r.drv.availEvent).toBe(2);

    // Several chains in one kick: one used-index publication, one call.
    r.drv.usedEvent = 2;
    for (let i = 0; i < 4; i++) r.request(T_FLUSH, 0, []);
    await r.run();
    await until('the call', () => r.w.stats(0).calls === 2);
    expect(eventfdRead(r.call)).toBe(1);
    expect(r.w.stats(0)).toMatchObject({ batches: 3, lastAvail: 6, usedIdx: 6 });
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
    expect(r.drv.reap().map((e) => e.id)).toEqual([a.head, b.head]);
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
      const old = r.drv.availEvent;
      r.drv.usedEvent = r.drv.lastUsed;
      const prev = Atomics.load(idx16, (r.drv.avail + 2) / 2);
      r.drv.publish();
      // Kick only when the device asked (vring_need_event on avail_event).
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
