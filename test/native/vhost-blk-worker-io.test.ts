// The native vhost-user-blk worker serving requests (vhost-blk-ring-driver.ts sets up guest
// memory, the ring driver and the disk): reads, writes, indirect chains, GET_ID, FLUSH,
// DISCARD/WRITE_ZEROES, and requests that fail (bounds, read-only, buffer faults).
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { eventfdRead, eventfdWrite } from '../../src/native/unix-fd.js';
import { pattern } from './helpers.js';
import {
  SPAN_A, SPAN_B, HOLE, BEYOND, LAYOUT, DISK_SECTORS, T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD,
  T_WRITE_ZEROES, S_OK, S_IOERR, S_UNSUPP, until, layout, u8, rig, fileBytes, guest, secondQueue,
  dwzSegment, useWorkerRig,
} from './vhost-blk-ring-driver.js';

useWorkerRig();

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
    // The flush may complete after the others (on the worker's io_uring).
    expect(used.map((e) => e.id).sort()).toEqual([g.head, f.head, u.head].sort());
    expect(used.find((e) => e.id === g.head)!.len).toBe(21);
    expect(u8[g.status]).toBe(S_OK);
    expect(guest(id, 20).equals(Buffer.concat([Buffer.from('abc-123'), Buffer.alloc(13)]))).toBe(true);
    expect(u8[f.status]).toBe(S_OK);
    expect(u8[u.status]).toBe(S_UNSUPP);
    expect(r.w.stats(0).errors).toBe(1);
  });

  it('DISCARD and WRITE_ZEROES (with and without UNMAP) zero the file; bad segments are refused', async () => {
    const r = rig({ writeCache: false });
    const seg = (sector: number, count: number, flags: number): number => dwzSegment(r, sector, count, flags);
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
    expect(used.find((e) => e.id === none)).toEqual({ id: none, len: 0 });
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
    const { drv: drv2, kick: kick2, call: call2 } = secondQueue(r, 3);
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
});
