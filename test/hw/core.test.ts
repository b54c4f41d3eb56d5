// The machine core: RAM, port-I/O and MMIO dispatch, interrupt lines, the virtual clock and
// the device lifecycle, driven as qtest drives them.
import { describe, expect, it } from 'vitest';
import { type AccessSize, type IoRegion } from '../../hw/core/address-space.js';
import { HwError } from '../../hw/core/error.js';
import { IrqLine } from '../../hw/core/irq.js';
import { Machine, type Device } from '../../hw/core/machine.js';

/** A bank of 32-bit registers that records every access. */
function regs(name: string, count: number): IoRegion & { vals: Uint32Array; log: string[] } {
  const vals = new Uint32Array(count);
  const log: string[] = [];
  return {
    name, vals, log,
    read(off: number, size: AccessSize) {
      log.push(`r${size}@${off}`);
      const v = vals[off >> 2]! >>> ((off & 3) * 8);
      return size === 4 ? v : v & ((1 << (8 * size)) - 1);
    },
    write(off: number, size: AccessSize, value: number) {
      log.push(`w${size}@${off}=${value.toString(16)}`);
      const shift = (off & 3) * 8;
      const mask = size === 4 ? 0xffffffff : ((1 << (8 * size)) - 1) << shift;
      vals[off >> 2] = ((vals[off >> 2]! & ~mask) | ((value << shift) & mask)) >>> 0;
    },
  };
}

describe('machine core', () => {
  it('RAM reads back what was written and refuses accesses outside it', () => {
    const m = new Machine({ ramSize: 1 << 20 });
    m.memWrite(0x1000, Uint8Array.of(1, 2, 3));
    expect([...m.memRead(0xfff, 5)]).toEqual([0, 1, 2, 3, 0]);
    expect(() => m.ram.view((1 << 20) - 2, 4)).toThrow(/outside RAM/);
    expect(() => new Machine({ ramSize: 1000 })).toThrow(HwError);
  });

  it('dispatches port I/O to the region that holds it; unassigned ports read all ones', () => {
    const m = new Machine({ ramSize: 1 << 20 });
    const r = regs('dev-a', 4);
    m.io.map(0x1f0, 16, r);
    m.portWrite(0x1f4, 4, 0xdeadbeef);
    expect(m.portRead(0x1f4, 4)).toBe(0xdeadbeef);
    expect(m.portRead(0x1f5, 1)).toBe(0xbe);
    expect(r.log).toEqual(['w4@4=deadbeef', 'r4@4', 'r1@5']);
    expect(m.portRead(0x300, 1)).toBe(0xff);
    expect(m.portRead(0x300, 2)).toBe(0xffff);
    expect(m.portRead(0x300, 4)).toBe(0xffffffff);
    m.portWrite(0x300, 4, 1); // ignored
    // An access that runs off the end of a region is unassigned too.
    expect(m.portRead(0x1fe, 4)).toBe(0xffffffff);
    expect(() => m.io.map(0x1f8, 16, regs('dev-b', 4))).toThrow(/dev-b: port I\/O range 0x1f8\+16 overlaps dev-a at 0x1f0\+16/);
    expect(() => m.io.map(0xfff8, 16, regs('dev-c', 4))).toThrow(/out of bounds/);
    m.io.unmap(0x1f0, r);
    expect(m.portRead(0x1f4, 4)).toBe(0xffffffff);
  });

  it('sends MMIO register accesses as one access (64-bit as two halves) and others byte by byte', () => {
    const m = new Machine({ ramSize: 1 << 20 });
    const r = regs('bar0', 4);
    m.mmio.map(0xfebf0000, 16, r);
    m.memWrite(0xfebf0000, Uint8Array.of(0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88));
    expect(r.log).toEqual(['w4@0=44332211', 'w4@4=88776655']);
    expect([...m.memRead(0xfebf0004, 2)]).toEqual([0x55, 0x66]);
    r.log.length = 0;
    expect([...m.memRead(0xfebf0001, 3)]).toEqual([0x22, 0x33, 0x44]);
    expect(r.log).toEqual(['r1@1', 'r1@2', 'r1@3']);
    expect([...m.memRead(0xfebf000e, 4)]).toEqual([0, 0, 0xff, 0xff]); // runs into unassigned space
  });

  it('wires output lines to input lines, and lets a test intercept either side', () => {
    const m = new Machine({ ramSize: 1 << 20 });
    const seen: string[] = [];
    const pic = m.addGpioIn('ioapic', 'unnamed-gpio-in', 24, (n, l) => seen.push(`${n}:${l}`));
    const irq = new IrqLine('dev irq');
    irq.connect(pic, 11);
    irq.raise();
    irq.raise(); // same level: nothing new
    irq.lower();
    irq.pulse();
    expect(seen).toEqual(['11:true', '11:false', '11:true', '11:false']);
    const got: string[] = [];
    m.interceptIn('/machine/ioapic', (n, l) => got.push(`${n}:${l}`));
    irq.raise();
    expect(got).toEqual(['11:true']);
    expect(seen).toHaveLength(4);
    expect(pic.level(11)).toBe(true);
    expect(() => m.interceptIn('ioapic', () => undefined)).toThrow(/IRQ intercept already enabled/);
    expect(() => m.interceptIn('nosuch', () => undefined)).toThrow(/Cannot find 'nosuch'/);
    m.setIrqIn('ioapic', 'unnamed-gpio-in', 3, 1);
    expect(got).toEqual(['11:true', '3:true']);
    expect(() => m.setIrqIn('ioapic', 'other', 3, 1)).toThrow(/No input lines 'other'/);
    expect(() => pic.set(24, true)).toThrow(/no input line 24/);
    const out = new IrqLine('out');
    m.addGpioOut('dev0', 'irq', [out]);
    const outs: string[] = [];
    m.interceptOut('dev0', 'irq', (n, l) => outs.push(`${n}:${l}`));
    out.raise();
    expect(outs).toEqual(['0:true']);
    expect(() => m.interceptOut('dev0', 'other', () => undefined)).toThrow(/Cannot find output lines 'other'/);
  });

  it('runs timers in deadline order as the clock steps, and clock_step without an argument goes to the next deadline', () => {
    const m = new Machine({ ramSize: 1 << 20 });
    const fired: string[] = [];
    m.clock.after(100, () => fired.push(`a@${m.clock.now()}`));
    m.clock.after(50, () => {
      fired.push(`b@${m.clock.now()}`);
      m.clock.after(10, () => fired.push(`c@${m.clock.now()}`)); // set from a timer: same step
    });
    const dead = m.clock.after(70, () => fired.push('cancelled'));
    m.clock.after(100, () => fired.push(`d@${m.clock.now()}`)); // same deadline: set order
    dead.cancel();
    expect(m.clockStep()).toBe(50);
    expect(fired).toEqual(['b@50']);
    expect(m.clockStep(100)).toBe(150);
    expect(fired).toEqual(['b@50', 'c@60', 'a@100', 'd@100']);
    expect(m.clockStep()).toBe(150); // nothing pending: stays
    expect(m.clockSet(10)).toBe(150); // never backwards
    expect(m.clockSet(1000)).toBe(1000);
  });

  it('realizes devices with unique ids; a failed realize leaves nothing behind; removal unrealizes', () => {
    const m = new Machine({ ramSize: 1 << 20 });
    const log: string[] = [];
    const dev = (id: string, fail = false): Device => {
      const r = regs(id, 1);
      return {
        id, type: 'test-dev',
        realize(mm) {
          if (fail) throw new HwError('EINVAL', `${id}: Property 'x' is required`);
          mm.io.map(0x500, 4, r);
          log.push(`realize ${id}`);
        },
        unrealize(mm) {
          mm.io.unmap(0x500, r);
          log.push(`unrealize ${id}`);
        },
      };
    };
    expect(() => m.addDevice(dev('bad', true))).toThrow(/Property 'x' is required/);
    expect(m.device('bad')).toBeUndefined();
    m.addDevice(dev('d0'));
    expect(() => m.addDevice(dev('d0'))).toThrow(/Duplicate device ID 'd0'/);
    expect(() => m.addDevice(dev('0bad'))).toThrow(/identifier/);
    m.portWrite(0x500, 4, 7);
    expect(m.portRead(0x500, 4)).toBe(7);
    m.removeDevice('d0');
    expect(m.portRead(0x500, 4)).toBe(0xffffffff);
    expect(() => m.removeDevice('d0')).toThrow(/Device 'd0' not found/);
    expect(log).toEqual(['realize d0', 'unrealize d0']);
  });
});
