// The guest CPU adapter: v86 (pinned) boots Spindle's own guest program, built from roms/
// with gcc -m32, by multiboot with no firmware, and the program's serial report arrives. A
// v86 whose internals moved fails here, naming what moved.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { bridgeIrqs, bridgePorts, checkInternals, startGuest } from '../../hw/cpu/v86.js';
import { IdeDrive, PiixIde } from '../../hw/ide/piix.js';
import { PcMachine } from '../../hw/pc/pc.js';
import { createBackend } from '../../src/backend/backend.js';
import { openNode, unref } from '../../src/block/graph.js';
import { scratchDir } from '../helpers/tmp.js';
// @ts-expect-error: a plain .mjs build script, no types
import { buildGuest } from '../../scripts/build-roms.mjs';

const dir = scratchDir('spindle-v86-');

describe('v86 CPU adapter', () => {
  it('boots roms/guest by multiboot and reads its report from COM1', async () => {
    const elf = readFileSync((buildGuest as () => string)());
    let out = '';
    let done!: () => void;
    const passed = new Promise<void>((r) => (done = r));
    const g = await startGuest({
      memorySize: 32 << 20,
      multiboot: elf,
      serial: (b) => {
        out += String.fromCharCode(b);
        if (out.includes('PASS\n')) done();
      },
    });
    try {
      await passed;
      // v86 without a disk of its own: nothing answers on the primary IDE channel.
      expect(out).toBe('spindle guest: booted\nspindle guest: ide0 none\nspindle guest: PASS\n');
      expect(g.cpu.mem8.length).toBe(32 << 20);
    } finally {
      g.stop();
    }
  });

  it("runs the guest's port I/O on Spindle's devices: IDENTIFY reaches Spindle's IDE disk", async () => {
    const path = join(dir, 'hd.img');
    writeFileSync(path, Buffer.alloc(1 << 20));
    const m = new PcMachine({ ramSize: 32 << 20 });
    const ide = new PiixIde({ id: 'ide', bus: m.chipset.bus, irqs: m.ioapic });
    m.addDevice(ide);
    const node = await openNode({ driver: 'raw', file: { driver: 'file', filename: path } });
    const be = createBackend({ name: 'hd0' }, node);
    unref(node);
    ide.attach(0, 0, new IdeDrive({ id: 'hd0', kind: 'hd', drive: be, model: 'SPINDLE V86 DISK' }));
    let out = '';
    let done!: () => void;
    const passed = new Promise<void>((r) => (done = r));
    const g = await startGuest({
      memorySize: 32 << 20,
      multiboot: readFileSync((buildGuest as () => string)()),
      serial: (b) => {
        out += String.fromCharCode(b);
        if (out.includes('PASS\n')) done();
      },
      beforeRun: (cpu) => {
        bridgePorts(cpu, m.io, 0x1f0, 8);
        bridgePorts(cpu, m.io, 0x3f6, 1);
        bridgeIrqs(cpu, m);
      },
    });
    try {
      await passed;
      expect(out).toContain('spindle guest: ide0 model SPINDLE V86 DISK\n');
      expect(out).toContain('spindle guest: ide0 pio pattern ok\nspindle guest: PASS\n');
      // What the guest wrote by PIO is in the image file: sector n holds n*0x101 + 7i.
      const file = readFileSync(path);
      for (let lba = 1; lba <= 8; lba++) {
        for (let i = 0; i < 256; i++) expect(file.readUInt16LE(lba * 512 + 2 * i)).toBe((lba * 0x101 + i * 7) & 0xffff);
      }
      expect(file.subarray(0, 512).every((b) => b === 0)).toBe(true);
    } finally {
      g.stop();
      m.removeDevice('ide');
      be.unref();
    }
  });

  it('names every internal that moved', () => {
    const fake = { v86: { cpu: { io: { register_read() {}, register_write() {} }, devices: {}, mem8: new Uint8Array(1) } } };
    expect(() => checkInternals(fake)).toThrow(/v86 internals moved: v86\.cpu\.io\.mmap_register \(want function, found undefined\), v86\.cpu\.devices\.pci\.register_device .*v86\.cpu\.write_blob/);
  });
});
