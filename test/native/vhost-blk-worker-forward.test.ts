// The native vhost-user-blk worker's mapped queues (vhost-blk-ring-driver.ts sets up guest
// memory, the ring driver and the disk; Forwarder plays JavaScript's side of the forward
// ring): reads and writes served through the cluster map at host offsets, everything else
// forwarded and completed by the test, invalidate + barrier, broken forward protocols,
// pause/remove with requests forwarded, setCapacity, and argument checks.
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { describe, expect, it } from 'vitest';
import { native } from '../../src/native/addon.js';
import { eventfdRead } from '../../src/native/unix-fd.js';
import { FWD_CONS, VhostBlkMap } from '../../src/native/vhost-blk-worker.js';
import { pattern } from './helpers.js';
import {
  DISK_SECTORS, T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, S_OK, S_IOERR, S_UNSUPP, until,
  u8, rig, fileBytes, guest, Forwarder, dwzSegment, useWorkerRig, type Rig,
} from './vhost-blk-ring-driver.js';

useWorkerRig();

const CB = 12; // 4 KiB clusters
const C = 1 << CB;
const SECT = C / 512; // sectors per cluster
const DISK = pattern(7, DISK_SECTORS * 512); // the rig's file content

/** A queue with a cluster map (initially empty) and a forward ring. */
function mapped(o: Parameters<typeof rig>[0] = {}): { r: Rig; map: VhostBlkMap; fwd: Forwarder } {
  const map = new VhostBlkMap(CB, DISK_SECTORS * 512);
  const fwd = new Forwarder(o.num ?? 64);
  const r = rig({ ...o, queue: { map, forward: fwd.forward, ...o.queue } });
  return { r, map, fwd };
}

/** A read of `len` bytes at guest byte offset `off` into one zeroed buffer. */
function read(r: Rig, off: number, len: number): { head: number; status: number; buf: number } {
  const buf = r.mem.take(len, 'A', 0);
  return { ...r.request(T_IN, off / 512, [[buf, len, true]]), buf };
}


describe('VhostBlkWorker mapped queues', () => {
  it('a mapped read is served natively from the mapped host offset', async () => {
    const { r, map, fwd } = mapped();
    map.set(0, C, 3 * C, false);
    expect(map.size).toBe(1);
    const rd = read(r, 0, C);
    expect(await r.run()).toEqual([{ id: rd.head, len: C + 1 }]);
    expect(u8[rd.status]).toBe(S_OK);
    expect(guest(rd.buf, C).equals(DISK.subarray(3 * C, 4 * C))).toBe(true);
    expect(guest(rd.buf, C).equals(DISK.subarray(0, C))).toBe(false);
    expect(r.w.stats(0)).toMatchObject({ requests: 1, bytesRead: C, forwarded: 0, inForward: 0 });
    expect(fwd.produced).toBe(0);
    expect(eventfdRead(fwd.notifyFd)).toBe(0);
  });

  it('a read spanning clusters at non-contiguous host offsets is split at the cluster edge', async () => {
    const { r, map } = mapped();
    map.set(C, C, 10 * C, true);
    map.set(2 * C, C, 5 * C, true);
    map.set(3 * C, 2 * C, 20 * C, true); // two host-contiguous clusters: one run
    // Guest [C + 1024, 3C - 1024) in segments whose edges are not the cluster edge.
    const a = r.mem.take(2048, 'A', 0);
    const b = r.mem.take(4096, 'B', 0);
    const rd = r.request(T_IN, (C + 1024) / 512, [[a, 2048, true], [b, 4096, true]]);
    const c = r.mem.take(2 * C, 'A', 0);
    const rd2 = r.request(T_IN, 3 * SECT, [[c, 2 * C, true]]);
    await r.run();
    expect([u8[rd.status], u8[rd2.status]]).toEqual([S_OK, S_OK]);
    const want = Buffer.concat([DISK.subarray(10 * C + 1024, 11 * C), DISK.subarray(5 * C, 6 * C - 1024)]);
    expect(Buffer.concat([guest(a, 2048), guest(b, 4096)]).equals(want)).toBe(true);
    expect(guest(c, 2 * C).equals(DISK.subarray(20 * C, 22 * C))).toBe(true);
    expect(r.w.stats(0)).toMatchObject({ requests: 2, forwarded: 0 });
  });

  it('an unmapped read is forwarded; the completion JavaScript posts reaches the used ring and calls', async () => {
    const { r, map, fwd } = mapped();
    map.set(0, C, 0, true);
    const rd = read(r, C, 1024); // cluster 1: unmapped
    u8[rd.buf] = 0x5a;
    r.submit();
    await until('forwarded', () => r.w.stats(0).forwarded === 1);
    await until('published', () => fwd.produced === 1);
    expect(fwd.take()).toEqual([rd.head]);
    expect(Atomics.load(fwd.ring, FWD_CONS)).toBe(1);
    // Nothing touched or pushed by the worker.
    expect(u8[rd.buf]).toBe(0x5a);
    expect(u8[rd.status]).toBe(0xff);
    expect(r.drv.usedIdx).toBe(0);
    expect(r.w.stats(0)).toMatchObject({ requests: 0, forwarded: 1, inForward: 1, lastAvail: 1, usedIdx: 0 });
    await until('notified', () => eventfdRead(fwd.notifyFd) === 1);

    // JavaScript executes it: data and status byte into guest memory, then the completion.
    u8.set(DISK.subarray(C, C + 1024), rd.buf);
    u8[rd.status] = S_OK;
    fwd.complete([{ id: rd.head, len: 1025 }]);
    await until('the used element', () => r.drv.usedIdx === 1);
    expect(r.drv.reap()).toEqual([{ id: rd.head, len: 1025 }]);
    await until('the call', () => r.w.stats(0).calls === 1);
    expect(eventfdRead(r.call)).toBe(1);
    expect(fwd.taken).toBe(1);
    expect(r.w.stats(0)).toMatchObject({ requests: 0, forwarded: 1, inForward: 0, usedIdx: 1 });

    // The head is free again: the same chain made available again, its cluster mapped now,
    // is served natively.
    map.set(C, C, 12 * C, false);
    r.drv.addRawHead(rd.head);
    expect(await r.run()).toEqual([{ id: rd.head, len: 1025 }]);
    expect(guest(rd.buf, 1024).equals(DISK.subarray(12 * C, 12 * C + 1024))).toBe(true);
    expect(r.w.stats(0)).toMatchObject({ requests: 1, forwarded: 1, broken: null });
  });

  it('a write to a read-only-mapped cluster is forwarded; to a writable-mapped one it lands at the host offset', async () => {
    const { r, map, fwd } = mapped();
    map.set(0, C, 7 * C, false);
    map.set(C, C, 9 * C, true);
    const data = pattern(42, C);
    const src = r.mem.take(C);
    u8.set(data, src);
    const ro = r.request(T_OUT, 0, [[src, C, false]]);
    const rw = r.request(T_OUT, SECT, [[src, C, false]]);
    const half = r.request(T_OUT, SECT + SECT / 2, [[src, C, false]]); // cluster 1 (writable) + 2 (unmapped)
    const rdRo = read(r, 0, 512); // reading a read-only-mapped cluster is native
    r.submit();
    await until('the native ones', () => r.drv.usedIdx === 2);
    // In either order: the write may complete later (on the worker's io_uring).
    expect(r.drv.reap().sort((x, y) => x.id - y.id)).toEqual([{ id: rw.head, len: 1 }, { id: rdRo.head, len: 513 }].sort((x, y) => x.id - y.id));
    expect([u8[ro.status], u8[rw.status], u8[half.status], u8[rdRo.status]]).toEqual([0xff, S_OK, 0xff, S_OK]);
    await until('published', () => fwd.produced === 2);
    expect(fwd.take()).toEqual([ro.head, half.head]);
    const disk = Buffer.from(fileBytes(r, 0, DISK.length));
    expect(disk.subarray(9 * C, 10 * C).equals(data)).toBe(true);
    // Nothing else changed: not the identity location, not the read-only cluster's host.
    const expected = Buffer.from(DISK);
    data.copy(expected, 9 * C);
    expect(disk.equals(expected)).toBe(true);
    expect(guest(rdRo.buf, 512).equals(DISK.subarray(7 * C, 7 * C + 512))).toBe(true);
    expect(r.w.stats(0)).toMatchObject({ requests: 2, bytesWritten: C, forwarded: 2, inForward: 2 });
  });

  it('flush, discard and write-zeroes are forwarded; GET_ID and unnegotiated types stay native', async () => {
    const { r, fwd } = mapped({ serial: 'fwd', queue: { writeZeroes: false } });
    const f = r.request(T_FLUSH, 0, []);
    const d = r.request(T_DISCARD, 0, [[dwzSegment(r, 0, 8), 16, false]]);
    const id = r.mem.take(20, 'A', 0);
    const g = r.request(T_GET_ID, 0, [[id, 20, true]]);
    const z = r.request(T_WRITE_ZEROES, 0, [[dwzSegment(r, 8, 8), 16, false]]); // not negotiated
    const bad = r.request(T_IN, 0, [[r.mem.take(100), 100, true]]); // not a sector multiple
    r.submit();
    await until('the native ones', () => r.drv.usedIdx === 3);
    expect(r.drv.reap().map((e) => e.id)).toEqual([g.head, z.head, bad.head]);
    expect([u8[g.status], u8[z.status], u8[bad.status]]).toEqual([S_OK, S_UNSUPP, S_IOERR]);
    expect(guest(id, 3).toString('latin1')).toBe('fwd');
    await until('published', () => fwd.produced === 2);
    expect(fwd.take()).toEqual([f.head, d.head]);
    expect([u8[f.status], u8[d.status]]).toEqual([0xff, 0xff]);
    expect(fileBytes(r, 0, DISK.length).equals(DISK)).toBe(true);

    // Completed in the other order than forwarded.
    u8[f.status] = S_OK;
    u8[d.status] = S_OK;
    fwd.complete([{ id: d.head, len: 1 }, { id: f.head, len: 1 }]);
    await until('completions', () => r.drv.usedIdx === 5);
    expect(r.drv.reap()).toEqual([{ id: d.head, len: 1 }, { id: f.head, len: 1 }]);
    expect(r.w.stats(0)).toMatchObject({ requests: 3, errors: 2, forwarded: 2, inForward: 0 });
  });

  it('after invalidate + barrier the same read is forwarded', async () => {
    const { r, map, fwd } = mapped();
    map.set(0, 2 * C, 4 * C, true);
    const first = read(r, 0, 512);
    await r.run();
    expect(guest(first.buf, 512).equals(DISK.subarray(4 * C, 4 * C + 512))).toBe(true);
    map.invalidate(100, 1); // unaligned: clears the cluster it touches, not its neighbour
    expect(map.size).toBe(1);
    r.w.barrier();
    const second = read(r, 0, 512);
    const neighbour = read(r, C, 512);
    r.submit();
    await until('the neighbour', () => r.drv.usedIdx === 2);
    expect(r.drv.reap()).toEqual([{ id: neighbour.head, len: 513 }]);
    await until('forwarded', () => fwd.produced === 1);
    expect(fwd.take()).toEqual([second.head]);
    expect(u8[second.status]).toBe(0xff);
    map.clear();
    expect(map.size).toBe(0);
    r.w.barrier();
    read(r, C, 512);
    r.submit();
    await until('forwarded after clear', () => fwd.produced === 2);
  });

  it('a completion for a head that was not forwarded breaks the queue', async () => {
    const { r, map, fwd } = mapped();
    map.set(0, C, 0, true);
    const native = read(r, 0, 512);
    await r.run();
    fwd.complete([{ id: native.head, len: 513 }]);
    await until('broken', () => r.w.stats(0).broken !== null);
    expect(r.w.stats(0).broken).toMatch(new RegExp(`completion for head ${native.head} that was not forwarded`));
    expect(r.drv.usedIdx).toBe(1);
    // Stopped: nothing more is served.
    read(r, 0, 512);
    r.submit();
    r.w.barrier();
    expect(r.w.stats(0)).toMatchObject({ lastAvail: 1, usedIdx: 1 });
  });

  it('a head made available again while forwarded breaks the queue', async () => {
    const { r, fwd } = mapped();
    const rd = read(r, 0, 512);
    r.submit();
    await until('forwarded', () => fwd.produced === 1);
    r.drv.addRawHead(rd.head);
    r.submit();
    await until('broken', () => r.w.stats(0).broken !== null);
    expect(r.w.stats(0).broken).toMatch(new RegExp(`head ${rd.head} made available again while in flight`));
    expect(r.w.stats(0)).toMatchObject({ forwarded: 1, lastAvail: 1 });
  });

  it('pause(): nothing new is popped, but completions of forwarded requests are pushed', async () => {
    const { r, map, fwd } = mapped();
    map.set(0, C, 0, true);
    const fw = read(r, C, 512);
    r.submit();
    await until('forwarded', () => fwd.produced === 1);
    r.w.pause();
    const nat = read(r, 0, 512);
    r.submit();
    fwd.take();
    fwd.complete([{ id: fw.head, len: 513 }]);
    await until('the completion while paused', () => r.drv.usedIdx === 1);
    r.w.barrier(); // the kick was seen by now: it must only be remembered
    expect(r.drv.usedIdx).toBe(1);
    expect(u8[nat.status]).toBe(0xff);
    expect(r.w.stats(0)).toMatchObject({ lastAvail: 1, inForward: 0, requests: 0 });
    r.w.resume();
    await until('served after resume', () => r.drv.usedIdx === 2);
    expect(r.drv.reap()).toEqual([{ id: fw.head, len: 513 }, { id: nat.head, len: 513 }]);
  });

  it('removeQueue pushes completions already posted and reports inForward and lastAvail', async () => {
    const { r, fwd } = mapped();
    const a = read(r, 0, 512);
    const b = read(r, C, 512);
    r.submit();
    await until('forwarded', () => fwd.produced === 2);
    expect(fwd.take()).toEqual([a.head, b.head]);
    fwd.complete([{ id: b.head, len: 513 }], false); // no eventfd: only removeQueue sees it
    const pos = r.w.removeQueue(0);
    expect(pos).toMatchObject({ lastAvail: 2, usedIdx: 1, forwarded: 2, inForward: 1, broken: null });
    expect(r.drv.usedIdx).toBe(1);
    expect(r.drv.reap()).toEqual([{ id: b.head, len: 513 }]);
    expect(fwd.taken).toBe(1);
  });

  it('setCapacity: a read past the old end becomes OK, past the new end fails', async () => {
    const r = rig({ queue: { capacitySectors: DISK_SECTORS / 2 } });
    const past = read(r, DISK_SECTORS * 256, 512);
    await r.run();
    expect(u8[past.status]).toBe(S_IOERR);
    r.w.setCapacity(0, DISK_SECTORS);
    const now = read(r, DISK_SECTORS * 256, 512);
    await r.run();
    expect(u8[now.status]).toBe(S_OK);
    expect(guest(now.buf, 512).equals(DISK.subarray(DISK_SECTORS * 256, DISK_SECTORS * 256 + 512))).toBe(true);
    r.w.setCapacity(0, 8);
    const shrunk = read(r, 8 * 512, 512);
    await r.run();
    expect(u8[shrunk.status]).toBe(S_IOERR);
    expect(() => r.w.setCapacity(0, -1)).toThrow(RangeError);
  });

  it('notifyFd is written once per batch, however many requests it forwarded', async () => {
    const { r, fwd } = mapped();
    const heads = [0, 1, 2].map((i) => read(r, i * C, 512).head);
    r.submit();
    await until('forwarded', () => r.w.stats(0).forwarded === 3);
    r.w.barrier(); // the batch, and its notification, are over
    expect(eventfdRead(fwd.notifyFd)).toBe(1);
    expect(fwd.take()).toEqual(heads);
    const more = [3, 4].map((i) => read(r, i * C, 512).head);
    r.submit();
    await until('forwarded', () => r.w.stats(0).forwarded === 5);
    r.w.barrier();
    expect(eventfdRead(fwd.notifyFd)).toBe(1);
    expect(fwd.take()).toEqual(more);
  });

  it('a queue keeps its map when JavaScript drops the map object', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const collected = { done: false };
    const registry = new FinalizationRegistry(() => {
      collected.done = true;
    });
    const fwd = new Forwarder(64);
    const r = rig({ add: false });
    ((): void => {
      const map = new native.VhostBlkMap(CB, DISK_SECTORS * 512);
      map.set(0, C, 6 * C, true);
      registry.register(map, 0);
      r.w.addQueue(0, {
        num: 64, desc: r.drv.desc, avail: r.drv.avail, used: r.drv.used, lastAvail: 0, usedIdx: 0, eventIdx: false,
        kickFd: r.kick, callFd: r.call, fd: r.file, capacitySectors: DISK_SECTORS, readOnly: false, serial: '',
        writeCache: true, map, forward: fwd.forward,
      });
    })();
    await until('the map object collected', () => {
      gc();
      return collected.done;
    });
    const rd = read(r, 0, C);
    await r.run();
    expect(u8[rd.status]).toBe(S_OK);
    expect(guest(rd.buf, C).equals(DISK.subarray(6 * C, 7 * C))).toBe(true);
    expect(r.w.stats(0).forwarded).toBe(0);
  });

  it('argument checks', () => {
    expect(() => new VhostBlkMap(8, 1 << 20)).toThrow(RangeError);
    expect(() => new native.VhostBlkMap(22, 1 << 20)).toThrow(/clusterBits/);
    const map = new VhostBlkMap(CB, 10 * C + 1); // 11 clusters
    expect(() => map.set(512, C, 0, true)).toThrow(/guestOffset 512 is not a multiple of the cluster size 4096/);
    expect(() => map.set(0, 100, 0, true)).toThrow(RangeError);
    expect(() => map.handle.set(0, C, 100, true)).toThrow(/hostOffset 100 is not a multiple/);
    expect(() => map.handle.set(0, C, 100, true)).toThrow(RangeError);
    map.set(8 * C, 8 * C, 0, true); // clusters 11..15 are beyond the table: ignored
    expect(map.size).toBe(3);
    expect(map.invalidate(9 * C - 1, 2)).toBe(2); // touches clusters 8 and 9, both mapped
    expect(map.size).toBe(1);
    expect(map.invalidate(0, 0)).toBe(0);
    expect(map.invalidate(8 * C, 3 * C)).toBe(1); // only cluster 10 was still mapped
    expect(map.size).toBe(0);

    const fwd = new Forwarder(16);
    const r = rig({ add: false });
    const base = {
      num: 16, desc: r.drv.desc, avail: r.drv.avail, used: r.drv.used, lastAvail: 0, usedIdx: 0, eventIdx: false,
      kickFd: r.kick, callFd: -1, fd: r.file, capacitySectors: DISK_SECTORS, readOnly: false, serial: '', writeCache: true,
    };
    expect(() => r.w.addQueue(0, { ...base, map })).toThrow(TypeError);
    expect(() => r.w.addQueue(0, { ...base, map })).toThrow(/needs forward/);
    const notAMap = { set() {}, invalidate: () => 0, clear() {}, reclaim() {}, size: 0, retired: 0 };
    expect(() => r.w.addQueue(0, { ...base, map: notAMap, forward: fwd.forward })).toThrow(/must be a VhostBlkMap/);
    const short = { ...fwd.forward, ring: new Int32Array(16 + 3 * 16 - 1) };
    expect(() => r.w.addQueue(0, { ...base, map, forward: short })).toThrow(/at least 16 \+ 3 \* num = 64/);
    const f64 = { ...fwd.forward, ring: new Float64Array(64) as unknown as Int32Array };
    expect(() => r.w.addQueue(0, { ...base, map, forward: f64 })).toThrow(/Int32Array/);
    expect(() => r.w.addQueue(0, { ...base, map, forward: { ...fwd.forward, notifyFd: 99999 } })).toThrow(/dup/);
    expect(() => r.w.stats(0)).toThrow(/not attached/);
  });

  it('a raw queue with a forward ring forwards nothing', async () => {
    const fwd = new Forwarder(64);
    const r = rig({ queue: { forward: fwd.forward } });
    const f = r.request(T_FLUSH, 0, []);
    const w = r.request(T_OUT, 4, [[r.mem.take(512, 'A', 0x33), 512, false]]);
    await r.run();
    expect([u8[f.status], u8[w.status]]).toEqual([S_OK, S_OK]);
    expect(fileBytes(r, 4 * 512, 512).every((v) => v === 0x33)).toBe(true);
    expect(r.w.stats(0)).toMatchObject({ requests: 2, forwarded: 0 });
    expect(fwd.produced).toBe(0);
  });
});
