/**
 * QEMU's qtest text protocol, without any I/O: `parseCommand` turns one line into a typed
 * command, `executeCommand` runs it against a QtestTarget and returns the reply line (without
 * its newline). Unsolicited `IRQ raise|lower N` lines go through the session's `send`.
 *
 * Where QEMU asserts (and so kills the machine) on a malformed argument, we answer `ERR ...`
 * and keep going; where QEMU silently truncates (`outb 0x10 0x1ff`), we refuse with `ERR` too,
 * because a harness sending such a value has a bug it wants to hear about.
 */
import type { PortSize, QtestTarget } from './target.js';

/** Width of a memory access in bytes (readb..readq, writeb..writeq). */
export type MemSize = 1 | 2 | 4 | 8;

export type QtestCommand =
  | { kind: 'out'; size: PortSize; addr: number; value: number }
  | { kind: 'in'; size: PortSize; addr: number }
  | { kind: 'store'; size: MemSize; addr: number; value: bigint }
  | { kind: 'load'; size: MemSize; addr: number }
  | { kind: 'read'; addr: number; size: number; encoding: 'hex' | 'base64' }
  | { kind: 'write'; addr: number; data: Uint8Array }
  | { kind: 'memset'; addr: number; size: number; value: number }
  | { kind: 'irq_intercept'; direction: 'in' | 'out'; path: string; name: string | undefined }
  | { kind: 'set_irq_in'; path: string; name: string; line: number; level: number }
  | { kind: 'clock_step'; ns: number | undefined }
  | { kind: 'clock_set'; ns: number }
  | { kind: 'endianness' };

export type ParseResult = { ok: true; command: QtestCommand } | { ok: false; reply: string };

/** Per-connection protocol state: QEMU keeps this once per machine, we keep it per client. */
export interface QtestSession {
  /** The interception this session installed; QEMU allows one. */
  intercept: { direction: 'in' | 'out'; path: string; name: string | undefined } | undefined;
  /** Last level reported per line. Lines start low and, as in QEMU, only changes are sent. */
  readonly irqLevels: Map<number, boolean>;
  /** Where unsolicited lines (`IRQ raise 3`) go, without the newline. */
  readonly send: (line: string) => void;
}

export function createSession(send: (line: string) => void): QtestSession {
  return { intercept: undefined, irqLevels: new Map(), send };
}

/** Largest SIZE accepted by read/b64read/write/b64write/memset: keeps one request bounded. */
export const MAX_TRANSFER = 64 * 1024 * 1024;
/**
 * Guest-physical addresses must stay exact in a JS number. x86 has at most 52 physical address
 * bits, so nothing real lives above 2^53.
 */
export const MAX_ADDR = Number.MAX_SAFE_INTEGER;
/** Reply to a second interception on one connection (QEMU's own text is "IRQ intercept ..."). */
export const ALREADY_INTERCEPTED = 'FAIL IRQ intercept already enabled';

const U64_MAX = (1n << 64n) - 1n;

/** A malformed line: carries the complete reply. Internal to this module. */
class Reject extends Error {}

function reject(reply: string): never {
  throw new Reject(reply);
}

/** Why `text` is not a C integer literal (strtoull, base 0), or its value. */
function parseCLiteral(text: string, allowNegative: boolean): bigint | string {
  let body = text;
  let negative = false;
  if (body.startsWith('-') || body.startsWith('+')) {
    negative = body.startsWith('-');
    body = body.slice(1);
  }
  let radix: 8 | 10 | 16;
  let digits: string;
  if (/^0x/i.test(body)) {
    radix = 16;
    digits = body.slice(2);
    if (!/^[0-9a-f]+$/i.test(digits)) return 'is not a number';
  } else if (body.startsWith('0')) {
    radix = 8;
    digits = body;
    if (!/^[0-7]+$/.test(digits)) return 'is not a number';
  } else {
    radix = 10;
    digits = body;
    if (!/^[0-9]+$/.test(digits)) return 'is not a number';
  }
  // Check the digit count first so a megabyte of digits never reaches BigInt().
  digits = digits.replace(/^0+/, '') || '0';
  const maxDigits = { 8: 22, 10: 20, 16: 16 }[radix];
  const prefix = { 8: '0o', 10: '', 16: '0x' }[radix];
  const value = digits.length > maxDigits ? U64_MAX + 1n : BigInt(prefix + digits);
  if (value > U64_MAX) return 'does not fit in 64 bits';
  if (negative && value !== 0n) {
    if (!allowNegative) return 'must not be negative';
    return -value;
  }
  return value;
}

/** Parses argument `arg` of `cmd` and checks it lies in [min, max]. */
function integer(cmd: string, arg: string, text: string, max: bigint, min = 0n): bigint {
  const value = parseCLiteral(text, min < 0n);
  if (typeof value === 'string') reject(`ERR ${cmd}: ${arg} '${text}' ${value}`);
  if (value < min || value > max) {
    const range = min < 0n ? `${min}..${max}` : `max 0x${max.toString(16)}`;
    reject(`ERR ${cmd}: ${arg} '${text}' out of range (${range})`);
  }
  return value;
}

function num(cmd: string, arg: string, text: string, max: number, min = 0): number {
  return Number(integer(cmd, arg, text, BigInt(max), BigInt(min)));
}

function transferSize(cmd: string, text: string, min: number): number {
  const size = num(cmd, 'SIZE', text, Number.MAX_SAFE_INTEGER);
  if (size > MAX_TRANSFER) reject(`ERR ${cmd}: SIZE '${text}' exceeds the 64 MiB limit`);
  if (size < min) reject(`ERR ${cmd}: SIZE must be at least ${min}`);
  return size;
}

/** ADDR of a memory access of `len` bytes: the whole range must be addressable. */
function memAddr(cmd: string, text: string, len: number): number {
  const addr = num(cmd, 'ADDR', text, MAX_ADDR);
  if (addr + len - 1 > MAX_ADDR) reject(`ERR ${cmd}: ADDR '${text}' + ${len} bytes out of range`);
  return addr;
}

const BYTE_SIZE: Record<string, MemSize> = { b: 1, w: 2, l: 4, q: 8 };

function sizeOf(cmd: string): MemSize {
  return BYTE_SIZE[cmd.slice(-1)] ?? reject(`FAIL Unknown command '${cmd}'`);
}

function maxOf(size: MemSize): bigint {
  return (1n << BigInt(size * 8)) - 1n;
}

interface Syntax {
  /** Argument names, optional ones in brackets: gives both the counts and the ERR message. */
  usage: string;
  build(cmd: string, args: string[]): QtestCommand;
}

function portCommand(kind: 'in' | 'out'): Syntax {
  return {
    usage: kind === 'out' ? 'ADDR VALUE' : 'ADDR',
    build(cmd, [addrText, valueText]) {
      const size = sizeOf(cmd) as PortSize;
      const addr = num(cmd, 'ADDR', addrText!, 0xffff);
      if (kind === 'in') return { kind, size, addr };
      return { kind, size, addr, value: Number(integer(cmd, 'VALUE', valueText!, maxOf(size))) };
    },
  };
}

const HEX_DATA = /^0x((?:[0-9a-f]{2})*)$/i;
const BASE64 = /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/;

/** Keyed by a Map, not an object, so that `constructor` or `__proto__` are just unknown. */
const SYNTAX = new Map<string, Syntax>();
for (const s of ['b', 'w', 'l']) {
  SYNTAX.set(`out${s}`, portCommand('out'));
  SYNTAX.set(`in${s}`, portCommand('in'));
}
for (const s of ['b', 'w', 'l', 'q']) {
  SYNTAX.set(`write${s}`, {
    usage: 'ADDR VALUE',
    build(cmd, [addrText, valueText]) {
      const size = sizeOf(cmd);
      const addr = memAddr(cmd, addrText!, size);
      return { kind: 'store', size, addr, value: integer(cmd, 'VALUE', valueText!, maxOf(size)) };
    },
  });
  SYNTAX.set(`read${s}`, {
    usage: 'ADDR',
    build(cmd, [addrText]) {
      const size = sizeOf(cmd);
      return { kind: 'load', size, addr: memAddr(cmd, addrText!, size) };
    },
  });
}
for (const [name, encoding] of [['read', 'hex'], ['b64read', 'base64']] as const) {
  SYNTAX.set(name, {
    usage: 'ADDR SIZE',
    build(cmd, [addrText, sizeText]) {
      // QEMU asserts on SIZE 0: its reply would be indistinguishable from garbage.
      const size = transferSize(cmd, sizeText!, 1);
      return { kind: 'read', addr: memAddr(cmd, addrText!, size), size, encoding };
    },
  });
}
SYNTAX.set('write', {
  usage: 'ADDR SIZE 0xDATA',
  build(cmd, [addrText, sizeText, dataText]) {
    const size = transferSize(cmd, sizeText!, 0);
    const addr = memAddr(cmd, addrText!, size);
    const hex = HEX_DATA.exec(dataText!)?.[1];
    if (hex === undefined) reject(`ERR ${cmd}: DATA must be 0x followed by pairs of hex digits`);
    if (hex.length !== size * 2) {
      reject(`ERR ${cmd}: DATA has ${hex.length / 2} bytes but SIZE is ${size}`);
    }
    return { kind: 'write', addr, data: Uint8Array.from(Buffer.from(hex, 'hex')) };
  },
});
SYNTAX.set('b64write', {
  // The data of a zero-sized write is empty, and so missing once the line is split.
  usage: 'ADDR SIZE [BASE64]',
  build(cmd, [addrText, sizeText, dataText = '']) {
    const size = transferSize(cmd, sizeText!, 0);
    const addr = memAddr(cmd, addrText!, size);
    // Buffer.from() skips characters that are not base64; a harness bug should not be skipped.
    if (!BASE64.test(dataText)) reject(`ERR ${cmd}: DATA is not padded base64`);
    const data = Uint8Array.from(Buffer.from(dataText, 'base64'));
    if (data.length !== size) reject(`ERR ${cmd}: DATA has ${data.length} bytes but SIZE is ${size}`);
    return { kind: 'write', addr, data };
  },
});
SYNTAX.set('memset', {
  usage: 'ADDR SIZE VALUE',
  build(cmd, [addrText, sizeText, valueText]) {
    const size = transferSize(cmd, sizeText!, 0);
    const addr = memAddr(cmd, addrText!, size);
    return { kind: 'memset', addr, size, value: num(cmd, 'VALUE', valueText!, 0xff) };
  },
});
SYNTAX.set('irq_intercept_in', {
  usage: 'PATH',
  build: (_cmd, [path]) => ({ kind: 'irq_intercept', direction: 'in', path: path!, name: undefined }),
});
SYNTAX.set('irq_intercept_out', {
  usage: 'PATH [NAME]',
  build: (_cmd, [path, name]) => ({ kind: 'irq_intercept', direction: 'out', path: path!, name }),
});
SYNTAX.set('set_irq_in', {
  usage: 'PATH NAME NUM LEVEL',
  build(cmd, [path, name, lineText, levelText]) {
    // QEMU parses both as a C int; only LEVEL has a meaning when negative (non-zero = raise).
    const line = num(cmd, 'NUM', lineText!, 0x7fffffff);
    const level = num(cmd, 'LEVEL', levelText!, 0x7fffffff, -0x80000000);
    return { kind: 'set_irq_in', path: path!, name: name!, line, level };
  },
});
SYNTAX.set('clock_step', {
  usage: '[NS]',
  build(cmd, [nsText]) {
    const ns = nsText === undefined ? undefined : num(cmd, 'NS', nsText, Number.MAX_SAFE_INTEGER);
    return { kind: 'clock_step', ns };
  },
});
SYNTAX.set('clock_set', {
  usage: 'NS',
  build: (cmd, [nsText]) => ({ kind: 'clock_set', ns: num(cmd, 'NS', nsText!, Number.MAX_SAFE_INTEGER) }),
});
SYNTAX.set('endianness', { usage: '', build: () => ({ kind: 'endianness' }) });

/** Splits a line into words. Unlike QEMU we tolerate runs of blanks and a trailing `\r`. */
export function splitWords(line: string): string[] {
  const trimmed = line.trim();
  return trimmed === '' ? [] : trimmed.split(/[ \t]+/);
}

/** Parses one command line (without its newline). Blank lines are the caller's business. */
export function parseCommand(line: string): ParseResult {
  const [cmd = '', ...args] = splitWords(line);
  const syntax = SYNTAX.get(cmd);
  if (!syntax) return { ok: false, reply: `FAIL Unknown command '${cmd}'` };
  const words = splitWords(syntax.usage);
  const min = words.filter((w) => !w.startsWith('[')).length;
  if (args.length < min || args.length > words.length) {
    const expected = syntax.usage === '' ? 'no arguments' : syntax.usage;
    return { ok: false, reply: `ERR ${cmd}: expected ${expected}, got ${args.length} argument(s)` };
  }
  try {
    return { ok: true, command: syntax.build(cmd, args) };
  } catch (err) {
    if (err instanceof Reject) return { ok: false, reply: err.message };
    throw err;
  }
}

function hex(value: bigint | number, digits: number): string {
  return `0x${value.toString(16).padStart(digits, '0')}`;
}

/** The target's bytes, checked: a short read would otherwise turn into a bogus reply. */
function readBytes(target: QtestTarget, addr: number, len: number): Uint8Array {
  const bytes = target.memRead(addr, len);
  if (bytes.length !== len) throw new Error(`memRead returned ${bytes.length} bytes, expected ${len}`);
  return bytes;
}

function clockReply(now: number): string {
  if (!Number.isFinite(now)) throw new Error(`clock returned ${now}`);
  return `OK ${BigInt(Math.trunc(now))}`;
}

function intercept(
  cmd: Extract<QtestCommand, { kind: 'irq_intercept' }>,
  target: QtestTarget,
  session: QtestSession,
): string {
  const current = session.intercept;
  if (current) {
    // QEMU answers OK when the same device is intercepted again, and refuses any other.
    const same = current.direction === cmd.direction && current.path === cmd.path && current.name === cmd.name;
    return same ? 'OK' : ALREADY_INTERCEPTED;
  }
  const notify = (line: number, level: boolean): void => {
    if ((session.irqLevels.get(line) ?? false) === level) return;
    session.irqLevels.set(line, level);
    session.send(`IRQ ${level ? 'raise' : 'lower'} ${line}`);
  };
  if (cmd.direction === 'in') target.interceptIn(cmd.path, notify);
  else target.interceptOut(cmd.path, cmd.name, notify);
  session.intercept = { direction: cmd.direction, path: cmd.path, name: cmd.name };
  return 'OK';
}

function run(cmd: QtestCommand, target: QtestTarget, session: QtestSession): string {
  switch (cmd.kind) {
    case 'out':
      target.portWrite(cmd.addr, cmd.size, cmd.value);
      return 'OK';
    case 'in': {
      // Mask like the bus would: a sloppy device returning extra bits must not widen the reply.
      const raw = target.portRead(cmd.addr, cmd.size);
      const value = cmd.size === 4 ? raw >>> 0 : raw & ((1 << (cmd.size * 8)) - 1);
      // QEMU pads every in* reply to 4 digits and every read* reply to 16.
      return `OK ${hex(value, 4)}`;
    }
    case 'store': {
      const bytes = new Uint8Array(8);
      new DataView(bytes.buffer).setBigUint64(0, cmd.value, true);
      target.memWrite(cmd.addr, bytes.subarray(0, cmd.size));
      return 'OK';
    }
    case 'load': {
      const bytes = new Uint8Array(8);
      bytes.set(readBytes(target, cmd.addr, cmd.size));
      return `OK ${hex(new DataView(bytes.buffer).getBigUint64(0, true), 16)}`;
    }
    case 'read': {
      const buf = Buffer.from(readBytes(target, cmd.addr, cmd.size));
      return cmd.encoding === 'hex' ? `OK 0x${buf.toString('hex')}` : `OK ${buf.toString('base64')}`;
    }
    case 'write':
      if (cmd.data.length > 0) target.memWrite(cmd.addr, cmd.data);
      return 'OK';
    case 'memset':
      if (cmd.size > 0) target.memWrite(cmd.addr, new Uint8Array(cmd.size).fill(cmd.value));
      return 'OK';
    case 'irq_intercept':
      return intercept(cmd, target, session);
    case 'set_irq_in':
      target.setIrqIn(cmd.path, cmd.name, cmd.line, cmd.level);
      return 'OK';
    case 'clock_step':
      // Call without an argument rather than with `undefined`: "omitted" is what the target sees.
      return clockReply(cmd.ns === undefined ? target.clockStep() : target.clockStep(cmd.ns));
    case 'clock_set':
      return clockReply(target.clockSet(cmd.ns));
    case 'endianness':
      return 'OK little';
  }
}

/** One line of text from anything thrown: a reply must never span lines. */
function failReason(err: unknown): string {
  const text = err instanceof Error ? err.message || err.name : String(err);
  return text.replace(/[\r\n]+/g, ' ').trim() || 'internal error';
}

/**
 * Runs `cmd` and returns its reply. QtestError is the target's way to refuse; anything else it
 * throws is a bug in the machine, but a test harness still deserves an answer, not a hang.
 */
export function executeCommand(cmd: QtestCommand, target: QtestTarget, session: QtestSession): string {
  try {
    return run(cmd, target, session);
  } catch (err) {
    return `FAIL ${failReason(err)}`;
  }
}

/** Parses and runs one line; `undefined` for a blank line, which gets no reply. */
export function handleLine(line: string, target: QtestTarget, session: QtestSession): string | undefined {
  if (splitWords(line).length === 0) return undefined;
  const parsed = parseCommand(line);
  return parsed.ok ? executeCommand(parsed.command, target, session) : parsed.reply;
}
