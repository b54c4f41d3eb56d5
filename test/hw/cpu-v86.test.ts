// The guest CPU adapter: v86 (pinned) runs Spindle's own guest program (roms/, built with
// gcc -m32) on Spindle's machine, whose RAM is v86's memory: the program finds the disks over
// PCI, assigns BARs, routes PIRQs, and checks IDE by PIO and bus-master DMA (with the IRQ and
// the JIT dropping code that DMA replaced) and virtio-blk (INTx, ISR). A v86 whose internals
// moved fails here, naming what moved.
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkInternals, createGuest } from '../../hw/cpu/v86.js';
import { VirtioBlkPci } from '../../hw/block/virtio-blk.js';
import { IdeDrive, PiixIde } from '../../hw/ide/piix.js';
import { PcMachine } from '../../hw/pc/pc.js';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import { scratchDir } from '../helpers/tmp.js';
// @ts-expect-error: a plain .mjs build script, no types
import { buildGuest } from '../../scripts/build-roms.mjs';

const dir = scratchDir('spindle-v86-');
const MiB = 1 << 20;

async function backend(name: string, o: Record<string, unknown>): Promise<BlockBackend> {
  const node = await openNode(o as never);
  const be = createBackend({ name }, node);
  unref(node);
  return be;
}

/** Runs roms/guest on a machine built on the guest's RAM; resolves with COM1's text at the verdict. */
async function runGuestProgram(plug: (m: PcMachine) => void, memorySize = 32 * MiB): Promise<{ out: string; m: PcMachine }> {
  let out = '';
  let done!: () => void;
  const verdict = new Promise<void>((r) => (done = r));
  const g = await createGuest({
    memorySize,
    multiboot: readFileSync((buildGuest as () => string)()),
    serial: (b) => {
      out += String.fromCharCode(b);
      if (/spindle guest: (PASS|FAIL.*)\n$/.test(out)) done();
    },
  });
  const m = new PcMachine({ ramSize: memorySize, ram: g.memory, msi: false, smm: false });
  try {
    plug(m);
    g.attach(m);
    g.run();
    await verdict;
  } finally {
    g.stop();
  }
  return { out, m };
}

describe('v86 CPU adapter', () => {
  it("runs the guest program on Spindle's IDE (PIO, DMA) and virtio-blk, with data in the images", async () => {
    const base = join(dir, 'base.raw');
    const b = Buffer.alloc(8 * MiB);
    b.write('SPINDLE-BASE', 0, 'latin1');
    writeFileSync(base, b);
    const overlay = join(dir, 'hd.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', overlay]);
    const vdisk = join(dir, 'vd.raw');
    writeFileSync(vdisk, Buffer.alloc(4 * MiB));
    const hd = await backend('hd0', { driver: 'qcow2', file: { driver: 'file', filename: overlay } });
    const vd = await backend('vd0', { driver: 'raw', file: { driver: 'file', filename: vdisk } });
    const { out, m } = await runGuestProgram((m) => {
      const ide = new PiixIde({ id: 'ide', bus: m.chipset.bus, irqs: m.ioapic });
      m.addDevice(ide);
      ide.attach(0, 0, new IdeDrive({ id: 'hd0', kind: 'hd', drive: hd, model: 'SPINDLE V86 DISK' }));
      ide.attach(1, 0, new IdeDrive({ id: 'cd0', kind: 'cd', drive: null }));
      m.addDevice(new VirtioBlkPci({ id: 'vblk', drive: vd, bus: m.chipset.bus, serial: 'SPINDLE-VD0' }));
    });
    try {
      expect(out).toContain('spindle guest: pci 00:01.1 8086:7010 class 0101\n');
      expect(out).toContain('spindle guest: ide0 model SPINDLE V86 DISK, 16384 sectors\n');
      expect(out).toContain('spindle guest: ide0 base ok\n'); // read through the qcow2 overlay's backing file
      expect(out).toContain('spindle guest: ide0 pio pattern ok\n');
      expect(out).toContain('spindle guest: ide0 dma 16 sectors ok (IRQ 14), irq ok\n');
      expect(out).toContain('spindle guest: ide0 dma code ok\n');
      expect(out).toMatch(/spindle guest: ide2 atapi model .* \(skipped\)\n/);
      expect(out).toContain('spindle guest: virtio 00:02.0 IRQ 10, irq ok, line lowered by ISR read\n');
      expect(out).toContain('spindle guest: virtio 00:02.0 serial "SPINDLE-VD0"\n');
      expect(out).toContain('spindle guest: virtio 00:02.0 capacity 8192 sectors ok\n');
      expect(out.endsWith('spindle guest: disks checked: 2\nspindle guest: PASS\n')).toBe(true);
    } finally {
      for (const d of m.allDevices().reverse()) m.removeDevice(d.id);
      hd.unref();
      vd.unref();
      await settleCloses();
    }
    // The overlay is consistent and holds what the guest wrote; the base is untouched.
    execFileSync('qemu-img', ['check', '-q', overlay]);
    const raw = join(dir, 'hd.raw');
    execFileSync('qemu-img', ['convert', '-O', 'raw', overlay, raw]);
    const disk = readFileSync(raw);
    for (let lba = 1; lba <= 8; lba++) {
      for (let i = 0; i < 256; i++) expect(disk.readUInt16LE(lba * 512 + 2 * i)).toBe((lba * 0x101 + i * 7) & 0xffff);
    }
    expect(disk.readUInt32LE(16 * 512)).toBe((0xd0000000 ^ 0x01010101 ^ (16 << 16)) >>> 0);
    expect(readFileSync(base).subarray(12).every((x) => x === 0)).toBe(true);
    // virtio-blk's pattern is at sector 32 of its raw image.
    expect(readFileSync(vdisk).subarray(32 * 512, 48 * 512).some((x) => x !== 0)).toBe(true);
  });

  it("gives v86's ports back when Spindle unmaps a region", async () => {
    const g = await createGuest({ memorySize: 2 * MiB });
    try {
      const m = new PcMachine({ ramSize: 2 * MiB, ram: g.memory, msi: false, smm: false });
      g.attach(m);
      const before = g.cpu.io.ports[0x3000];
      const region = { name: 'probe', read: () => 0x5a, write: () => {} };
      m.io.map(0x3000, 4, region);
      expect(g.cpu.io.ports[0x3000]).not.toBe(before);
      const e = g.cpu.io.ports[0x3000]!;
      expect(e.read8.call(e.device, 0x3000)).toBe(0x5a);
      m.io.unmap(0x3000, region);
      expect(g.cpu.io.ports[0x3000]).toBe(before);
      // PCI config space is Spindle's: the host bridge answers at 0xCF8/0xCFC.
      const cf8 = g.cpu.io.ports[0xcf8]!;
      const cfc = g.cpu.io.ports[0xcfc]!;
      cf8.write32.call(cf8.device, 0x80000000 | (1 << 11) | (3 << 8));
      expect(cfc.read32.call(cfc.device, 0xcfc) >>> 0).toBe(0x71138086); // 00:01.3 PIIX4 PM
    } finally {
      g.stop();
    }
  });

  it("keeps the machine's view of guest RAM when v86's wasm memory grows", async () => {
    const g = await createGuest({ memorySize: 2 * MiB });
    try {
      const m = new PcMachine({ ramSize: 2 * MiB, ram: g.memory, msi: false, smm: false });
      const view = m.ram.bytes;
      const old = new Uint8Array(g.cpu.wasm_memory.buffer);
      g.cpu.wasm_memory.grow(16); // as v86's JIT does while a guest runs
      expect(old.byteLength).toBe(0); // an ordinary view is detached now
      expect(m.ram.bytes).toBe(view); // Spindle's is not, and is the same memory:
      const fresh = new Uint8Array(g.cpu.wasm_memory.buffer, g.cpu.mem8.byteOffset, 2 * MiB);
      fresh[4096] = 0xa5;
      expect(view[4096]).toBe(0xa5);
      view[8191] = 0x5a;
      expect(fresh[8191]).toBe(0x5a);
    } finally {
      g.stop();
    }
  });

  it('pause holds the CPU (no guest output across event-loop turns) and resume lets it finish', async () => {
    let out = '';
    let done!: () => void;
    const verdict = new Promise<void>((r) => (done = r));
    const g = await createGuest({
      memorySize: 32 * MiB,
      multiboot: readFileSync((buildGuest as () => string)()),
      serial: (b) => {
        out += String.fromCharCode(b);
        if (/spindle guest: (PASS|FAIL.*)\n$/.test(out)) done();
      },
    });
    try {
      const m = new PcMachine({ ramSize: 32 * MiB, ram: g.memory, msi: false, smm: false });
      g.attach(m);
      g.run();
      g.pause();
      const held = out;
      for (let i = 0; i < 50; i++) await new Promise<void>((r) => setImmediate(r));
      expect(out).toBe(held); // nothing ran while paused
      expect(out).not.toMatch(/PASS|FAIL/);
      g.resume();
      await verdict;
      expect(out).toMatch(/spindle guest: (PASS|FAIL no disk found)\n$/); // it ran on to its verdict (no disks here)
    } finally {
      g.stop();
    }
  });

  it('names every internal that moved', () => {
    const fake = { v86: { cpu: { io: { ports: [] }, mem8: new Uint8Array(1) } } };
    expect(() => checkInternals(fake)).toThrow(
      /v86 internals moved: v86\.cpu\.io\.mmap_register \(want function, found undefined\), v86\.cpu\.mmap_write16 .*v86\.cpu\.jit_dirty_cache \(want function, found undefined\); .*hw\/cpu\/v86\.ts/,
    );
  });
});
