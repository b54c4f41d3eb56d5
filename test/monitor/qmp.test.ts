// The QMP monitor's protocol: greeting, negotiation, id echo, error classes, malformed input
// that leaves the connection up, and events to negotiated clients only. Over a real socket.
import { mkdtempSync, rmSync } from 'node:fs';
import { connect, createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { defineCommand, QmpError, QmpMonitor } from '../../src/monitor/qmp.js';

const dir = mkdtempSync(join(tmpdir(), 'spindle-qmp-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function pair(mon: QmpMonitor, name: string): Promise<{ send: (s: string) => void; next: () => Promise<Record<string, unknown>>; sock: Socket }> {
  const path = join(dir, name);
  const srv = createServer((s) => void mon.attach(s));
  await new Promise<void>((r) => srv.listen(path, r));
  const sock = connect(path);
  let buf = '';
  const queue: string[] = [];
  let waiter: ((s: string) => void) | null = null;
  sock.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (waiter) {
        const w = waiter;
        waiter = null;
        w(line);
      } else queue.push(line);
    }
  });
  sock.on('close', () => srv.close());
  return {
    sock,
    send: (s) => void sock.write(s),
    next: async () => JSON.parse(queue.shift() ?? (await new Promise<string>((r) => (waiter = r)))) as Record<string, unknown>,
  };
}

describe('QMP monitor', () => {
  it('greets, negotiates, echoes ids, and answers bad input with errors while staying up', async () => {
    const mon = new QmpMonitor({ major: 0, minor: 1, micro: 0, package: 'spindle-test' });
    mon.register(defineCommand({ name: 'fail-generic', doc: '', args: {}, run: () => { throw new Error('it broke'); } }));
    mon.register(defineCommand({ name: 'fail-device', doc: '', args: {}, run: () => { throw new QmpError('DeviceNotFound', "Device 'x' not found"); } }));
    mon.register(defineCommand({ name: 'echo', doc: '', args: { a: { type: 'any', optional: true } }, run: (a) => a }));
    const c = await pair(mon, 'a.sock');
    expect(await c.next()).toEqual({ QMP: { version: { qemu: { major: 0, minor: 1, micro: 0 }, package: 'spindle-test' }, capabilities: [] } });
    c.send('{"execute": "echo", "id": 1}\n');
    expect(await c.next()).toEqual({ error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" }, id: 1 });
    c.send('{"execute": "qmp_capabilities"}');
    expect(await c.next()).toEqual({ return: {} });
    // Split across writes, two in one write, nested braces and a brace inside a string.
    c.send('{"execute": "echo", "arguments": {"a": {"b": "}{"}}, ');
    c.send('"id": "x"}{"execute": "query-version", "id": [2]}');
    expect(await c.next()).toEqual({ return: { a: { b: '}{' } }, id: 'x' });
    expect(await c.next()).toEqual({ return: { qemu: { major: 0, minor: 1, micro: 0 }, package: 'spindle-test' }, id: [2] });
    c.send('{"execute": nope}\n');
    expect((await c.next())['error']).toMatchObject({ class: 'GenericError' });
    c.send('garbage\n');
    expect((await c.next())['error']).toMatchObject({ class: 'GenericError' });
    c.send('{"execute": "echo", "arguments": [1]}');
    expect(await c.next()).toEqual({ error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } });
    c.send('{"execute": "echo", "extra": 1}');
    expect((await c.next())['error']).toMatchObject({ desc: "QMP input member 'extra' is unexpected" });
    c.send('{"arguments": {}}');
    expect((await c.next())['error']).toMatchObject({ desc: "QMP input lacks member 'execute'" });
    c.send('{"execute": "nope", "id": 5}');
    expect(await c.next()).toEqual({ error: { class: 'CommandNotFound', desc: 'The command nope has not been found' }, id: 5 });
    c.send('{"execute": "fail-generic"}');
    expect(await c.next()).toEqual({ error: { class: 'GenericError', desc: 'it broke' } });
    c.send('{"execute": "fail-device"}');
    expect(await c.next()).toEqual({ error: { class: 'DeviceNotFound', desc: "Device 'x' not found" } });
    c.send('{"execute": "query-commands"}');
    expect((await c.next())['return']).toEqual(expect.arrayContaining([{ name: 'qmp_capabilities' }, { name: 'echo' }]));
    c.sock.destroy();
  });

  it("checks every request against its command's typed definition, with QEMU's messages", async () => {
    const mon = new QmpMonitor({ major: 0, minor: 1, micro: 0, package: 'p' });
    const seen: unknown[] = [];
    mon.register(defineCommand({
      name: 'resize-ish',
      doc: 'takes typed arguments',
      args: {
        device: { type: 'str' },
        size: { type: 'int' },
        mode: { type: { enum: ['fast', 'slow'] }, optional: true },
        opts: { type: { object: { ro: { type: 'bool' } } }, optional: true },
        list: { type: { array: 'str' }, optional: true },
      },
      run: (a) => {
        // The handler's argument type comes from the definition: a.size is a number here.
        seen.push([a.device, a.size + 1, a.mode ?? 'none', a.opts?.ro ?? null, a.list ?? []]);
        return {};
      },
    }));
    expect(() => mon.register(defineCommand({ name: 'resize-ish', doc: '', args: {}, run: () => ({}) }))).toThrow(/defined twice/);
    const c = await pair(mon, 'd.sock');
    await c.next();
    c.send('{"execute": "qmp_capabilities"}');
    await c.next();
    const cases: [string, string][] = [
      ['{"size": 1}', "Parameter 'device' is missing"],
      ['{"device": 1, "size": 1}', "Invalid parameter type for 'device', expected: string"],
      ['{"device": "d", "size": 1.5}', "Invalid parameter type for 'size', expected: integer"],
      ['{"device": "d", "size": 1, "bogus": 1}', "Parameter 'bogus' is unexpected"],
      ['{"device": "d", "size": 1, "mode": "warp"}', "Parameter 'mode' does not accept value 'warp'"],
      ['{"device": "d", "size": 1, "opts": {}}', "Parameter 'opts.ro' is missing"],
      ['{"device": "d", "size": 1, "opts": {"ro": "yes"}}', "Invalid parameter type for 'opts.ro', expected: boolean"],
      ['{"device": "d", "size": 1, "list": ["a", 2]}', "Invalid parameter type for 'list[1]', expected: string"],
    ];
    for (const [args, desc] of cases) {
      c.send(`{"execute": "resize-ish", "arguments": ${args}}`);
      expect(await c.next()).toEqual({ error: { class: 'GenericError', desc } });
    }
    expect(seen).toEqual([]); // nothing ran with bad arguments
    c.send('{"execute": "resize-ish", "arguments": {"device": "d", "size": 41, "mode": "slow", "opts": {"ro": true}, "list": ["x"]}}');
    expect(await c.next()).toEqual({ return: {} });
    expect(seen).toEqual([['d', 42, 'slow', true, ['x']]]);
    c.send('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}');
    expect((await c.next())['error']).toMatchObject({ class: 'CommandNotFound' }); // already negotiated
    c.sock.destroy();
  });

  it('sends events with timestamps to negotiated clients only', async () => {
    const mon = new QmpMonitor({ major: 0, minor: 1, micro: 0, package: 'p' });
    const a = await pair(mon, 'b.sock');
    const b = await pair(mon, 'c.sock');
    await a.next();
    await b.next();
    a.send('{"execute": "qmp_capabilities"}');
    await a.next();
    mon.emit('STOP');
    b.send('{"execute": "qmp_capabilities"}');
    const ev = await a.next();
    expect(ev['event']).toBe('STOP');
    const ts = ev['timestamp'] as { seconds: number; microseconds: number };
    expect(ts.seconds).toBeGreaterThan(1.6e9);
    expect(ts.microseconds).toBeLessThan(1e6);
    // b negotiated after the event: its first message is the reply, not the event.
    expect(await b.next()).toEqual({ return: {} });
    a.sock.destroy();
    b.sock.destroy();
  });
});
