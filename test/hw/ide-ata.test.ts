// PIIX IDE with an ATA disk, driven through qtest: IDENTIFY, PIO and DMA I/O against the
// image file, errors, interrupts and nIEN, soft reset, diagnostics, TRIM.
// Some tests look at a request while it is in flight (BSY, unplug, a head offered twice): reads
// must not complete inline from the page cache (the engine is made on first use, after this).
process.env.SPINDLE_NO_INLINE_READS = '1';

import { readFileSync, statSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { ATA_ST, BM } from '../../src/qos/ata.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { ataString, imageFile, rig, word, type Rig } from './ide-helpers.js';

const dir = scratchDir('spindle-ide-');
const SIZE = 1 << 20;
let r: Rig | null = null;
afterEach(() => {
  r?.cleanup();
  r = null;
});

async function hdRig(size: number | Uint8Array = pattern(SIZE, 7)) {
  const path = imageFile(dir, size);
  r = await rig([{ bus: 0, unit: 0, kind: 'hd', path, serial: 'QM00001X', model: 'Spindle Test Disk' }]);
  await r.ch[0].select(0);
  return { path, r, ch: r.ch[0], qts: r.qts };
}

describe('PIIX IDE: PCI function and IDENTIFY DEVICE', () => {
  it('is 8086:7010 at 01.1 with prog-if 0x80 and a 16-port BAR4', async () => {
    const { qts } = await hdRig();
    const { QPciBus } = await import('../../src/qos/pci.js');
    const bus = new QPciBus(qts);
    expect((await bus.enumerate()).some(([devfn, v, d]) => devfn === 0x09 && v === 0x8086 && d === 0x7010)).toBe(true);
    expect(await bus.configRead(0x09, 0x08, 4) >>> 8).toBe(0x010180);
    await bus.configWrite(0x09, 0x20, 4, 0xffffffff);
    expect(await bus.configRead(0x09, 0x20, 4)).toBe(0xfffffff1);
  });

  it('reports geometry, LBA28/48 capacity, modes, features and byte-swapped strings, with a valid checksum', async () => {
    const { ch, qts } = await hdRig();
    expect(qts.getIrq(14)).toBe(false);
    await ch.setTaskFile({});
    await ch.command(0xec);
    expect(await ch.waitNotBusy() & ATA_ST.DRQ).toBeTruthy();
    expect(qts.getIrq(14)).toBe(true); // data ready: interrupt
    await ch.status();
    expect(qts.getIrq(14)).toBe(false); // reading status clears it
    const id = await ch.readData(512);
    expect(await ch.status() & ATA_ST.DRQ).toBe(0);
    expect(word(id, 0)).toBe(0x0040);
    expect([word(id, 1), word(id, 3), word(id, 6)]).toEqual([2, 16, 63]); // 2048 sectors / (16 * 63)
    expect(word(id, 59)).toBe(0x0100); // multiple mode off until SET MULTIPLE MODE
    expect(ataString(id, 10, 10)).toBe('QM00001X'.padEnd(20));
    expect(ataString(id, 27, 20)).toBe('Spindle Test Disk'.padEnd(40));
    expect([id[54], id[55]]).toEqual([0x70, 0x53]); // word 27 holds 'Sp', 'S' in the high byte
    expect(word(id, 47) & 0xff).toBe(16);
    expect(word(id, 49) & 0x0300).toBe(0x0300);
    expect(word(id, 60) | (word(id, 61) << 16)).toBe(SIZE / 512);
    expect(word(id, 100) + word(id, 101) * 65536).toBe(SIZE / 512);
    expect(word(id, 83) & 0x0400).toBe(0x0400); // 48-bit
    expect(word(id, 83) & 0x3000).toBe(0x3000); // FLUSH CACHE (EXT)
    expect(word(id, 82) & 0x20).toBe(0x20);
    expect(word(id, 85) & 0x20).toBe(0x20); // write cache on (backend default)
    expect(word(id, 88) & 0xff).toBe(0x3f);
    expect(word(id, 169) & 1).toBe(1);
    expect(id[510]).toBe(0xa5);
    expect(id.reduce((a, b) => a + b, 0) % 256).toBe(0);
  });
});

describe('PIIX IDE: PIO reads and writes', () => {
  it('READ SECTORS (LBA28, CHS) and READ SECTORS EXT return the image bytes', async () => {
    const { ch, path } = await hdRig();
    const file = readFileSync(path);
    let res = await ch.pioIn(0x20, { lba: 5, count: 3 }, 3 * 512);
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(Buffer.from(res.data).equals(file.subarray(5 * 512, 8 * 512))).toBe(true);
    res = await ch.pioIn(0x24, { lba: 100, count: 2, ext: true }, 1024);
    expect(Buffer.from(res.data).equals(file.subarray(100 * 512, 102 * 512))).toBe(true);
    // CHS: cylinder 1, head 2, sector 3 on a 16-head 63-sector geometry.
    const lba = (1 * 16 + 2) * 63 + 2;
    res = await ch.pioIn(0x20, { count: 1, lba: 3 | (1 << 8), device: 0x02 }, 512);
    expect(Buffer.from(res.data).equals(file.subarray(lba * 512, lba * 512 + 512))).toBe(true);
    // Sector count 0 means 256 sectors in 28-bit commands.
    res = await ch.pioIn(0x20, { lba: 0, count: 0 }, 256 * 512);
    expect(res.data.length).toBe(256 * 512);
    expect(Buffer.from(res.data).equals(file.subarray(0, 256 * 512))).toBe(true);
  });

  it('WRITE SECTORS and WRITE SECTORS EXT reach the file, one interrupt per sector', async () => {
    const { ch, path, qts } = await hdRig();
    const data = pattern(3 * 512, 99);
    await ch.setTaskFile({ lba: 9, count: 3 });
    await ch.command(0x30);
    expect(await ch.waitNotBusy() & ATA_ST.DRQ).toBeTruthy();
    expect(qts.getIrq(14)).toBe(false); // no interrupt before the first block of a write
    await ch.writeData(data.subarray(0, 512));
    expect(await ch.waitNotBusy() & ATA_ST.DRQ).toBeTruthy();
    expect(qts.getIrq(14)).toBe(true);
    await ch.status();
    await ch.writeData(data.subarray(512));
    const s = await ch.waitNotBusy();
    expect(s & (ATA_ST.DRQ | ATA_ST.ERR)).toBe(0);
    expect(qts.getIrq(14)).toBe(true); // completion
    expect(readFileSync(path).subarray(9 * 512, 12 * 512).equals(data)).toBe(true);
    const ext = pattern(1024, 5);
    expect((await ch.pioOut(0x34, { lba: 2000, count: 2, ext: true }, ext)).status & ATA_ST.ERR).toBe(0);
    expect(readFileSync(path).subarray(2000 * 512, 2002 * 512).equals(ext)).toBe(true);
  });

  it('SET MULTIPLE MODE gates READ/WRITE MULTIPLE and sets the DRQ block size', async () => {
    const { ch, path, qts } = await hdRig();
    let res = await ch.pioIn(0xc4, { lba: 0, count: 4 }, 2048);
    expect(res.status & ATA_ST.ERR).toBeTruthy(); // multiple mode off
    expect(await ch.error()).toBe(0x04);
    await ch.setTaskFile({ count: 3 });
    await ch.command(0xc6);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBeTruthy(); // not a power of two
    await ch.setTaskFile({ count: 4 });
    await ch.command(0xc6);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBe(0);
    expect(word(await ch.identify(), 59)).toBe(0x0104);
    // 10 sectors in blocks of 4: the second interrupt comes after 4 sectors, not 1.
    await ch.setTaskFile({ lba: 20, count: 10 });
    await ch.command(0xc4);
    await ch.waitNotBusy();
    await ch.status();
    const a = await ch.readData(512);
    expect(qts.getIrq(14)).toBe(false);
    const b = await ch.readData(1536);
    expect(qts.getIrq(14)).toBe(true);
    await ch.status();
    const c = await ch.readData(6 * 512);
    expect(await ch.status() & ATA_ST.DRQ).toBe(0);
    expect(Buffer.concat([a, b, c]).equals(readFileSync(path).subarray(20 * 512, 30 * 512))).toBe(true);
    const data = pattern(6 * 512, 3);
    res = { data: new Uint8Array(), status: (await ch.pioOut(0x39, { lba: 40, count: 6, ext: true }, data, 2048)).status };
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(readFileSync(path).subarray(40 * 512, 46 * 512).equals(data)).toBe(true);
    res = await ch.pioIn(0x29, { lba: 40, count: 6, ext: true }, 6 * 512, 2048);
    expect(Buffer.from(res.data).equals(data)).toBe(true);
  });
});

describe('PIIX IDE: errors, features and registers', () => {
  it('aborts unknown commands and PACKET on a disk, and reports IDNF past the end', async () => {
    const { ch } = await hdRig();
    for (const cmd of [0xff, 0xa0, 0xa1, 0x00]) {
      await ch.command(cmd);
      expect(await ch.waitNotBusy() & ATA_ST.ERR).toBeTruthy();
      expect(await ch.error()).toBe(0x04);
    }
    let res = await ch.pioIn(0x20, { lba: SIZE / 512 - 1, count: 2 }, 1024);
    expect(res.status & ATA_ST.ERR).toBeTruthy();
    expect(await ch.error()).toBe(0x10);
    res = await ch.pioIn(0x24, { lba: 2 ** 32, count: 1, ext: true }, 512);
    expect(await ch.error()).toBe(0x10);
    const w = await ch.pioOut(0x30, { lba: SIZE / 512, count: 1 }, new Uint8Array(512));
    expect(w.status & ATA_ST.ERR).toBeTruthy();
    expect(await ch.error()).toBe(0x10);
    // The last sector itself is fine.
    res = await ch.pioIn(0x20, { lba: SIZE / 512 - 1, count: 1 }, 512);
    expect(res.status & ATA_ST.ERR).toBe(0);
    // Power management (Linux's shutdown sends STANDBY IMMEDIATE): done, and the disk stays active.
    for (const cmd of [0xe0, 0xe1, 0xe2, 0xe3]) {
      await ch.command(cmd);
      expect(await ch.waitNotBusy() & ATA_ST.ERR).toBe(0);
    }
    await ch.command(0xe5);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBe(0);
    expect(await ch.reg(2)).toBe(0xff);
  });

  it('FLUSH CACHE (EXT) complete; SET FEATURES switches the backend write cache and transfer modes', async () => {
    const { ch, r } = await hdRig();
    for (const cmd of [0xe7, 0xea]) {
      await ch.command(cmd);
      const s = await ch.waitNotBusy();
      expect(s & ATA_ST.ERR).toBe(0);
      expect(s & ATA_ST.DRDY).toBeTruthy();
    }
    const be = r.backends[0]!;
    await ch.setTaskFile({ features: 0x82 });
    await ch.command(0xef);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBe(0);
    expect(be.writeCache).toBe(false);
    expect(word(await ch.identify(), 85) & 0x20).toBe(0);
    await ch.setTaskFile({ features: 0x02 });
    await ch.command(0xef);
    await ch.waitNotBusy();
    expect(be.writeCache).toBe(true);
    await ch.setTaskFile({ features: 0x03, count: 0x42 }); // UDMA mode 2
    await ch.command(0xef);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBe(0);
    let id = await ch.identify();
    expect(word(id, 88) >> 8).toBe(0x04);
    await ch.setTaskFile({ features: 0x03, count: 0x21 }); // MWDMA mode 1
    await ch.command(0xef);
    id = await ch.identify();
    expect(word(id, 63) >> 8).toBe(0x02);
    expect(word(id, 88) >> 8).toBe(0);
    await ch.setTaskFile({ features: 0x03, count: 0x47 }); // UDMA 7: not offered
    await ch.command(0xef);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBeTruthy();
    await ch.setTaskFile({ features: 0x77 });
    await ch.command(0xef);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBeTruthy();
    expect(await ch.error()).toBe(0x04);
  });

  it('READ NATIVE MAX ADDRESS (EXT) and LBA48 I/O on a disk above 2^28 sectors', async () => {
    const size = 2 ** 37 + 2 ** 20; // sparse: 2^28 + 2048 sectors
    const { ch, path, qts } = await hdRig(size);
    await ch.command(0xf8);
    await ch.waitNotBusy();
    expect([await ch.reg(3), await ch.reg(4), await ch.reg(5), (await ch.reg(6)) & 0x0f]).toEqual([0xff, 0xff, 0xff, 0x0f]);
    await ch.command(0x27);
    await ch.waitNotBusy();
    expect([await ch.reg(3), await ch.reg(4), await ch.reg(5)]).toEqual([0xff, 0x07, 0x00]);
    await ch.setControl(0x80); // HOB
    expect([await ch.reg(3), await ch.reg(4), await ch.reg(5)]).toEqual([0x10, 0x00, 0x00]);
    await ch.setControl(0x00);
    const id = await ch.identify();
    expect(word(id, 60) | (word(id, 61) << 16)).toBe(0x0fffffff);
    expect(word(id, 100) + word(id, 101) * 65536).toBe(2 ** 28 + 2048);
    const lba = 2 ** 28 + 5;
    const data = pattern(512, 11);
    expect((await ch.pioOut(0x34, { lba, count: 1, ext: true }, data)).status & ATA_ST.ERR).toBe(0);
    const fd = (await import('node:fs')).openSync(path, 'r');
    const back = Buffer.alloc(512);
    (await import('node:fs')).readSync(fd, back, 0, 512, lba * 512);
    (await import('node:fs')).closeSync(fd);
    expect(back.equals(data)).toBe(true);
    const res = await ch.pioIn(0x24, { lba, count: 1, ext: true }, 512);
    expect(Buffer.from(res.data).equals(data)).toBe(true);
    expect(statSync(path).size).toBe(size);
    expect(qts.getIrq(14)).toBe(false); // acknowledged by the status read
  });
});

describe('PIIX IDE: interrupts, reset and diagnostics', () => {
  it('nIEN masks the interrupt line; clearing it lets a pending interrupt through', async () => {
    const { ch, qts } = await hdRig();
    await ch.setControl(0x02);
    await ch.command(0xe7);
    await ch.waitNotBusy();
    expect(qts.getIrq(14)).toBe(false);
    await ch.setControl(0x00);
    expect(qts.getIrq(14)).toBe(true);
    await ch.status();
    expect(qts.getIrq(14)).toBe(false);
    // Alternate status does not acknowledge.
    await ch.command(0xe7);
    await ch.waitNotBusy();
    await ch.altStatus();
    expect(qts.getIrq(14)).toBe(true);
    expect(qts.getIrq(15)).toBe(false);
  });

  it('SRST holds BSY, then leaves the ATA signature, master selected, and cancels a transfer', async () => {
    const { ch, r } = await hdRig();
    const cd = imageFile(dir, new Uint8Array(2048 * 4));
    const { IdeDrive } = await import('../../hw/ide/piix.js');
    const { backendOn } = await import('./ide-helpers.js');
    const b = await backendOn(cd, true);
    r.backends.push(b);
    r.ide.attach(0, 1, new IdeDrive({ id: 'cd01', kind: 'cd', drive: b }));
    await ch.setTaskFile({ lba: 0, count: 2 });
    await ch.command(0x20);
    expect(await ch.waitNotBusy() & ATA_ST.DRQ).toBeTruthy();
    await ch.select(1);
    await ch.setControl(0x04);
    expect(await ch.altStatus() & ATA_ST.BSY).toBeTruthy();
    await ch.setControl(0x00);
    expect(await ch.reg(6) & 0x10).toBe(0); // master selected again
    expect(await ch.status()).toBe(0x50);
    expect([await ch.error(), await ch.reg(2), await ch.reg(3), await ch.reg(4), await ch.reg(5)]).toEqual([0x01, 1, 1, 0, 0]);
    expect(await ch.qts.inw(0x1f0)).toBe(0xffff); // no data left
    await ch.select(1);
    expect([await ch.reg(4), await ch.reg(5)]).toEqual([0x14, 0xeb]);
    expect(await ch.status()).toBe(0);
  });

  it('EXECUTE DEVICE DIAGNOSTIC sets code 01h and the signatures, with an interrupt', async () => {
    const { ch, qts } = await hdRig();
    await ch.setTaskFile({ lba: 0x123456, count: 9 });
    await ch.command(0x90);
    const s = await ch.waitNotBusy();
    expect(s & ATA_ST.ERR).toBe(0);
    expect(qts.getIrq(14)).toBe(true);
    expect([await ch.error(), await ch.reg(2), await ch.reg(3), await ch.reg(4), await ch.reg(5)]).toEqual([0x01, 1, 1, 0, 0]);
  });
});

describe('PIIX IDE: bus-master DMA', () => {
  it('READ DMA into a multi-PRD table with odd sizes, BSY until the backend completes', async () => {
    const { ch, path, qts, r } = await hdRig();
    const file = readFileSync(path);
    const bufs = [r.alloc.alloc(4096), r.alloc.alloc(8192), r.alloc.alloc(4096)];
    const prds = [{ addr: bufs[0]! + 6, len: 1000 }, { addr: bufs[1]!, len: 5142 }, { addr: bufs[2]! + 2, len: 2050 }];
    const total = 1000 + 5142 + 2050; // 16 sectors
    expect(total).toBe(16 * 512);
    await qts.outb(ch.bmBase! + 4, 0);
    const table = await ch.writePrds(prds);
    await qts.outl(ch.bmBase! + 4, table);
    await qts.outb(ch.bmBase!, BM.READ);
    await ch.setTaskFile({ lba: 33, count: 16 });
    await ch.command(0xc8);
    await qts.outb(ch.bmBase!, BM.READ | BM.START);
    expect(await ch.altStatus() & ATA_ST.BSY).toBeTruthy();
    expect(await ch.bmStatus() & BM.ACTIVE).toBeTruthy();
    expect(qts.getIrq(14)).toBe(false);
    const res = await ch.finishDma();
    expect(qts.getIrq(14)).toBe(false); // acknowledged
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(res.bmStatus & (BM.INTR | BM.ACTIVE | BM.ERROR)).toBe(BM.INTR); // table used up exactly
    const got = Buffer.concat(await Promise.all(prds.map((p) => qts.memread(p.addr, p.len))));
    expect(got.equals(file.subarray(33 * 512, 49 * 512))).toBe(true);
    expect(await ch.bmStatus() & BM.INTR).toBe(0); // write-one-to-clear
    // The engine started before the command works too.
    await qts.memset(bufs[0]!, 4096, 0);
    const again = await ch.dma(0xc8, { lba: 50, count: 1 }, [{ addr: bufs[0]!, len: 512 }], true, { startFirst: true });
    expect(again.status & ATA_ST.ERR).toBe(0);
    expect(Buffer.from(await qts.memread(bufs[0]!, 512)).equals(file.subarray(50 * 512, 51 * 512))).toBe(true);
  });

  it('WRITE DMA EXT from three PRDs reaches the file; a longer table leaves BM active', async () => {
    const { ch, path, qts, r } = await hdRig();
    const data = pattern(3 * 512, 42);
    const a = r.alloc.alloc(4096);
    await qts.memwrite(a, data);
    const res = await ch.dma(0x35, { lba: 7, count: 3, ext: true }, [{ addr: a, len: 700 }, { addr: a + 700, len: 300 }, { addr: a + 1000, len: 536 }], false);
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(readFileSync(path).subarray(7 * 512, 10 * 512).equals(data)).toBe(true);
    expect(qts.getIrq(14)).toBe(false); // the driver read status
    const long = await ch.dma(0x25, { lba: 7, count: 1, ext: true }, [{ addr: a + 2048, len: 2048 }], true);
    expect(long.bmStatus & (BM.INTR | BM.ACTIVE)).toBe(BM.INTR | BM.ACTIVE);
    expect(Buffer.from(await qts.memread(a + 2048, 512)).equals(data.subarray(0, 512))).toBe(true);
    const w = await ch.dma(0xca, { lba: 1, count: 1 }, [{ addr: a, len: 512 }], false);
    expect(w.status & ATA_ST.ERR).toBe(0);
    expect(readFileSync(path).subarray(512, 1024).equals(data.subarray(0, 512))).toBe(true);
  });

  it('a PRD table too short or pointing outside RAM ends with BM error and ABRT, no throw', async () => {
    const { ch, path, r } = await hdRig();
    const before = readFileSync(path);
    const a = r.alloc.alloc(4096);
    let res = await ch.dma(0xc8, { lba: 0, count: 2 }, [{ addr: a, len: 512 }], true);
    expect(res.bmStatus & BM.ERROR).toBeTruthy();
    expect(res.bmStatus & BM.ACTIVE).toBe(0);
    expect(res.status & ATA_ST.ERR).toBeTruthy();
    expect(res.error).toBe(0x04);
    res = await ch.dma(0xca, { lba: 0, count: 1 }, [{ addr: 0x7ffffff0, len: 512 }], false);
    expect(res.bmStatus & BM.ERROR).toBeTruthy();
    expect(res.status & ATA_ST.ERR).toBeTruthy();
    res = await ch.dma(0xc8, { lba: 0, count: 1 }, 0x7ffffff0, true);
    expect(res.bmStatus & BM.ERROR).toBeTruthy();
    expect(readFileSync(path).equals(before)).toBe(true);
    // And the drive still works.
    res = await ch.dma(0xc8, { lba: 0, count: 1 }, [{ addr: a, len: 512 }], true);
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(res.bmStatus & BM.ERROR).toBe(0);
  });

  it('DMA past the end reports IDNF; DATA SET MANAGEMENT TRIM punches the ranges out of the file', async () => {
    const { ch, path, qts, r } = await hdRig(pattern(SIZE, 1));
    const a = r.alloc.alloc(4096);
    let res = await ch.dma(0xc8, { lba: SIZE / 512, count: 1 }, [{ addr: a, len: 512 }], true);
    expect(res.error).toBe(0x10);
    const ranges = new Uint8Array(512);
    const dv = new DataView(ranges.buffer);
    dv.setUint32(0, 16, true); dv.setUint16(6, 16, true); // LBA 16, 16 sectors (8 KiB, page aligned)
    dv.setUint32(8, 64, true); dv.setUint16(14, 8, true); // LBA 64, 8 sectors
    await qts.memwrite(a, ranges);
    const before = readFileSync(path);
    res = await ch.dma(0x06, { features: 1, count: 1, ext: true }, [{ addr: a, len: 512 }], false);
    expect(res.status & ATA_ST.ERR).toBe(0);
    const after = readFileSync(path);
    expect(after.subarray(16 * 512, 32 * 512).every((b) => b === 0)).toBe(true);
    expect(after.subarray(64 * 512, 72 * 512).every((b) => b === 0)).toBe(true);
    expect(after.subarray(0, 16 * 512).equals(before.subarray(0, 16 * 512))).toBe(true);
    expect(after.subarray(32 * 512, 64 * 512).equals(before.subarray(32 * 512, 64 * 512))).toBe(true);
    expect(after.subarray(72 * 512).equals(before.subarray(72 * 512))).toBe(true);
    // Without the TRIM bit, or with a range past the end: refused.
    res = await ch.dma(0x06, { features: 0, count: 1, ext: true }, [{ addr: a, len: 512 }], false);
    expect(res.status & ATA_ST.ERR).toBeTruthy();
    dv.setUint32(0, SIZE / 512 - 1, true); dv.setUint16(6, 2, true);
    await qts.memwrite(a, ranges);
    res = await ch.dma(0x06, { features: 1, count: 1, ext: true }, [{ addr: a, len: 512 }], false);
    expect(res.error & 0x10).toBeTruthy();
  });
});

describe('PIIX IDE: plugging and odd accesses', () => {
  it('refuses a taken position, releases the backend on detach, and serves 32-bit data port reads', async () => {
    const { ch, r, qts } = await hdRig();
    const { IdeDrive } = await import('../../hw/ide/piix.js');
    const be = r.backends[0]!;
    expect(be.device?.id).toBe('hd00');
    expect(() => r.ide.attach(0, 0, new IdeDrive({ id: 'x', kind: 'cd', drive: null }))).toThrow(/in use by 'hd00'/);
    expect(() => r.ide.attach(2 as 0, 0, new IdeDrive({ id: 'y', kind: 'cd', drive: null }))).toThrow(/no IDE position/);
    expect(() => new IdeDrive({ id: 'z', kind: 'hd', drive: null })).toThrow(/needs a drive/);
    await ch.setTaskFile({});
    await ch.command(0xec);
    await ch.waitNotBusy();
    const words: number[] = [];
    for (let i = 0; i < 128; i++) words.push(await qts.inl(0x1f0));
    expect(words[0]! & 0xffff).toBe(0x0040);
    expect(await ch.status() & ATA_ST.DRQ).toBe(0);
    r.ide.detach(0, 0);
    expect(be.device).toBeNull();
    expect(await ch.status()).toBe(0xff); // empty channel floats
    expect(() => r.ide.detach(0, 0)).toThrow(/has no drive/);
  });

  it('a soft reset during a DMA transfer drops it, and the next transfer runs', async () => {
    const { ch, path, qts, r } = await hdRig();
    const a = r.alloc.alloc(8192);
    const table = await ch.writePrds([{ addr: a, len: 8192 }]);
    await qts.outl(ch.bmBase! + 4, table);
    await qts.outb(ch.bmBase!, BM.READ);
    await ch.setTaskFile({ lba: 0, count: 16 });
    await ch.command(0xc8);
    await qts.outb(ch.bmBase!, BM.READ | BM.START);
    await ch.setControl(0x04);
    await ch.setControl(0x00);
    await qts.outb(ch.bmBase!, 0);
    expect(await ch.status()).toBe(0x50);
    await r.backends[0]!.idle();
    for (let i = 0; i < 10; i++) await new Promise(setImmediate);
    expect(await ch.status()).toBe(0x50); // the stale completion changed nothing
    const res = await ch.dma(0xc8, { lba: 4, count: 1 }, [{ addr: a, len: 512 }], true);
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(Buffer.from(await qts.memread(a, 512)).equals(readFileSync(path).subarray(2048, 2560))).toBe(true);
  });
});

describe('PIIX IDE: backend I/O errors', () => {
  it('a failing read ends with UNC (PIO and DMA); a failing write with ABRT', async () => {
    const { openNode, unref } = await import('../../src/block/graph.js');
    const { createBackend } = await import('../../src/backend/backend.js');
    const path = imageFile(dir, pattern(SIZE, 2));
    const node = await openNode({
      driver: 'blkdebug',
      'inject-error': [{ event: 'read_aio', errno: 5, once: false }, { event: 'write_aio', errno: 5, once: false }],
      image: { driver: 'raw', file: { driver: 'file', filename: path } },
    });
    const be = createBackend({ name: 'idefaulty', werror: 'report', rerror: 'report' }, node);
    unref(node);
    r = await rig([{ bus: 0, unit: 0, kind: 'hd', path: null, backend: be }]);
    const ch = r.ch[0];
    await ch.select(0);
    const res = await ch.pioIn(0x20, { lba: 0, count: 1 }, 512);
    expect(res.status & ATA_ST.ERR).toBeTruthy();
    expect(res.data.length).toBe(0);
    expect(await ch.error()).toBe(0x40);
    const a = r.alloc.alloc(4096);
    const d = await ch.dma(0xc8, { lba: 0, count: 1 }, [{ addr: a, len: 512 }], true);
    expect(d.status & ATA_ST.ERR).toBeTruthy();
    expect(d.error).toBe(0x40);
    expect(d.bmStatus & (BM.INTR | BM.ERROR)).toBe(BM.INTR); // a device error, not a bus error
    const w = await ch.pioOut(0x30, { lba: 0, count: 1 }, new Uint8Array(512));
    expect(w.status & ATA_ST.ERR).toBeTruthy();
    expect(await ch.error()).toBe(0x04);
    expect(readFileSync(path).subarray(0, 512).equals(pattern(SIZE, 2).subarray(0, 512))).toBe(true);
  });
});
