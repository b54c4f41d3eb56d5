/** A QMP client for tests: connects (UNIX path or TCP port), negotiates, runs commands, keeps events. */
import { connect, createServer, type Socket } from 'node:net';
import type { QmpMonitor } from '../../src/monitor/qmp.js';

export interface QmpSession {
  greeting: Record<string, unknown>;
  /** The whole reply: { return } or { error }. */
  run(cmd: string, args?: object): Promise<Record<string, unknown>>;
  /** The `return` of a command that must succeed. */
  ok(cmd: string, args?: object): Promise<unknown>;
  /** The `error` of a command that must fail. */
  err(cmd: string, args?: object): Promise<{ class: string; desc: string }>;
  events: Record<string, unknown>[];
  close(): void;
}

export async function qmpConnect(where: string | number, negotiate = true): Promise<QmpSession> {
  const s: Socket = typeof where === 'number' ? connect(where, '127.0.0.1') : connect(where);
  await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
  const events: Record<string, unknown>[] = [];
  const waiting: ((m: Record<string, unknown>) => void)[] = [];
  let greet!: (m: Record<string, unknown>) => void;
  const greeting = new Promise<Record<string, unknown>>((r) => (greet = r));
  let buf = '';
  s.on('data', (d) => {
    buf += d.toString();
    for (let i = buf.indexOf('\n'); i >= 0; i = buf.indexOf('\n')) {
      const m = JSON.parse(buf.slice(0, i)) as Record<string, unknown>;
      buf = buf.slice(i + 1);
      if (m['event']) events.push(m);
      else if (m['QMP']) greet(m);
      else waiting.shift()?.(m);
    }
  });
  const run = (cmd: string, args?: object): Promise<Record<string, unknown>> =>
    new Promise((r) => {
      waiting.push(r);
      s.write(JSON.stringify({ execute: cmd, ...(args ? { arguments: args } : {}) }) + '\n');
    });
  const g = await greeting;
  if (negotiate) await run('qmp_capabilities');
  const ok = async (cmd: string, args?: object): Promise<unknown> => {
    const r = await run(cmd, args);
    if (!('return' in r)) throw new Error(`${cmd} failed: ${JSON.stringify(r)}`);
    return r['return'];
  };
  const err = async (cmd: string, args?: object): Promise<{ class: string; desc: string }> => {
    const r = await run(cmd, args);
    if (!('error' in r)) throw new Error(`${cmd} succeeded: ${JSON.stringify(r)}`);
    return r['error'] as { class: string; desc: string };
  };
  return { greeting: g, run, ok, err, events, close: () => s.destroy() };
}

/** Serves `mon` on a UNIX socket at `path` and connects a negotiated session; close() ends both. */
export async function serveMonitor(mon: QmpMonitor, path: string): Promise<QmpSession> {
  const srv = createServer((sock) => void mon.attach(sock));
  await new Promise<void>((r) => srv.listen(path, r));
  const q = await qmpConnect(path);
  return {
    ...q,
    close: () => {
      q.close();
      srv.close();
    },
  };
}
