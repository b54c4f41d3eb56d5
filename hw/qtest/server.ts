/**
 * The qtest server: QEMU's `-qtest unix:PATH`, a line protocol on a UNIX socket. The protocol
 * itself lives in protocol.ts; this file frames lines, keeps one session per connection and
 * writes the optional `-qtest-log` style trace.
 */
import { lstatSync, unlinkSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { createSession, handleLine, type QtestSession } from './protocol.js';
import type { QtestTarget } from './target.js';

export interface QtestServerOptions {
  /** Receives `[R +secs] line` for every line received and `[S +secs] line` for every line sent. */
  log?: (line: string) => void;
}

export interface QtestServer {
  readonly path: string;
  /** Stops listening, drops every connection and removes the socket file. Idempotent. */
  close(): Promise<void>;
}

/** A line longer than this (without its newline) is answered `ERR line too long` and dropped. */
export const MAX_LINE = 1024 * 1024;

/** Removes a socket left behind by a dead server; refuses to remove anything else. */
function removeStaleSocket(path: string): void {
  let isSocket: boolean;
  try {
    isSocket = lstatSync(path).isSocket();
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
  if (!isSocket) throw new Error(`qtest: ${path} exists and is not a socket`);
  unlinkSync(path);
}

/** One client: its own line buffer and protocol session (and so its own interception). */
class Connection {
  private pending = '';
  /** Set after an over-long line was refused: everything up to the next newline is dropped. */
  private discarding = false;
  private closed = false;
  private readonly session: QtestSession;

  constructor(
    private readonly socket: Socket,
    private readonly target: QtestTarget,
    private readonly log: (dir: 'R' | 'S', line: string) => void,
  ) {
    // The interception callback outlives the connection (the target has no way to undo it),
    // so sending must check that there is still someone to send to.
    this.session = createSession((line) => this.send(line));
    // UTF-8 decoding keeps a multi-byte character split across packets intact.
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => this.receive(chunk));
    // Back-pressure: stop reading commands while the client does not read its replies.
    socket.on('drain', () => socket.resume());
    // Errors (ECONNRESET, EPIPE) only end this connection; 'close' follows.
    socket.on('error', () => {});
    socket.on('close', () => {
      this.closed = true;
    });
  }

  destroy(): void {
    this.closed = true;
    this.socket.destroy();
  }

  private send(line: string): void {
    if (this.closed || this.socket.destroyed || !this.socket.writable) return;
    this.log('S', line);
    if (!this.socket.write(`${line}\n`)) this.socket.pause();
  }

  private receive(chunk: string): void {
    let start = 0;
    for (let nl = chunk.indexOf('\n'); nl >= 0; nl = chunk.indexOf('\n', start)) {
      const piece = chunk.slice(start, nl);
      start = nl + 1;
      if (this.discarding) {
        this.discarding = false;
        continue;
      }
      const line = this.pending + piece;
      this.pending = '';
      this.handle(line.endsWith('\r') ? line.slice(0, -1) : line);
      // A command may have made the machine close us (or the server may be closing).
      if (this.closed) return;
    }
    if (this.discarding) return;
    this.pending += chunk.slice(start);
    if (this.pending.length > MAX_LINE) {
      this.pending = '';
      this.discarding = true;
      this.send('ERR line too long');
    }
  }

  private handle(line: string): void {
    if (line.length > MAX_LINE) {
      // The whole over-long line arrived in one chunk: same answer as when it trickles in.
      this.send('ERR line too long');
      return;
    }
    this.log('R', line);
    const reply = handleLine(line, this.target, this.session);
    if (reply !== undefined) this.send(reply);
  }
}

/** The trace writer: seconds since `started` with 6 decimals, like QEMU's -qtest-log. */
function tracer(opts: QtestServerOptions): (dir: 'R' | 'S', line: string) => void {
  const started = process.hrtime.bigint();
  const out = opts.log;
  return (dir, line) => {
    if (!out) return;
    const us = (process.hrtime.bigint() - started) / 1000n;
    out(`[${dir} +${us / 1_000_000n}.${String(us % 1_000_000n).padStart(6, '0')}] ${line}`);
  };
}

/**
 * Serves qtest on one already-connected socket: QEMU's default `-qtest unix:PATH` connects to
 * the harness's listening socket rather than listening itself. Destroy the socket to stop.
 */
export function serveQtestSocket(socket: Socket, target: QtestTarget, opts: QtestServerOptions = {}): void {
  new Connection(socket, target, tracer(opts));
}

/** Starts a qtest server on the UNIX socket `path`, replacing a stale socket file there. */
export async function startQtestServer(
  path: string,
  target: QtestTarget,
  opts: QtestServerOptions = {},
): Promise<QtestServer> {
  const log = tracer(opts);
  removeStaleSocket(path);
  const connections = new Set<Connection>();
  const server: Server = createServer((socket) => {
    const conn = new Connection(socket, target, log);
    connections.add(conn);
    socket.on('close', () => connections.delete(conn));
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(path, () => {
      server.off('error', reject);
      resolve();
    });
  });
  // After listening, accept() failures (EMFILE) must not take the process down.
  server.on('error', () => {});

  let closing: Promise<void> | undefined;
  return {
    path,
    close() {
      closing ??= new Promise<void>((resolve) => {
        // server.close() waits for open connections, so end them first.
        // libuv unlinks the socket file itself; unlinking again could remove a successor's.
        server.close(() => resolve());
        for (const conn of connections) conn.destroy();
        connections.clear();
      });
      return closing;
    },
  };
}
