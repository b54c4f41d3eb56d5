// Helpers for the NBD export tests: asynchronous peers (the server runs in this process, so
// a synchronous spawn would deadlock it) and a minimal raw client for misbehaving on purpose.
import { spawn } from 'node:child_process';
import { connect, type Socket } from 'node:net';

export interface Ran {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a peer without blocking the event loop. */
export function sh(cmd: string, args: readonly string[], timeoutMs = 60_000): Promise<Ran> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const t = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('error', reject);
    p.on('close', (code) => {
      clearTimeout(t);
      resolve({ code, stdout, stderr });
    });
  });
}

export async function shOk(cmd: string, args: readonly string[], timeoutMs?: number): Promise<string> {
  const r = await sh(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.code}): ${r.stderr}${r.stdout}`);
  return r.stdout;
}

/** A raw NBD client: reads exactly, writes bytes, knows the handshake. */
export class RawClient {
  #buf = Buffer.alloc(0);
  #want: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  #ended: Error | null = null;
  readonly sock: Socket;
  readonly closed: Promise<void>;

  constructor(path: string) {
    this.sock = connect(path);
    this.sock.on('data', (d: Buffer) => {
      this.#buf = Buffer.concat([this.#buf, d]);
      this.#serve();
    });
    this.sock.on('error', () => undefined);
    this.closed = new Promise((r) => this.sock.on('close', () => {
      this.#ended = new Error('connection closed');
      this.#serve();
      r();
    }));
  }

  #serve(): void {
    const w = this.#want;
    if (!w) return;
    if (this.#buf.length >= w.n) {
      const out = this.#buf.subarray(0, w.n);
      this.#buf = this.#buf.subarray(w.n);
      this.#want = null;
      w.resolve(out);
    } else if (this.#ended) {
      this.#want = null;
      w.reject(this.#ended);
    }
  }

  read(n: number): Promise<Buffer> {
    return new Promise((resolve, reject) => {
      this.#want = { n, resolve, reject };
      this.#serve();
    });
  }

  write(b: Buffer): void {
    this.sock.write(b);
  }

  /** Greeting, client flags (fixed newstyle, no zeroes), EXPORT_NAME; returns size and flags. */
  async handshake(name: string): Promise<{ size: bigint; flags: number }> {
    const hello = await this.read(18);
    if (hello.toString('latin1', 0, 8) !== 'NBDMAGIC' || hello.toString('latin1', 8, 16) !== 'IHAVEOPT') throw new Error('bad greeting');
    const f = Buffer.alloc(4);
    f.writeUInt32BE(3);
    this.write(f);
    this.write(option(1, Buffer.from(name)));
    const r = await this.read(10);
    return { size: r.readBigUInt64BE(0), flags: r.readUInt16BE(8) };
  }

  /** Sends a request header (and payload). */
  request(type: number, cookie: bigint, offset: bigint, length: number, flags = 0, payload?: Buffer): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(offset, 16);
    h.writeUInt32BE(length, 24);
    this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /** Reads a simple reply header: error and cookie. */
  async simpleReply(): Promise<{ error: number; cookie: bigint }> {
    const r = await this.read(16);
    if (r.readUInt32BE(0) !== 0x67446698) throw new Error(`bad reply magic ${r.readUInt32BE(0).toString(16)}`);
    return { error: r.readUInt32BE(4), cookie: r.readBigUInt64BE(8) };
  }

  close(): void {
    this.sock.destroy();
  }
}

export function option(opt: number, data: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.write('IHAVEOPT', 0, 'latin1');
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(data.length, 12);
  return Buffer.concat([h, data]);
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
