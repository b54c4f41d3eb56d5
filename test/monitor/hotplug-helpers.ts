// A raw QMP client for the monitor tests: whole replies (error classes included), every
// event kept, waits for an event with a deadline. And the open files of a process.
import { readdirSync, readlinkSync } from 'node:fs';
import { connect, type Socket } from 'node:net';

export type Msg = Record<string, unknown>;

export class RawQmp {
  readonly events: Msg[] = [];
  private buf = '';
  private readonly waiting: ((m: Msg) => void)[] = [];
  private readonly eventWaiters = new Set<() => void>();

  private constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Msg;
        if ('event' in msg) {
          this.events.push(msg);
          for (const w of [...this.eventWaiters]) w();
        } else this.waiting.shift()?.(msg);
      }
    });
  }

  /** Connects (retrying while the socket appears), reads the greeting, negotiates. */
  static async connect(path: string): Promise<RawQmp> {
    for (let i = 0; ; i++) {
      try {
        const sock = await new Promise<Socket>((res, rej) => {
          const s = connect(path, () => res(s));
          s.once('error', rej);
        });
        const q = new RawQmp(sock);
        await q.next();
        const r = await q.cmd('qmp_capabilities');
        if (!('return' in r)) throw new Error(JSON.stringify(r));
        return q;
      } catch (e) {
        if (i > 200) throw e;
        await new Promise((r) => setTimeout(r, 25));
      }
    }
  }

  private next(): Promise<Msg> {
    return new Promise((r) => this.waiting.push(r));
  }

  /** The whole reply: { return } or { error: { class, desc } }. */
  cmd(execute: string, args?: Msg): Promise<Msg> {
    const reply = this.next();
    this.sock.write(`${JSON.stringify({ execute, ...(args ? { arguments: args } : {}) })}\n`);
    return reply;
  }

  /** The `return` of a command that must succeed. */
  async ok(execute: string, args?: Msg): Promise<unknown> {
    const r = await this.cmd(execute, args);
    if (!('return' in r)) throw new Error(`${execute}: ${JSON.stringify(r['error'])}`);
    return r['return'];
  }

  /** HMP through human-monitor-command: its output. */
  async hmp(line: string): Promise<string> {
    return (await this.ok('human-monitor-command', { 'command-line': line })) as string;
  }

  /** Events named `name` seen so far (their data). */
  seen(name: string): Msg[] {
    return this.events.filter((e) => e['event'] === name).map((e) => (e['data'] ?? {}) as Msg);
  }

  /** Waits until `count` events named `name` have arrived. */
  async waitEvent(name: string, count = 1, ms = 5000): Promise<Msg[]> {
    const deadline = Date.now() + ms;
    while (this.seen(name).length < count) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${count} ${name} event(s); have ${JSON.stringify(this.events)}`);
      await new Promise<void>((r) => {
        const t = setTimeout(done, Math.min(left, 50));
        function done(): void {
          clearTimeout(t);
          r();
        }
        this.eventWaiters.add(done);
        setTimeout(() => this.eventWaiters.delete(done), Math.min(left, 50) + 1);
      });
    }
    return this.seen(name);
  }

  close(): void {
    this.sock.destroy();
  }
}

/** How many of process `pid`'s open files are `path`. */
export function openCount(pid: number, path: string): number {
  let n = 0;
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      if (readlinkSync(`/proc/${pid}/fd/${fd}`) === path) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

/** Polls `cond` until it holds, for at most `ms`. */
export async function eventually(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
