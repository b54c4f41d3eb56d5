import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MAX_LINE, serveQtestSocket, startQtestServer, type QtestServer } from '../../hw/qtest/server.js';
import { QtestError, type PortSize, type QtestTarget } from '../../hw/qtest/target.js';

type Cb = (line: number, level: boolean) => void;

/**
 * Just enough machine for the transport: 1 MiB of RAM, port registers, a clock, and two
 * devices whose lines can be intercepted. Writing 0x80|N to port 0x20 raises "pic" output N.
 */
class FakeTarget implements QtestTarget {
  readonly ram = new Uint8Array(1 << 20);
  readonly ports = new Map<number, number>();
  now = 0;
  private readonly inCbs = new Map<string, Cb>();
  private readonly outCbs = new Map<string, Cb>();

  private device(path: string): string {
    if (path !== 'ioapic' && path !== 'pic') throw new QtestError(`No device at '${path}'`);
    return path;
  }
  portRead(addr: number, size: PortSize): number {
    return this.ports.get(addr) ?? 2 ** (size * 8) - 1;
  }
  portWrite(addr: number, _size: PortSize, value: number): void {
    if (addr === 0x20) this.outCbs.get('pic')?.(value & 0x7f, (value & 0x80) !== 0);
    else this.ports.set(addr, value);
  }
  memRead(addr: number, len: number): Uint8Array {
    return this.ram.slice(addr, addr + len);
  }
  memWrite(addr: number, data: Uint8Array): void {
    this.ram.set(data, addr);
  }
  clockStep(ns?: number): number {
    this.now += ns ?? 1000;
    return this.now;
  }
  clockSet(ns: number): number {
    this.now = Math.max(this.now, ns);
    return this.now;
  }
  interceptIn(path: string, cb: Cb): void {
    this.inCbs.set(this.device(path), cb);
  }
  interceptOut(path: string, _name: string | undefined, cb: Cb): void {
    this.outCbs.set(this.device(path), cb);
  }
  setIrqIn(path: string, _name: string, line: number, level: number): void {
    this.inCbs.get(this.device(path))?.(line, level !== 0);
  }
}

/** A client socket that hands out received lines one at a time, waiting on 'data' events. */
class LineClient {
  private buffer = '';
  private readonly lines: string[] = [];
  private readonly waiters: { resolve: (line: string) => void; reject: (err: Error) => void }[] = [];
  private ended = false;

  private constructor(readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => {
      const parts = (this.buffer + chunk).split('\n');
      this.buffer = parts.pop()!;
      for (const line of parts) {
        const waiter = this.waiters.shift();
        if (waiter) waiter.resolve(line);
        else this.lines.push(line);
      }
    });
    socket.on('close', () => {
      this.ended = true;
      for (const w of this.waiters.splice(0)) w.reject(new Error('connection closed'));
    });
  }

  static wrap(socket: Socket): LineClient {
    return new LineClient(socket);
  }

  static connect(path: string): Promise<LineClient> {
    return new Promise((resolve, reject) => {
      const socket = connect(path, () => resolve(new LineClient(socket)));
      socket.once('error', reject);
    });
  }

  /** Resolves once the data has been handed to the kernel. */
  send(text: string): Promise<void> {
    return new Promise((resolve, reject) => this.socket.write(text, (err) => (err ? reject(err) : resolve())));
  }

  next(): Promise<string> {
    const line = this.lines.shift();
    if (line !== undefined) return Promise.resolve(line);
    if (this.ended) return Promise.reject(new Error('connection closed'));
    return new Promise((resolve, reject) => this.waiters.push({ resolve, reject }));
  }

  async command(line: string): Promise<string> {
    await this.send(`${line}\n`);
    return this.next();
  }

  closed(): Promise<void> {
    return this.ended ? Promise.resolve() : new Promise((resolve) => this.socket.once('close', () => resolve()));
  }

  end(): Promise<void> {
    const done = this.closed();
    this.socket.end();
    return done;
  }
}

let dir: string;
let sock: string;
let target: FakeTarget;
let server: QtestServer;
let log: string[];
const clients: LineClient[] = [];

async function client(): Promise<LineClient> {
  const c = await LineClient.connect(sock);
  clients.push(c);
  return c;
}

/**
 * Makes sure the server has read whatever was written before: a round trip on another
 * connection takes at least one more turn of the server's event loop, which reads every
 * readable socket. Used to force a command to arrive in several packets.
 */
async function barrier(): Promise<void> {
  const other = await client();
  expect(await other.command('endianness')).toBe('OK little');
  await other.end();
}

beforeEach(async () => {
  dir = mkdtempSync(join(tmpdir(), 'spindle-qtest-'));
  sock = join(dir, 'qtest.sock');
  target = new FakeTarget();
  log = [];
  server = await startQtestServer(sock, target, { log: (line) => log.push(line) });
});

afterEach(async () => {
  for (const c of clients.splice(0)) c.socket.destroy();
  await server.close();
  rmSync(dir, { recursive: true, force: true });
});

describe('qtest server', () => {
  it('answers commands in order over a UNIX socket', async () => {
    const c = await client();
    expect(server.path).toBe(sock);
    expect(await c.command('outb 0x60 0x2a')).toBe('OK');
    expect(await c.command('inb 0x60')).toBe('OK 0x002a');
    expect(await c.command('writeq 0x100 0xfedcba9876543210')).toBe('OK');
    expect(await c.command('readq 0x100')).toBe('OK 0xfedcba9876543210');
    expect(await c.command('clock_step 50')).toBe('OK 50');
    expect(await c.command('bogus')).toBe("FAIL Unknown command 'bogus'");
    expect(await c.command('inb nope')).toBe("ERR inb: ADDR 'nope' is not a number");
    expect(await c.command('irq_intercept_in nowhere')).toBe("FAIL No device at 'nowhere'");
  });

  it('handles several commands in one packet, replying to each in order', async () => {
    const c = await client();
    await c.send('writeb 0x10 0x1\nwriteb 0x11 0x2\nreadw 0x10\nendianness\nclock_set 7\n');
    expect([await c.next(), await c.next(), await c.next(), await c.next(), await c.next()]).toEqual([
      'OK',
      'OK',
      'OK 0x0000000000000201',
      'OK little',
      'OK 7',
    ]);
  });

  it('reassembles a command split across packets, CR and LF apart', async () => {
    const c = await client();
    target.ram[0x100] = 0x5a;
    for (const part of ['rea', 'db 0x1', '00\r']) {
      await c.send(part);
      await barrier();
    }
    await c.send('\nread');
    await barrier();
    await c.send(' 0x100 2\r\n');
    expect(await c.next()).toBe('OK 0x000000000000005a');
    expect(await c.next()).toBe('OK 0x5a00');
    expect(log.filter((l) => l.startsWith('[R') && l.includes('0x100'))).toEqual([
      expect.stringMatching(/\] readb 0x100$/),
      expect.stringMatching(/\] read 0x100 2$/),
    ]);
  });

  it('moves large data both ways: b64write and read of 512 KiB', async () => {
    const c = await client();
    const data = Buffer.alloc(512 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
    expect(await c.command(`b64write 0x1000 0x80000 ${data.toString('base64')}`)).toBe('OK');
    expect(Buffer.from(target.ram.subarray(0x1000, 0x81000)).equals(data)).toBe(true);
    expect(await c.command('read 0x1000 0x80000')).toBe(`OK 0x${data.toString('hex')}`);
    expect(await c.command('b64read 0x1000 0x80000')).toBe(`OK ${data.toString('base64')}`);
  });

  it('answers an over-long line once with ERR line too long, drops it, and keeps serving', async () => {
    const c = await client();
    // Trickled in: refused as soon as the limit is passed, the rest of the line is dropped.
    await c.send('x'.repeat(MAX_LINE + 1));
    expect(await c.next()).toBe('ERR line too long');
    await c.send('still the same line\nendianness\n');
    expect(await c.next()).toBe('OK little');
    // All at once, newline included: the same single answer.
    await c.send(`readb ${'0'.repeat(MAX_LINE)}\ninb 0x3f8\n`);
    expect(await c.next()).toBe('ERR line too long');
    expect(await c.next()).toBe('OK 0x00ff');
    expect(log.some((l) => l.includes('still the same line'))).toBe(false);
  });

  it('sends IRQ lines unsolicited, between replies, to the connection that intercepted', async () => {
    const a = await client();
    const b = await client();
    expect(await a.command('irq_intercept_in ioapic')).toBe('OK');
    // Each connection has its own interception state: b may still intercept (another device).
    expect(await b.command('irq_intercept_out pic')).toBe('OK');
    expect(await b.command('irq_intercept_out ioapic')).toBe('FAIL IRQ intercept already enabled');

    expect(await a.command('set_irq_in ioapic unnamed-gpio-in 14 1')).toBe('IRQ raise 14');
    expect(await a.next()).toBe('OK');
    // Driven from b, the ioapic line is still reported to a, and only to a.
    expect(await b.command('set_irq_in ioapic unnamed-gpio-in 14 0')).toBe('OK');
    expect(await a.next()).toBe('IRQ lower 14');

    expect(await b.command('outb 0x20 0x85')).toBe('IRQ raise 5');
    expect(await b.next()).toBe('OK');
    // Nothing of b's reached a: its next line is the reply to its next command.
    expect(await a.command('inb 0x3f8')).toBe('OK 0x00ff');
    expect(await b.command('endianness')).toBe('OK little');
  });

  it('drops IRQ lines for a connection that has closed, and keeps serving the others', async () => {
    const a = await client();
    expect(await a.command('irq_intercept_in ioapic')).toBe('OK');
    await a.end();
    const b = await client();
    expect(await b.command('set_irq_in ioapic unnamed-gpio-in 3 1')).toBe('OK');
    expect(await b.command('endianness')).toBe('OK little');
    expect(log.some((l) => l.includes('IRQ'))).toBe(false);
  });

  it('logs received and sent lines like -qtest-log, IRQ lines included', async () => {
    const c = await client();
    await c.command('irq_intercept_out pic');
    await c.send('outb 0x20 0x81\r\n');
    expect(await c.next()).toBe('IRQ raise 1');
    expect(await c.next()).toBe('OK');
    expect(log.map((l) => l.replace(/^\[([RS]) \+\d+\.\d{6}\] /, '[$1] '))).toEqual([
      '[R] irq_intercept_out pic',
      '[S] OK',
      '[R] outb 0x20 0x81',
      '[S] IRQ raise 1',
      '[S] OK',
    ]);
    const secs = log.map((l) => Number(/^\[[RS] \+(\d+\.\d{6})\]/.exec(l)![1]));
    expect(secs).toEqual([...secs].sort((x, y) => x - y));
    expect(secs[0]).toBeLessThan(60);
  });

  it('close() ends connections, removes the socket and is idempotent', async () => {
    const c = await client();
    expect(await c.command('endianness')).toBe('OK little');
    expect(existsSync(sock)).toBe(true);
    await Promise.all([server.close(), server.close()]);
    await c.closed();
    expect(existsSync(sock)).toBe(false);
    await expect(LineClient.connect(sock)).rejects.toThrow(/ENOENT|ECONNREFUSED/);
    await server.close();
  });

  it('replaces a stale socket file but refuses to remove anything else', async () => {
    const stale = join(dir, 'stale.sock');
    // A process that exits while listening leaves its socket file behind, like a crashed QEMU.
    const child = spawnSync(process.execPath, ['-e', `require('net').createServer().listen(${JSON.stringify(stale)}, () => process.exit(0))`]);
    expect(child.status).toBe(0);
    expect(existsSync(stale)).toBe(true);
    const second = await startQtestServer(stale, target);
    try {
      const c = await LineClient.connect(stale);
      clients.push(c);
      expect(await c.command('clock_step')).toBe('OK 1000');
    } finally {
      await second.close();
    }

    const file = join(dir, 'precious');
    writeFileSync(file, 'keep me');
    await expect(startQtestServer(file, target)).rejects.toThrow(/not a socket/);
    expect(readFileSync(file, 'utf8')).toBe('keep me');
  });

  it('serveQtestSocket speaks qtest on a socket it connected itself (QEMU\'s -qtest unix:P)', async () => {
    // The harness listens, as libqtest does, and the machine connects to it.
    const harnessPath = join(dir, 'harness.sock');
    const accepted = new Promise<LineClient>((resolve) => {
      const listener = createServer((s) => {
        listener.close();
        resolve(LineClient.wrap(s));
      }).listen(harnessPath);
    });
    const machineSide = connect(harnessPath);
    const lines: string[] = [];
    serveQtestSocket(machineSide, target, { log: (l) => lines.push(l) });
    const harness = await accepted;
    clients.push(harness);
    expect(await harness.command('irq_intercept_out pic')).toBe('OK');
    expect(await harness.command('outb 0x20 0x82')).toBe('IRQ raise 2');
    expect(await harness.next()).toBe('OK');
    expect(lines.map((l) => l.replace(/^\[([RS]) \+\d+\.\d{6}\] /, '$1 '))).toEqual([
      'R irq_intercept_out pic',
      'S OK',
      'R outb 0x20 0x82',
      'S IRQ raise 2',
      'S OK',
    ]);
    machineSide.destroy();
    await harness.closed();
  });
});
