/** A QMP client for tests: connects (UNIX path or TCP port), negotiates, runs commands, keeps events. */
import { connect, type Socket } from 'node:net';

export interface QmpSession {
  greeting: Record<string, unknown>;
  run(cmd: string, args?: object): Promise<Record<string, unknown>>;
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
  return { greeting: g, run, events, close: () => s.destroy() };
}
