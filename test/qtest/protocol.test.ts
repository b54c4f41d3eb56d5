import { describe, expect, it } from 'vitest';
import {
  ALREADY_INTERCEPTED,
  createSession,
  handleLine,
  MAX_TRANSFER,
  parseCommand,
  type QtestSession,
} from '../../hw/qtest/protocol.js';
import { QtestError, type PortSize, type QtestTarget } from '../../hw/qtest/target.js';

type Cb = (line: number, level: boolean) => void;

/**
 * A tiny machine: 1 MiB of RAM (unassigned above, reads 0xff), port registers, a virtual clock
 * with one timer (the "rtc" raising its output line 8 at 1 ms), and three devices whose lines
 * can be intercepted. Port 0x20 is a "pic": writing 0x80|N raises its output N, N lowers it.
 */
class FakeTarget implements QtestTarget {
  readonly ram = new Uint8Array(1 << 20);
  readonly ports = new Map<number, number>();
  readonly inLevels = new Map<string, number>();
  readonly portWrites: [number, PortSize, number][] = [];
  now = 0;
  private timers = [{ at: 1_000_000, fire: () => this.raiseOut('rtc', 8, true) }];
  private readonly inCbs = new Map<string, Cb>();
  private readonly outCbs = new Map<string, Cb>();

  private device(path: string): string {
    const name = path.replace(/^\/machine\//, '');
    if (!['ioapic', 'pic', 'rtc'].includes(name)) throw new QtestError(`No device at '${path}'`);
    return name;
  }
  raiseOut(dev: string, line: number, level: boolean): void {
    this.outCbs.get(dev)?.(line, level);
  }

  portRead(addr: number, size: PortSize): number {
    if (addr === 0xdead) throw new Error('wires\ncrossed');
    return this.ports.get(addr) ?? 2 ** (size * 8) - 1;
  }
  portWrite(addr: number, size: PortSize, value: number): void {
    if (addr === 0xbad) throw new QtestError('port 0xbad is reserved');
    this.portWrites.push([addr, size, value]);
    if (addr === 0x20) this.raiseOut('pic', value & 0x7f, (value & 0x80) !== 0);
    else this.ports.set(addr, value);
  }
  memRead(addr: number, len: number): Uint8Array {
    if (addr === 0xfee00000) throw 'lapic on fire'; // a non-Error throw
    const out = new Uint8Array(len).fill(0xff);
    if (addr < this.ram.length) out.set(this.ram.subarray(addr, Math.min(addr + len, this.ram.length)));
    return out;
  }
  memWrite(addr: number, data: Uint8Array): void {
    if (addr >= this.ram.length) return;
    this.ram.set(data.subarray(0, this.ram.length - addr), addr);
  }
  clockStep(ns?: number): number {
    return this.clockSet(ns === undefined ? (this.timers[0]?.at ?? this.now) : this.now + ns);
  }
  clockSet(ns: number): number {
    this.now = Math.max(this.now, ns);
    const due = this.timers.filter((t) => t.at <= this.now);
    this.timers = this.timers.filter((t) => t.at > this.now);
    for (const t of due) t.fire();
    return this.now;
  }
  interceptIn(path: string, cb: Cb): void {
    this.inCbs.set(this.device(path), cb);
  }
  interceptOut(path: string, name: string | undefined, cb: Cb): void {
    const dev = this.device(path);
    if (name !== undefined && name !== 'intr') throw new QtestError(`${dev} has no output '${name}'`);
    this.outCbs.set(dev, cb);
  }
  setIrqIn(path: string, name: string, line: number, level: number): void {
    const dev = this.device(path);
    if (name !== 'unnamed-gpio-in') throw new QtestError(`${dev} has no input group '${name}'`);
    const cb = this.inCbs.get(dev);
    if (cb) cb(line, level !== 0);
    else this.inLevels.set(`${dev}:${line}`, level);
  }
}

/** A target, a session, and everything the session sent unsolicited, interleaved with replies. */
function setup(): { target: FakeTarget; session: QtestSession; wire: string[]; run: (line: string) => string | undefined } {
  const target = new FakeTarget();
  const wire: string[] = [];
  const session = createSession((line) => wire.push(line));
  const run = (line: string): string | undefined => {
    const reply = handleLine(line, target, session);
    if (reply !== undefined) wire.push(reply);
    return reply;
  };
  return { target, session, wire, run };
}

describe('port I/O', () => {
  it('outb/outw/outl pass address, size and value to the target', () => {
    const { target, run } = setup();
    expect(run('outb 0x70 0x8f')).toBe('OK');
    expect(run('outw 0x1f0 0xbeef')).toBe('OK');
    expect(run('outl 0xcf8 0x80000000')).toBe('OK');
    expect(target.portWrites).toEqual([[0x70, 1, 0x8f], [0x1f0, 2, 0xbeef], [0xcf8, 4, 0x80000000]]);
  });

  it('inb/inw/inl reply zero-padded to the access width', () => {
    const { target, run } = setup();
    target.ports.set(0x60, 0x5);
    target.ports.set(0x1f0, 0x1234);
    target.ports.set(0xcfc, 0x8086);
    expect(run('inb 0x60')).toBe('OK 0x0005');
    expect(run('inw 0x1f0')).toBe('OK 0x1234');
    expect(run('inl 0xcfc')).toBe('OK 0x8086');
    expect(run('inl 0x3f8')).toBe('OK 0xffffffff');
  });

  it('masks a port value wider than the access', () => {
    const { target, run } = setup();
    target.ports.set(0x61, 0x1ab);
    expect(run('inb 0x61')).toBe('OK 0x00ab');
  });

  it('refuses a port above 0xffff and a value wider than the access', () => {
    const { target, run } = setup();
    expect(run('outb 0x10000 1')).toMatch(/^ERR outb: ADDR '0x10000' out of range/);
    expect(run('inw 65536')).toMatch(/^ERR inw: ADDR/);
    expect(run('outb 0x80 0x100')).toMatch(/^ERR outb: VALUE '0x100' out of range/);
    expect(run('outw 0x80 0x10000')).toMatch(/^ERR outw: VALUE/);
    expect(run('outl 0x80 0x100000000')).toMatch(/^ERR outl: VALUE/);
    expect(run('outl 0x80 0xffffffff')).toBe('OK');
    expect(target.portWrites).toEqual([[0x80, 4, 0xffffffff]]);
  });
});

describe('memory access', () => {
  it('writeb..writeq store little-endian and readb..readq read back padded', () => {
    const { target, run } = setup();
    expect(run('writel 0x1000 0x11223344')).toBe('OK');
    expect([...target.ram.subarray(0x1000, 0x1004)]).toEqual([0x44, 0x33, 0x22, 0x11]);
    expect(run('writeb 0x2000 0x7')).toBe('OK');
    expect(run('writew 0x2002 0xa')).toBe('OK');
    expect(run('readb 0x2000')).toBe('OK 0x0000000000000007');
    expect(run('readw 0x2002')).toBe('OK 0x000000000000000a');
    expect(run('readl 0x1000')).toBe('OK 0x0000000011223344');
    expect(run('readq 0x1000')).toBe('OK 0x0000000011223344');
  });

  it('readq/writeq keep all 64 bits (a value above 2^53)', () => {
    const { target, run } = setup();
    expect(run('writeq 0x3000 0xfedcba9876543211')).toBe('OK');
    expect([...target.ram.subarray(0x3000, 0x3008)]).toEqual([0x11, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc, 0xfe]);
    expect(run('readq 0x3000')).toBe('OK 0xfedcba9876543211');
    expect(run('writeq 0x3008 18446744073709551615')).toBe('OK');
    expect(run('readq 0x3008')).toBe('OK 0xffffffffffffffff');
  });

  it('refuses a store value wider than the access', () => {
    const { target, run } = setup();
    expect(run('writeb 0x10 0x100')).toMatch(/^ERR writeb: VALUE/);
    expect(run('writel 0x10 0x100000000')).toMatch(/^ERR writel: VALUE/);
    expect(target.ram[0x10]).toBe(0);
  });

  it('unassigned space reads 0xff', () => {
    const { run } = setup();
    expect(run('readl 0x200000')).toBe('OK 0x00000000ffffffff');
    expect(run('read 0xffffe 4')).toBe('OK 0x0000ffff');
  });

  it('write then read round-trips hex data', () => {
    const { target, run } = setup();
    expect(run('write 0x500 4 0xdeadBEEF')).toBe('OK');
    expect([...target.ram.subarray(0x500, 0x504)]).toEqual([0xde, 0xad, 0xbe, 0xef]);
    expect(run('read 0x4ff 6')).toBe('OK 0x00deadbeef00');
    expect(run('write 0x500 0 0x')).toBe('OK');
  });

  it('write refuses data that does not match SIZE or is not hex', () => {
    const { target, run } = setup();
    expect(run('write 0x500 4 0xdeadbe')).toBe('ERR write: DATA has 3 bytes but SIZE is 4');
    expect(run('write 0x500 2 0xdeadbe')).toMatch(/^ERR write: DATA has 3 bytes/);
    expect(run('write 0x500 2 0xdea')).toMatch(/^ERR write: DATA must be 0x/);
    expect(run('write 0x500 2 dead')).toMatch(/^ERR write: DATA must be 0x/);
    expect(run('write 0x500 2 0xzz00')).toMatch(/^ERR write: DATA/);
    expect(target.ram[0x500]).toBe(0);
  });

  it('b64write then b64read round-trips, including lengths needing padding', () => {
    const { target, run } = setup();
    const data = Buffer.from([0, 1, 2, 0xfb, 0xff, 0x3e, 0x3f]);
    expect(run(`b64write 0x800 7 ${data.toString('base64')}`)).toBe('OK');
    expect(Buffer.from(target.ram.subarray(0x800, 0x807)).equals(data)).toBe(true);
    expect(run('b64read 0x800 7')).toBe(`OK ${data.toString('base64')}`);
    expect(run('b64read 0x801 2')).toBe('OK AQI=');
    expect(run('b64write 0x800 0 ')).toBe('OK');
  });

  it('b64write refuses bad base64 and a length mismatch', () => {
    const { target, run } = setup();
    expect(run('b64write 0x800 3 AQI')).toMatch(/^ERR b64write: DATA is not/);
    expect(run('b64write 0x800 3 AQ!D')).toMatch(/^ERR b64write: DATA is not/);
    expect(run('b64write 0x800 3 AQI=')).toBe('ERR b64write: DATA has 2 bytes but SIZE is 3');
    expect(target.ram[0x801]).toBe(0);
  });

  it('memset fills SIZE bytes and nothing more', () => {
    const { target, run } = setup();
    expect(run('memset 0x100 3 0xa5')).toBe('OK');
    expect([...target.ram.subarray(0xff, 0x104)]).toEqual([0, 0xa5, 0xa5, 0xa5, 0]);
    expect(run('memset 0x100 0 0x1')).toBe('OK');
    expect(run('memset 0x100 3 0x100')).toMatch(/^ERR memset: VALUE/);
  });

  it('bounds every transfer at 64 MiB and refuses empty reads', () => {
    const { run } = setup();
    const over = `0x${(MAX_TRANSFER + 1).toString(16)}`;
    for (const cmd of [`read 0 ${over}`, `b64read 0 ${over}`, `memset 0 ${over} 0`, `write 0 ${over} 0x00`]) {
      expect(run(cmd)).toMatch(/^ERR \w+: SIZE '0x4000001' exceeds the 64 MiB limit$/);
    }
    expect(run('read 0 0')).toMatch(/^ERR read: SIZE must be at least 1/);
    expect(run('b64read 0 0')).toMatch(/^ERR b64read: SIZE/);
  });

  it('refuses addresses a JS number cannot hold exactly', () => {
    const { run } = setup();
    expect(run('readb 0x20000000000000')).toMatch(/^ERR readb: ADDR .* out of range/);
    expect(run('readq 0x1ffffffffffffc')).toMatch(/^ERR readq: ADDR .* \+ 8 bytes out of range/);
    expect(run('readb 0x1fffffffffffff')).toBe('OK 0x00000000000000ff');
  });
});

describe('numbers', () => {
  it('accepts decimal, hex (either case) and octal like strtoull base 0', () => {
    const { target, run } = setup();
    run('writeb 16 1');
    run('writeb 0x11 2');
    run('writeb 0X12 3');
    run('writeb 023 4'); // octal 023 = 19
    run('writeb 0 0377');
    expect([...target.ram.subarray(0, 1)]).toEqual([0xff]);
    expect([...target.ram.subarray(16, 20)]).toEqual([1, 2, 3, 4]);
  });

  it('refuses garbage, trailing characters and non-octal digits, naming the argument', () => {
    const { run } = setup();
    expect(run('inb zz')).toBe("ERR inb: ADDR 'zz' is not a number");
    expect(run('inb 0x10g')).toBe("ERR inb: ADDR '0x10g' is not a number");
    expect(run('inb 12abc')).toMatch(/^ERR inb: ADDR/);
    expect(run('inb 0x')).toMatch(/^ERR inb: ADDR '0x' is not a number/);
    expect(run('inb 08')).toMatch(/^ERR inb: ADDR '08' is not a number/);
    expect(run('outb 0x10 1.5')).toBe("ERR outb: VALUE '1.5' is not a number");
  });

  it('refuses values beyond 64 bits, even with many leading zeros accepted', () => {
    const { run } = setup();
    expect(run('readb 0x10000000000000000')).toBe("ERR readb: ADDR '0x10000000000000000' does not fit in 64 bits");
    expect(run('readb 18446744073709551616')).toMatch(/does not fit in 64 bits/);
    expect(run(`readb 0x${'0'.repeat(40)}10`)).toBe('OK 0x0000000000000000');
    expect(run(`readb ${'9'.repeat(5000)}`)).toMatch(/does not fit in 64 bits/);
  });

  it('accepts a minus sign only for LEVEL', () => {
    const { target, run } = setup();
    expect(run('outb -1 0')).toBe("ERR outb: ADDR '-1' must not be negative");
    expect(run('set_irq_in ioapic unnamed-gpio-in -1 1')).toMatch(/^ERR set_irq_in: NUM '-1' must not be negative/);
    expect(run('set_irq_in ioapic unnamed-gpio-in 4 -1')).toBe('OK');
    expect(target.inLevels.get('ioapic:4')).toBe(-1);
    expect(run('set_irq_in ioapic unnamed-gpio-in 4 0x80000000')).toMatch(/^ERR set_irq_in: LEVEL .* out of range/);
  });
});

describe('errors', () => {
  it('answers FAIL for an unknown command, including Object.prototype names', () => {
    const { run } = setup();
    expect(run('frobnicate 1 2')).toBe("FAIL Unknown command 'frobnicate'");
    expect(run('constructor')).toBe("FAIL Unknown command 'constructor'");
    expect(run('__proto__')).toBe("FAIL Unknown command '__proto__'");
  });

  it('answers ERR with the expected arguments for a wrong argument count', () => {
    const { run } = setup();
    expect(run('outb 0x10')).toBe('ERR outb: expected ADDR VALUE, got 1 argument(s)');
    expect(run('inb')).toBe('ERR inb: expected ADDR, got 0 argument(s)');
    expect(run('write 0 1')).toMatch(/^ERR write: expected ADDR SIZE 0xDATA/);
    expect(run('set_irq_in ioapic x 1')).toMatch(/^ERR set_irq_in: expected PATH NAME NUM LEVEL/);
    expect(run('irq_intercept_in')).toMatch(/^ERR irq_intercept_in: expected PATH/);
    expect(run('irq_intercept_in ioapic extra')).toMatch(/^ERR irq_intercept_in: expected PATH,/);
    expect(run('endianness now')).toBe('ERR endianness: expected no arguments, got 1 argument(s)');
    expect(run('clock_step 1 2')).toMatch(/^ERR clock_step: expected \[NS\]/);
  });

  it('turns a QtestError from the target into FAIL <message>', () => {
    const { run } = setup();
    expect(run('outb 0xbad 1')).toBe('FAIL port 0xbad is reserved');
    expect(run('set_irq_in nowhere unnamed-gpio-in 0 1')).toBe("FAIL No device at 'nowhere'");
  });

  it('turns any other throw into a one-line FAIL and keeps serving', () => {
    const { run } = setup();
    expect(run('inb 0xdead')).toBe('FAIL wires crossed');
    expect(run('readb 0xfee00000')).toBe('FAIL lapic on fire');
    expect(run('endianness')).toBe('OK little');
  });

  it('ignores blank lines and tolerates extra blanks and a trailing CR', () => {
    const { run } = setup();
    expect(run('')).toBeUndefined();
    expect(run('  \t ')).toBeUndefined();
    expect(run('  writeb   0x10\t0x5  \r')).toBe('OK');
    expect(run('readb 0x10\r')).toBe('OK 0x0000000000000005');
  });
});

describe('parseCommand', () => {
  it('yields typed commands', () => {
    expect(parseCommand('outw 0x10 0x20')).toEqual({ ok: true, command: { kind: 'out', size: 2, addr: 0x10, value: 0x20 } });
    expect(parseCommand('readq 8')).toEqual({ ok: true, command: { kind: 'load', size: 8, addr: 8 } });
    expect(parseCommand('clock_step')).toEqual({ ok: true, command: { kind: 'clock_step', ns: undefined } });
    expect(parseCommand('irq_intercept_out /machine/pic intr')).toEqual({
      ok: true,
      command: { kind: 'irq_intercept', direction: 'out', path: '/machine/pic', name: 'intr' },
    });
    expect(parseCommand('inb x')).toEqual({ ok: false, reply: "ERR inb: ADDR 'x' is not a number" });
  });
});

describe('interrupts', () => {
  it('irq_intercept_in reports raise/lower unsolicited, before the reply, changes only', () => {
    const { wire, run } = setup();
    expect(run('irq_intercept_in ioapic')).toBe('OK');
    run('set_irq_in ioapic unnamed-gpio-in 14 1');
    run('set_irq_in /machine/ioapic unnamed-gpio-in 14 1'); // already high: no line
    run('set_irq_in ioapic unnamed-gpio-in 3 0'); // lines start low: no line
    run('set_irq_in ioapic unnamed-gpio-in 14 0');
    expect(wire).toEqual(['OK', 'IRQ raise 14', 'OK', 'OK', 'OK', 'IRQ lower 14', 'OK']);
  });

  it('irq_intercept_out reports output lines raised by a port write', () => {
    const { wire, run } = setup();
    expect(run('irq_intercept_out pic intr')).toBe('OK');
    run('outb 0x20 0x83');
    run('outb 0x20 0x03');
    expect(wire).toEqual(['OK', 'IRQ raise 3', 'OK', 'IRQ lower 3', 'OK']);
  });

  it('allows one interception per session: the same again is OK, another is refused', () => {
    const { session, run } = setup();
    expect(run('irq_intercept_in ioapic')).toBe('OK');
    expect(run('irq_intercept_in ioapic')).toBe('OK');
    expect(run('irq_intercept_out pic')).toBe(ALREADY_INTERCEPTED);
    expect(run('irq_intercept_out ioapic')).toBe(ALREADY_INTERCEPTED);
    expect(session.intercept).toEqual({ direction: 'in', path: 'ioapic', name: undefined });
  });

  it('a failed interception does not use up the session', () => {
    const { run } = setup();
    expect(run('irq_intercept_in nowhere')).toBe("FAIL No device at 'nowhere'");
    expect(run('irq_intercept_out pic bogus')).toBe("FAIL pic has no output 'bogus'");
    expect(run('irq_intercept_out /machine/pic')).toBe('OK');
  });

  it('set_irq_in drives the line when not intercepted and checks the group name', () => {
    const { target, run } = setup();
    expect(run('set_irq_in ioapic unnamed-gpio-in 0x10 1')).toBe('OK');
    expect(target.inLevels.get('ioapic:16')).toBe(1);
    expect(run('set_irq_in ioapic other 1 1')).toBe("FAIL ioapic has no input group 'other'");
  });
});

describe('clock', () => {
  it('clock_step NS advances by NS; clock_set moves forward only; both reply the time', () => {
    const { target, run } = setup();
    expect(run('clock_step 100')).toBe('OK 100');
    expect(run('clock_step 0x100')).toBe('OK 356');
    expect(run('clock_set 5000')).toBe('OK 5000');
    expect(run('clock_set 10')).toBe('OK 5000');
    expect(target.now).toBe(5000);
    expect(run('clock_set 9007199254740992')).toMatch(/^ERR clock_set: NS .* out of range/);
  });

  it('clock_step without NS runs to the next deadline; a timer IRQ arrives before the reply', () => {
    const { wire, run } = setup();
    run('irq_intercept_out rtc');
    expect(run('clock_step')).toBe('OK 1000000');
    expect(wire).toEqual(['OK', 'IRQ raise 8', 'OK 1000000']);
    expect(run('clock_step')).toBe('OK 1000000');
  });

  it('prints a large time in decimal, not exponent notation', () => {
    const { run } = setup();
    expect(run('clock_set 9007199254740991')).toBe('OK 9007199254740991');
  });

  it('endianness is little', () => {
    expect(setup().run('endianness')).toBe('OK little');
  });
});
