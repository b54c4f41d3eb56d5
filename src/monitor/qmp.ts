/**
 * A QMP monitor (../shared/specs/qmp-spec.txt) on a socket: the greeting, capabilities
 * negotiation, one command table, `id` echoed, errors by class, events to every client.
 * The table starts small (the machine's lifecycle); the monitor issue grows it.
 */
import type { Socket } from 'node:net';

import { QmpError, type QmpErrorClass } from './errors.js';
import { checkArgs, defineCommand, type CommandDef } from './schema.js';

export { QmpError, type QmpErrorClass } from './errors.js';
export { defineCommand, type CommandDef } from './schema.js';

/** Splits a byte stream into top-level JSON values: braces counted outside strings. */
class JsonFramer {
  private buf = '';
  private depth = 0;
  private inString = false;
  private escape = false;
  private scanned = 0;

  push(chunk: string, emit: (text: string) => void): void {
    this.buf += chunk;
    for (let i = this.scanned; i < this.buf.length; i++) {
      const ch = this.buf[i]!;
      if (this.inString) {
        if (this.escape) this.escape = false;
        else if (ch === '\\') this.escape = true;
        else if (ch === '"') this.inString = false;
        continue;
      }
      if (ch === '"') this.inString = true;
      else if (ch === '{' || ch === '[') this.depth++;
      else if (ch === '}' || ch === ']') this.depth--;
      if (this.depth <= 0 && (ch === '}' || ch === ']' || (ch === '\n' && this.buf.slice(0, i).trim()))) {
        const text = this.buf.slice(0, i + 1).trim();
        this.buf = this.buf.slice(i + 1);
        this.depth = 0;
        i = -1;
        if (text) emit(text);
      }
    }
    this.scanned = this.buf.length;
    if (this.buf.length > 1 << 20) {
      this.buf = '';
      this.scanned = 0;
      this.depth = 0;
      emit('\u0000too-long');
    }
  }
}

export class QmpClient {
  negotiated = false;
  private readonly framer = new JsonFramer();
  /** Commands run one at a time, replies in order, even when one waits (a drained media change). */
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly socket: Socket, private readonly monitor: QmpMonitor) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => this.framer.push(d, (t) => void (this.queue = this.queue.then(() => this.handle(t)))));
    socket.on('error', () => {});
  }

  send(obj: unknown): void {
    if (!this.socket.destroyed) this.socket.write(`${JSON.stringify(obj)}\r\n`);
  }

  private async handle(text: string): Promise<void> {
    let req: unknown;
    try {
      if (text === '\u0000too-long') throw new Error('request too long');
      req = JSON.parse(text);
    } catch (e) {
      this.send({ error: { class: 'GenericError', desc: `JSON parse error, ${(e as Error).message}` } });
      return;
    }
    const r = req as Record<string, unknown>;
    const id = r && typeof r === 'object' && 'id' in r ? { id: r['id'] } : {};
    const fail = (cls: QmpErrorClass, desc: string): void => this.send({ error: { class: cls, desc }, ...id });
    if (!r || typeof r !== 'object' || Array.isArray(r)) return fail('GenericError', 'QMP input must be a JSON object');
    const name = r['execute'];
    if (typeof name !== 'string') return fail('GenericError', "QMP input lacks member 'execute'");
    for (const k of Object.keys(r)) if (!['execute', 'arguments', 'id'].includes(k)) return fail('GenericError', `QMP input member '${k}' is unexpected`);
    const args = r['arguments'] ?? {};
    if (!args || typeof args !== 'object' || Array.isArray(args)) return fail('GenericError', "QMP input member 'arguments' must be an object");
    if (!this.negotiated && name !== 'qmp_capabilities') {
      return fail('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    if (this.negotiated && name === 'qmp_capabilities') {
      return fail('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    }
    const cmd = this.monitor.command(name);
    if (!cmd) return fail('CommandNotFound', `The command ${name} has not been found`);
    try {
      checkArgs(cmd.args, args as Record<string, unknown>, cmd.open);
      const ret = await cmd.run(args as never, this);
      this.send({ return: ret ?? {}, ...id });
    } catch (e) {
      if (e instanceof QmpError) fail(e.errorClass, e.message);
      else fail('GenericError', e instanceof Error ? e.message : String(e));
    }
  }
}

export class QmpMonitor {
  private readonly commands = new Map<string, CommandDef>();
  private readonly clients = new Set<QmpClient>();

  constructor(private readonly version: { major: number; minor: number; micro: number; package: string }) {
    this.register(defineCommand({
      name: 'qmp_capabilities',
      doc: 'Leaves capabilities negotiation mode (no capabilities are offered)',
      args: { enable: { type: { array: { enum: ['oob'] } }, optional: true } },
      run: (a, c) => {
        if (a.enable?.length) throw new QmpError('GenericError', "Capability 'oob' not available");
        c.negotiated = true;
      },
    }));
    this.register(defineCommand({ name: 'query-commands', doc: 'The commands this monitor has', args: {}, run: () => [...this.commands.keys()].map((name) => ({ name })) }));
    this.register(defineCommand({
      name: 'query-version',
      doc: 'The version of the program',
      args: {},
      run: () => ({ qemu: { major: version.major, minor: version.minor, micro: version.micro }, package: version.package }),
    }));
  }

  register(cmd: CommandDef): void {
    if (this.commands.has(cmd.name)) throw new Error(`QMP command '${cmd.name}' is defined twice`);
    this.commands.set(cmd.name, cmd);
  }

  /** Every command, with its definition (documentation, arguments). */
  all(): CommandDef[] {
    return [...this.commands.values()];
  }

  command(name: string): CommandDef | undefined {
    return this.commands.get(name);
  }

  /** Serves QMP on a connected socket (either end of the connection). */
  attach(socket: Socket): QmpClient {
    const c = new QmpClient(socket, this);
    this.clients.add(c);
    socket.on('close', () => this.clients.delete(c));
    const v = this.version;
    c.send({ QMP: { version: { qemu: { major: v.major, minor: v.minor, micro: v.micro }, package: v.package }, capabilities: [] } });
    return c;
  }

  /** An event to every negotiated client, with QEMU's timestamp. */
  emit(event: string, data?: Record<string, unknown>): void {
    const now = Date.now();
    const msg = { event, ...(data ? { data } : {}), timestamp: { seconds: Math.floor(now / 1000), microseconds: (now % 1000) * 1000 } };
    for (const c of this.clients) if (c.negotiated) c.send(msg);
  }
}
