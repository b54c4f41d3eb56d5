/**
 * `spindle system`'s command line, in QEMU's syntax for what Spindle supports: single-dash
 * options (a double dash works too), each with at most one argument. Anything else is
 * refused by name, as qemu-system does.
 */
import { CliError } from '../fail.js';
import { parseBool, parseKeyval, parseSize, type KeyvalObject } from './keyval.js';

/**
 * A socket end: a UNIX socket at `path`, or TCP at host:port. Spindle connects (QEMU's
 * default) or, with server=on, listens.
 */
export type SocketSpec = ({ kind: 'unix'; path: string } | { kind: 'tcp'; host: string; port: number }) & { server: boolean; wait: boolean };

/** What a socket end is called in messages: the path, or host:port. */
export function socketName(s: SocketSpec): string {
  return s.kind === 'unix' ? s.path : `${s.host}:${s.port}`;
}

export interface SystemConfig {
  machine: string;
  ramSize: number;
  accel: string | null;
  qtest: SocketSpec | null;
  qtestLog: string | null;
  chardevs: Map<string, SocketSpec>;
  /** QMP monitors, on a chardev or straight on a socket (-qmp). */
  monitors: SocketSpec[];
  blockdevs: (KeyvalObject | Record<string, unknown>)[];
  drives: KeyvalObject[];
  devices: KeyvalObject[];
  nodefaults: boolean;
  /** -kernel: a multiboot kernel (booted without firmware) or a Linux bzImage. */
  kernel: string | null;
  /** -initrd and -append, for a Linux -kernel. */
  initrd: string | null;
  append: string | null;
  /** -bios: the firmware image (default: Debian's SeaBIOS). */
  bios: string | null;
  /** -snapshot: writes go to temporary overlays, the images stay as they were. */
  snapshot: boolean;
  /** -serial: where COM1 goes ('stdio', or null for nowhere). */
  serial: 'stdio' | null;
}

/** Options that take an argument, and those that do not. */
const WITH_ARG = new Set(['machine', 'M', 'm', 'accel', 'qtest', 'qtest-log', 'chardev', 'mon', 'qmp', 'blockdev', 'drive', 'device', 'display', 'kernel', 'serial',
  'initrd', 'append', 'bios', 'hda', 'hdb', 'hdc', 'hdd', 'cdrom', 'boot']);
const NO_ARG = new Set(['nodefaults', 'snapshot']);

/**
 * `unix:PATH` or `tcp:[HOST]:PORT`, then `,server=on|off,wait=on|off` (-qtest, -qmp). A TCP
 * end without a host is on loopback (QEMU's would be every interface).
 */
function parseSocketUri(opt: string, text: string): SocketSpec {
  const tcp = text.startsWith('tcp:');
  if (!tcp && !text.startsWith('unix:')) throw new CliError(`${opt}: only 'unix:PATH' and 'tcp:HOST:PORT' sockets are supported, not '${text}'`);
  const kv = parseKeyval(opt, text.slice(tcp ? 4 : 5), 'path');
  const path = kv['path'];
  if (typeof path !== 'string' || !path) throw new CliError(`${opt}: a socket ${tcp ? 'address' : 'path'} is required`);
  for (const k of Object.keys(kv)) if (!['path', 'server', 'wait'].includes(k)) throw new CliError(`${opt}: Invalid parameter '${k}'`);
  const server = parseBool(opt, 'server', kv['server'], false);
  const wait = parseBool(opt, 'wait', kv['wait'], server);
  if (!tcp) return { kind: 'unix', path, server, wait };
  return { ...tcpAddress(opt, path), server, wait };
}

function tcpAddress(opt: string, addr: string): { kind: 'tcp'; host: string; port: number } {
  const colon = addr.lastIndexOf(':');
  const host = colon < 0 ? '' : addr.slice(0, colon).replace(/^\[(.*)\]$/, '$1');
  const port = Number(addr.slice(colon + 1));
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new CliError(`${opt}: '${addr}' is not HOST:PORT`);
  return { kind: 'tcp', host: host || '127.0.0.1', port };
}

export function parseSystemArgs(argv: readonly string[]): SystemConfig {
  const c: SystemConfig = {
    machine: 'pc', ramSize: 128 << 20, accel: null, qtest: null, qtestLog: null, chardevs: new Map(),
    monitors: [], blockdevs: [], drives: [], devices: [], nodefaults: false, kernel: null, serial: null,
    initrd: null, append: null, bios: null, snapshot: false,
  };
  const monChardevs: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const tok = argv[i]!;
    if (!tok.startsWith('-') || tok === '-') throw new CliError(`${tok}: a lone argument (images go in -drive file=...)`);
    const name = tok.replace(/^--?/, '');
    const opt = `-${name}`;
    if (NO_ARG.has(name)) {
      if (name === 'nodefaults') c.nodefaults = true;
      if (name === 'snapshot') c.snapshot = true;
      continue;
    }
    if (!WITH_ARG.has(name)) throw new CliError(`${opt}: invalid option`);
    const arg = argv[++i];
    if (arg === undefined) throw new CliError(`${opt}: requires an argument`);
    switch (name) {
      case 'machine':
      case 'M': {
        const kv = parseKeyval(opt, arg, 'type');
        const type = kv['type'];
        if (type !== 'pc' && type !== 'pc-i440fx') {
          throw new CliError(`${opt}: unsupported machine type '${String(type)}' (Spindle has 'pc')`);
        }
        c.machine = 'pc';
        for (const [k, v] of Object.entries(kv)) {
          if (k === 'type') continue;
          if (k === 'accel') c.accel = String(v);
          else throw new CliError(`${opt}: Property 'pc-machine.${k}' not found`);
        }
        break;
      }
      case 'm': {
        const kv = parseKeyval(opt, arg, 'size');
        for (const k of Object.keys(kv)) if (k !== 'size') throw new CliError(`${opt}: Invalid parameter '${k}'`);
        c.ramSize = parseSize(opt, String(kv['size']), 1 << 20);
        if (c.ramSize < 1 << 20 || c.ramSize % 4096) throw new CliError(`${opt}: ram size ${c.ramSize} is too small or not a multiple of 4 KiB`);
        break;
      }
      case 'accel': {
        const kv = parseKeyval(opt, arg, 'accel');
        if (kv['accel'] !== 'qtest' && kv['accel'] !== 'tcg') throw new CliError(`${opt}: invalid accelerator '${String(kv['accel'])}' (Spindle has qtest)`);
        c.accel = String(kv['accel']);
        break;
      }
      case 'display': {
        const kv = parseKeyval(opt, arg, 'type');
        if (kv['type'] !== 'none') throw new CliError(`${opt}: Spindle has no display; use -display none`);
        break;
      }
      case 'qtest':
        c.qtest = parseSocketUri(opt, arg);
        break;
      case 'kernel':
        c.kernel = arg;
        break;
      case 'initrd':
        c.initrd = arg;
        break;
      case 'append':
        c.append = arg;
        break;
      case 'bios':
        c.bios = arg;
        break;
      case 'hda':
      case 'hdb':
      case 'hdc':
      case 'hdd':
        // QEMU's shorthands: an IDE disk at index 0..3.
        c.drives.push({ file: arg, if: 'ide', index: String(name.charCodeAt(2) - 97), media: 'disk' });
        break;
      case 'cdrom':
        c.drives.push({ file: arg, if: 'ide', index: '2', media: 'cdrom' });
        break;
      case 'boot': {
        // SeaBIOS without QEMU's boot-order file tries the first hard disk, then the CD.
        const kv = parseKeyval(opt, arg, 'order');
        for (const k of Object.keys(kv)) if (!['order', 'menu', 'strict'].includes(k)) throw new CliError(`${opt}: Invalid parameter '${k}'`);
        break;
      }
      case 'serial':
        if (arg !== 'stdio' && arg !== 'none') throw new CliError(`${opt}: only 'stdio' and 'none' are supported, not '${arg}'`);
        c.serial = arg === 'stdio' ? 'stdio' : null;
        break;
      case 'qtest-log':
        c.qtestLog = arg;
        break;
      case 'qmp':
        c.monitors.push(parseSocketUri(opt, arg));
        break;
      case 'chardev': {
        const kv = parseKeyval(opt, arg, 'backend');
        const id = kv['id'];
        if (kv['backend'] !== 'socket') throw new CliError(`${opt}: chardev backend '${String(kv['backend'])}' is not supported (socket)`);
        if (typeof id !== 'string' || !id) throw new CliError(`${opt}: Parameter 'id' is missing`);
        if (c.chardevs.has(id)) throw new CliError(`${opt}: duplicate chardev id '${id}'`);
        const path = kv['path'];
        const port = kv['port'];
        for (const k of Object.keys(kv)) if (!['backend', 'id', 'path', 'host', 'port', 'server', 'wait'].includes(k)) throw new CliError(`${opt}: Invalid parameter '${k}'`);
        const server = parseBool(opt, 'server', kv['server'], false);
        const wait = parseBool(opt, 'wait', kv['wait'], server);
        if (typeof path === 'string' && path) c.chardevs.set(id, { kind: 'unix', path, server, wait });
        else if (typeof port === 'string') c.chardevs.set(id, { ...tcpAddress(opt, `${typeof kv['host'] === 'string' ? kv['host'] : ''}:${port}`), server, wait });
        else throw new CliError(`${opt}: chardev: socket: no path or port given`);
        break;
      }
      case 'mon': {
        const kv = parseKeyval(opt, arg, 'chardev');
        if ((kv['mode'] ?? 'readline') !== 'control') throw new CliError(`${opt}: only mode=control (QMP) monitors are supported`);
        for (const k of Object.keys(kv)) if (!['chardev', 'mode', 'pretty'].includes(k)) throw new CliError(`${opt}: Invalid parameter '${k}'`);
        monChardevs.push(String(kv['chardev']));
        break;
      }
      case 'blockdev':
        c.blockdevs.push(arg.trimStart().startsWith('{') ? parseJson(opt, arg) : parseKeyval(opt, arg));
        break;
      case 'drive':
        c.drives.push(parseKeyval(opt, arg, 'file'));
        break;
      case 'device':
        c.devices.push(parseKeyval(opt, arg, 'driver'));
        break;
    }
  }
  if ((c.initrd || c.append) && !c.kernel) throw new CliError(`${c.initrd ? '-initrd' : '-append'} only allowed with -kernel option`);
  for (const id of monChardevs) {
    const ch = c.chardevs.get(id);
    if (!ch) throw new CliError(`-mon: chardev '${id}' not found`);
    c.monitors.push(ch);
  }
  return c;
}

function parseJson(opt: string, text: string): Record<string, unknown> {
  try {
    const v: unknown = JSON.parse(text);
    if (v && typeof v === 'object' && !Array.isArray(v)) return v as Record<string, unknown>;
  } catch (e) {
    throw new CliError(`${opt}: invalid JSON: ${(e as Error).message}`);
  }
  throw new CliError(`${opt}: JSON must be an object`);
}
