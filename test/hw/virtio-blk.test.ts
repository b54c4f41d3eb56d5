// virtio-blk on virtio-pci, driven from the guest side over qtest (in process), against a real
// raw image file whose bytes are checked directly.
// Some tests look at a request while it is in flight (BSY, unplug, a head offered twice): reads
// must not complete inline from the page cache (the engine is made on first use, after this).
process.env.SPINDLE_NO_INLINE_READS = '1';

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import { openNode, unref } from '../../src/block/graph.js';
import { PcMachine } from '../../hw/pc/pc.js';
import { VirtioBlkPci, type VirtioBlkOptions } from '../../hw/block/virtio-blk.js';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { QPciBus } from '../../src/qos/pci.js';
import { QtestClient } from '../../src/qos/qtest-client.js';
import { turn, VIRTIO_F_VERSION_1, VIRTIO_STATUS_NEEDS_RESET, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../src/qos/virtio.js';
import {
  QVirtioBlk, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
  VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_IN,
} from '../../src/qos/virtio-blk.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-vblk-');
let n = 0;

interface Rig {
  path: string;
  backend: BlockBackend;
  m: PcMachine;
  dev: VirtioBlkPci;
  qts: QtestClient;
  alloc: GuestAlloc;
}
const rigs: Rig[] = [];

async function rig(o: Partial<VirtioBlkOptions> & { size?: number; readOnly?: boolean } = {}): Promise<Rig> {
  const k = n++;
  const path = join(dir, `disk${k}.img`);
  writeFileSync(path, pattern(o.size ?? 4 << 20, k + 1));
  const node = await openNode({ driver: 'raw', 'read-only': o.readOnly ?? false, discard: 'unmap', file: { driver: 'file', filename: path } });
  const backend = createBackend({ name: `vblk${k}` }, node);
  unref(node);
  const m = new PcMachine();
  const { size: _s, readOnly: _r, ...devOpts } = o;
  const dev = new VirtioBlkPci({ id: 'disk0', drive: backend, bus: m.chipset.bus, ...devOpts });
  m.addDevice(dev);
  const qts = QtestClient.inProcess(m);
  const alloc = await GuestAlloc.forPc(qts);
  const r = { path, backend, m, dev, qts, alloc };
  rigs.push(r);
  return r;
}

afterEach(async () => {
  for (const r of rigs.splice(0)) {
    await r.backend.idle();
    r.m.removeDevice('disk0');
    r.backend.unref();
  }
});

function file(r: Rig, off: number, len: number): Buffer {
  return readFileSync(r.path).subarray(off, off + len);
}

describe('virtio-blk-pci: transport and initialisation', () => {
  it('is a transitional 1af4:1001 with capabilities, negotiates VERSION_1 (modern) and round-trips data', async () => {
    const r = await rig({ serial: 'SPINDLE-SERIAL-0001' });
    const bus = new QPciBus(r.qts);
    const found = (await bus.enumerate()).find(([, v]) => v === 0x1af4)!;
    expect(found.slice(1)).toEqual([0x1af4, 0x1001]);
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const d = blk.dev;
    // All four modern structures found in BAR4, and MSI-X.
    expect(d.common && d.isrAddr && d.devCfg && d.notifyBase).toBeTruthy();
    expect(d.notifyMult).toBe(4);
    expect(d.msixTable).toBeGreaterThan(0);
    expect(d.has(VIRTIO_F_VERSION_1) && d.has(VIRTIO_BLK_F_FLUSH) && d.has(VIRTIO_BLK_F_DISCARD) && d.has(VIRTIO_BLK_F_WRITE_ZEROES) && d.has(VIRTIO_BLK_F_MQ)).toBe(true);
    expect(d.has(VIRTIO_BLK_F_RO)).toBe(false);
    expect(await blk.capacity()).toBe((4 << 20) / 512);
    expect(await d.config32(20)).toBe(512); // blk_size
    expect(await d.config32(12)).toBe(254); // seg_max
    expect(await d.config16(34)).toBe(1); // num_queues
    expect(await d.config8(32)).toBe(1); // writeback
    expect(await d.config32(8)).toBe(4 << 20); // size_max
    expect([await d.config16(16), await d.config8(18), await d.config8(19)]).toEqual([8, 16, 63]); // geometry
    expect([await d.config32(36), await d.config32(40), await d.config32(44)]).toEqual([0x3fffff, 1, 1]); // discard limits
    expect([await d.config32(48), await d.config32(52), await d.config8(56)]).toEqual([0x3fffff, 1, 1]); // write-zeroes limits
    const data = pattern(4096, 99);
    expect(await blk.write(8, data)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 8 * 512, 4096)).toEqual(data);
    const rd = await blk.read(7, 2048);
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(rd.usedLen).toBe(2049);
    expect(Buffer.from(rd.data)).toEqual(file(r, 7 * 512, 2048));
    expect(await blk.getId()).toEqual({ status: VIRTIO_BLK_S_OK, id: 'SPINDLE-SERIAL-0001' });
    expect(await blk.flush()).toBe(VIRTIO_BLK_S_OK);
    expect((await blk.request(77, 0, { inLen: 512 })).status).toBe(VIRTIO_BLK_S_UNSUPP);
  });

  it('reaches the modern registers through the VIRTIO_PCI_CAP_PCI_CFG window in config space', async () => {
    const r = await rig({ numQueues: 2 });
    const blk = await QVirtioBlk.start(r.qts, r.alloc, { queues: 2 });
    const d = blk.dev;
    expect(d.pciCfgCap).toBeGreaterThan(0);
    expect(await d.windowRead(0x2000, 4)).toBe(8192); // capacity, low word, in device config
    expect(await d.windowRead(0x12, 2)).toBe(2); // num_queues
    await d.windowWrite(0x16, 2, 1); // queue_select
    expect(await r.qts.readw(d.common + 0x16)).toBe(1);
    expect(await d.windowRead(0x1c, 2)).toBe(1); // queue 1 enabled
  });

  it('refuses FEATURES_OK without VERSION_1 or with features it does not offer', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    expect(await blk.dev.negotiate(1n << 9n, true)).toBe(false);
    expect(await blk.dev.negotiate((1n << 32n) | (1n << 60n), true)).toBe(false);
    expect(await blk.dev.negotiate((1n << 32n) | (1n << 9n), true)).toBe(true);
  });

  it('works through the legacy I/O BAR (PFN rings, config at 0x14)', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc, { legacy: true });
    expect(blk.dev.has(VIRTIO_F_VERSION_1)).toBe(false);
    expect(blk.dev.has(VIRTIO_BLK_F_FLUSH)).toBe(true);
    expect(await blk.capacity()).toBe(8192);
    expect(await r.qts.inw(blk.dev.ioBase + 0x0c)).toBe(256);
    const data = pattern(1024, 5);
    expect(await blk.write(100, data)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 100 * 512, 1024)).toEqual(data);
    const rd = await blk.read(100, 1024, { segments: 2 });
    expect(Buffer.from(rd.data)).toEqual(data);
    expect(await blk.flush()).toBe(VIRTIO_BLK_S_OK);
    // With MSI-X on, the legacy config moves to 0x18 and the vector registers appear at 0x14/0x16.
    const mailbox = r.alloc.alloc(16);
    await blk.dev.setMsixEntry(1, mailbox, 0x77);
    await blk.dev.enableMsix();
    expect(await blk.dev.setQueueVector(0, 1)).toBe(1);
    expect(await blk.capacity()).toBe(8192);
    expect((await blk.read(0, 512)).status).toBe(VIRTIO_BLK_S_OK);
    expect(await r.qts.readl(mailbox)).toBe(0x77);
  });

  it('lets the driver turn the write cache off through config (CONFIG_WCE), restored on reset', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    expect(r.backend.writeCache).toBe(true);
    await blk.dev.setConfig8(32, 0);
    expect(await blk.dev.config8(32)).toBe(0);
    expect(r.backend.writeCache).toBe(false);
    const data = pattern(512, 21);
    expect(await blk.write(9, data)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 9 * 512, 512)).toEqual(data);
    await blk.dev.reset();
    expect(r.backend.writeCache).toBe(true);
    // A driver without FLUSH gets write-through.
    await blk.init({ features: 0xffffffffffffn & ~(1n << 9n) });
    expect(r.backend.writeCache).toBe(false);
  });

  it('unplugs cleanly with a request in flight: the function goes, the backend is free, nothing throws', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    await blk.submit(VIRTIO_BLK_T_IN, 0, { inLen: 65536 });
    r.m.removeDevice('disk0');
    expect(r.backend.device).toBeNull();
    expect(await new QPciBus(r.qts).find(0x1af4, 0x1001)).toBeUndefined();
    for (let i = 0; i < 100; i++) await turn();
    expect(await blk.vq().usedIdx()).toBe(0);
    // Plug a new device onto the same backend.
    r.m.addDevice(new VirtioBlkPci({ id: 'disk0', drive: r.backend, bus: r.m.chipset.bus }));
    const again = await QVirtioBlk.start(r.qts, r.alloc);
    expect((await again.read(0, 512)).status).toBe(VIRTIO_BLK_S_OK);
  });

  it('is 1af4:1042 without the legacy BAR when disableLegacy is set', async () => {
    const r = await rig({ disableLegacy: true });
    const bus = new QPciBus(r.qts);
    const pdev = (await bus.find(0x1af4, 0x1042))!;
    expect(pdev).toBeDefined();
    expect(await pdev.config(0x08, 1)).toBe(1);
    await expect(pdev.mapBar(0)).rejects.toThrow(/not implemented/);
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    expect(await blk.write(0, pattern(512, 1))).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 0, 512)).toEqual(pattern(512, 1));
  });

  it('refuses bad properties with HwError and leaves the backend free', async () => {
    const r = await rig();
    const m2 = new PcMachine();
    const other = createBackend({ name: `vblkx${n++}` });
    expect(() => m2.addDevice(new VirtioBlkPci({ id: 'd1', drive: other, bus: m2.chipset.bus, queueSize: 2048 }))).toThrow(/queue-size/);
    expect(() => m2.addDevice(new VirtioBlkPci({ id: 'd1', drive: other, bus: m2.chipset.bus, serial: 'x'.repeat(21) }))).toThrow(/serial/);
    expect(other.device).toBeNull();
    other.unref();
    expect(r.backend.device?.id).toBe('disk0');
  });
});

describe('virtio-blk-pci: requests', () => {
  it('serves multi-descriptor and indirect chains (zero copy into guest RAM)', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const a = pattern(3 * 1024, 11);
    expect(await blk.write(40, a, { segments: 3 })).toBe(VIRTIO_BLK_S_OK);
    const b = pattern(4096, 12);
    expect(await blk.write(60, b, { segments: 4, indirect: true })).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 40 * 512, a.length)).toEqual(a);
    expect(file(r, 60 * 512, b.length)).toEqual(b);
    const rd = await blk.read(40, 40 * 512, { segments: 5, indirect: true });
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(Buffer.from(rd.data)).toEqual(file(r, 40 * 512, 40 * 512));
  });

  it('discards and writes zeroes into the file, and checks flags and ranges', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    expect(file(r, 16 * 512, 4096).some((x) => x !== 0)).toBe(true);
    expect(await blk.writeZeroes(16, 8)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 16 * 512, 4096).every((x) => x === 0)).toBe(true);
    expect(file(r, 24 * 512, 512).some((x) => x !== 0)).toBe(true);
    expect(await blk.writeZeroes(32, 8, true)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 32 * 512, 4096).every((x) => x === 0)).toBe(true);
    expect(await blk.discard(64, 16)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 64 * 512, 8192).every((x) => x === 0)).toBe(true);
    expect(await blk.discard(64, 8, 1)).toBe(VIRTIO_BLK_S_UNSUPP); // unmap flag on a discard
    expect(await blk.writeZeroes(64, 8, true)).toBe(VIRTIO_BLK_S_OK);
    expect((await blk.request(VIRTIO_BLK_T_DISCARD, 0, { out: new Uint8Array(32) })).status).toBe(VIRTIO_BLK_S_UNSUPP); // two segments
    expect(await blk.writeZeroes(8192 - 4, 8)).toBe(VIRTIO_BLK_S_IOERR);
    expect(await blk.discard(8190, 4)).toBe(VIRTIO_BLK_S_IOERR);
  });

  it('refuses writes on a read-only disk with IOERR, offering RO', async () => {
    const r = await rig({ readOnly: true });
    const before = readFileSync(r.path);
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    expect(blk.dev.has(VIRTIO_BLK_F_RO)).toBe(true);
    expect(await blk.write(0, pattern(512, 3))).toBe(VIRTIO_BLK_S_IOERR);
    expect(await blk.writeZeroes(0, 8)).toBe(VIRTIO_BLK_S_IOERR);
    expect(readFileSync(r.path).equals(before)).toBe(true);
    const rd = await blk.read(0, 512);
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(Buffer.from(rd.data)).toEqual(before.subarray(0, 512));
  });

  it('fails out-of-range sectors and partial sectors with IOERR', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    expect((await blk.read(8191, 1024)).status).toBe(VIRTIO_BLK_S_IOERR);
    expect((await blk.read(8191, 512)).status).toBe(VIRTIO_BLK_S_OK);
    expect((await blk.read(2 ** 40, 512)).status).toBe(VIRTIO_BLK_S_IOERR);
    const before = file(r, 0, 512);
    expect(await blk.write(0, pattern(300, 1))).toBe(VIRTIO_BLK_S_IOERR);
    expect(file(r, 0, 512)).toEqual(before);
  });

  it('moves a 1 MiB request each way', async () => {
    const r = await rig({ size: 8 << 20 });
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const big = pattern(1 << 20, 77);
    expect(await blk.write(2048, big)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 2048 * 512, 1 << 20).equals(big)).toBe(true);
    const rd = await blk.read(2048, 1 << 20, { segments: 16 });
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(Buffer.from(rd.data).equals(big)).toBe(true);
  });

  it('fills a queue of 1024 with indirect requests, kicked once, all completed', async () => {
    const r = await rig({ queueSize: 1024 });
    const blk = await QVirtioBlk.start(r.qts, r.alloc, { features: 0xffffffffffffn & ~(1n << 29n) });
    expect(blk.vq().num).toBe(1024);
    // Count interrupts and used->idx publications: completions are published in batches.
    const proxy = r.dev.proxy!;
    let irqs = 0;
    const notify = proxy.notifyQueue.bind(proxy);
    proxy.notifyQueue = (q) => void (irqs++, notify(q));
    const pend = [];
    for (let i = 0; i < 1024; i++) pend.push(await blk.submit(VIRTIO_BLK_T_IN, i, { inLen: 512, indirect: true, noKick: true }));
    await blk.vq().kick();
    const seen = new Map<number, number>();
    for (let i = 0; i < 1024; i++) {
      const u = await blk.vq().waitUsed();
      expect(seen.has(u.id)).toBe(false);
      seen.set(u.id, u.len);
    }
    expect(seen.size).toBe(1024);
    expect(irqs).toBeGreaterThan(0);
    expect(irqs).toBeLessThan(512);
    const img = readFileSync(r.path);
    for (const [i, p] of pend.entries()) {
      const res = await blk.result(p, seen.get(p.head)!);
      expect(res.status).toBe(VIRTIO_BLK_S_OK);
      expect(res.usedLen).toBe(513);
      if (i % 97 === 0) expect(Buffer.from(res.data)).toEqual(img.subarray(i * 512, i * 512 + 512));
    }
  });

  it('serves several queues (num-queues)', async () => {
    const r = await rig({ numQueues: 3 });
    const blk = await QVirtioBlk.start(r.qts, r.alloc, { queues: 3 });
    expect(await blk.dev.numQueues()).toBe(3);
    expect(await blk.dev.config16(34)).toBe(3);
    const d = pattern(512, 31);
    expect(await blk.write(5, d, { queue: 2 })).toBe(VIRTIO_BLK_S_OK);
    expect(Buffer.from((await blk.read(5, 512, { queue: 1 })).data)).toEqual(d);
    expect(file(r, 5 * 512, 512)).toEqual(d);
  });

  it('stops popping while the backend is drained and resumes after', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    r.backend.childDrainedBegin();
    const p = await blk.submit(VIRTIO_BLK_T_IN, 0, { inLen: 512 });
    for (let i = 0; i < 50; i++) await turn();
    expect(await blk.vq().usedIdx()).toBe(0);
    expect(r.dev.vdev!.queues[0]!.inFlight).toBe(0); // not even popped
    r.backend.childDrainedEnd();
    const res = await blk.wait(p);
    expect(res.status).toBe(VIRTIO_BLK_S_OK);
  });
});

describe('virtio-blk-pci: malformed chains', () => {
  it('fails a buffer outside RAM, a zero-length buffer and a loop with IOERR, and goes on', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const vq = blk.vq();
    const qts = r.qts;
    const hdr = r.alloc.alloc(16);
    await qts.memwrite(hdr, Uint8Array.of(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)); // IN, sector 0
    const status = r.alloc.alloc(1);
    const data = r.alloc.alloc(512);
    const cases: [string, number, number][] = [['outside RAM', 0x7ffff000 * 2, 512], ['zero length', data, 0], ['past the end of RAM', (128 << 20) - 256, 512]];
    for (const [, addr, len] of cases) {
      await qts.writeb(status, 0xff);
      const [a, b, c] = vq.take(3) as [number, number, number];
      await vq.writeDesc(a, hdr, 16, VRING_DESC_F_NEXT, b);
      await vq.writeDesc(b, addr, len, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, c);
      await vq.writeDesc(c, status, 1, VRING_DESC_F_WRITE, 0);
      vq.track(a, [a, b, c]);
      await vq.publish(a);
      await vq.kick();
      const u = await vq.waitUsed();
      expect(u.id).toBe(a);
      expect(await qts.readb(status)).toBe(VIRTIO_BLK_S_IOERR);
    }
    // A loop: the status descriptor chains to itself.
    await qts.writeb(status, 0xff);
    const [a, b, c] = vq.take(3) as [number, number, number];
    await vq.writeDesc(a, hdr, 16, VRING_DESC_F_NEXT, b);
    await vq.writeDesc(b, data, 512, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, c);
    await vq.writeDesc(c, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, c);
    vq.track(a, [a, b, c]);
    await vq.publish(a);
    await vq.kick();
    expect((await vq.waitUsed()).id).toBe(a);
    expect(await qts.readb(status)).toBe(VIRTIO_BLK_S_IOERR);
    // The device keeps going.
    expect(r.dev.vdev!.broken).toBe(false);
    const rd = await blk.read(3, 512);
    expect(rd.status).toBe(VIRTIO_BLK_S_OK);
    expect(Buffer.from(rd.data)).toEqual(file(r, 3 * 512, 512));
  });

  it('returns malformed indirect tables unserved (used len 0) without breaking the device', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const vq = blk.vq();
    const qts = r.qts;
    const hdr = r.alloc.alloc(16);
    await qts.memset(hdr, 16, 0);
    const status = r.alloc.alloc(1);
    const table = r.alloc.alloc(64, 16);
    await vq.writeDesc(0, hdr, 16, VRING_DESC_F_NEXT, 1, table);
    await vq.writeDesc(1, status, 1, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1, table); // loops inside the table
    await vq.writeDesc(2, table, 32, VRING_DESC_F_INDIRECT, 0, table); // nested
    await vq.writeDesc(3, hdr, 16, VRING_DESC_F_NEXT, 9, table); // next beyond the table
    const cases: [number, number][] = [
      [table, 24], // not a whole number of descriptors
      [0x7ffff000 * 4, 64], // outside RAM
      [table + 32, 16], // a nested indirect descriptor
      [table + 48, 16], // next out of range
    ];
    for (const [addr, len] of cases) {
      await qts.writeb(status, 0xff);
      const [h] = vq.take(1) as [number];
      await vq.writeDesc(h, addr, len, VRING_DESC_F_INDIRECT, 0);
      vq.track(h, [h]);
      await vq.publish(h);
      await vq.kick();
      const u = await vq.waitUsed();
      expect(u).toEqual({ id: h, len: 0 });
      expect(await qts.readb(status)).toBe(0xff);
    }
    // The loop inside a table still finds its status byte.
    const [h] = vq.take(1) as [number];
    await vq.writeDesc(h, table, 32, VRING_DESC_F_INDIRECT, 0);
    vq.track(h, [h]);
    await vq.publish(h);
    await vq.kick();
    expect((await vq.waitUsed()).id).toBe(h);
    expect(await qts.readb(status)).toBe(VIRTIO_BLK_S_IOERR);
    expect(r.dev.vdev!.broken).toBe(false);
    expect((await blk.read(0, 512, { indirect: true })).status).toBe(VIRTIO_BLK_S_OK);
  });

  it('marks itself broken (NEEDS_RESET, config interrupt) on a head reused in flight, and works after reset', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const d = blk.dev;
    const p = await blk.submit(VIRTIO_BLK_T_IN, 0, { inLen: 4096 });
    // No event-loop turn has passed: the request is still in flight. Offer its head again.
    expect(r.dev.vdev!.queues[0]!.inFlight).toBe(1);
    await blk.vq().publish(p.head);
    await blk.vq().kick();
    expect((await d.status()) & VIRTIO_STATUS_NEEDS_RESET).toBe(VIRTIO_STATUS_NEEDS_RESET);
    expect((await d.isr()) & 2).toBe(2);
    for (let i = 0; i < 100; i++) await turn();
    // Re-initialise: the orphaned completion must not reach the new rings.
    await blk.init();
    expect((await d.status()) & VIRTIO_STATUS_NEEDS_RESET).toBe(0);
    expect(await blk.vq().usedIdx()).toBe(0);
    const data = pattern(512, 8);
    expect(await blk.write(1, data)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 512, 512)).toEqual(data);
    expect(await blk.vq().usedIdx()).toBe(1);
  });

  it('marks itself broken when avail idx jumps past the queue size', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    await r.qts.writew(blk.vq().avail + 2, 300);
    await blk.vq().kick();
    expect((await blk.dev.status()) & VIRTIO_STATUS_NEEDS_RESET).toBeTruthy();
    expect(r.dev.vdev!.brokenReason).toMatch(/more than the queue size/);
  });
});

describe('virtio-blk-pci: interrupts', () => {
  it('raises INTx through the PIIX3 route, and an ISR read lowers it', async () => {
    const r = await rig();
    await r.qts.irqInterceptIn('ioapic');
    const slot = (await new QPciBus(r.qts).find(0x1af4, 0x1001))!.slot;
    const pirq = (slot - 1) & 3; // INTA swizzled by slot, as QEMU's i440FX
    const bus = new QPciBus(r.qts);
    await bus.configWrite(0x08, 0x60 + pirq, 1, 11);
    const blk = await QVirtioBlk.start(r.qts, r.alloc, { features: 0xffffffffffffn & ~(1n << 29n) });
    expect(r.qts.getIrq(11)).toBe(false);
    await blk.read(0, 512);
    expect(r.qts.getIrq(11)).toBe(true);
    expect((await blk.dev.pci.config(0x06, 2)) & 0x08).toBe(0x08);
    expect(await blk.dev.isr()).toBe(1);
    expect(r.qts.getIrq(11)).toBe(false);
    expect(await blk.dev.isr()).toBe(0);
    // avail NO_INTERRUPT suppresses it.
    await blk.vq().setAvailFlags(1);
    await blk.read(0, 512);
    expect(r.qts.getIrq(11)).toBe(false);
    // A configuration change raises it too, with both ISR bits (as QEMU sets them).
    await r.backend.truncate(8 << 20);
    expect(r.qts.getIrq(11)).toBe(true);
    expect(await blk.dev.isr()).toBe(3);
    expect(r.qts.getIrq(11)).toBe(false);
    // INTx disabled in the command register: the status bit follows, the pin stays down.
    await blk.vq().setAvailFlags(0);
    await blk.dev.pci.setConfig(0x04, 2, 0x407);
    await blk.read(0, 512);
    expect(r.qts.getIrq(11)).toBe(false);
    expect((await blk.dev.pci.config(0x06, 2)) & 0x08).toBe(0x08);
  });

  it('delivers MSI-X messages into guest RAM, holds them while masked, and sends none by INTx', async () => {
    const r = await rig();
    await r.qts.irqInterceptIn('ioapic');
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const d = blk.dev;
    const mailbox = r.alloc.alloc(64);
    await r.qts.memset(mailbox, 64, 0);
    await d.setMsixEntry(0, mailbox, 0xc0f1);
    await d.setMsixEntry(1, mailbox + 8, 0x1234abcd);
    await d.enableMsix();
    expect(await d.setConfigVector(0)).toBe(0);
    expect(await d.setQueueVector(0, 1)).toBe(1);
    expect(await d.setQueueVector(0, 7)).toBe(0xffff); // beyond the table
    await d.setQueueVector(0, 1);
    await blk.read(0, 512);
    expect(await r.qts.readl(mailbox + 8)).toBe(0x1234abcd);
    for (let i = 0; i < 12; i++) expect(r.qts.getIrq(i)).toBe(false);
    // Masked: pending bit, no message; unmasking delivers it.
    await r.qts.writel(mailbox + 8, 0);
    await d.setMsixEntry(1, mailbox + 8, 0x55, true);
    await blk.read(0, 512);
    expect(await r.qts.readl(mailbox + 8)).toBe(0);
    expect((await r.qts.readl(d.msixTable + 0x800)) & 2).toBe(2);
    await r.qts.writel(d.msixTable + 16 + 12, 0);
    expect(await r.qts.readl(mailbox + 8)).toBe(0x55);
    expect((await r.qts.readl(d.msixTable + 0x800)) & 2).toBe(0);
  });

  it('sends a configuration interrupt with the new capacity after a backend resize', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    const d = blk.dev;
    const mailbox = r.alloc.alloc(16);
    await r.qts.memset(mailbox, 16, 0);
    await d.setMsixEntry(0, mailbox, 0xcf);
    await d.enableMsix();
    await d.setConfigVector(0);
    const gen = await d.configGeneration();
    await r.backend.truncate(8 << 20);
    expect(await r.qts.readl(mailbox)).toBe(0xcf);
    expect(await blk.capacity()).toBe((8 << 20) / 512);
    expect(await d.configGeneration()).not.toBe(gen);
    expect((await d.isr()) & 2).toBe(2);
    const data = pattern(512, 4);
    expect(await blk.write((6 << 20) / 512, data)).toBe(VIRTIO_BLK_S_OK);
    expect(file(r, 6 << 20, 512)).toEqual(data);
  });

  it('with EVENT_IDX interrupts only when used_event is passed, and publishes avail_event', async () => {
    const r = await rig();
    const blk = await QVirtioBlk.start(r.qts, r.alloc);
    expect(blk.dev.has(29)).toBe(true);
    const d = blk.dev;
    const mailbox = r.alloc.alloc(16);
    await d.setMsixEntry(1, mailbox, 1);
    await d.enableMsix();
    await d.setQueueVector(0, 1);
    blk.vq().autoUsedEvent = false;
    await blk.vq().setUsedEvent(5); // interrupt when used idx passes 5
    for (let i = 0; i < 3; i++) {
      await r.qts.writel(mailbox, 0);
      await blk.read(i, 512);
      expect(await r.qts.readl(mailbox)).toBe(0);
    }
    expect(await blk.vq().availEvent()).toBe(3);
    await blk.vq().setUsedEvent(3);
    await blk.read(3, 512);
    expect(await r.qts.readl(mailbox)).toBe(1);
  });
});
