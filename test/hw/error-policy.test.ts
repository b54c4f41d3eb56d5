// The rerror/werror policy and resize as a guest sees them through the emulated devices
// (virtio-blk-pci and PIIX IDE), driven over in-process qtest, against a real image file
// wrapped in blkdebug: raw -> blkdebug -> file. Stopped requests must stay with the device
// (no used entry, BSY, no interrupt) until the backend resumes them.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { createBackend, type BackendOptions, type BlockBackend } from '../../src/backend/backend.js';
import { onBlockEvent, type BlockEvent } from '../../src/backend/events.js';
import { blkdebugState } from '../../src/block/drivers/blkdebug.js';
import { openNode, unref } from '../../src/block/graph.js';
import * as blockIo from '../../src/block/io.js';
import type { BlockNode } from '../../src/block/node.js';
import { PcMachine } from '../../hw/pc/pc.js';
import { VirtioBlkPci } from '../../hw/block/virtio-blk.js';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { ATA_ST, BM, type QAtaChannel } from '../../src/qos/ata.js';
import { QtestClient } from '../../src/qos/qtest-client.js';
import { QVirtioBlk, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT } from '../../src/qos/virtio-blk.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { rig as ideRig, word, type Rig as IdeRig } from './ide-helpers.js';

const dir = scratchDir('spindle-errpol-');
const SIZE = 1 << 20;
let n = 0;

const events: BlockEvent[] = [];
const offEvents = onBlockEvent((e) => events.push(e));
afterAll(() => void offEvents());
const cleanups: (() => void)[] = [];
afterEach(() => {
  events.length = 0;
  for (const c of cleanups.splice(0).reverse()) c();
});

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

/** Turns the event loop until `cond` holds, at most `max` turns. */
async function until(cond: () => boolean | Promise<boolean>, what: string, max = 20000): Promise<void> {
  for (let i = 0; i < max; i++) {
    if (await cond()) return;
    await tick();
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function turns(k: number): Promise<void> {
  for (let i = 0; i < k; i++) await tick();
}

function stops(be: BlockBackend): number {
  return events.filter((e) => e.event === 'BACKEND_STOPPED' && e.device === be.name).length;
}

interface Faulty {
  path: string;
  be: BlockBackend;
  /** The blkdebug node (raw's file). */
  dbg: BlockNode;
}

/** raw -> blkdebug(rules) -> file over a patterned image, under a backend with the policy. */
async function faulty(rules: { inject?: object[]; setState?: object[] }, policy: Pick<BackendOptions, 'rerror' | 'werror'>, size = SIZE): Promise<Faulty> {
  const k = n++;
  const path = join(dir, `disk${k}.img`);
  writeFileSync(path, pattern(size, k + 1));
  const node = await openNode({
    driver: 'raw',
    file: { driver: 'blkdebug', 'inject-error': rules.inject ?? [], 'set-state': rules.setState ?? [], image: { driver: 'file', filename: path } },
  });
  const be = createBackend({ name: `ep${k}`, ...policy }, node);
  const dbg = node.file!.node;
  unref(node);
  return { path, be, dbg };
}

function fileAt(path: string, off: number, len: number): Buffer {
  return readFileSync(path).subarray(off, off + len);
}

// ---------------------------------------------------------------------------------------------
// virtio-blk

interface VRig extends Faulty {
  m: PcMachine;
  dev: VirtioBlkPci;
  qts: QtestClient;
  alloc: GuestAlloc;
  blk: QVirtioBlk;
}

async function vrig(f: Faulty): Promise<VRig> {
  const m = new PcMachine();
  const dev = new VirtioBlkPci({ id: 'disk0', drive: f.be, bus: m.chipset.bus });
  m.addDevice(dev);
  cleanups.push(() => {
    if (m.device('disk0')) m.removeDevice('disk0');
    f.be.unref();
  });
  const qts = QtestClient.inProcess(m);
  const alloc = await GuestAlloc.forPc(qts);
  const blk = await QVirtioBlk.start(qts, alloc);
  return { ...f, m, dev, qts, alloc, blk };
}

describe('virtio-blk: werror=stop', () => {
  it('holds a failing write (no used entry, iostatus failed, BACKEND_STOPPED) and completes it OK on resume once the fault is cleared', async () => {
    // Writes fail with EIO while blkdebug is in state 1; a flush moves it to state 2.
    const r = await vrig(await faulty({
      inject: [{ event: 'write_aio', state: 1, errno: 5 }],
      setState: [{ event: 'flush_to_disk', state: 1, new_state: 2 }],
    }, { werror: 'stop', rerror: 'report' }));
    const before = fileAt(r.path, 8 * 512, 4096);
    const data = pattern(4096, 501);
    const p = await r.blk.submit(VIRTIO_BLK_T_OUT, 8, { out: data });
    await until(() => stops(r.be) === 1, 'BACKEND_STOPPED');
    await turns(50);
    // The guest sees nothing: no used entry, the status byte untouched, the file unchanged.
    expect(await p.vq.usedIdx()).toBe(0);
    expect(await r.qts.readb(p.status)).toBe(0xff);
    expect(fileAt(r.path, 8 * 512, 4096)).toEqual(before);
    expect(r.dev.vdev!.queues[0]!.inFlight).toBe(1);
    expect(r.be.iostatus).toBe('failed');
    expect(r.be.stopped).toHaveLength(1);
    expect(events.find((e) => e.event === 'BLOCK_IO_ERROR')).toMatchObject({ device: r.be.name, operation: 'write', action: 'stop', nospace: false });

    // Resuming with the fault still there retries the write, which stops again.
    r.be.resume();
    await until(() => stops(r.be) === 2, 'second BACKEND_STOPPED');
    await turns(20);
    expect(await p.vq.usedIdx()).toBe(0);
    expect(r.be.stopped).toHaveLength(1);
    expect(r.be.iostatus).toBe('failed');

    // Clear the fault (state 1 -> 2) and resume: the same request completes with OK.
    await blockIo.flush(r.be.root!);
    expect(blkdebugState(r.dbg)).toBe(2);
    r.be.resume();
    const res = await r.blk.wait(p);
    expect(res.status).toBe(VIRTIO_BLK_S_OK);
    expect(fileAt(r.path, 8 * 512, 4096)).toEqual(data);
    expect(r.be.iostatus).toBe('ok');
    expect(r.be.stopped).toHaveLength(0);
    expect(stops(r.be)).toBe(2);
    // And the device goes on.
    expect((await r.blk.read(8, 4096)).data).toEqual(new Uint8Array(data));
  });
});

describe('virtio-blk: unplug while a request is stopped', () => {
  it('drops the stopped write with the device: a later resume does not write it, and a new device works', async () => {
    const r = await vrig(await faulty({ inject: [{ event: 'write_aio', errno: 5, once: true }] }, { werror: 'stop', rerror: 'report' }));
    const before = fileAt(r.path, 4 * 512, 512);
    const stale = pattern(512, 601);
    await r.blk.submit(VIRTIO_BLK_T_OUT, 4, { out: stale });
    await until(() => stops(r.be) === 1, 'BACKEND_STOPPED');
    expect(r.be.stopped).toHaveLength(1);
    r.m.removeDevice('disk0');
    expect(r.be.device).toBeNull();
    expect(r.be.stopped).toHaveLength(0);
    // The rule was `once`: were the old request retried, it would now succeed and land.
    r.be.resume();
    await turns(50);
    await r.be.idle();
    expect(fileAt(r.path, 4 * 512, 512)).toEqual(before);
    // A new device on the same backend sees only its own requests.
    r.m.addDevice(new VirtioBlkPci({ id: 'disk0', drive: r.be, bus: r.m.chipset.bus }));
    const again = await QVirtioBlk.start(r.qts, r.alloc);
    const data = pattern(512, 602);
    expect(await again.write(5, data)).toBe(VIRTIO_BLK_S_OK);
    expect(await again.vq().usedIdx()).toBe(1);
    expect(fileAt(r.path, 5 * 512, 512)).toEqual(data);
    expect(fileAt(r.path, 4 * 512, 512)).toEqual(before);
  });
});

describe('virtio-blk: report and ignore', () => {
  it('werror=report and rerror=report give the guest IOERR, without a stop', async () => {
    const r = await vrig(await faulty({ inject: [{ event: 'write_aio', errno: 5 }, { event: 'read_aio', errno: 5 }] }, { werror: 'report', rerror: 'report' }));
    const before = fileAt(r.path, 0, 1024);
    expect(await r.blk.write(0, pattern(1024, 9))).toBe(VIRTIO_BLK_S_IOERR);
    expect(fileAt(r.path, 0, 1024)).toEqual(before);
    expect((await r.blk.read(0, 512)).status).toBe(VIRTIO_BLK_S_IOERR);
    expect(r.be.stopped).toHaveLength(0);
    expect(stops(r.be)).toBe(0);
    expect(r.be.iostatus).toBe('failed');
    const errs = events.filter((e) => e.event === 'BLOCK_IO_ERROR' && e.device === r.be.name);
    expect(errs.map((e) => e.event === 'BLOCK_IO_ERROR' && [e.operation, e.action])).toEqual([['write', 'report'], ['read', 'report']]);
  });

  it('the backend default (werror=enospc) reports an EIO write to the guest as IOERR', async () => {
    const r = await vrig(await faulty({ inject: [{ event: 'write_aio', errno: 5 }] }, {}));
    expect(r.be.werror).toBe('enospc');
    expect(await r.blk.write(0, pattern(512, 10))).toBe(VIRTIO_BLK_S_IOERR);
    expect(stops(r.be)).toBe(0);
  });

  it('werror=ignore and rerror=ignore complete with OK although the I/O failed', async () => {
    const r = await vrig(await faulty({ inject: [{ event: 'write_aio', errno: 5 }, { event: 'read_aio', errno: 5 }] }, { werror: 'ignore', rerror: 'ignore' }));
    const before = fileAt(r.path, 0, 1024);
    expect(await r.blk.write(0, pattern(1024, 11))).toBe(VIRTIO_BLK_S_OK);
    expect(fileAt(r.path, 0, 1024)).toEqual(before); // it really failed
    expect((await r.blk.read(0, 512)).status).toBe(VIRTIO_BLK_S_OK);
    expect(r.be.stopped).toHaveLength(0);
    expect(r.be.iostatus).toBe('ok');
    expect(events.filter((e) => e.event === 'BLOCK_IO_ERROR').every((e) => e.event === 'BLOCK_IO_ERROR' && e.action === 'ignore')).toBe(true);
  });
});

describe('virtio-blk: werror=enospc', () => {
  it('reports EIO to the guest but stops on ENOSPC (iostatus nospace), and resume completes the write', async () => {
    const r = await vrig(await faulty({
      inject: [{ event: 'write_aio', errno: 5, once: true, sector: 0 }, { event: 'write_aio', errno: 28, once: true, sector: 16 }],
    }, { werror: 'enospc', rerror: 'report' }));
    // EIO: reported.
    expect(await r.blk.write(0, pattern(512, 12))).toBe(VIRTIO_BLK_S_IOERR);
    expect(stops(r.be)).toBe(0);
    expect(r.be.iostatus).toBe('failed');
    // ENOSPC: stopped, the guest waits.
    const data = pattern(1024, 13);
    const p = await r.blk.submit(VIRTIO_BLK_T_OUT, 16, { out: data });
    await until(() => stops(r.be) === 1, 'BACKEND_STOPPED');
    await turns(20);
    expect(await p.vq.usedIdx()).toBe(1);
    expect(r.be.iostatus).toBe('nospace');
    expect(r.be.stopped).toHaveLength(1);
    expect(events.filter((e) => e.event === 'BLOCK_IO_ERROR').map((e) => e.event === 'BLOCK_IO_ERROR' && [e.action, e.nospace])).toEqual([['report', false], ['stop', true]]);
    // The ENOSPC rule was `once`: resume succeeds.
    r.be.resume();
    expect((await r.blk.wait(p)).status).toBe(VIRTIO_BLK_S_OK);
    expect(fileAt(r.path, 16 * 512, 1024)).toEqual(data);
    expect(r.be.iostatus).toBe('ok');
  });
});

describe('virtio-blk: resize through raw -> blkdebug -> file', () => {
  it('growing the backend raises a config interrupt and the new capacity is usable', async () => {
    const r = await vrig(await faulty({}, { werror: 'stop' }));
    expect(await r.blk.capacity()).toBe(SIZE / 512);
    expect(await r.blk.dev.isr()).toBe(0);
    await r.be.truncate(4 * SIZE);
    expect((await r.blk.dev.isr()) & 2).toBe(2);
    expect(await r.blk.capacity()).toBe((4 * SIZE) / 512);
    expect(readFileSync(r.path).length).toBe(4 * SIZE);
    const data = pattern(512, 14);
    expect(await r.blk.write((3 * SIZE) / 512, data)).toBe(VIRTIO_BLK_S_OK);
    expect(fileAt(r.path, 3 * SIZE, 512)).toEqual(data);
  });
});

// ---------------------------------------------------------------------------------------------
// IDE

async function hd(f: Faulty): Promise<{ r: IdeRig; ch: QAtaChannel; qts: QtestClient }> {
  const r = await ideRig([{ bus: 0, unit: 0, kind: 'hd', path: null, backend: f.be }]);
  cleanups.push(() => r.cleanup());
  await r.ch[0].select(0);
  return { r, ch: r.ch[0], qts: r.qts };
}

/** Sets up the bus master and issues a DMA command, without waiting. */
async function startDma(ch: QAtaChannel, qts: QtestClient, cmd: number, lba: number, count: number, addr: number, toMemory: boolean): Promise<void> {
  const table = await ch.writePrds([{ addr, len: count * 512 }]);
  await qts.outb(ch.bmBase!, 0);
  await qts.outb(ch.bmBase! + 2, BM.ERROR | BM.INTR);
  await qts.outl(ch.bmBase! + 4, table);
  const dir = toMemory ? BM.READ : 0;
  await qts.outb(ch.bmBase!, dir);
  await ch.setTaskFile({ lba, count });
  await ch.command(cmd);
  await qts.outb(ch.bmBase!, dir | BM.START);
}

describe('IDE: werror=stop', () => {
  it('WRITE DMA stays BSY with no interrupt until resume, then completes and the data is in the file', async () => {
    const f = await faulty({ inject: [{ event: 'write_aio', errno: 5, once: true }] }, { werror: 'stop', rerror: 'report' });
    const { r, ch, qts } = await hd(f);
    const data = pattern(4 * 512, 21);
    const before = fileAt(f.path, 10 * 512, data.length);
    const a = r.alloc.alloc(4096);
    await qts.memwrite(a, data);
    await startDma(ch, qts, 0xca, 10, 4, a, false);
    await until(() => stops(f.be) === 1, 'BACKEND_STOPPED');
    await turns(50);
    expect((await ch.altStatus()) & ATA_ST.BSY).toBeTruthy();
    expect(qts.getIrq(14)).toBe(false);
    expect((await ch.bmStatus()) & (BM.INTR | BM.ACTIVE | BM.ERROR)).toBe(BM.ACTIVE);
    expect(fileAt(f.path, 10 * 512, data.length)).toEqual(before);
    expect(f.be.iostatus).toBe('failed');
    expect(f.be.stopped).toHaveLength(1);
    f.be.resume();
    await until(async () => ((await ch.bmStatus()) & BM.INTR) !== 0, 'BM interrupt');
    expect(qts.getIrq(14)).toBe(true);
    const res = await ch.finishDma();
    expect(res.status & (ATA_ST.ERR | ATA_ST.BSY | ATA_ST.DRQ)).toBe(0);
    expect(res.bmStatus & BM.ERROR).toBe(0);
    expect(fileAt(f.path, 10 * 512, data.length)).toEqual(data);
    expect(f.be.iostatus).toBe('ok');
  });

  it('WRITE SECTORS stops in its second block: BSY, no interrupt, until resume; then it completes', async () => {
    // Only the write touching sector 21 fails (once).
    const f = await faulty({ inject: [{ event: 'write_aio', errno: 5, once: true, sector: 21 }] }, { werror: 'stop', rerror: 'report' });
    const { ch, qts } = await hd(f);
    const data = pattern(2 * 512, 22);
    const before = fileAt(f.path, 21 * 512, 512);
    await ch.setTaskFile({ lba: 20, count: 2 });
    await ch.command(0x30);
    expect((await ch.waitNotBusy()) & ATA_ST.DRQ).toBeTruthy();
    await ch.writeData(data.subarray(0, 512));
    expect((await ch.waitNotBusy()) & ATA_ST.DRQ).toBeTruthy(); // the first block went through
    await ch.status(); // acknowledge its interrupt
    expect(qts.getIrq(14)).toBe(false);
    await ch.writeData(data.subarray(512));
    await until(() => stops(f.be) === 1, 'BACKEND_STOPPED');
    await turns(50);
    expect((await ch.altStatus()) & (ATA_ST.BSY | ATA_ST.DRQ | ATA_ST.ERR)).toBe(ATA_ST.BSY);
    expect(qts.getIrq(14)).toBe(false);
    expect(fileAt(f.path, 20 * 512, 512)).toEqual(data.subarray(0, 512));
    expect(fileAt(f.path, 21 * 512, 512)).toEqual(before);
    f.be.resume();
    const s = await ch.waitNotBusy();
    expect(s & (ATA_ST.ERR | ATA_ST.DRQ)).toBe(0);
    expect(s & ATA_ST.DRDY).toBeTruthy();
    expect(qts.getIrq(14)).toBe(true);
    await ch.status();
    expect(fileAt(f.path, 20 * 512, 1024)).toEqual(data);
  });

  it('rerror=stop holds READ DMA the same way and resume delivers the data', async () => {
    const f = await faulty({ inject: [{ event: 'read_aio', errno: 5, once: true }] }, { werror: 'report', rerror: 'stop' });
    const { r, ch, qts } = await hd(f);
    const a = r.alloc.alloc(4096);
    await qts.memset(a, 2048, 0);
    await startDma(ch, qts, 0xc8, 30, 4, a, true);
    await until(() => stops(f.be) === 1, 'BACKEND_STOPPED');
    await turns(50);
    expect((await ch.altStatus()) & ATA_ST.BSY).toBeTruthy();
    expect(qts.getIrq(14)).toBe(false);
    expect(events.find((e) => e.event === 'BLOCK_IO_ERROR')).toMatchObject({ operation: 'read', action: 'stop' });
    f.be.resume();
    const res = await ch.finishDma();
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(Buffer.from(await qts.memread(a, 2048))).toEqual(fileAt(f.path, 30 * 512, 2048));
  });
});

describe('IDE: werror=report', () => {
  it('WRITE DMA and WRITE SECTORS end with ERR/ABRT and an interrupt; the file is unchanged', async () => {
    const f = await faulty({ inject: [{ event: 'write_aio', errno: 5 }] }, { werror: 'report', rerror: 'report' });
    const { r, ch, qts } = await hd(f);
    const before = readFileSync(f.path);
    const a = r.alloc.alloc(4096);
    await qts.memwrite(a, pattern(2048, 23));
    await startDma(ch, qts, 0xca, 10, 4, a, false);
    await until(async () => ((await ch.bmStatus()) & BM.INTR) !== 0 && !((await ch.altStatus()) & ATA_ST.BSY), 'DMA end');
    expect(qts.getIrq(14)).toBe(true);
    const res = await ch.finishDma();
    expect(res.status & ATA_ST.ERR).toBeTruthy();
    expect(res.error).toBe(0x04);
    expect(res.bmStatus & BM.ERROR).toBe(0); // a device error, not a bus error
    // PIO.
    await ch.setTaskFile({ lba: 3, count: 1 });
    await ch.command(0x30);
    expect((await ch.waitNotBusy()) & ATA_ST.DRQ).toBeTruthy();
    expect(qts.getIrq(14)).toBe(false);
    await ch.writeData(pattern(512, 24));
    const s = await ch.waitNotBusy();
    expect(s & ATA_ST.ERR).toBeTruthy();
    expect(qts.getIrq(14)).toBe(true);
    expect(await ch.error()).toBe(0x04);
    expect(readFileSync(f.path).equals(before)).toBe(true);
    expect(stops(f.be)).toBe(0);
    expect(f.be.iostatus).toBe('failed');
  });
});

describe('IDE: werror=enospc', () => {
  it('EIO aborts the command; ENOSPC keeps it BSY until resume', async () => {
    const f = await faulty({
      inject: [{ event: 'write_aio', errno: 5, once: true, sector: 0 }, { event: 'write_aio', errno: 'ENOSPC', once: true, sector: 40 }],
    }, { werror: 'enospc', rerror: 'report' });
    const { r, ch, qts } = await hd(f);
    const a = r.alloc.alloc(4096);
    const data = pattern(1024, 25);
    await qts.memwrite(a, data);
    const eio = await ch.dma(0xca, { lba: 0, count: 2 }, [{ addr: a, len: 1024 }], false);
    expect(eio.status & ATA_ST.ERR).toBeTruthy();
    expect(eio.error).toBe(0x04);
    expect(stops(f.be)).toBe(0);
    await startDma(ch, qts, 0xca, 40, 2, a, false);
    await until(() => stops(f.be) === 1, 'BACKEND_STOPPED');
    await turns(50);
    expect((await ch.altStatus()) & ATA_ST.BSY).toBeTruthy();
    expect(qts.getIrq(14)).toBe(false);
    expect(f.be.iostatus).toBe('nospace');
    f.be.resume();
    const ok = await ch.finishDma();
    expect(ok.status & ATA_ST.ERR).toBe(0);
    expect(fileAt(f.path, 40 * 512, 1024)).toEqual(data);
  });
});

describe('IDE: resize', () => {
  it('IDENTIFY and READ NATIVE MAX ADDRESS follow a backend resize, and the new sectors are addressable', async () => {
    const f = await faulty({}, { werror: 'stop' });
    const { ch, qts } = await hd(f);
    let id = await ch.identify();
    expect(word(id, 60) | (word(id, 61) << 16)).toBe(SIZE / 512);
    expect(word(id, 100) + word(id, 101) * 65536).toBe(SIZE / 512);
    const newSize = 3 * SIZE;
    const lba = SIZE / 512 + 100; // beyond the old end
    expect((await ch.pioOut(0x30, { lba, count: 1 }, pattern(512, 26))).status & ATA_ST.ERR).toBeTruthy();
    expect(await ch.error()).toBe(0x10); // IDNF
    await f.be.truncate(newSize);
    id = await ch.identify();
    expect(word(id, 60) | (word(id, 61) << 16)).toBe(newSize / 512);
    expect(word(id, 100) + word(id, 101) * 65536).toBe(newSize / 512);
    expect(word(id, 1)).toBe(Math.floor(newSize / 512 / (16 * 63)));
    await ch.command(0x27); // READ NATIVE MAX ADDRESS EXT
    await ch.waitNotBusy();
    const max = (await ch.reg(3)) | ((await ch.reg(4)) << 8) | ((await ch.reg(5)) << 16);
    expect(max).toBe(newSize / 512 - 1);
    await ch.status();
    const data = pattern(512, 27);
    expect((await ch.pioOut(0x30, { lba, count: 1 }, data)).status & ATA_ST.ERR).toBe(0);
    expect(fileAt(f.path, lba * 512, 512)).toEqual(data);
    expect(qts.getIrq(14)).toBe(false);
  });
});

describe('a guest reset while a request is stopped', () => {
  it('virtio-blk: the reset drops the stopped write; resume does not write it and the device works on', async () => {
    const r = await vrig(await faulty({ inject: [{ event: 'write_aio', errno: 5, once: true }] }, { werror: 'stop', rerror: 'report' }));
    const before = fileAt(r.path, 6 * 512, 512);
    await r.blk.submit(VIRTIO_BLK_T_OUT, 6, { out: pattern(512, 701) });
    await until(() => stops(r.be) === 1, 'BACKEND_STOPPED');
    expect(r.be.stopped).toHaveLength(1);
    // The driver starts over: status 0 resets the device, then it sets up again.
    const again = await QVirtioBlk.start(r.qts, r.alloc);
    expect(r.be.stopped).toHaveLength(0);
    r.be.resume(); // the rule was `once`: a retried write would succeed and land
    await turns(50);
    await r.be.idle();
    expect(fileAt(r.path, 6 * 512, 512)).toEqual(before);
    const data = pattern(512, 702);
    expect(await again.write(7, data)).toBe(VIRTIO_BLK_S_OK);
    expect(fileAt(r.path, 7 * 512, 512)).toEqual(data);
  });

  it('IDE: a soft reset drops the stopped WRITE DMA, frees the bus master, and the next DMA works', async () => {
    const f = await faulty({ inject: [{ event: 'write_aio', errno: 5, once: true }] }, { werror: 'stop', rerror: 'report' });
    const { r, ch, qts } = await hd(f);
    const before = fileAt(f.path, 20 * 512, 2048);
    const a = r.alloc.alloc(4096);
    await qts.memwrite(a, pattern(2048, 703));
    await startDma(ch, qts, 0xca, 20, 4, a, false);
    await until(() => stops(f.be) === 1, 'BACKEND_STOPPED');
    // SRST on, then off: the drives reset.
    await ch.setControl(0x04);
    await ch.setControl(0x00);
    await until(async () => ((await ch.altStatus()) & ATA_ST.BSY) === 0, 'not BSY after reset');
    expect(f.be.stopped).toHaveLength(0);
    f.be.resume();
    await turns(50);
    await f.be.idle();
    expect(fileAt(f.path, 20 * 512, 2048)).toEqual(before);
    // The bus master was released: a new DMA write goes through.
    await ch.select(0);
    const data = pattern(1024, 704);
    await qts.memwrite(a, data);
    const res = await ch.dma(0xca, { lba: 30, count: 2 }, [{ addr: a, len: 1024 }], false);
    expect(res.status & (ATA_ST.ERR | ATA_ST.BSY)).toBe(0);
    expect(res.bmStatus & BM.ERROR).toBe(0);
    expect(fileAt(f.path, 30 * 512, 1024)).toEqual(data);
  });
});

describe('flush, discard and write-zeroes under the error policy', () => {
  it('virtio-blk FLUSH that fails with werror=stop stops (no used entry, BLOCK_IO_ERROR) and resume retries it', async () => {
    const r = await vrig(await faulty({ inject: [{ event: 'flush_to_disk', errno: 5, once: true }] }, { werror: 'stop', rerror: 'report' }));
    const p = await r.blk.submit(VIRTIO_BLK_T_FLUSH, 0, {});
    await until(() => stops(r.be) === 1, 'BACKEND_STOPPED');
    await turns(20);
    expect(await p.vq.usedIdx()).toBe(0);
    expect(r.be.stopped).toHaveLength(1);
    expect(events.find((e) => e.event === 'BLOCK_IO_ERROR')).toMatchObject({ device: r.be.name, operation: 'write', action: 'stop' });
    r.be.resume(); // the rule was `once`: the retry succeeds
    expect((await r.blk.wait(p)).status).toBe(VIRTIO_BLK_S_OK);
    expect(r.be.iostatus).toBe('ok');
  });

  it('with werror=report a failing FLUSH is IOERR to the guest, without a stop', async () => {
    const r = await vrig(await faulty({ inject: [{ event: 'flush_to_disk', errno: 5, once: true }] }, { werror: 'report', rerror: 'report' }));
    expect(await r.blk.flush()).toBe(VIRTIO_BLK_S_IOERR);
    expect(stops(r.be)).toBe(0);
    expect(await r.blk.flush()).toBe(VIRTIO_BLK_S_OK);
  });
});

