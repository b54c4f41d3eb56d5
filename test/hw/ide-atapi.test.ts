// PIIX IDE with an ATAPI CD-ROM on ide.1 (IRQ 15), driven through qtest: identification,
// packets by PIO and DMA against an ISO-like file, TOC, mode pages, configuration, media
// events, the tray and its lock, media change and UNIT ATTENTION.
import { readFileSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { ATA_ST, BM, type QAtaChannel } from '../../src/qos/ata.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { ataString, imageFile, rawNode, rig, word, type Rig } from './ide-helpers.js';
import { unref } from '../../src/block/graph.js';

const dir = scratchDir('spindle-atapi-');
const SECTORS = 40;
let r: Rig | null = null;
afterEach(() => {
  r?.cleanup();
  r = null;
});

async function cdRig(empty = false) {
  const path = empty ? null : imageFile(dir, pattern(SECTORS * 2048, 3));
  r = await rig([{ bus: 1, unit: 0, kind: 'cd', path, model: 'Spindle CD' }]);
  const ch = r.ch[1];
  await ch.select(0);
  return { path, r, ch, qts: r.qts, be: r.backends[0]! };
}

const be32 = (b: Uint8Array, o: number): number => ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;

async function expectSense(ch: QAtaChannel, cdb: number[], key: number, asc: number, ascq: number): Promise<void> {
  const res = await ch.packet(cdb);
  expect(res.status & ATA_ST.ERR).toBeTruthy();
  expect(res.error >> 4).toBe(key);
  expect(await ch.requestSense()).toEqual([key, asc, ascq]);
}

describe('ATAPI: identification', () => {
  it('has the packet signature, aborts IDENTIFY DEVICE, and answers IDENTIFY PACKET DEVICE and INQUIRY', async () => {
    const { ch, qts } = await cdRig();
    expect([await ch.reg(2), await ch.reg(3), await ch.reg(4), await ch.reg(5)]).toEqual([1, 1, 0x14, 0xeb]);
    await ch.setTaskFile({ lba: 0 });
    await ch.command(0xec);
    expect(await ch.waitNotBusy() & ATA_ST.ERR).toBeTruthy();
    expect(await ch.error()).toBe(0x04);
    expect([await ch.reg(4), await ch.reg(5)]).toEqual([0x14, 0xeb]);
    expect(qts.getIrq(15)).toBe(true);
    expect(qts.getIrq(14)).toBe(false);
    const id = await ch.identify(0xa1);
    expect(word(id, 0)).toBe(0x85c0);
    expect(ataString(id, 27, 20)).toBe('Spindle CD'.padEnd(40));
    expect(word(id, 49) & 0x0300).toBe(0x0300);
    expect(id.reduce((a, b) => a + b, 0) % 256).toBe(0);
    const inq = await ch.packet([0x12, 0, 0, 0, 36]);
    expect(inq.status & ATA_ST.ERR).toBe(0);
    expect(inq.reason & 3).toBe(3); // IO and CoD: command done
    expect(inq.data.length).toBe(36);
    expect(inq.data[0]).toBe(0x05);
    expect(inq.data[1]).toBe(0x80);
    expect(Buffer.from(inq.data.subarray(8, 16)).toString()).toBe('SPINDLE ');
    expect(Buffer.from(inq.data.subarray(16, 32)).toString()).toBe('Spindle CD'.padEnd(16));
    expect((await ch.packet([0x12, 0, 0, 0, 5])).data.length).toBe(5); // allocation length
  });
});

describe('ATAPI: reads', () => {
  it('TEST UNIT READY, READ CAPACITY, and READ(10) by PIO in byte-count-limited blocks', async () => {
    const { ch, path } = await cdRig();
    const iso = readFileSync(path!);
    expect((await ch.packet([0x00])).status & ATA_ST.ERR).toBe(0);
    const cap = await ch.packet([0x25]);
    expect([be32(cap.data, 0), be32(cap.data, 4)]).toEqual([SECTORS - 1, 2048]);
    const res = await ch.packet([0x28, 0, 0, 0, 0, 3, 0, 0, 5], { bcl: 4096 });
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(Buffer.from(res.data).equals(iso.subarray(3 * 2048, 8 * 2048))).toBe(true);
    // READ(12) with an odd byte count limit: the device rounds it down to even.
    const r12 = await ch.packet([0xa8, 0, 0, 0, 0, 10, 0, 0, 0, 1], { bcl: 1001 });
    expect(Buffer.from(r12.data).equals(iso.subarray(10 * 2048, 11 * 2048))).toBe(true);
    await expectSense(ch, [0x28, 0, 0, 0, 0, SECTORS - 1, 0, 0, 2], 5, 0x21, 0);
    expect((await ch.packet([0x28, 0, 0, 0, 0, SECTORS - 1, 0, 0, 1])).data.length).toBe(2048);
  });

  it('counts DRQ blocks of the byte count limit', async () => {
    const { ch, qts } = await cdRig();
    await ch.setTaskFile({ lba: 1000 << 8, device: 0 });
    await ch.command(0xa0);
    await ch.waitNotBusy();
    await ch.writeData(Uint8Array.of(0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0));
    const sizes: number[] = [];
    for (;;) {
      const s = await ch.waitNotBusy();
      if (!(s & ATA_ST.DRQ)) break;
      expect(qts.getIrq(15)).toBe(true);
      await ch.status();
      expect((await ch.reg(2)) & 3).toBe(2); // IO, data
      const n = (await ch.reg(4)) | ((await ch.reg(5)) << 8);
      sizes.push(n);
      await ch.readData(n);
    }
    expect(sizes).toEqual([1000, 1000, 48]);
  });

  it('READ(12) and INQUIRY by DMA into two PRDs', async () => {
    const { ch, path, r, qts } = await cdRig();
    const iso = readFileSync(path!);
    const a = r.alloc.alloc(8192);
    const b = r.alloc.alloc(8192);
    const res = await ch.packet([0xa8, 0, 0, 0, 0, 2, 0, 0, 0, 3], { dma: [{ addr: a, len: 2048 + 100 }, { addr: b, len: 4096 - 100 }] });
    expect(res.status & ATA_ST.ERR).toBe(0);
    expect(Buffer.from(res.data).equals(iso.subarray(2 * 2048, 5 * 2048))).toBe(true);
    expect(qts.getIrq(15)).toBe(false);
    const inq = await ch.packet([0x12, 0, 0, 0, 36], { dma: [{ addr: a, len: 36 }] });
    expect(inq.data[0]).toBe(0x05);
    expect(await ch.bmStatus() & (BM.INTR | BM.ERROR)).toBe(0);
  });
});

describe('ATAPI: TOC, mode pages, configuration', () => {
  it('READ TOC formats 0 (LBA and MSF) and 1', async () => {
    const { ch } = await cdRig();
    let t = (await ch.packet([0x43, 0, 0, 0, 0, 0, 0, 0, 100])).data;
    expect(t.length).toBe(20);
    expect([t[0], t[1], t[2], t[3]]).toEqual([0, 18, 1, 1]);
    expect([t[5], t[6], be32(t, 8)]).toEqual([0x14, 1, 0]);
    expect([t[13], t[14], be32(t, 16)]).toEqual([0x14, 0xaa, SECTORS]);
    t = (await ch.packet([0x43, 2, 0, 0, 0, 0, 0, 0, 100])).data;
    expect([...t.subarray(8, 12)]).toEqual([0, 0, 2, 0]);
    expect([...t.subarray(16, 20)]).toEqual([0, 0, 2, (SECTORS + 150) % 75]);
    t = (await ch.packet([0x43, 0, 0, 0, 0, 0, 0xaa, 0, 100])).data;
    expect(t.length).toBe(12);
    t = (await ch.packet([0x43, 0, 1, 0, 0, 0, 0, 0, 12])).data;
    expect([t[1], t[2], t[3], t[5], t[6], be32(t, 8)]).toEqual([10, 1, 1, 0x14, 1, 0]);
    await expectSense(ch, [0x43, 0, 0, 0, 0, 0, 2, 0, 100], 5, 0x24, 0);
    await expectSense(ch, [0x43, 0, 5, 0, 0, 0, 0, 0, 100], 5, 0x24, 0);
  });

  it('MODE SENSE(10) shows the lock; GET CONFIGURATION reports the CD-ROM profile; unknown opcodes are refused', async () => {
    const { ch } = await cdRig();
    let m = (await ch.packet([0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 64])).data;
    expect(m.length).toBe(28);
    expect((m[0]! << 8) | m[1]!).toBe(26);
    expect(m[8]).toBe(0x2a);
    expect(m[14]! & 0x02).toBe(0);
    expect((await ch.packet([0x1e, 0, 0, 0, 1])).status & ATA_ST.ERR).toBe(0);
    m = (await ch.packet([0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 64])).data;
    expect(m[14]! & 0x02).toBe(0x02);
    expect((await ch.packet([0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 64])).data.length).toBe(36);
    await expectSense(ch, [0x5a, 0, 0x05, 0, 0, 0, 0, 0, 64], 5, 0x24, 0);
    const g = (await ch.packet([0x46, 0, 0, 0, 0, 0, 0, 1, 0])).data;
    expect(be32(g, 0)).toBe(g.length - 4);
    expect((g[6]! << 8) | g[7]!).toBe(0x0008);
    expect([g[8], g[9], g[12], g[13], g[14]]).toEqual([0, 0, 0, 8, 1]); // profile list: CD-ROM, current
    const one = (await ch.packet([0x46, 2, 0, 1, 0, 0, 0, 1, 0])).data;
    expect(one.length).toBe(8 + 12);
    expect([one[8], one[9]]).toEqual([0, 1]);
    await expectSense(ch, [0xff], 5, 0x20, 0);
  });
});

describe('ATAPI: tray, lock, media events and media change', () => {
  it('PREVENT blocks eject; ALLOW lets START STOP UNIT open and close the tray', async () => {
    const { ch, be } = await cdRig();
    const ops = be.ops!;
    expect((await ch.packet([0x1e, 0, 0, 0, 1])).status & ATA_ST.ERR).toBe(0);
    expect(ops.isMediumLocked!()).toBe(true);
    await expectSense(ch, [0x1b, 0, 0, 0, 0x02], 5, 0x53, 0x02);
    expect(ops.isTrayOpen!()).toBe(false);
    await ch.packet([0x1e, 0, 0, 0, 0]);
    expect(ops.isMediumLocked!()).toBe(false);
    expect((await ch.packet([0x1b, 0, 0, 0, 0x02])).status & ATA_ST.ERR).toBe(0);
    expect(ops.isTrayOpen!()).toBe(true);
    await expectSense(ch, [0x00], 2, 0x3a, 0x02);
    let e = (await ch.packet([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).data;
    expect(e[5]! & 3).toBe(1); // tray open, no medium readable
    expect((await ch.packet([0x1b, 0, 0, 0, 0x03])).status & ATA_ST.ERR).toBe(0);
    expect(ops.isTrayOpen!()).toBe(false);
    e = (await ch.packet([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).data;
    expect([e[2], e[4], e[5]]).toEqual([0x04, 2, 2]); // media class, new media, present
    e = (await ch.packet([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).data;
    expect(e[4]).toBe(0); // reported once
    expect((await ch.packet([0x00])).status & ATA_ST.ERR).toBe(0);
    await expectSense(ch, [0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8], 5, 0x24, 0); // not polled
  });

  it('an eject request on a locked tray becomes a media event; force unlocks', async () => {
    const { ch, be } = await cdRig();
    await ch.packet([0x1e, 0, 0, 0, 1]);
    be.ops!.ejectRequest!(false);
    expect(be.ops!.isMediumLocked!()).toBe(true);
    const e = (await ch.packet([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).data;
    expect([e[4], e[5]]).toEqual([1, 2]);
    be.ops!.ejectRequest!(true);
    expect(be.ops!.isMediumLocked!()).toBe(false);
  });

  it('media removal and insertion through the backend: NOT READY, then UNIT ATTENTION once, then the new data', async () => {
    const { ch, be } = await cdRig();
    expect((await ch.packet([0x00])).status & ATA_ST.ERR).toBe(0);
    await be.removeNode();
    expect(be.ops!.isTrayOpen!()).toBe(true);
    let e = (await ch.packet([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).data;
    expect([e[4], e[5]]).toEqual([3, 1]);
    await expectSense(ch, [0x25], 2, 0x3a, 0x02);
    const g = (await ch.packet([0x46, 0, 0, 0, 0, 0, 0, 1, 0])).data;
    expect((g[6]! << 8) | g[7]!).toBe(0); // no current profile
    const path2 = imageFile(dir, pattern(8 * 2048, 77));
    const node = await rawNode(path2, true);
    be.insertNode(node);
    unref(node);
    expect(be.ops!.isTrayOpen!()).toBe(false);
    // INQUIRY passes a pending unit attention by; TEST UNIT READY reports it once.
    expect((await ch.packet([0x12, 0, 0, 0, 36])).status & ATA_ST.ERR).toBe(0);
    await expectSense(ch, [0x00], 6, 0x28, 0);
    expect((await ch.packet([0x00])).status & ATA_ST.ERR).toBe(0);
    e = (await ch.packet([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).data;
    expect([e[4], e[5]]).toEqual([2, 2]);
    const cap = await ch.packet([0x25]);
    expect(be32(cap.data, 0)).toBe(7);
    const d = await ch.packet([0x28, 0, 0, 0, 0, 1, 0, 0, 1]);
    expect(Buffer.from(d.data).equals(readFileSync(path2).subarray(2048, 4096))).toBe(true);
  });

  it('REQUEST SENSE reports a pending unit attention itself and clears it', async () => {
    const { ch, be } = await cdRig();
    be.ops!.changeMedia!(true);
    expect(await ch.requestSense()).toEqual([6, 0x28, 0]);
    expect((await ch.packet([0x00])).status & ATA_ST.ERR).toBe(0);
    expect(await ch.requestSense()).toEqual([0, 0, 0]);
  });

  it('an empty drive is NOT READY with the tray closed (medium not present)', async () => {
    const { ch } = await cdRig(true);
    await expectSense(ch, [0x00], 2, 0x3a, 0x01);
    await expectSense(ch, [0x28, 0, 0, 0, 0, 0, 0, 0, 1], 2, 0x3a, 0x01);
    const inq = await ch.packet([0x12, 0, 0, 0, 36]);
    expect(inq.status & ATA_ST.ERR).toBe(0);
  });

  it('DEVICE RESET restores the signature; SRST leaves an ATAPI status of 0', async () => {
    const { ch } = await cdRig();
    await ch.setTaskFile({ lba: 0x777777, count: 5 });
    await ch.command(0x08);
    expect([await ch.reg(2), await ch.reg(3), await ch.reg(4), await ch.reg(5)]).toEqual([1, 1, 0x14, 0xeb]);
    await ch.setControl(0x04);
    await ch.setControl(0x00);
    expect(await ch.status()).toBe(0);
    expect(await ch.error()).toBe(1);
  });
});
