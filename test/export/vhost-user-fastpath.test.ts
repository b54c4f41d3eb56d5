// The vhost-user-blk fast path (src/export/vhost-user/fast-path.ts): a raw file export's rings
// served by the native worker thread, driven by the TypeScript front-end and split-ring driver
// of vhost-user-frontend.ts over memfd guest RAM. Checks what the hand-overs must keep: data in
// the file, ring positions across GET_VRING_BASE, a new memory table, and a move back to the
// TypeScript path when the graph changes under the export (here: a throttle and a drain).
import { existsSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { newConfig, Bucket } from '../../src/backend/throttle.js';
import { configureGroup, ioLimitsEnable } from '../../src/backend/throttle-group.js';
import { withDrained } from '../../src/block/drain.js';
import { createIoThread, deleteIoThread, setNodeIoThread } from '../../src/block/iothread.js';
import { VIRTIO_RING_F_EVENT_IDX } from '../../src/export/vhost-user/blk-features.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { eventfdRead, liveMappings, memfdCreate, mmapFd, UnixConnection } from '../../src/native/unix-fd.js';
import { VHOST_USER_SET_SLAVE_REQ_FD, VHOST_USER_SLAVE_CONFIG_CHANGE_MSG } from '../../src/export/vhost-user/backend-channel.js';
import {
  VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../hw/virtio/virtio-blk-abi.js';
import { BlkDriver, dwz } from './vhost-user-blk-driver.js';
import { exportRig, fill, SIZE, uniq, useExportRig } from './vhost-user-export-rig.js';
import {
  configReq, connect, fdCount, HIGH, killFrontEnd, LOW, memTable, MiB, qemuStartup,
  restartRing, toClose, toUnmap, until,
} from './vhost-user-frontend.js';

useExportRig();
const rig = (format: 'raw' | 'qcow2' = 'raw', numQueues = 1, node?: Record<string, unknown>) => exportRig(format, { numQueues, node });

describe('vhost-user-blk fast path (native worker)', () => {
  it('serves a raw file natively: multi-segment writes land in the file, reads, GET_ID, flush, discard; two queues', async () => {
    const r = await rig('raw', 2);
    expect(r.exp.onFastPath).toBe(true);
    const [q0, q1] = r.drv as [BlkDriver, BlkDriver];
    const a = fill(3 * 512, 11);
    const b = fill(4096, 12);
    expect((await q0.submit(VIRTIO_BLK_T_OUT, 100, [{ len: 512, data: a.subarray(0, 512) }, { len: 1024, data: a.subarray(512) }])).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q1.submit(VIRTIO_BLK_T_OUT, 200, [{ len: 4096, data: b }])).status).toBe(VIRTIO_BLK_S_OK);
    const file = readFileSync(r.img);
    expect(file.subarray(100 * 512, 103 * 512)).toEqual(Buffer.from(a));
    expect(file.subarray(200 * 512, 208 * 512)).toEqual(Buffer.from(b));
    const rd = await q1.submit(VIRTIO_BLK_T_IN, 100, [{ len: 1024 }, { len: 512 }]);
    expect(Buffer.concat(rd.data.map((d) => Buffer.from(d)))).toEqual(Buffer.from(a));
    const id = await q0.submit(VIRTIO_BLK_T_GET_ID, 0, [{ len: 20 }]);
    expect(Buffer.from(id.data[0]!).toString('latin1').replace(/\0+$/, '')).toBe('fast0');
    expect((await q0.submit(VIRTIO_BLK_T_FLUSH, 0)).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q0.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(200, 8) }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(readFileSync(r.img).subarray(200 * 512, 208 * 512).every((x) => x === 0)).toBe(true);
    // The TypeScript data plane never saw a request: the block layer's counters stay at zero.
    expect(r.exp.backend.node!.stats.rdOps + r.exp.backend.node!.stats.wrOps).toBe(0);
  });

  it('discard=ignore on the node: discard keeps the data, write-zeroes with UNMAP still zeroes (as the block layer does)', async () => {
    const r = await rig('raw', 1, { discard: 'ignore' });
    expect(r.exp.onFastPath).toBe(true);
    const q = r.drv[0]!;
    const before = readFileSync(r.img).subarray(300 * 512, 308 * 512);
    expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(300, 8) }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(readFileSync(r.img).subarray(300 * 512, 308 * 512)).toEqual(before);
    expect(before.some((x) => x !== 0)).toBe(true);
    expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(300, 8, 1) }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(readFileSync(r.img).subarray(300 * 512, 308 * 512).every((x) => x === 0)).toBe(true);
    expect(r.exp.backend.node!.stats.discardOps).toBe(0); // native, not the block layer
  });

  it('a node that detects zeroes stays on the TypeScript path, and works', async () => {
    const r = await rig('qcow2', 1, { 'detect-zeroes': 'on' });
    const q = r.drv[0]!;
    const d = fill(2048, 13);
    expect((await q.submit(VIRTIO_BLK_T_OUT, 50, [{ len: 2048, data: d }])).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q.submit(VIRTIO_BLK_T_IN, 50, [{ len: 2048 }])).data[0]).toEqual(d);
    expect(r.exp.onFastPath).toBe(false);
  });

  it('GET_VRING_BASE hands the position back; a ring set up again from it continues natively', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    for (let i = 0; i < 5; i++) expect((await q.submit(VIRTIO_BLK_T_IN, i, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const vb = await r.fe.call(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(0, 0));
    expect(P.dataView(vb).getUint32(4, true)).toBe(7 + 5);
    expect(q.usedIdx).toBe(12);
    // QEMU's vhost_dev_start again, with a new kick eventfd.
    q.kickFd = await restartRing(r.fe, 0, 12);
    const d = fill(1024, 14);
    expect((await q.submit(VIRTIO_BLK_T_OUT, 30, [{ len: 1024, data: d }])).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q.submit(VIRTIO_BLK_T_IN, 30, [{ len: 1024 }])).data[0]).toEqual(d);
    expect(q.usedIdx).toBe(14);
    expect(r.exp.onFastPath).toBe(true);
    expect(q.errors).toEqual([]);
  });

  it('a new memory table moves the rings at their positions; buffers in the new region work', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const EXTRA = { gpa: 0x20000000, size: MiB, uva: 0x7f1000000000, off: 0 };
    const extraFd = memfdCreate('hotplug', MiB);
    toClose.push(extraFd);
    const extraMap = mmapFd(extraFd, MiB);
    toUnmap.push(extraMap);
    q.extra.push({ gpa: EXTRA.gpa, view: new Uint8Array(extraMap) });
    expect(await r.fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH, EXTRA]), [r.ram.fd, r.ram.fd, extraFd])).toBe(0n);
    const d = fill(2048, 15);
    expect((await q.submit(VIRTIO_BLK_T_OUT, 60, [{ gpa: EXTRA.gpa + 4096, len: 2048, data: d }])).status).toBe(VIRTIO_BLK_S_OK);
    const rd = await q.submit(VIRTIO_BLK_T_IN, 60, [{ gpa: EXTRA.gpa + 65536, len: 2048 }]);
    expect(rd.data[0]).toEqual(d);
    expect(q.usedIdx).toBe(10);
    expect(r.exp.onFastPath).toBe(true);
  });

  it('a throttle added under the export moves the session to the TypeScript path at the drain, at the same position', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const d = fill(512, 16);
    expect((await q.submit(VIRTIO_BLK_T_OUT, 10, [{ len: 512, data: d }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(r.exp.onFastPath).toBe(true);
    ioLimitsEnable(r.exp.backend, `fast-${uniq()}`);
    const cfg = newConfig();
    cfg.buckets[Bucket.OPS_TOTAL]!.avg = 1_000_000;
    configureGroup(r.exp.backend.throttle!, cfg);
    await withDrained([r.exp.backend.node!], () => {});
    expect(r.exp.onFastPath).toBe(false);
    expect((await q.submit(VIRTIO_BLK_T_IN, 10, [{ len: 512 }])).data[0]).toEqual(d);
    expect(q.usedIdx).toBe(9);
    // Now the block layer sees the requests.
    expect(r.exp.backend.node!.stats.rdOps).toBeGreaterThan(0);
  });

  it('rings run on the thread of the node\'s context: exports in one context share it, an iothread move takes the rings along', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    expect((await q.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    const mainTid = r.exp.nativeThreadId!;
    expect(mainTid).toBeGreaterThan(0);
    expect(mainTid).not.toBe(process.pid);
    expect(readFileSync(`/proc/self/task/${mainTid}/comm`, 'utf8').trim()).toBe('spindle-iothrd');
    // A second export in the main context: same thread.
    const r2 = await rig();
    expect((await r2.drv[0]!.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(r2.exp.nativeThreadId).toBe(mainTid);
    // The first export's node moves to an iothread: its rings move to that thread, in place.
    const t = createIoThread(`vu-io-${uniq()}`);
    try {
      await setNodeIoThread(r.exp.backend.node!, t, true);
      const ioTid = r.exp.nativeThreadId!;
      expect(ioTid).toBeGreaterThan(0);
      expect(ioTid).not.toBe(mainTid);
      const d = fill(1024, 17);
      expect((await q.submit(VIRTIO_BLK_T_OUT, 40, [{ len: 1024, data: d }])).status).toBe(VIRTIO_BLK_S_OK);
      expect((await q.submit(VIRTIO_BLK_T_IN, 40, [{ len: 1024 }])).data[0]).toEqual(d);
      expect(q.usedIdx).toBe(10);
      expect(r2.exp.nativeThreadId).toBe(mainTid);
      // And back: the iothread's thread stops with its last ring.
      await setNodeIoThread(r.exp.backend.node!, null, true);
      expect(r.exp.nativeThreadId).toBe(mainTid);
      expect(existsSync(`/proc/self/task/${ioTid}`)).toBe(false);
      expect((await q.submit(VIRTIO_BLK_T_IN, 40, [{ len: 1024 }])).data[0]).toEqual(d);
    } finally {
      await setNodeIoThread(r.exp.backend.node!, null, true);
      deleteIoThread(t.id);
    }
  });

  it('block_resize: the rings take the new capacity, and the front-end hears of it on the back-end channel', async () => {
    const r = await rig();
    const q = r.drv[0]!;
    const [mine, theirs] = UnixConnection.pair();
    expect(await r.fe.ack(VHOST_USER_SET_SLAVE_REQ_FD, new Uint8Array(0), [theirs.fd])).toBe(0n);
    theirs.close();
    const cap = SIZE / 512;
    expect((await q.submit(VIRTIO_BLK_T_IN, cap, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_IOERR);
    await r.exp.backend.truncate(SIZE + MiB);
    // VHOST_USER_SLAVE_CONFIG_CHANGE_MSG: request 2, version 1, no payload, no reply wanted.
    const hdr = new Uint8Array(P.HEADER_SIZE);
    let got: { bytes: number } | null = null;
    await until('the config-change message', () => (got = mine.recv(hdr, 0)) !== null);
    expect(got!.bytes).toBe(P.HEADER_SIZE);
    expect(P.decodeHeader(hdr)).toMatchObject({ request: VHOST_USER_SLAVE_CONFIG_CHANGE_MSG, flags: 1, size: 0 });
    mine.close();
    const cfg = await r.fe.call(P.VHOST_USER_GET_CONFIG, configReq(0, 8));
    expect(P.dataView(cfg.subarray(P.CONFIG_HEADER)).getBigUint64(0, true)).toBe(BigInt(cap + MiB / 512));
    const d = fill(512, 18);
    expect((await q.submit(VIRTIO_BLK_T_OUT, cap + 5, [{ len: 512, data: d }])).status).toBe(VIRTIO_BLK_S_OK);
    expect((await q.submit(VIRTIO_BLK_T_IN, cap + 5, [{ len: 512 }])).data[0]).toEqual(d);
    expect(r.exp.onFastPath).toBe(true);
  });

  it('a ring the worker finds broken signals its err eventfd and is served no more; the session stays up', async () => {
    const r = await exportRig('raw', { numQueues: 2, err: true });
    expect(r.exp.onFastPath).toBe(true);
    const [q0, q1] = r.drv as [BlkDriver, BlkDriver];
    q0.publishHead(500); // not a descriptor of a 128-entry table
    q0.kick();
    await until('the err eventfd', () => eventfdRead(r.errs[0]!) === 1);
    expect(eventfdRead(r.errs[1]!)).toBe(0);
    // The other ring goes on; the control plane still answers.
    expect((await q1.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(await r.fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(2n);
    expect(r.be.closed).toBe(false);
  });

  it('the front-end going away joins the worker and leaks no fd or mapping; a new session is native again', async () => {
    const r = await rig();
    expect((await r.drv[0]!.submit(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    // QEMU is killed: the socket and its eventfds go.
    killFrontEnd(r.fe, [...r.kicks, ...r.calls], r.inflight);
    await until('the session ending', () => r.be.closed);
    expect(liveMappings()).toBe(r.maps0);
    expect(fdCount()).toBe(r.fds0);
    const q = new BlkDriver(r.ram, 0); // rings reset before the new session reads them
    const { fe, be } = await connect(r.exp, r.exp.path);
    const { kicks, calls } = await qemuStartup(fe, r.ram.fd, 1, { length: SIZE });
    q.attach(kicks[0]!, calls[0]!, be.hasFeature(VIRTIO_RING_F_EVENT_IDX));
    expect((await q.submit(VIRTIO_BLK_T_IN, 1, [{ len: 512 }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(r.exp.onFastPath).toBe(true);
  });
});
