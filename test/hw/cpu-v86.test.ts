// The guest CPU adapter: v86 (pinned) boots Spindle's own guest program, built from roms/
// with gcc -m32, by multiboot with no firmware, and the program's serial report arrives. A
// v86 whose internals moved fails here, naming what moved.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { checkInternals, startGuest } from '../../hw/cpu/v86.js';
// @ts-expect-error: a plain .mjs build script, no types
import { buildGuest } from '../../scripts/build-roms.mjs';

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
      expect(out).toBe('spindle guest: booted\nspindle guest: PASS\n');
      expect(g.cpu.mem8.length).toBe(32 << 20);
    } finally {
      g.stop();
    }
  });

  it('names every internal that moved', () => {
    const fake = { v86: { cpu: { io: { register_read() {}, register_write() {} }, devices: {}, mem8: new Uint8Array(1) } } };
    expect(() => checkInternals(fake)).toThrow(/v86 internals moved: v86\.cpu\.io\.mmap_register \(want function, found undefined\), v86\.cpu\.devices\.pci\.register_device .*v86\.cpu\.write_blob/);
  });
});
