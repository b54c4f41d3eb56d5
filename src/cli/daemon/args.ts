/**
 * `spindle daemon`'s command line, in qemu-storage-daemon's syntax: double-dash options, each
 * with one argument (`--opt value` or `--opt=value`), values in QEMU's keyval form or JSON.
 */
import { CliError } from '../fail.js';
import { parseBool, parseKeyval, typedKeyval, type KeyvalObject } from '../system/keyval.js';
import type { SocketSpec } from '../system/args.js';

export interface DaemonConfig {
  blockdevs: Record<string, unknown>[];
  chardevs: Map<string, SocketSpec>;
  /** QMP monitors, by chardev id. */
  monitors: string[];
  iothreads: { id: string; props: Record<string, number> }[];
  pidfile: string | null;
  /** --nbd-server: where the NBD server listens. */
  nbdServer: Record<string, unknown> | null;
  /** --export type=nbd,...: block exports, as block-export-add's arguments. */
  exports: Record<string, unknown>[];
  help: boolean;
  version: boolean;
}

const WITH_ARG = new Set(['blockdev', 'chardev', 'monitor', 'object', 'pidfile', 'nbd-server', 'export']);
/** qemu-storage-daemon options Spindle does not have yet, and where they come from. */
const LATER: Record<string, string> = { daemonize: 'a later release' };

export const DAEMON_USAGE = `Usage: spindle daemon [options]
Spindle's storage daemon, with qemu-storage-daemon's options:

  --blockdev [driver=]<driver>[,node-name=<N>][,<prop>=<value>...] | JSON
                        a block node, as QMP's blockdev-add (owned by the monitor)
  --chardev socket,id=<id>,path=<path>[,server=on|off][,wait=on|off]
  --chardev socket,id=<id>,host=<host>,port=<port>[,server=on|off][,wait=on|off]
                        a socket for a monitor
  --monitor [chardev=]<id>[,mode=control]
                        a QMP monitor on a chardev
  --object iothread,id=<id>[,poll-max-ns=<ns>][,poll-grow=<n>][,poll-shrink=<n>][,aio-max-batch=<n>]
  --nbd-server addr.type=unix,addr.path=<path> | addr.type=inet,addr.host=<host>,addr.port=<port>
                        start the NBD server (loopback when no host is given)
  --export type=nbd,id=<id>,node-name=<node>[,name=<name>][,writable=on][,description=<text>][,allocation-depth=on]
           [,iothread=<id>[,fixed-iothread=on]]
                        export a node over NBD (iothread: the node moves there; NBD runs on the main loop)
  --export type=vhost-user-blk,id=<id>,node-name=<node>,addr.type=unix,addr.path=<path>
           [,writable=on][,num-queues=<n>][,writethrough=on][,logical-block-size=<512..2M>][,iothread=<id>]
                        serve a node to a vhost-user front-end (QEMU's vhost-user-blk-pci)
  --pidfile <path>      write the process id there (removed at exit)
  -h, --help            this text
  -V, --version         the version
`;


function jsonOrKeyval(opt: string, text: string, implied?: string): Record<string, unknown> {
  if (!text.trimStart().startsWith('{')) return typedKeyval(parseKeyval(opt, text, implied)) as Record<string, unknown>;
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new CliError(`${opt}: invalid JSON: ${(e as Error).message}`);
  }
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new CliError(`${opt}: JSON must be an object`);
  return v as Record<string, unknown>;
}

function chardev(opt: string, kv: KeyvalObject): [string, SocketSpec] {
  const id = kv['id'];
  if (kv['backend'] !== 'socket') throw new CliError(`${opt}: chardev backend '${String(kv['backend'])}' is not supported (socket)`);
  if (typeof id !== 'string' || !id) throw new CliError(`${opt}: Parameter 'id' is missing`);
  for (const k of Object.keys(kv)) if (!['backend', 'id', 'path', 'host', 'port', 'server', 'wait'].includes(k)) throw new CliError(`${opt}: Invalid parameter '${k}'`);
  const server = parseBool(opt, 'server', kv['server'], false);
  const wait = parseBool(opt, 'wait', kv['wait'], server);
  const path = kv['path'];
  if (typeof path === 'string' && path) return [id, { kind: 'unix', path, server, wait }];
  const port = Number(kv['port']);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new CliError(`${opt}: chardev: socket: no path or port given`);
  return [id, { kind: 'tcp', host: typeof kv['host'] === 'string' && kv['host'] ? kv['host'] : '127.0.0.1', port, server, wait }];
}

export function parseDaemonArgs(argv: readonly string[]): DaemonConfig {
  const c: DaemonConfig = { blockdevs: [], chardevs: new Map(), monitors: [], iothreads: [], pidfile: null, nbdServer: null, exports: [], help: false, version: false };
  for (let i = 0; i < argv.length; i++) {
    const tok = argv[i]!;
    if (tok === '-h' || tok === '--help') {
      c.help = true;
      continue;
    }
    if (tok === '-V' || tok === '--version') {
      c.version = true;
      continue;
    }
    if (!tok.startsWith('--')) throw new CliError(`${tok}: a lone argument (options are --name value)`);
    const eq = tok.indexOf('=');
    const name = tok.slice(2, eq < 0 ? undefined : eq);
    const opt = `--${name}`;
    if (LATER[name]) throw new CliError(`${opt}: not supported yet (it comes with ${LATER[name]})`);
    if (!WITH_ARG.has(name)) throw new CliError(`${opt}: invalid option`);
    const arg = eq < 0 ? argv[++i] : tok.slice(eq + 1);
    if (arg === undefined) throw new CliError(`${opt}: requires an argument`);
    switch (name) {
      case 'blockdev':
        c.blockdevs.push(jsonOrKeyval(opt, arg, 'driver'));
        break;
      case 'chardev': {
        const [id, spec] = chardev(opt, parseKeyval(opt, arg, 'backend'));
        if (c.chardevs.has(id)) throw new CliError(`${opt}: duplicate chardev id '${id}'`);
        c.chardevs.set(id, spec);
        break;
      }
      case 'monitor': {
        const kv = parseKeyval(opt, arg, 'chardev');
        for (const k of Object.keys(kv)) if (!['chardev', 'mode', 'pretty', 'id'].includes(k)) throw new CliError(`${opt}: Invalid parameter '${k}'`);
        if ((kv['mode'] ?? 'control') !== 'control') throw new CliError(`${opt}: only mode=control (QMP) monitors are supported`);
        if (typeof kv['chardev'] !== 'string') throw new CliError(`${opt}: Parameter 'chardev' is missing`);
        c.monitors.push(kv['chardev']);
        break;
      }
      case 'object': {
        const o = jsonOrKeyval(opt, arg, 'qom-type');
        const { 'qom-type': type, id, ...props } = o;
        if (type !== 'iothread') throw new CliError(`${opt}: object type '${String(type)}' is not supported (iothread)`);
        if (typeof id !== 'string') throw new CliError(`${opt}: Parameter 'id' is missing`);
        for (const [k, v] of Object.entries(props)) {
          if (!['poll-max-ns', 'poll-grow', 'poll-shrink', 'aio-max-batch'].includes(k)) throw new CliError(`${opt}: Property 'iothread.${k}' not found`);
          if (typeof v !== 'number') throw new CliError(`${opt}: Parameter '${k}' expects a number`);
        }
        c.iothreads.push({ id, props: props as Record<string, number> });
        break;
      }
      case 'pidfile':
        c.pidfile = arg;
        break;
      case 'nbd-server': {
        if (c.nbdServer) throw new CliError(`${opt}: only one NBD server`);
        const o = jsonOrKeyval(opt, arg);
        for (const k of Object.keys(o)) if (!['addr', 'max-connections', 'tls-creds'].includes(k)) throw new CliError(`${opt}: Parameter '${k}' is unexpected`);
        if (!o['addr'] || typeof o['addr'] !== 'object') throw new CliError(`${opt}: Parameter 'addr' is missing`);
        c.nbdServer = o;
        break;
      }
      case 'export': {
        const o = jsonOrKeyval(opt, arg, 'type');
        if (o['type'] !== 'nbd' && o['type'] !== 'vhost-user-blk') throw new CliError(`${opt}: export type '${String(o['type'])}' is not supported (nbd, vhost-user-blk)`);
        c.exports.push(o);
        break;
      }
    }
  }
  for (const id of c.monitors) if (!c.chardevs.has(id)) throw new CliError(`--monitor: chardev '${id}' not found`);
  if (c.exports.some((e) => e['type'] === 'nbd') && !c.nbdServer) throw new CliError('--export: type=nbd needs --nbd-server');
  return c;
}
