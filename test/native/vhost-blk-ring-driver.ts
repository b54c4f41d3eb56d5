// A tiny split-ring driver for the native vhost-user-blk worker tests, against real memory,
// real fds and the worker's real thread: guest RAM is a memfd mapped with mmapLayout as two
// spans with a hole between (and reserved, unmapped space after them); the driver fills the
// descriptor table and avail ring (with used_event) and reads the used ring; the disk is a
// temp file.  useWorkerRig() installs the memory and the per-test cleanup.  Forwarder plays
// JavaScript's side of a mapped queue's forward ring.
import { closeSync, openSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll } from 'vitest';
import { closeFd, eventfd, eventfdWrite, memfdCreate, mmapLayout } from '../../src/native/unix-fd.js';
import {
  CPL_CONS, CPL_PROD, FWD_CONS, FWD_PROD, VhostBlkWorker, cplSlot, forwardRingLength, fwdSlot, type VhostBlkForward,
  type VhostBlkQueueOptions,
} from '../../src/native/vhost-blk-worker.js';
import { pattern, tempDir } from './helpers.js';

export const MiB = 1 << 20;
export const SPAN_A: [number, number] = [0, MiB];
export const SPAN_B: [number, number] = [2 * MiB, 3 * MiB];
export const HOLE = MiB + 4096; // inside [1 MiB, 2 MiB): PROT_NONE
export const BEYOND = 3 * MiB + 4096; // inside the layout, after the last span: PROT_NONE
export const LAYOUT = 4 * MiB;
export const DISK_SECTORS = 2048; // 1 MiB

export const T_IN = 0, T_OUT = 1, T_FLUSH = 4, T_GET_ID = 8, T_DISCARD = 11, T_WRITE_ZEROES = 13;
export const S_OK = 0, S_IOERR = 1, S_UNSUPP = 2;
export const F_NEXT = 1, F_WRITE = 2, F_INDIRECT = 4;

export const fdCount = (): number => readdirSync('/proc/self/fd').length;
export const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

export async function until(what: string, pred: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await turn();
  }
}

/** One descriptor of a chain: guest address, length, device-writable. */
export type Seg = [addr: number, len: number, write: boolean];

/** A minimal split-ring driver over the layout. */
export class Driver {
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
export class Alloc {
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

export let layout: ArrayBuffer;
export let u8: Uint8Array;
let memfd = -1;
let dir: { dir: string; cleanup: () => void };

export interface Rig {
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
  /** Publishes and kicks (no waiting). */
  submit(): void;
  close(): void;
}

/** Run (newest first) after each test. */
export const cleanups: (() => void)[] = [];

/** Call once at the top of a test file: guest memory for the file, rigs closed after each test. */
export function useWorkerRig(): void {
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

  afterEach(() => {
    while (cleanups.length) cleanups.pop()!();
  });
}

let fileSeq = 0;
export function rig(o: {
  num?: number; eventIdx?: boolean; readOnly?: boolean; serial?: string; writeCache?: boolean; add?: boolean;
  /** More addQueue options (map, forward, capacitySectors, ...). */
  queue?: Partial<VhostBlkQueueOptions>;
} = {}): Rig {
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
    serial: o.serial ?? 'spindle-serial', writeCache: o.writeCache ?? true, ...o.queue,
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
    submit() {
      drv.publish();
      eventfdWrite(kick);
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

/**
 * A second queue, `index`, on the rig's worker: 16 entries with EVENT_IDX at 0x8000, its own
 * eventfds, read-only over the rig's file (16 sectors), serial `q<index>`.
 */
export function secondQueue(r: Rig, index: number): { drv: Driver; kick: number; call: number } {
  const drv = new Driver(layout, 16, 0x8000, 0x8000 + 256, 0x9000);
  const kick = eventfd();
  const call = eventfd();
  cleanups.push(() => {
    closeFd(kick);
    closeFd(call);
  });
  r.w.addQueue(index, {
    num: 16, desc: drv.desc, avail: drv.avail, used: drv.used, lastAvail: 0, usedIdx: 0, eventIdx: true,
    kickFd: kick, callFd: call, fd: r.file, capacitySectors: 16, readOnly: true, serial: `q${index}`, writeCache: true,
  });
  return { drv, kick, call };
}

export const fileBytes = (r: Rig, off: number, len: number): Buffer => readFileSync(r.path).subarray(off, off + len);
export const guest = (addr: number, len: number): Buffer => Buffer.from(u8.subarray(addr, addr + len));

/** JavaScript's side of a mapped queue's forward ring (and its two eventfds). */
export class Forwarder {
  readonly ring: Int32Array;
  readonly notifyFd = eventfd();
  readonly completeFd = eventfd();

  constructor(readonly num: number) {
    this.ring = new Int32Array(forwardRingLength(num));
    cleanups.push(() => {
      closeFd(this.notifyFd);
      closeFd(this.completeFd);
    });
  }

  get forward(): VhostBlkForward {
    return { ring: this.ring, notifyFd: this.notifyFd, completeFd: this.completeFd };
  }

  /** The worker's counters: forwarded so far, completions taken so far. */
  get produced(): number {
    return Atomics.load(this.ring, FWD_PROD) >>> 0;
  }
  get taken(): number {
    return Atomics.load(this.ring, CPL_CONS) >>> 0;
  }

  /** The heads forwarded since the last take(), oldest first (consumed). */
  take(): number[] {
    const prod = this.produced;
    const heads: number[] = [];
    for (let i = Atomics.load(this.ring, FWD_CONS) >>> 0; i !== prod; i = (i + 1) >>> 0) {
      heads.push(Atomics.load(this.ring, fwdSlot(this.num, i)));
    }
    Atomics.store(this.ring, FWD_CONS, prod | 0);
    return heads;
  }

  /** Posts completions (head, used length) and, unless told not to, writes completeFd. */
  complete(list: { id: number; len: number }[], signal = true): void {
    let p = Atomics.load(this.ring, CPL_PROD) >>> 0;
    for (const { id, len } of list) {
      const at = cplSlot(this.num, p);
      Atomics.store(this.ring, at, id);
      Atomics.store(this.ring, at + 1, len);
      p = (p + 1) >>> 0;
    }
    Atomics.store(this.ring, CPL_PROD, p | 0);
    if (signal) eventfdWrite(this.completeFd);
  }
}

/** A discard / write-zeroes segment (struct virtio_blk_discard_write_zeroes) in guest memory; its address. */
export function dwzSegment(r: Rig, sector: number, count: number, flags = 0): number {
  const s = r.mem.take(16);
  const dv = new DataView(layout);
  dv.setBigUint64(s, BigInt(sector), true);
  dv.setUint32(s + 8, count, true);
  dv.setUint32(s + 12, flags, true);
  return s;
}
