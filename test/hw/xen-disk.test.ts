// xen-disk (blkback) driven by a blkfront that speaks only qtest: the xenbus state machine,
// feature keys, data round trips checked against the image file, multi-page rings, indirect
// requests, flush/barrier, discard, guest mistakes answered with BLKIF_RSP_ERROR, and the
// params-only disk that opens and releases its own backend on every connect.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { PcMachine } from '../../hw/pc/pc.js';
import {
  BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY,
} from '../../hw/xen/blkif-ring.js';
import { XenBridge } from '../../hw/xen/xen-bridge.js';
import { XenDisk } from '../../hw/xen/xen-disk.js';
import { createBackend, liveBackends, type BlockBackend } from '../../src/backend/backend.js';
import { getDriver, registerDriver } from '../../src/block/drivers/index.js';
import { openNode, unref } from '../../src/block/graph.js';
import { stateOf } from '../../src/block/node.js';
import { Perm, type BlockDriver, type IoCallback } from '../../src/block/types.js';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { QtestClient } from '../../src/qos/qtest-client.js';
import { XENBUS, XenBlkfront, XenGuest, waitFor } from '../../src/qos/xen-blkfront.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-xen-');
const XVDA = 51712;
const SIZE = 4 << 20;
let n = 0;

function image(seed: number, size = SIZE): string {
  const path = join(dir, `xvd${n++}.raw`);
  writeFileSync(path, pattern(size, seed));
  return path;
}

async function backendFor(path: string, name: string): Promise<BlockBackend> {
  const node = await openNode({ driver: 'raw', discard: 'unmap', file: { driver: 'file', filename: path, discard: 'unmap' } });
  const b = createBackend({ name }, node);
  unref(node);
  return b;
}

// A test driver whose writes complete only when the test opens the gate, logging every request.
const gate = { hold: false, held: [] as IoCallback[], log: [] as string[] };
const gatedDriver: BlockDriver = {
  format: 'x-xen-gated',
  protocol: true,
  optionKeys: ['size'],
  async open(node, o) {
    node.opaque = { size: Number(o['size'] ?? 1 << 20) };
  },
  getLength: (node) => stateOf<{ size: number }>(node).size,
  childPerms: () => ({ perm: 0, shared: Perm.ALL }),
  readv(_node, _offset, _bytes, _iov, _flags, cb) {
    setImmediate(cb, null);
  },
  writev(_node, offset, bytes, _iov, flags, cb) {
    gate.log.push(`write ${offset / 512}+${bytes / 512}${flags & 4 ? ' fua' : ''}`);
    if (gate.hold) gate.held.push(cb);
    else setImmediate(cb, null);
  },
  async flush() {
    gate.log.push('flush');
  },
};
try {
  getDriver(gatedDriver.format);
} catch {
  registerDriver(gatedDriver);
}

const cleanups: (() => void | Promise<void>)[] = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

async function rig(opts: { path?: string; params?: boolean } = {}) {
  const path = opts.path ?? image(n + 1);
  const m = new PcMachine({ ramSize: 64 << 20 });
  const bridge = new XenBridge({ id: 'xenbridge' });
  m.addDevice(bridge);
  let drive: BlockBackend | undefined;
  const opened: BlockBackend[] = [];
  let disk: XenDisk;
  if (opts.params) {
    disk = new XenDisk({
      id: 'xvda', bridge, vdev: XVDA,
      openDrive: async (params) => {
        const b = await backendFor(params, 'xvda-own');
        opened.push(b);
        return b;
      },
    });
  } else {
    drive = await backendFor(path, `xvda${n}`);
    disk = new XenDisk({ id: 'xvda', bridge, vdev: XVDA, drive });
  }
  if (opts.params) bridge.store.write(`/local/domain/0/backend/vbd/1/${XVDA}/params`, path);
  m.addDevice(disk);
  const qts = QtestClient.inProcess(m);
  const xen = await XenGuest.create(qts, await GuestAlloc.forPc(qts));
  const fe = new XenBlkfront(xen, XVDA);
  cleanups.push(() => {
    if (m.device('xvda')) m.removeDevice('xvda');
    if (drive && !drive.dead) drive.unref();
  });
  return { m, bridge, disk, drive, qts, xen, fe, path, opened };
}

const fileAt = (path: string, sector: number, count: number) => readFileSync(path).subarray(sector * 512, (sector + count) * 512);

describe('xen-disk: xenbus state machine and feature keys', () => {
  it('publishes the blkback keys, connects, closes and connects again', async () => {
    const { fe, xen, disk } = await rig();
    await fe.probe();
    const f = fe.features;
    expect(f['state']).toBe(String(XENBUS.InitWait));
    expect(f).toMatchObject({
      'feature-flush-cache': '1', 'feature-barrier': '1', 'feature-discard': '1', 'feature-persistent': '0',
      'feature-max-indirect-segments': '256', 'max-ring-page-order': '4', 'sector-size': '512',
      sectors: String(SIZE / 512), info: '0', mode: 'w', 'frontend-id': '1', frontend: fe.frontendPath,
    });
    expect(await xen.read(`${fe.frontendPath}/backend-id`)).toBe('0');
    // Initialised is what makes the backend connect; it does not run ahead of the frontend.
    expect(await fe.backendState()).toBe(XENBUS.InitWait);
    await fe.connect();
    expect(await fe.backendState()).toBe(XENBUS.Connected);
    expect(fe.sectors).toBe(SIZE / 512);
    expect(await xen.read(`${fe.frontendPath}/state`)).toBe(String(XENBUS.Connected));
    expect((await fe.read(0, 8)).status).toBe(BLKIF_RSP_OKAY);

    // Closing: the backend follows to Closing, and to Closed only once the frontend is Closed.
    await fe.setState(XENBUS.Closing);
    expect(await fe.waitBackendState(XENBUS.Closing, XENBUS.Closed)).toBe(XENBUS.Closing);
    await fe.setState(XENBUS.Closed);
    expect(await fe.waitBackendState(XENBUS.Closed)).toBe(XENBUS.Closed);
    // The old ring's port is no longer served.
    const kicksBefore = disk.stats.ok;
    await xen.notify(fe.port);
    expect(disk.stats.ok).toBe(kicksBefore);

    await fe.reinitialise();
    expect(await fe.backendState()).toBe(XENBUS.InitWait);
    await fe.connect({ ringPageOrder: 1 });
    expect(await fe.backendState()).toBe(XENBUS.Connected);
    expect((await fe.read(8, 8)).status).toBe(BLKIF_RSP_OKAY);
    expect(disk.stats.connects).toBe(2);
  });

  it('refuses bad properties at realize, leaving nothing behind, and lets go of its drive on unplug', async () => {
    const { m, bridge, drive } = await rig();
    expect(() => new XenDisk({ id: 'x', bridge, vdev: 0, drive })).toThrow(/invalid vdev/);
    expect(() => m.addDevice(new XenDisk({ id: 'xvdz', bridge, vdev: 51728 }))).toThrow(/needs drive=/);
    expect(() => m.addDevice(new XenDisk({ id: 'xvdz', bridge, vdev: XVDA, drive }))).toThrow(/already has a backend/);
    expect(() => m.addDevice(new XenDisk({ id: 'xvdz', bridge, vdev: 51728, drive }))).toThrow(/already in use by device 'xvda'/);
    expect(bridge.store.exists('/local/domain/0/backend/vbd/1/51728')).toBe(false);
    expect(m.device('xvdz')).toBeUndefined();
    const lone = new XenBridge({ id: 'lone' });
    expect(() => m.addDevice(new XenDisk({ id: 'xvdy', bridge: lone, vdev: 51744, drive }))).toThrow(/not realized/);
    expect(drive!.device?.id).toBe('xvda');
    m.removeDevice('xvda');
    expect(drive!.device).toBeNull();
    expect(bridge.store.exists(`/local/domain/0/backend/vbd/1/${XVDA}`)).toBe(false);
    expect(bridge.store.exists(`/local/domain/1/device/vbd/${XVDA}`)).toBe(false);
  });

  it('refuses a ring it cannot map: error key, backend Closing, nothing served', async () => {
    const { fe, xen, bridge } = await rig();
    await fe.probe();
    await xen.write(`${fe.frontendPath}/ring-ref`, '900'); // never granted
    await xen.write(`${fe.frontendPath}/event-channel`, String(await xen.evtchnAlloc(0)));
    await fe.setState(XENBUS.Initialised);
    await fe.waitBackendState(XENBUS.Closing);
    expect(bridge.store.read(`${fe.backendPath}/error`)).toMatch(/grant ref 900 does not permit access/);
    await xen.write(`${fe.frontendPath}/protocol`, 'arm-abi');
    await fe.setState(XENBUS.Closed);
    await fe.waitBackendState(XENBUS.Closed);
    await fe.reinitialise();
    await fe.setState(XENBUS.Initialised);
    await waitFor('protocol error', () => (/unsupported protocol 'arm-abi'/.test(bridge.store.read(`${fe.backendPath}/error`) ?? '') ? true : undefined));
  });
});

describe('xen-disk: data', () => {
  it('round-trips writes and reads against the image file, notifying through the event channel', async () => {
    const { fe, qts, path } = await rig();
    await qts.irqInterceptIn('xen-evtchn');
    await fe.connect();
    // Reads see the file.
    const r0 = await fe.read(100, 40);
    expect(r0.status).toBe(BLKIF_RSP_OKAY);
    expect(Buffer.from(r0.data).equals(fileAt(path, 100, 40))).toBe(true);
    // The response raised the port's line; waitResponse acknowledged it.
    expect(await fe.xen.pending(fe.port)).toBe(false);
    // Writes of 1..11 segments land in the file, partial last pages included.
    for (const [sector, count, seed] of [[0, 1, 3], [77, 21, 4], [1000, 88, 5], [SIZE / 512 - 9, 9, 6]] as const) {
      const data = pattern(count * 512, seed);
      expect(await fe.write(sector, data)).toBe(BLKIF_RSP_OKAY);
      expect(Buffer.from(fileAt(path, sector, count)).equals(data)).toBe(true);
      const back = await fe.read(sector, count);
      expect(Buffer.from(back.data).equals(data)).toBe(true);
    }
    // A response notifies: the line is up until the guest acknowledges.
    const id = await fe.submit({ operation: BLKIF_OP_READ, sector: 0n, seg: [] }); // 0 segments: an error, still answered
    await waitFor('irq', () => (qts.getIrq(fe.port) ? true : undefined));
    expect((await fe.waitResponse(id)).status).toBe(BLKIF_RSP_ERROR);
    expect(qts.getIrq(fe.port)).toBe(false);
  });

  it('speaks the x86_32 ABI when the frontend asks for it (108-byte slots)', async () => {
    const { fe, path, disk } = await rig();
    await fe.connect({ protocol: 'x86_32-abi', ringPageOrder: 1 });
    expect(fe.ringSize).toBe(64);
    for (let i = 0; i < 70; i++) { // wraps the ring: slots at 108-byte strides, straddling pages
      const data = pattern(1024 + 512 * (i % 5), i);
      expect(await fe.write(16 * i, data), `write ${i}`).toBe(BLKIF_RSP_OKAY);
      expect(fileAt(path, 16 * i, data.length / 512).equals(data)).toBe(true);
    }
    expect(Buffer.from((await fe.read(16, 8)).data).equals(fileAt(path, 16, 8))).toBe(true);
    const ind = await fe.indirect(BLKIF_OP_READ, 0, 8 * 20);
    expect(Buffer.from(ind.data).equals(fileAt(path, 0, 160))).toBe(true);
    expect(await fe.discard(4000, 16)).toBe(BLKIF_RSP_OKAY);
    expect(fileAt(path, 4000, 16).equals(Buffer.alloc(16 * 512))).toBe(true);
    expect(disk.stats.error).toBe(0);
  });

  it('serves a multi-page ring with many requests in flight, wrapping around it', async () => {
    const { fe, qts, path, disk } = await rig();
    await fe.connect({ ringPageOrder: 1 });
    expect(fe.ringSize).toBe(64);
    const bufs: number[] = [];
    for (let round = 0; round < 3; round++) {
      const ids: bigint[] = [];
      for (let i = 0; i < 50; i++) {
        const buf = fe.xen.alloc.alloc(4096);
        bufs.push(buf);
        await qts.memwrite(buf, pattern(4096, 1000 * round + i));
        const gref = await fe.xen.grant(buf, 0, true);
        ids.push(await fe.submit({ operation: BLKIF_OP_WRITE, sector: BigInt(8 * (50 * round + i)), seg: [{ gref, firstSect: 0, lastSect: 7 }] }));
      }
      for (const id of ids) expect((await fe.waitResponse(id)).status).toBe(BLKIF_RSP_OKAY);
    }
    const file = readFileSync(path);
    for (let k = 0; k < 150; k++) {
      const want = pattern(4096, 1000 * Math.floor(k / 50) + (k % 50));
      expect(file.subarray(k * 4096, (k + 1) * 4096).equals(want), `page ${k}`).toBe(true);
    }
    expect(disk.stats.ok).toBe(150);
    // Four pages and the largest order the backend allows.
    await fe.disconnect();
    await fe.reinitialise();
    await fe.connect({ ringPageOrder: 4 });
    expect(fe.ringSize).toBe(512);
    expect(Buffer.from((await fe.read(0, 8)).data).equals(file.subarray(0, 4096))).toBe(true);
  });

  it('keeps a full one-page ring moving: more requests than slots, all answered in the end', async () => {
    const { fe, qts, path } = await rig();
    await fe.connect();
    expect(fe.ringSize).toBe(32);
    const ids: bigint[] = [];
    for (let i = 0; i < 45; i++) {
      const buf = fe.xen.alloc.alloc(4096);
      await qts.memwrite(buf, Buffer.alloc(4096, i + 1));
      ids.push(await fe.submit({ operation: BLKIF_OP_WRITE, sector: BigInt(8 * i), seg: [{ gref: await fe.xen.grant(buf, 0, true), firstSect: 0, lastSect: 7 }] }));
    }
    for (const id of ids) expect((await fe.waitResponse(id)).status).toBe(BLKIF_RSP_OKAY);
    const file = readFileSync(path);
    for (let i = 0; i < 45; i++) expect(file.subarray(4096 * i, 4096 * (i + 1)).equals(Buffer.alloc(4096, i + 1)), `page ${i}`).toBe(true);
  });

  it('does indirect reads and writes of up to 256 segments, and refuses more', async () => {
    const { fe, path } = await rig({ path: image(9, 16 << 20) });
    await fe.connect();
    const data = pattern(200 * 4096, 42);
    const w = await fe.indirect(BLKIF_OP_WRITE, 2048, data);
    expect(w.status).toBe(BLKIF_RSP_OKAY);
    expect(fileAt(path, 2048, 1600).equals(data)).toBe(true);
    const r = await fe.indirect(BLKIF_OP_READ, 2048, 1600);
    expect(Buffer.from(r.data).equals(data)).toBe(true);
    const full = await fe.indirect(BLKIF_OP_READ, 0, 256 * 8);
    expect(full.status).toBe(BLKIF_RSP_OKAY);
    expect(Buffer.from(full.data).equals(fileAt(path, 0, 2048))).toBe(true);
    expect((await fe.indirect(BLKIF_OP_READ, 0, 257 * 8)).status).toBe(BLKIF_RSP_ERROR);
    expect((await fe.request({ operation: BLKIF_OP_INDIRECT, indirectOp: 3, nrSegments: 1, indirectGrefs: [8] })).status).toBe(BLKIF_RSP_ERROR);
    expect((await fe.request({ operation: BLKIF_OP_INDIRECT, indirectOp: BLKIF_OP_READ, nrSegments: 4, indirectGrefs: [1000] })).status).toBe(BLKIF_RSP_ERROR);
  });

  it('flushes, and orders a barrier after the writes before it', async () => {
    const { fe, path, qts } = await rig();
    await fe.connect();
    expect(await fe.flush()).toBe(BLKIF_RSP_OKAY);
    expect(await fe.barrier()).toBe(BLKIF_RSP_OKAY);
    // Writes in flight, then a barrier write over the same sectors: the barrier's data wins.
    const ids: bigint[] = [];
    for (let i = 0; i < 4; i++) {
      const buf = fe.xen.alloc.alloc(4096);
      await qts.memwrite(buf, Buffer.alloc(4096, 0x10 + i));
      ids.push(await fe.submit({ operation: BLKIF_OP_WRITE, sector: 64n, seg: [{ gref: await fe.xen.grant(buf, 0, true), firstSect: 0, lastSect: 7 }] }));
    }
    const bdata = Buffer.alloc(4096, 0xb7);
    const seen = fe.arrivals.length;
    expect(await fe.barrier(64, bdata)).toBe(BLKIF_RSP_OKAY);
    for (const id of ids) expect((await fe.waitResponse(id)).status).toBe(BLKIF_RSP_OKAY);
    expect(fileAt(path, 64, 8).equals(bdata)).toBe(true);
    // Every write before the barrier was answered before it.
    const order = fe.arrivals.slice(seen);
    expect(order.length).toBe(5);
    expect(order.slice(0, 4).sort()).toEqual([...ids].sort());
    expect((await fe.request({ operation: 4 /* BLKIF_OP_RESERVED_1 */ })).status).toBe(BLKIF_RSP_EOPNOTSUPP);
  });

  it('holds a barrier (and what follows it) until the writes before it complete', async () => {
    const node = await openNode({ driver: 'x-xen-gated', size: 1 << 20 });
    const drive = createBackend({ name: 'xvdgated' }, node);
    unref(node);
    const m = new PcMachine({ ramSize: 32 << 20 });
    const bridge = new XenBridge({ id: 'xenbridge' });
    m.addDevice(bridge);
    m.addDevice(new XenDisk({ id: 'xvdc', bridge, vdev: 51744, drive }));
    cleanups.push(() => {
      m.removeDevice('xvdc');
      drive.unref();
    });
    const qts = QtestClient.inProcess(m);
    const fe = new XenBlkfront(await XenGuest.create(qts, await GuestAlloc.forPc(qts)), 51744);
    await fe.connect();
    const buf = fe.xen.alloc.alloc(4096);
    const g = await fe.xen.grant(buf, 0, true);
    const seg = [{ gref: g, firstSect: 0, lastSect: 7 }];
    gate.log.length = 0;
    gate.hold = true;
    const w1 = await fe.submit({ operation: BLKIF_OP_WRITE, sector: 8n, seg });
    const w2 = await fe.submit({ operation: BLKIF_OP_WRITE, sector: 16n, seg });
    // The barrier and a write after it reach the backend in one pass.
    const b = await fe.submit({ operation: BLKIF_OP_WRITE_BARRIER, sector: 24n, seg }, { notify: false });
    const w3 = await fe.submit({ operation: BLKIF_OP_WRITE, sector: 32n, seg }, { notify: false });
    await fe.kick();
    for (let i = 0; i < 50; i++) await new Promise(setImmediate);
    await fe.poll();
    expect(gate.log).toEqual(['write 8+8', 'write 16+8']); // no flush, no barrier write, nothing after it
    expect(fe.arrivals).not.toContain(b);
    gate.hold = false;
    for (const cb of gate.held.splice(0)) cb(null);
    for (const id of [w1, w2, b, w3]) expect((await fe.waitResponse(id)).status).toBe(BLKIF_RSP_OKAY);
    expect(gate.log).toEqual(['write 8+8', 'write 16+8', 'flush', 'write 24+8 fua', 'write 32+8']);
    expect(fe.arrivals.slice(-2)).toEqual([b, w3]);
  });

  it('discards: the range reads as zeroes in the file, neighbours untouched; bad discards fail', async () => {
    const { fe, path } = await rig();
    await fe.connect();
    const before = readFileSync(path);
    expect(await fe.discard(64, 128)).toBe(BLKIF_RSP_OKAY);
    const after = readFileSync(path);
    expect(after.subarray(64 * 512, 192 * 512).equals(Buffer.alloc(128 * 512))).toBe(true);
    expect(after.subarray(0, 64 * 512).equals(before.subarray(0, 64 * 512))).toBe(true);
    expect(after.subarray(192 * 512).equals(before.subarray(192 * 512))).toBe(true);
    expect(Buffer.from((await fe.read(64, 8)).data).equals(Buffer.alloc(4096))).toBe(true);
    expect(await fe.discard(SIZE / 512 - 4, 8)).toBe(BLKIF_RSP_ERROR);
    expect(await fe.discard(0, 8, 1 /* secure */)).toBe(BLKIF_RSP_EOPNOTSUPP);
  });
});

describe('xen-disk: read-only media', () => {
  it('publishes mode r and VDISK_READONLY, reads, and fails writes and discards', async () => {
    const path = image(31);
    const node = await openNode({ driver: 'raw', 'read-only': true, file: { driver: 'file', filename: path, 'read-only': true } });
    const drive = createBackend({ name: 'xvdro' }, node);
    unref(node);
    const m = new PcMachine({ ramSize: 32 << 20 });
    const bridge = new XenBridge({ id: 'xenbridge' });
    m.addDevice(bridge);
    m.addDevice(new XenDisk({ id: 'xvdb', bridge, vdev: 51728, drive }));
    cleanups.push(() => {
      m.removeDevice('xvdb');
      drive.unref();
    });
    const qts = QtestClient.inProcess(m);
    const fe = new XenBlkfront(await XenGuest.create(qts, await GuestAlloc.forPc(qts)), 51728);
    await fe.connect();
    expect(fe.features).toMatchObject({ mode: 'r', info: '4' });
    expect(Buffer.from((await fe.read(0, 8)).data).equals(fileAt(path, 0, 8))).toBe(true);
    const before = readFileSync(path);
    expect(await fe.write(0, Buffer.alloc(4096, 1))).toBe(BLKIF_RSP_ERROR);
    expect(await fe.discard(0, 8)).toBe(BLKIF_RSP_ERROR);
    expect(readFileSync(path).equals(before)).toBe(true);
  });
});

describe('xen-disk: guest mistakes', () => {
  it('answers bad grant refs and bad segments with BLKIF_RSP_ERROR and keeps serving', async () => {
    const { fe, xen, qts, path, disk, bridge } = await rig();
    await fe.connect();
    const buf = xen.alloc.alloc(4096);
    const ro = await xen.grant(buf, 0, true);
    const rw = await xen.grant(buf, 0, false);
    const foreign = await xen.grant(buf, 7, false);
    const last = SIZE / 512;
    const bad = [
      { operation: BLKIF_OP_READ, sector: 0n, seg: [{ gref: 5000, firstSect: 0, lastSect: 7 }] }, // outside the table
      { operation: BLKIF_OP_READ, sector: 0n, seg: [{ gref: 3, firstSect: 0, lastSect: 7 }] }, // never granted
      { operation: BLKIF_OP_READ, sector: 0n, seg: [{ gref: ro, firstSect: 0, lastSect: 7 }] }, // device would write a read-only grant
      { operation: BLKIF_OP_READ, sector: 0n, seg: [{ gref: foreign, firstSect: 0, lastSect: 7 }] }, // granted to another domain
      { operation: BLKIF_OP_READ, sector: 0n, seg: [{ gref: rw, firstSect: 5, lastSect: 2 }] }, // first > last
      { operation: BLKIF_OP_READ, sector: 0n, seg: [{ gref: rw, firstSect: 0, lastSect: 8 }] }, // past the page
      { operation: BLKIF_OP_WRITE, sector: BigInt(last - 4), seg: [{ gref: ro, firstSect: 0, lastSect: 7 }] }, // past the disk
      { operation: BLKIF_OP_READ, sector: 2n ** 63n, seg: [{ gref: rw, firstSect: 0, lastSect: 0 }] },
      { operation: BLKIF_OP_WRITE, sector: 0n, nrSegments: 12, seg: [{ gref: ro, firstSect: 0, lastSect: 0 }] }, // > 11 segments
    ];
    await xen.setEntry(3, 0, 0, buf / 4096);
    const fileBefore = readFileSync(path);
    for (const [i, r] of bad.entries()) expect((await fe.request(r)).status, `bad request ${i}`).toBe(BLKIF_RSP_ERROR);
    expect(disk.stats.error).toBe(bad.length);
    expect(readFileSync(path).equals(fileBefore)).toBe(true);
    expect(bridge.store.read(`${fe.backendPath}/state`)).toBe(String(XENBUS.Connected));
    // A good request with an offset inside the page (sectors 2..5) still works afterwards.
    await qts.memwrite(buf, pattern(4096, 77));
    expect((await fe.request({ operation: BLKIF_OP_WRITE, sector: 10n, seg: [{ gref: ro, firstSect: 2, lastSect: 5 }] })).status).toBe(BLKIF_RSP_OKAY);
    expect(fileAt(path, 10, 4).equals(pattern(4096, 77).subarray(1024, 3072))).toBe(true);
    expect((await fe.read(10, 4)).status).toBe(BLKIF_RSP_OKAY);
  });

  it('stops serving a ring whose producer runs more than a ring ahead', async () => {
    const { fe, qts, bridge, disk } = await rig();
    await fe.connect();
    const ring = (bridge.grants.entry(8).frame) * 4096; // the ring is the first page granted
    await qts.writel(ring, 1000);
    await fe.xen.notify(fe.port);
    await fe.waitBackendState(XENBUS.Closing);
    expect(bridge.store.read(`${fe.backendPath}/error`)).toMatch(/ring overflow/);
    expect(disk.stats.ok + disk.stats.error).toBe(0);
  });
});

describe('xen-disk: a disk configured only through xenstore (params)', () => {
  it('opens its backend on connect, releases it on disconnect, and leaks nothing across reconnects', async () => {
    const base = liveBackends().length;
    const { fe, path, opened, m } = await rig({ params: true });
    await fe.probe();
    expect(opened.length).toBe(0);
    expect(fe.features['sectors']).toBeUndefined(); // nothing open yet
    expect(liveBackends().length).toBe(base);
    for (let round = 0; round < 3; round++) {
      if (round > 0) await fe.reinitialise();
      await fe.connect({ ringPageOrder: round % 2 });
      expect(opened.length).toBe(round + 1);
      const b = opened[round]!;
      expect(liveBackends()).toContain(b);
      expect(liveBackends().length).toBe(base + 1);
      expect(b.device?.id).toBe('xvda');
      expect(fe.sectors).toBe(SIZE / 512);
      const data = pattern(4096, 500 + round);
      expect(await fe.write(8 * round, data)).toBe(BLKIF_RSP_OKAY);
      expect(fileAt(path, 8 * round, 8).equals(data)).toBe(true);
      await fe.disconnect();
      expect(b.dead).toBe(true);
      expect(liveBackends().length).toBe(base);
    }
    // The name is free again each time: a backend of the same name can be made now.
    const again = await backendFor(path, 'xvda-own');
    again.unref();
    // Unplugging while connected releases the backend too.
    await fe.reinitialise();
    await fe.connect();
    expect(liveBackends().length).toBe(base + 1);
    m.removeDevice('xvda');
    expect(opened[3]!.dead).toBe(true);
    expect(liveBackends().length).toBe(base);
  });

  it('drops a backend that finishes opening after the frontend has gone away', async () => {
    const base = liveBackends().length;
    const path = image(61);
    const m = new PcMachine({ ramSize: 32 << 20 });
    const bridge = new XenBridge({ id: 'xenbridge' });
    m.addDevice(bridge);
    let release: (() => void) | undefined;
    const opened: BlockBackend[] = [];
    const disk = new XenDisk({
      id: 'xvdd', bridge, vdev: 51760,
      openDrive: async (params) => {
        await new Promise<void>((r) => (release = r));
        const b = await backendFor(params, 'xvdd-own');
        opened.push(b);
        return b;
      },
    });
    bridge.store.write('/local/domain/0/backend/vbd/1/51760/params', path);
    m.addDevice(disk);
    cleanups.push(() => void (m.device('xvdd') && m.removeDevice('xvdd')));
    const qts = QtestClient.inProcess(m);
    const fe = new XenBlkfront(await XenGuest.create(qts, await GuestAlloc.forPc(qts)), 51760);
    await fe.probe();
    await fe.setState(XENBUS.Initialised);
    await waitFor('openDrive called', () => release);
    await fe.setState(XENBUS.Closed);
    await fe.waitBackendState(XENBUS.Closed);
    release!();
    release = undefined;
    await waitFor('opened', () => opened[0]);
    await waitFor('dropped', () => (opened[0]!.dead ? true : undefined));
    expect(opened[0]!.device).toBeNull();
    expect(liveBackends().length).toBe(base);
    expect(await fe.backendState()).toBe(XENBUS.Closed);
    // And it can still connect properly afterwards.
    await fe.reinitialise();
    const conn = fe.connect();
    await waitFor('second open', () => release);
    release!();
    await conn;
    expect(opened.length).toBe(2);
    expect(opened[1]!.device?.id).toBe('xvdd');
    await fe.disconnect();
    expect(liveBackends().length).toBe(base);
  });

  it('reports a params key it cannot open and stays in InitWait', async () => {
    const { fe, bridge } = await rig({ params: true, path: join(dir, 'missing.raw') });
    await fe.probe();
    await fe.setState(XENBUS.Initialised);
    await waitFor('error key', () => bridge.store.read(`${fe.backendPath}/error`));
    expect(bridge.store.read(`${fe.backendPath}/error`)).toMatch(/missing\.raw/);
    expect(await fe.backendState()).toBe(XENBUS.InitWait);
  });
});
