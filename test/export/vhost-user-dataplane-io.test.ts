// The vhost-user-blk data plane's requests on the TypeScript path (the rig and how requests are
// held: vhost-user-rig.ts): reads and writes through the rings, notification suppression,
// discard, write-zeroes and read-only exports.
process.env.SPINDLE_VHOST_FASTPATH = '0'; // the TypeScript path: see vhost-user-rig.ts

import { describe, expect, it } from 'vitest';
import { VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from '../../src/export/vhost-user/blk-features.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { eventfdRead } from '../../src/native/unix-fd.js';
import {
  VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
} from '../../hw/virtio/virtio-blk-abi.js';
import { VRING_AVAIL_F_NO_INTERRUPT } from '../../hw/virtio/virtqueue.js';
import { sleep, turns, until } from './vhost-user-frontend.js';
import { SIZE, CAP, bit, rig, fileNow, fill, dwz, useDataPlaneRig } from './vhost-user-rig.js';

useDataPlaneRig();

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
