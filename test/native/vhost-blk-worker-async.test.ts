// The native vhost-user-blk worker with its io_uring (SPINDLE_VHOST_IO, read when a worker is
// constructed; vhost-blk-ring-driver.ts sets up guest memory, the ring driver and the disk).
// `async` sends every read, write and flush to the ring, so these tests exercise completion
// from CQEs deterministically: data, EOF, errors, mapped runs, backpressure, and the commands
// that must wait for I/O in flight (removeQueue, pause, barrier), plus EVENT_IDX calls.
// `auto` (the default) is checked against a file whose pages were dropped. Everything runs twice:
// on io_uring, and on the thread pool that stands in for it where it is refused
// (SPINDLE_VHOST_RING=threads forces that).
import { closeSync, ftruncateSync, openSync, readFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { beforeAll, describe, expect, it } from 'vitest';
import { eventfdRead, eventfdWrite } from '../../src/native/unix-fd.js';
import { VhostBlkMap, type VhostBlkIoMode } from '../../src/native/vhost-blk-worker.js';
import { pattern } from './helpers.js';
import {
  DISK_SECTORS, T_IN, T_OUT, T_FLUSH, S_OK, S_IOERR, cleanups, fileBytes, Forwarder, guest, layout, rig,
  turn, u8, until, useWorkerRig, type Rig,
} from './vhost-blk-ring-driver.js';

useWorkerRig();

const DISK = pattern(7, DISK_SECTORS * 512); // the rig's file content

/** The engine the describe block in progress runs on. */
let engine: 'io_uring' | 'threads' = 'io_uring';

/** A rig whose worker was created with SPINDLE_VHOST_IO=mode on `engine` (the variables are restored at once). */
function ioRig(mode: VhostBlkIoMode | string, o: Parameters<typeof rig>[0] = {}): Rig {
  const saved = [process.env.SPINDLE_VHOST_IO, process.env.SPINDLE_VHOST_RING];
  process.env.SPINDLE_VHOST_IO = mode;
  process.env.SPINDLE_VHOST_RING = engine === 'threads' ? 'threads' : '';
  try {
    return rig(o);
  } finally {
    for (const [k, v] of [['SPINDLE_VHOST_IO', saved[0]], ['SPINDLE_VHOST_RING', saved[1]]] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

/**
 * io_uring may be refused (seccomp): the worker then runs on the thread pool. Were that to fail
 * too, it runs synchronously and only behaviour is checked.
 */
let uring: boolean | undefined;
function asyncRig(o: Parameters<typeof rig>[0] = {}): Rig {
  const r = ioRig('async', o);
  if (uring === undefined) {
    uring = r.w.ioMode === 'async';
    if (engine === 'threads') expect(r.w.ioEngine).toBe('threads');
    else if (r.w.ioEngine !== 'io_uring' && process.env.SPINDLE_NO_IO_URING !== '1') throw new Error('io_uring refused (set SPINDLE_NO_IO_URING=1 to accept)');
  }
  return r;
}

/** Every served request went through the ring (when there is one). */
function allAsync(r: Rig, n: number): void {
  const s = r.w.stats(0);
  expect(s.requests).toBe(n);
  if (uring) expect(s.asyncRequests).toBe(n);
  expect(s.inAsync).toBe(0);
}

function read(r: Rig, sector: number, len: number, span: 'A' | 'B' = 'A'): { head: number; status: number; buf: number } {
  const buf = r.mem.take(len, span, 0xee);
  return { ...r.request(T_IN, sector, [[buf, len, true]]), buf };
}

function write(r: Rig, sector: number, data: Buffer, span: 'A' | 'B' = 'A'): { head: number; status: number } {
  const buf = r.mem.take(data.length, span);
  u8.set(data, buf);
  return r.request(T_OUT, sector, [[buf, data.length, false]]);
}

/** fdatasync + POSIX_FADV_DONTNEED on the whole file (GNU dd); false if dd failed. */
function dropCache(path: string): boolean {
  return spawnSync('dd', [`of=${path}`, 'oflag=nocache', 'conv=notrunc,fdatasync', 'count=0'], { stdio: 'ignore' }).status === 0;
}

for (const e of ['io_uring', 'threads'] as const) describe(`VhostBlkWorker with ${e === 'io_uring' ? 'io_uring' : 'its thread pool'}`, () => {
  beforeAll(() => {
    engine = e;
    uring = undefined;
  });

  it('ioMode follows SPINDLE_VHOST_IO (default auto)', () => {
    expect(ioRig('sync').w.ioMode).toBe('sync');
    const a = ioRig('auto').w.ioMode;
    const b = ioRig('nonsense').w.ioMode;
    expect([a, b]).toEqual(asyncRig().w.ioMode === 'async' ? ['auto', 'auto'] : ['sync', 'sync']);
  });

  it('reads (multi-segment, both spans, indirect) complete from CQEs', async () => {
    const r = asyncRig();
    const a = read(r, 0, 4096);
    const x = r.mem.take(1024, 'A', 0);
    const y = r.mem.take(3072, 'B', 0);
    const b = r.request(T_IN, 40, [[x, 1024, true], [y, 3072, true]], { indirectAt: r.mem.take(64, 'B') });
    const c = read(r, DISK_SECTORS - 1, 512, 'B');
    const used = await r.run();
    expect(used.map((e) => e.id).sort()).toEqual([a.head, b.head, c.head].sort());
    expect(used.find((e) => e.id === b.head)!.len).toBe(4097);
    expect([a, b, c].map((q) => u8[q.status])).toEqual([S_OK, S_OK, S_OK]);
    expect(guest(a.buf, 4096).equals(DISK.subarray(0, 4096))).toBe(true);
    expect(Buffer.concat([guest(x, 1024), guest(y, 3072)]).equals(DISK.subarray(40 * 512, 40 * 512 + 4096))).toBe(true);
    expect(guest(c.buf, 512).equals(DISK.subarray(DISK.length - 512))).toBe(true);
    allAsync(r, 3);
    expect(r.w.stats(0)).toMatchObject({ bytesRead: 4096 + 4096 + 512, errors: 0, lastAvail: 3, usedIdx: 3 });
  });

  it('multi-segment writes land in the file; flush; write cache off (write + fdatasync)', async () => {
    const r = asyncRig();
    const data = pattern(42, 8192);
    const a = r.mem.take(1536, 'A');
    const b = r.mem.take(8192 - 1536, 'B');
    u8.set(data.subarray(0, 1536), a);
    u8.set(data.subarray(1536), b);
    const w = r.request(T_OUT, 16, [[a, 1536, false], [b, 8192 - 1536, false]]);
    const f = r.request(T_FLUSH, 0, []);
    await r.run();
    expect([u8[w.status], u8[f.status]]).toEqual([S_OK, S_OK]);
    expect(fileBytes(r, 16 * 512, 8192).equals(data)).toBe(true);
    expect(fileBytes(r, 0, 16 * 512).equals(DISK.subarray(0, 16 * 512))).toBe(true);
    allAsync(r, 2);
    expect(r.w.stats(0).bytesWritten).toBe(8192);

    r.w.setWriteCache(0, false);
    const more = pattern(43, 4096);
    const w2 = write(r, 100, more, 'B');
    const w3 = write(r, 200, more);
    await r.run();
    expect([u8[w2.status], u8[w3.status]]).toEqual([S_OK, S_OK]);
    expect(fileBytes(r, 100 * 512, 4096).equals(more) && fileBytes(r, 200 * 512, 4096).equals(more)).toBe(true);
    allAsync(r, 4);
  });

  it('a read past the end of a short file reads zeroes', async () => {
    const r = asyncRig();
    const end = 3 * 512 + 100;
    ftruncateSync(r.file, end);
    const across = read(r, 2, 2048); // [1024, 3072): 612 bytes of data, then zeroes
    const beyond = read(r, 64, 4096, 'B'); // entirely past the end
    await r.run();
    expect([u8[across.status], u8[beyond.status]]).toEqual([S_OK, S_OK]);
    expect(guest(across.buf, 2048).equals(Buffer.concat([DISK.subarray(1024, end), Buffer.alloc(3072 - end)]))).toBe(true);
    expect(guest(beyond.buf, 4096).every((v) => v === 0)).toBe(true);
    allAsync(r, 2);
  });

  it('mapped queue: reads and writes split over non-contiguous host runs', async () => {
    const C = 4096;
    const map = new VhostBlkMap(12, DISK_SECTORS * 512);
    const fwd = new Forwarder(64);
    const r = asyncRig({ queue: { map, forward: fwd.forward } });
    map.set(0, C, 30 * C, true);
    map.set(C, C, 10 * C, true);
    map.set(2 * C, 2 * C, 50 * C, true); // host-contiguous: one run
    const a = r.mem.take(2048, 'A', 0);
    const b = r.mem.take(4 * C - 2048, 'B', 0);
    const rd = r.request(T_IN, 0, [[a, 2048, true], [b, 4 * C - 2048, true]]);
    await r.run();
    const data = pattern(77, 2 * C);
    const w = write(r, (C + 1024) / 512, data); // the end of cluster 1, cluster 2, the start of 3
    await r.run();
    expect([u8[rd.status], u8[w.status]]).toEqual([S_OK, S_OK]);
    const want = Buffer.concat([DISK.subarray(30 * C, 31 * C), DISK.subarray(10 * C, 11 * C), DISK.subarray(50 * C, 52 * C)]);
    expect(Buffer.concat([guest(a, 2048), guest(b, 4 * C - 2048)]).equals(want)).toBe(true);
    const disk = readFileSync(r.path);
    const expected = Buffer.from(DISK);
    data.copy(expected, 10 * C + 1024, 0, C - 1024);
    data.copy(expected, 50 * C, C - 1024, 2 * C);
    expect(disk.equals(expected)).toBe(true);
    expect(fwd.produced).toBe(0);
    allAsync(r, 2);
  });

  it('backpressure: more SQEs than the ring holds (512-byte clusters, one run each)', async () => {
    const map = new VhostBlkMap(9, DISK_SECTORS * 512);
    const fwd = new Forwarder(256);
    const r = asyncRig({ num: 256, queue: { map, forward: fwd.forward } });
    const runs = 128; // 64 KiB, clusters mapped in reverse: 128 runs, 128 SQEs per request
    for (let i = 0; i < runs; i++) map.set(i * 512, 512, (DISK_SECTORS - 1 - i) * 512, false);
    const want = Buffer.concat(Array.from({ length: runs }, (_, i) => DISK.subarray((DISK_SECTORS - 1 - i) * 512, (DISK_SECTORS - i) * 512)));
    // 40 requests (5120 SQEs, the CQ holds 4096) reading into one buffer (same data).
    const buf = r.mem.take(runs * 512, 'B', 0);
    const reqs = Array.from({ length: 40 }, () => r.request(T_IN, 0, [[buf, runs * 512, true]]));
    await r.run();
    expect(reqs.every((q) => u8[q.status] === S_OK)).toBe(true);
    expect(guest(buf, runs * 512).equals(want)).toBe(true);
    allAsync(r, 40);
    expect(r.w.stats(0).broken).toBeNull();
  });

  it('a request with more parts than the ring can hold is done synchronously', async () => {
    const big = 4 * DISK_SECTORS; // 4 MiB of guest space (the file holds 1 MiB: beyond reads zeroes)
    const map = new VhostBlkMap(9, big * 512);
    const fwd = new Forwarder(64);
    const r = asyncRig({ queue: { map, forward: fwd.forward, capacitySectors: big } });
    const n = 5 * 1024; // 2.5 MiB in 512-byte clusters mapped in reverse: 5120 runs > 4096
    for (let i = 0; i < n; i++) map.set(i * 512, 512, (n - 1 - i) * 512, false);
    // Five 512 KiB segments over one buffer: done in order, the last one stays.
    const buf = r.mem.take(512 * 1024, 'B', 0xee);
    const rd = r.request(T_IN, 0, Array.from({ length: 5 }, () => [buf, 512 * 1024, true] as [number, number, boolean]));
    await r.run();
    expect(u8[rd.status]).toBe(S_OK);
    // Guest [2 MiB, 2.5 MiB) = host clusters 1023..0 in reverse.
    const want = Buffer.concat(Array.from({ length: 1024 }, (_, i) => DISK.subarray((1023 - i) * 512, (1024 - i) * 512)));
    expect(guest(buf, 512 * 1024).equals(want)).toBe(true);
    expect(r.w.stats(0)).toMatchObject({ requests: 1, asyncRequests: 0, errors: 0 });
  });

  it('an I/O error (a write to a read-only fd) fails that request; the queue goes on', async () => {
    const r = asyncRig({ add: false });
    const ro = openSync(r.path, 'r');
    cleanups.push(() => closeSync(ro));
    r.w.addQueue(0, {
      num: r.drv.num, desc: r.drv.desc, avail: r.drv.avail, used: r.drv.used, lastAvail: 0, usedIdx: 0, eventIdx: false,
      kickFd: r.kick, callFd: r.call, fd: ro, capacitySectors: DISK_SECTORS, readOnly: false, serial: '', writeCache: true,
    });
    const w = write(r, 0, pattern(1, 4096));
    const rd = read(r, 8, 512);
    await r.run();
    expect([u8[w.status], u8[rd.status]]).toEqual([S_IOERR, S_OK]);
    expect(guest(rd.buf, 512).equals(DISK.subarray(4096, 4608))).toBe(true);
    const rd2 = read(r, 16, 512);
    await r.run();
    expect(u8[rd2.status]).toBe(S_OK);
    expect(r.w.stats(0)).toMatchObject({ requests: 3, errors: 1, bytesWritten: 0, broken: null });
    expect(readFileSync(r.path).equals(DISK)).toBe(true);
  });

  it('removeQueue right after a kick: the position counts every popped request, all completed', async () => {
    const r = asyncRig({ num: 256, writeCache: false });
    const reqs: { head: number; status: number }[] = [];
    for (let i = 0; i < 80; i++) reqs.push(i % 3 === 0 ? write(r, i * 8, pattern(i, 4096), i % 2 ? 'A' : 'B') : read(r, i * 8, 4096, i % 2 ? 'A' : 'B'));
    r.submit();
    await until('some popped', () => r.w.stats(0).lastAvail > 0);
    const pos = r.w.removeQueue(0);
    expect(pos.usedIdx).toBe(pos.lastAvail);
    expect(pos.inAsync).toBe(0);
    expect(r.drv.usedIdx).toBe(pos.usedIdx);
    expect(reqs.slice(0, pos.lastAvail).every((q) => u8[q.status] === S_OK)).toBe(true);
    expect(reqs.slice(pos.lastAvail).every((q) => u8[q.status] === 0xff)).toBe(true);
    expect(r.drv.reap().length).toBe(pos.lastAvail);
    // Re-added at that position, the rest is served.
    r.w.addQueue(0, {
      num: r.drv.num, desc: r.drv.desc, avail: r.drv.avail, used: r.drv.used, lastAvail: pos.lastAvail, usedIdx: pos.usedIdx,
      eventIdx: false, kickFd: r.kick, callFd: r.call, fd: r.file, capacitySectors: DISK_SECTORS, readOnly: false, serial: '', writeCache: false,
    });
    await until('the rest', () => r.drv.usedIdx === 80);
    expect(reqs.every((q) => u8[q.status] === S_OK)).toBe(true);
    for (let i = 0; i < 80; i += 3) expect(fileBytes(r, i * 8 * 512, 4096).equals(pattern(i, 4096))).toBe(true);
  });

  it('pause() with requests in flight returns once they completed; nothing new until resume()', async () => {
    const r = asyncRig({ num: 256, writeCache: false }); // write + fdatasync: slow, so some are in flight
    const reqs = Array.from({ length: 48 }, (_, i) => write(r, i * 8, pattern(100 + i, 4096), i % 2 ? 'A' : 'B'));
    r.submit();
    await until('some popped', () => r.w.stats(0).lastAvail > 0);
    r.w.pause();
    const s = r.w.stats(0);
    expect(s.inAsync).toBe(0);
    expect(r.drv.usedIdx).toBe(s.lastAvail);
    expect(s.usedIdx).toBe(s.lastAvail);
    expect(reqs.slice(0, s.lastAvail).every((q) => u8[q.status] === S_OK)).toBe(true);
    expect(reqs.slice(s.lastAvail).every((q) => u8[q.status] === 0xff)).toBe(true);
    const extra = read(r, 0, 512);
    r.submit();
    for (let i = 0; i < 20; i++) await turn();
    expect(r.w.stats(0).lastAvail).toBe(s.lastAvail);
    expect(u8[extra.status]).toBe(0xff);
    r.w.resume();
    await until('all', () => r.drv.usedIdx === 49);
    expect([...reqs, extra].every((q) => u8[q.status] === S_OK)).toBe(true);
    for (let i = 0; i < 48; i++) expect(fileBytes(r, i * 8 * 512, 4096).equals(pattern(100 + i, 4096))).toBe(true);
  });

  it('barrier() returns only once the requests in flight completed', async () => {
    const r = asyncRig({ num: 256, writeCache: false });
    const n = 32;
    const reqs = Array.from({ length: n }, (_, i) => write(r, i * 8, pattern(200 + i, 4096), i % 2 ? 'A' : 'B'));
    r.submit();
    await until('all popped', () => r.w.stats(0).lastAvail === n);
    r.w.barrier();
    expect(r.drv.usedIdx).toBe(n);
    expect(r.w.stats(0)).toMatchObject({ inAsync: 0, usedIdx: n, requests: n });
    expect(reqs.every((q) => u8[q.status] === S_OK)).toBe(true);
  });

  it('EVENT_IDX: calls as used_event asks, none lost, with completions from CQEs', async () => {
    const r = asyncRig({ num: 256, eventIdx: true, writeCache: false });
    const u16 = new Uint16Array(layout);
    // The driver's used_event store must be ordered before its used-index load (2.7.10).
    const setUsedEvent = (v: number): void => void Atomics.store(u16, (r.drv.avail + 4 + 2 * r.drv.num) / 2, v);
    const n = 40;
    const reqs: { head: number; status: number }[] = [];
    for (let i = 0; i < n; i++) {
      if (i % 4 === 0) reqs.push(r.request(T_FLUSH, 0, []));
      else if (i % 4 === 1) reqs.push(write(r, i * 8, pattern(300 + i, 4096), 'B'));
      else reqs.push(read(r, i * 8, 4096));
    }
    setUsedEvent(0); // a call for the first completion
    r.submit();
    let seen = 0;
    let wakeups = 0;
    while (seen < n) {
      await until('a call', () => eventfdRead(r.call) > 0);
      wakeups++;
      for (;;) {
        seen += r.drv.reap().length;
        setUsedEvent(r.drv.lastUsed); // call when the used index passes what we have seen
        if (r.drv.usedIdx === r.drv.lastUsed) break; // else one came in meanwhile: reap it too
      }
    }
    expect(seen).toBe(n);
    expect(reqs.every((q) => u8[q.status] === S_OK)).toBe(true);
    const s = r.w.stats(0);
    expect(s.calls).toBeGreaterThanOrEqual(wakeups);
    expect(s.calls).toBeLessThanOrEqual(s.batches);
    allAsync(r, n);

    // used_event far ahead: completions, no call.
    r.w.barrier();
    eventfdRead(r.call);
    const calls = r.w.stats(0).calls;
    setUsedEvent((r.drv.lastUsed + 1000) & 0xffff);
    for (let i = 0; i < 8; i++) read(r, i * 8, 512);
    r.submit();
    await until('completed', () => r.drv.usedIdx === n + 8);
    r.w.barrier();
    expect(r.w.stats(0).calls).toBe(calls);
    expect(eventfdRead(r.call)).toBe(0);
  });

  it('auto: reads of a file whose pages were dropped go through the ring and return the right data', async () => {
    const r = ioRig('auto', { num: 256 });
    const dropped = dropCache(r.path);
    const reqs: { sector: number; buf: number; status: number }[] = [];
    // 1 MiB in 16 KiB reads out of order, half into each span, in one kick.
    for (let i = 0; i < 64; i++) {
      const sector = ((i * 37) % 64) * 32;
      const q = read(r, sector, 16384, i % 2 ? 'A' : 'B');
      reqs.push({ sector, buf: q.buf, status: q.status });
    }
    await r.run();
    for (const q of reqs) {
      expect(u8[q.status]).toBe(S_OK);
      expect(guest(q.buf, 16384).equals(DISK.subarray(q.sector * 512, q.sector * 512 + 16384))).toBe(true);
    }
    const s = r.w.stats(0);
    expect(s).toMatchObject({ requests: 64, errors: 0, inAsync: 0 });
    // Cold pages: NOWAIT said EAGAIN at least for the first, which the ring then read.
    if (dropped && r.w.ioMode === 'auto') expect(s.asyncRequests).toBeGreaterThan(0);
    // Now cached: the same reads are served inline.
    const before = s.asyncRequests;
    const again = read(r, 0, 8192, 'B');
    await r.run();
    expect(u8[again.status]).toBe(S_OK);
    expect(r.w.stats(0).asyncRequests).toBe(before);
  });

  it('auto: writes (inline where the file system refuses NOWAIT buffered writes, as ext4 does) and reads back', async () => {
    const r = ioRig('auto');
    const data = pattern(55, 16384);
    const w = write(r, 64, data, 'B');
    await r.run();
    expect(u8[w.status]).toBe(S_OK);
    const rd = read(r, 64, 16384);
    await r.run();
    expect(u8[rd.status]).toBe(S_OK);
    expect(guest(rd.buf, 16384).equals(data)).toBe(true);
    expect(fileBytes(r, 64 * 512, 16384).equals(data)).toBe(true);
    expect(r.w.stats(0)).toMatchObject({ requests: 2, bytesWritten: 16384, bytesRead: 16384, errors: 0 });
  });

  it('kick/eventfd plumbing: a completion arriving while the worker sleeps in epoll is pushed and called', async () => {
    const r = asyncRig();
    const rd = read(r, 0, 512);
    r.drv.publish();
    eventfdWrite(r.kick);
    await until('the used element', () => r.drv.usedIdx === 1);
    await until('the call', () => eventfdRead(r.call) > 0);
    expect(u8[rd.status]).toBe(S_OK);
    allAsync(r, 1);
  });
});
