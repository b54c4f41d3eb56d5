/**
 * Starting a machine the way QEMU's libqtest does: listen on a qtest socket and a QMP socket,
 * run `spindle system -qtest unix:Q -chardev socket,path=M,id=char0 -mon chardev=char0,mode=control
 * -display none -accel qtest <args>`, accept both connections, negotiate QMP.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { QtestClient } from './qtest-client.js';

/** A QMP connection: commands in order, events kept aside. */
export class QmpConnection {
  readonly events: Record<string, unknown>[] = [];
  private buf = '';
  private readonly waiting: ((msg: Record<string, unknown>) => void)[] = [];

  constructor(private readonly sock: Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ('event' in msg) this.events.push(msg);
        else this.waiting.shift()?.(msg);
      }
    });
  }

  /** The next non-event message (the greeting, then replies). */
  next(): Promise<Record<string, unknown>> {
    return new Promise((r) => this.waiting.push(r));
  }

  /** Runs a command; resolves with its `return`, rejects with its error's description. */
  async execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const reply = this.next();
    this.sock.write(`${JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}) })}\n`);
    const msg = await reply;
    if ('error' in msg) throw new Error(`${command}: ${(msg['error'] as { desc: string }).desc}`);
    return msg['return'];
  }

  close(): void {
    this.sock.destroy();
  }
}

export interface RunningMachine {
  qts: QtestClient;
  qmp: QmpConnection;
  process: ChildProcess;
  /** QMP quit, then waits for the process to exit; resolves with its exit code. */
  quit(): Promise<number | null>;
}

/** The bundled CLI next to this module (dist/), or the repository's build when run from source. */
function spindleBinary(): string {
  const here = dirname(fileURLToPath(import.meta.url));
  for (const p of [join(here, 'spindle.mjs'), join(here, '..', '..', 'dist', 'spindle.mjs')]) if (existsSync(p)) return p;
  throw new Error('spindle.mjs not found: run `npm run build`');
}

function acceptOne(path: string): { server: Server; socket: Promise<Socket> } {
  let resolve!: (s: Socket) => void;
  const socket = new Promise<Socket>((r) => (resolve = r));
  const server = createServer((s) => resolve(s));
  server.listen(path);
  return { server, socket };
}

/** Starts `spindle system` with `args` (e.g. ['-drive', 'file=x.img,if=ide']) under qtest. */
export async function startMachine(args: readonly string[]): Promise<RunningMachine> {
  const dir = mkdtempSync(join(tmpdir(), 'spindle-qos-'));
  const q = acceptOne(join(dir, 'qtest.sock'));
  const m = acceptOne(join(dir, 'qmp.sock'));
  const proc = spawn(process.execPath, [
    spindleBinary(), 'system', '-qtest', `unix:${join(dir, 'qtest.sock')}`,
    '-chardev', `socket,path=${join(dir, 'qmp.sock')},id=char0`, '-mon', 'chardev=char0,mode=control',
    '-display', 'none', '-accel', 'qtest', ...args,
  ], { stdio: ['ignore', 'inherit', 'pipe'] });
  let stderr = '';
  proc.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((r) => proc.on('exit', (code) => r(code)));
  const failed = exited.then((code) => {
    throw new Error(`spindle system exited (${code}) before connecting: ${stderr.trim()}`);
  });
  try {
    const [qs, ms] = await Promise.race([Promise.all([q.socket, m.socket]), failed]);
    const qmp = new QmpConnection(ms);
    await qmp.next(); // the greeting
    await qmp.execute('qmp_capabilities');
    const qts = QtestClient.overSocket(qs);
    return {
      qts, qmp, process: proc,
      async quit() {
        await qmp.execute('quit').catch(() => undefined);
        const code = await exited;
        qts.close();
        qmp.close();
        return code;
      },
    };
  } finally {
    q.server.close();
    m.server.close();
    void exited.then(() => rmSync(dir, { recursive: true, force: true }));
    failed.catch(() => undefined);
  }
}
