/**
 * The guest side of qtest: a client that speaks QEMU's qtest protocol, to a machine in this
 * process (each command runs at once, through the same protocol code) or over a UNIX socket
 * (`spindle system -qtest`, or qemu-system itself). Guest-side drivers in this folder use
 * only this, so a device test runs unchanged against either.
 */
import { connect, type Socket } from 'node:net';
import { createSession, handleLine, type QtestSession } from '../../hw/qtest/protocol.js';
import type { QtestTarget } from '../../hw/qtest/target.js';

export class QtestFailure extends Error {}

type Transport = (line: string) => Promise<string>;

export class QtestClient {
  /** Levels of the intercepted lines, as the IRQ messages left them. */
  private readonly irqs = new Map<number, boolean>();
  private constructor(private readonly send: Transport, private readonly closer: () => void) {}

  /** A client of a machine in this process. */
  static inProcess(target: QtestTarget): QtestClient {
    let client!: QtestClient;
    const session: QtestSession = createSession((line) => client.unsolicited(line));
    client = new QtestClient((line) => Promise.resolve(handleLine(line, target, session) ?? ''), () => {});
    return client;
  }

  /** A client of the qtest socket at `path` (the machine listens: -qtest unix:PATH,server=on). */
  static async connect(path: string): Promise<QtestClient> {
    const sock = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(s));
      s.once('error', reject);
    });
    return QtestClient.overSocket(sock);
  }

  /** A client of an accepted or connected socket (the harness listened, libqtest style). */
  static overSocket(sock: Socket): QtestClient {
    let client!: QtestClient;
    const waiting: ((line: string) => void)[] = [];
    let buf = '';
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.startsWith('IRQ ')) client.unsolicited(line);
        else waiting.shift()?.(line);
      }
    });
    sock.on('close', () => {
      for (const w of waiting.splice(0)) w('FAIL connection closed');
    });
    client = new QtestClient((line) => new Promise((resolve) => {
      waiting.push(resolve);
      sock.write(`${line}\n`);
    }), () => sock.destroy());
    return client;
  }

  private unsolicited(line: string): void {
    const m = /^IRQ (raise|lower) (\d+)$/.exec(line);
    if (m) this.irqs.set(Number(m[2]), m[1] === 'raise');
  }

  close(): void {
    this.closer();
  }

  /** Sends one command; returns what follows OK, throws on FAIL/ERR. */
  async command(line: string): Promise<string> {
    const reply = await this.send(line);
    if (reply === 'OK') return '';
    if (reply.startsWith('OK ')) return reply.slice(3);
    throw new QtestFailure(`qtest '${line.length > 80 ? `${line.slice(0, 80)}...` : line}': ${reply}`);
  }

  private async num(line: string): Promise<number> {
    return Number(await this.command(line));
  }

  outb(addr: number, v: number): Promise<string> { return this.command(`outb 0x${addr.toString(16)} 0x${v.toString(16)}`); }
  outw(addr: number, v: number): Promise<string> { return this.command(`outw 0x${addr.toString(16)} 0x${v.toString(16)}`); }
  outl(addr: number, v: number): Promise<string> { return this.command(`outl 0x${addr.toString(16)} 0x${(v >>> 0).toString(16)}`); }
  inb(addr: number): Promise<number> { return this.num(`inb 0x${addr.toString(16)}`); }
  inw(addr: number): Promise<number> { return this.num(`inw 0x${addr.toString(16)}`); }
  inl(addr: number): Promise<number> { return this.num(`inl 0x${addr.toString(16)}`); }
  writeb(addr: number, v: number): Promise<string> { return this.command(`writeb 0x${addr.toString(16)} 0x${v.toString(16)}`); }
  writew(addr: number, v: number): Promise<string> { return this.command(`writew 0x${addr.toString(16)} 0x${v.toString(16)}`); }
  writel(addr: number, v: number): Promise<string> { return this.command(`writel 0x${addr.toString(16)} 0x${(v >>> 0).toString(16)}`); }
  writeq(addr: number, v: bigint): Promise<string> { return this.command(`writeq 0x${addr.toString(16)} 0x${v.toString(16)}`); }
  readb(addr: number): Promise<number> { return this.num(`readb 0x${addr.toString(16)}`); }
  readw(addr: number): Promise<number> { return this.num(`readw 0x${addr.toString(16)}`); }
  readl(addr: number): Promise<number> { return this.num(`readl 0x${addr.toString(16)}`); }
  async readq(addr: number): Promise<bigint> { return BigInt(await this.command(`readq 0x${addr.toString(16)}`)); }

  async memread(addr: number, len: number): Promise<Uint8Array> {
    if (len === 0) return new Uint8Array(0);
    return Uint8Array.from(Buffer.from(await this.command(`b64read 0x${addr.toString(16)} ${len}`), 'base64'));
  }

  async memwrite(addr: number, data: Uint8Array): Promise<void> {
    if (data.length === 0) return;
    await this.command(`b64write 0x${addr.toString(16)} ${data.length} ${Buffer.from(data).toString('base64')}`);
  }

  async memset(addr: number, len: number, v: number): Promise<void> {
    await this.command(`memset 0x${addr.toString(16)} ${len} 0x${v.toString(16)}`);
  }

  async clockStep(ns?: number): Promise<number> {
    return this.num(ns === undefined ? 'clock_step' : `clock_step ${ns}`);
  }

  async irqInterceptIn(path: string): Promise<void> {
    await this.command(`irq_intercept_in ${path}`);
  }

  /** Whether intercepted line `n` is up (as the last IRQ message said). */
  getIrq(n: number): boolean {
    return this.irqs.get(n) ?? false;
  }
}
