// The hybrid fast path for qcow2 (src/export/vhost-user/fast-path.ts, mapping.ts,
// forwarding.ts): the native worker serves reads and writes of clusters in its mapping table,
// everything else is forwarded to the block layer and completed back through the worker.
// What must hold: data lands where qcow2 says (QEMU reads it back, `qemu-img check` is clean),
// a cluster leaves the table before qcow2 frees or copies it, and forwarded requests are
// complete before a ring changes hands.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { newConfig, Bucket } from '../../src/backend/throttle.js';
import { configureGroup, ioLimitsEnable } from '../../src/backend/throttle-group.js';
import { withDrained } from '../../src/block/drain.js';
import { settleCloses, unref } from '../../src/block/graph.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import {
  VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
} from '../../hw/virtio/virtio-blk-abi.js';
import { ok, qemuImg } from '../cli/helpers.js';
import { BlkDriver, dwz } from './vhost-user-blk-driver.js';
import { exportRig, fill, SIZE, uniq, useExportRig } from './vhost-user-export-rig.js';
import { connect, fdCount, killFrontEnd, MiB, qemuStartup, until } from './vhost-user-frontend.js';
import { liveMappings } from '../../src/native/unix-fd.js';
import { VIRTIO_RING_F_EVENT_IDX } from '../../src/export/vhost-user/blk-features.js';

useExportRig();

const CLUSTER = 65536;
const SECTORS = CLUSTER / 512;
const empty = (raw: string, q: string): void => void ok(qemuImg('create', '-q', '-f', 'qcow2', q, String(SIZE)));

type Rig = Awaited<ReturnType<typeof exportRig>>;
const ops = (r: Rig): number => r.node.stats.rdOps + r.node.stats.wrOps;

async function write(q: BlkDriver, sector: number, data: Uint8Array): Promise<void> {
  expect((await q.submit(VIRTIO_BLK_T_OUT, sector, [{ len: data.length, data }])).status).toBe(VIRTIO_BLK_S_OK);
}
async function read(q: BlkDriver, sector: number, len: number): Promise<Uint8Array> {
  const c = await q.submit(VIRTIO_BLK_T_IN, sector, [{ len }]);
  expect(c.status).toBe(VIRTIO_BLK_S_OK);
  return c.data[0]!;
}
/** The image as QEMU reads it (the export may still hold it open: -U). */
function qemuRead(r: Rig, offset: number, len: number, snapshot?: string): Buffer {
  const out = `${r.file}.${offset}.raw`;
  ok(qemuImg('convert', '-U', '-f', 'qcow2', ...(snapshot ? ['-l', `snapshot.name=${snapshot}`] : []), '-O', 'raw', r.file, out));
  return readFileSync(out).subarray(offset, offset + len);
}
async function closeAndCheck(r: Rig): Promise<void> {
  r.fe.close();
  await r.exp.close();
  unref(r.node);
  await settleCloses();
  ok(qemuImg('check', '-q', r.file));
}

describe('vhost-user-blk hybrid fast path (qcow2)', () => {
  it('allocated clusters: the first read goes through the block layer, then the worker serves them, writes in place', async () => {
    const r = await exportRig('qcow2');
    expect(r.exp.onFastPath).toBe(true);
    const q = r.drv[0]!;
    const base = fill(SIZE, 3);
    expect(await read(q, 2 * SECTORS, 4096)).toEqual(base.subarray(2 * CLUSTER, 2 * CLUSTER + 4096));
    expect(r.node.stats.rdOps).toBe(1);
    await until('the cluster learned', () => r.exp.nativeMappedClusters > 0);
    // From now on the block layer sees nothing: reads and in-place writes are native.
    const before = ops(r);
    expect(await read(q, 2 * SECTORS + 8, 8192)).toEqual(base.subarray(2 * CLUSTER + 4096, 2 * CLUSTER + 4096 + 8192));
    const d = fill(8192, 21);
    await write(q, 2 * SECTORS + 16, d);
    expect(await read(q, 2 * SECTORS + 16, 8192)).toEqual(d);
    expect(ops(r)).toBe(before);
    // The bytes went where qcow2 maps them: QEMU reads them back.
    expect(qemuRead(r, 2 * CLUSTER + 8192, 8192)).toEqual(Buffer.from(d));
    await closeAndCheck(r);
  });

  it('an empty image: allocating writes are forwarded, rewrites are native; flush; QEMU reads the result and check is clean', async () => {
    const r = await exportRig('qcow2', { qcow2: empty });
    const q = r.drv[0]!;
    const at = [0, 5 * SECTORS + 24, 100 * SECTORS - 8]; // the last one straddles two clusters
    for (const [i, s] of at.entries()) await write(q, s, fill(8192, 30 + i));
    expect(r.node.stats.wrOps).toBe(3);
    await until('the clusters learned', () => r.exp.nativeMappedClusters >= 4);
    const wr = r.node.stats.wrOps;
    for (const [i, s] of at.entries()) await write(q, s, fill(8192, 40 + i));
    expect(r.node.stats.wrOps).toBe(wr);
    expect((await q.submit(VIRTIO_BLK_T_FLUSH, 0)).status).toBe(VIRTIO_BLK_S_OK);
    for (const [i, s] of at.entries()) {
      expect(await read(q, s, 8192)).toEqual(fill(8192, 40 + i));
      expect(qemuRead(r, s * 512, 8192)).toEqual(Buffer.from(fill(8192, 40 + i)));
    }
    // Never written: still reads as zeroes (forwarded: unallocated).
    expect((await read(q, 50 * SECTORS, 4096)).every((b) => b === 0)).toBe(true);
    expect(q.errors).toEqual([]);
    await closeAndCheck(r);
  });

  it('discard: the cluster leaves the table before qcow2 frees it; a write that reuses the host cluster does not show through', async () => {
    const r = await exportRig('qcow2', { qcow2: empty });
    const q = r.drv[0]!;
    await write(q, 1 * SECTORS, fill(CLUSTER, 50));
    await until('the cluster learned', () => r.exp.nativeMappedClusters === 1);
    await write(q, 1 * SECTORS, fill(CLUSTER, 51)); // native
    expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(SECTORS, SECTORS) }])).status).toBe(VIRTIO_BLK_S_OK);
    expect(r.exp.nativeMappedClusters).toBe(0);
    // New clusters: qcow2 may hand out the freed one again.
    for (let i = 0; i < 4; i++) await write(q, (10 + i) * SECTORS, fill(CLUSTER, 60 + i));
    expect((await read(q, SECTORS, CLUSTER)).every((b) => b === 0)).toBe(true);
    for (let i = 0; i < 4; i++) expect(await read(q, (10 + i) * SECTORS, CLUSTER)).toEqual(fill(CLUSTER, 60 + i));
    await closeAndCheck(r);
  });

  it('a cluster shared with an internal snapshot is read natively, copied on write, and read back new; the snapshot keeps the old data', async () => {
    const r = await exportRig('qcow2', {
      qcow2: (raw, q) => {
        ok(qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, q));
        ok(qemuImg('snapshot', '-c', 's1', q));
      },
    });
    const q = r.drv[0]!;
    const base = fill(SIZE, 3);
    expect(await read(q, 4 * SECTORS, 4096)).toEqual(base.subarray(4 * CLUSTER, 4 * CLUSTER + 4096));
    await until('the cluster learned', () => r.exp.nativeMappedClusters > 0);
    const rd = r.node.stats.rdOps;
    expect(await read(q, 4 * SECTORS, 4096)).toEqual(base.subarray(4 * CLUSTER, 4 * CLUSTER + 4096));
    expect(r.node.stats.rdOps).toBe(rd); // native, read-only mapping
    const d = fill(4096, 70);
    await write(q, 4 * SECTORS, d); // not writable in place: forwarded, copied
    expect(r.node.stats.wrOps).toBe(1);
    expect(await read(q, 4 * SECTORS, 4096)).toEqual(d);
    expect(await read(q, 4 * SECTORS + 8, 4096)).toEqual(base.subarray(4 * CLUSTER + 4096, 4 * CLUSTER + 8192));
    expect(qemuRead(r, 4 * CLUSTER, 4096, 's1')).toEqual(Buffer.from(base.subarray(4 * CLUSTER, 4 * CLUSTER + 4096)));
    await closeAndCheck(r);
  });

  it('a bounded table: with 512-byte clusters the disk spans four chunks of entries and the table holds two; evicted clusters are forwarded again and data stays right', async () => {
    process.env.SPINDLE_VHOST_MAP_BYTES = String(2 * 4096 * 8);
    try {
      const r = await exportRig('qcow2', { qcow2: (raw, q) => void ok(qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=512', raw, q)) });
      const q = r.drv[0]!;
      const base = fill(SIZE, 3);
      // One read per MiB, twice over: each learns its 4 MiB window, evicting older chunks.
      for (let pass = 0; pass < 2; pass++) {
        for (let mib = 0; mib < 8; mib++) {
          expect(await read(q, mib * 2048 + 7, 4096)).toEqual(base.subarray(mib * MiB + 7 * 512, mib * MiB + 7 * 512 + 4096));
          await until('learned', () => r.exp.nativeMappedClusters > 0);
          expect(r.exp.nativeMappedClusters).toBeLessThanOrEqual(2 * 4096);
        }
      }
      // Writes and a discard across every chunk, then everything read back through QEMU.
      for (let mib = 0; mib < 8; mib++) await write(q, mib * 2048 + 100, fill(2048, 50 + mib));
      expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(1, 8) }])).status).toBe(VIRTIO_BLK_S_OK);
      const want = Buffer.from(base);
      for (let mib = 0; mib < 8; mib++) want.set(fill(2048, 50 + mib), mib * MiB + 100 * 512);
      const got = qemuRead(r, 0, SIZE);
      const discarded = got.subarray(512, 512 + 8 * 512);
      expect(discarded.every((b) => b === 0) || discarded.equals(want.subarray(512, 512 + 8 * 512))).toBe(true); // discard is advisory
      want.set(discarded, 512);
      expect(got.equals(want)).toBe(true);
      await closeAndCheck(r);
    } finally {
      delete process.env.SPINDLE_VHOST_MAP_BYTES;
    }
  });

  it('a backing file: unallocated clusters read through it, a partial write copies the rest up', async () => {
    const r = await exportRig('qcow2', {
      qcow2: (raw, q) => void ok(qemuImg('create', '-q', '-f', 'qcow2', '-b', raw, '-F', 'raw', q)),
    });
    const q = r.drv[0]!;
    const base = fill(SIZE, 3);
    expect(await read(q, 3 * SECTORS, 8192)).toEqual(base.subarray(3 * CLUSTER, 3 * CLUSTER + 8192));
    const d = fill(4096, 80);
    await write(q, 3 * SECTORS + 8, d);
    const want = Buffer.from(base.subarray(3 * CLUSTER, 4 * CLUSTER));
    want.set(d, 4096);
    expect(Buffer.from(await read(q, 3 * SECTORS, CLUSTER))).toEqual(want);
    await until('the cluster learned', () => r.exp.nativeMappedClusters === 1);
    expect(Buffer.from(await read(q, 3 * SECTORS, CLUSTER))).toEqual(want);
    await closeAndCheck(r);
  });

  it('GET_VRING_BASE and drained sections wait for forwarded requests; the worker takes the ring back after', async () => {
    const r = await exportRig('qcow2', { qcow2: empty });
    const q = r.drv[0]!;
    // Allocating writes are forwarded; the reply must come after their used entries.
    const p = [q.post(VIRTIO_BLK_T_OUT, 0, [{ len: 4096, data: fill(4096, 90) }]), q.post(VIRTIO_BLK_T_OUT, 7 * SECTORS, [{ len: 4096, data: fill(4096, 91) }])];
    q.kick();
    // The worker forwards both (and asks for the next kick past them) on its own thread; this
    // thread does not yield meanwhile, so their I/O has not even started when the message goes.
    const end = Date.now() + 3000;
    while (q.availEvent !== 9 && Date.now() < end);
    expect(q.availEvent).toBe(9);
    const vb = await r.fe.call(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(0, 0));
    expect(P.dataView(vb).getUint32(4, true)).toBe(7 + 2);
    expect(q.usedIdx).toBe(7 + 2);
    for (const x of p) expect((await q.wait(x)).status).toBe(VIRTIO_BLK_S_OK);
    expect(r.node.stats.wrOps).toBe(2);

    // A drain with forwarded requests in flight: they finish; afterwards the ring is native again.
    const r2 = await exportRig('qcow2', { qcow2: empty });
    const q2 = r2.drv[0]!;
    const w = q2.post(VIRTIO_BLK_T_OUT, 9 * SECTORS, [{ len: 4096, data: fill(4096, 92) }]);
    q2.kick();
    await until('forwarded', () => r2.node.stats.wrOps + r2.node.stats.rdOps > 0 || q2.usedIdx > 7);
    await withDrained([r2.node], () => {});
    expect((await q2.wait(w)).status).toBe(VIRTIO_BLK_S_OK);
    expect(r2.exp.onFastPath).toBe(true);
    // The drain forgot the table (the graph may have changed): the next request relearns it.
    expect(r2.exp.nativeMappedClusters).toBe(0);
    expect(await read(q2, 9 * SECTORS, 4096)).toEqual(fill(4096, 92));
    await until('the cluster learned', () => r2.exp.nativeMappedClusters === 1);
    const wr = r2.node.stats.wrOps;
    await write(q2, 9 * SECTORS, fill(4096, 93));
    expect(r2.node.stats.wrOps).toBe(wr);
    expect(await read(q2, 9 * SECTORS, 4096)).toEqual(fill(4096, 93));
    expect(q2.errors).toEqual([]);
    await closeAndCheck(r2);
  });

  it('a throttle added with a forwarded write not yet started: it runs after the drain, then the session is on the TypeScript path', async () => {
    const r = await exportRig('qcow2', { qcow2: empty });
    const q = r.drv[0]!;
    const w = q.post(VIRTIO_BLK_T_OUT, 11 * SECTORS, [{ len: 4096, data: fill(4096, 97) }]);
    q.kick();
    const end = Date.now() + 3000;
    while (q.availEvent !== 8 && Date.now() < end); // forwarded; this thread has not popped it
    expect(q.availEvent).toBe(8);
    ioLimitsEnable(r.exp.backend, `hybrid-${uniq()}`);
    const cfg = newConfig();
    cfg.buckets[Bucket.OPS_TOTAL]!.avg = 1_000_000;
    configureGroup(r.exp.backend.throttle!, cfg);
    await withDrained([r.node], () => {});
    expect(r.exp.onFastPath).toBe(false);
    expect((await q.wait(w)).status).toBe(VIRTIO_BLK_S_OK);
    expect(await read(q, 11 * SECTORS, 4096)).toEqual(fill(4096, 97));
    await write(q, 12 * SECTORS, fill(4096, 98));
    expect(await read(q, 12 * SECTORS, 4096)).toEqual(fill(4096, 98));
    expect(q.usedIdx).toBe(7 + 4);
    expect(q.errors).toEqual([]);
  });

  it('the front-end going away with forwarded requests done leaks no fd or mapping; a new session serves natively again', async () => {
    const r = await exportRig('qcow2', { qcow2: empty, numQueues: 2 });
    const [q0, q1] = r.drv as [BlkDriver, BlkDriver];
    await write(q0, 0, fill(4096, 99)); // forwarded on both queues
    await write(q1, 20 * SECTORS, fill(4096, 100));
    await until('learned', () => r.exp.nativeMappedClusters === 2);
    killFrontEnd(r.fe, [...r.kicks, ...r.calls], r.inflight);
    await until('the session ending', () => r.be.closed);
    await until('the forwarders released', () => fdCount() === r.fds0 && liveMappings() === r.maps0);
    const qs = [new BlkDriver(r.ram, 0), new BlkDriver(r.ram, 1)]; // rings reset before the new session reads them
    const { fe, be } = await connect(r.exp, r.exp.path);
    const { kicks, calls } = await qemuStartup(fe, r.ram.fd, 2, { length: SIZE });
    qs.forEach((d, i) => d.attach(kicks[i]!, calls[i]!, be.hasFeature(VIRTIO_RING_F_EVENT_IDX)));
    expect(await read(qs[1]!, 0, 4096)).toEqual(fill(4096, 99));
    expect(await read(qs[0]!, 20 * SECTORS, 4096)).toEqual(fill(4096, 100));
    expect(r.exp.onFastPath).toBe(true);
  });

  it('the front-end dies with forwarded writes in flight: they finish, then everything is released; the data is in the image', async () => {
    const r = await exportRig('qcow2', { qcow2: empty });
    const q = r.drv[0]!;
    for (let i = 0; i < 4; i++) q.post(VIRTIO_BLK_T_OUT, (30 + i) * SECTORS, [{ len: 8192, data: fill(8192, 110 + i) }]);
    q.kick();
    const end = Date.now() + 3000;
    while (q.availEvent !== 11 && Date.now() < end); // all four forwarded; none started here
    expect(q.availEvent).toBe(11);
    killFrontEnd(r.fe, [...r.kicks, ...r.calls], r.inflight);
    await until('the session ending', () => r.be.closed);
    await until('the forwarders released', () => fdCount() === r.fds0 && liveMappings() === r.maps0);
    expect(r.node.stats.wrOps).toBe(4);
    for (let i = 0; i < 4; i++) expect(qemuRead(r, (30 + i) * CLUSTER, 8192)).toEqual(Buffer.from(fill(8192, 110 + i)));
    await closeAndCheck(r);
  });

  it('grows with block_resize: the new clusters are allocated and then served natively', async () => {
    const r = await exportRig('qcow2', { qcow2: empty });
    const q = r.drv[0]!;
    await r.exp.backend.truncate(SIZE + MiB);
    const s = Math.floor(SIZE / CLUSTER) * SECTORS + 2 * SECTORS;
    await write(q, s, fill(4096, 95));
    expect(await read(q, s, 4096)).toEqual(fill(4096, 95));
    await until('the new cluster learned', () => r.exp.nativeMappedClusters === 1);
    const wr = r.node.stats.wrOps;
    await write(q, s, fill(4096, 96));
    expect(r.node.stats.wrOps).toBe(wr);
    expect(await read(q, s, 4096)).toEqual(fill(4096, 96));
    expect(qemuRead(r, s * 512, 4096)).toEqual(Buffer.from(fill(4096, 96)));
    await closeAndCheck(r);
  });
});
