/**
 * QMP's human-monitor-command: the few HMP commands scripts still send through QMP, with
 * QEMU's syntax and output (lines end in "\r\n", as QEMU's monitor writes them):
 *   drive_add [-n] PCI_ADDR OPTS   a backend like -drive (if=none only, as on a running pc)
 *   drive_del ID                   the name goes at once; the medium too if a device uses it
 *   info block [ID]                a listing per backend
 *   info status, stop, cont|c, device_add OPTS, device_del ID
 * Errors are output, not QMP errors, as in QEMU ("unknown command: 'x'").
 */
import type { PcMachine } from '../../hw/pc/pc.js';
import { driveDel, findBackend, liveBackends } from '../backend/backend.js';
import type { BlockNode } from '../block/node.js';
import { addDrive, DeviceError, type Plugged } from '../cli/system/devices.js';
import { parseKeyval } from '../cli/system/keyval.js';
import type { DeviceCommands } from './commands/devices.js';
import { qdevOf } from './commands/qdev.js';
import type { RunState } from './commands/run-state.js';
import { defineCommand, QmpError, type QmpMonitor } from './qmp.js';

export interface HmpContext {
  machine: PcMachine;
  plugged: Plugged;
  devices: DeviceCommands;
  runState: RunState;
}

/** HMP's words: whitespace-separated, "double quotes" keep spaces. */
function words(line: string): string[] {
  const out: string[] = [];
  const re = /"((?:[^"\\]|\\.)*)"|(\S+)/g;
  for (let m = re.exec(line); m; m = re.exec(line)) out.push(m[1] !== undefined ? m[1].replace(/\\(.)/g, '$1') : m[2]!);
  return out;
}

/** The file a node reads, as QEMU's bs->filename: a protocol node's, else its primary child's. */
function filename(node: BlockNode): string {
  for (let n: BlockNode | undefined = node; n; n = n.primary?.node ?? n.file?.node) {
    const f = n.options['filename'];
    if (typeof f === 'string') return f;
    if (!n.primary && !n.file) break;
  }
  return '';
}

function infoBlock(plugged: Plugged, only: string | undefined): string {
  const entries: string[] = [];
  for (const be of liveBackends()) {
    const name = be.visible ? be.name : '';
    const qdev = qdevOf(be);
    if (!name && !qdev) continue; // QEMU's query-block: named, or attached to a device
    if (only !== undefined && name !== only) continue;
    const node = be.node;
    let s = name ? `${name}${node ? ` (${node.name})` : ''}` : node ? node.name : qdev ?? '<anonymous>';
    s += node ? `: ${filename(node)} (${node.driver.format}${node.readOnly ? ', read-only' : ''})\n` : ': [not inserted]\n';
    if (qdev) s += `    Attached to:      ${qdev}\n`;
    if (be.iostatus !== 'ok') s += `    I/O status:       ${be.iostatus}\n`;
    const ops = be.ops;
    if (ops?.isTrayOpen) s += `    Removable device: ${ops.isMediumLocked?.() ? '' : 'not '}locked, tray ${ops.isTrayOpen() ? 'open' : 'closed'}\n`;
    if (node) {
      let direct = false;
      let noFlush = false;
      for (let n: BlockNode | undefined = node; n; n = n.primary?.node ?? n.file?.node) {
        direct ||= n.options.cache?.direct === true;
        noFlush ||= n.options.cache?.['no-flush'] === true;
      }
      s += `    Cache mode:       ${be.writeCache ? 'writeback' : 'writethrough'}${direct ? ', direct' : ''}${noFlush ? ', ignore flushes' : ''}\n`;
      const backing = node.backing?.node;
      if (backing) {
        let depth = 0;
        for (let n: BlockNode | undefined = node; n?.backing; n = n.backing.node) depth++;
        s += `    Backing file:     ${filename(backing)} (chain depth: ${depth})\n`;
      }
    }
    entries.push(s);
  }
  return entries.join('\n');
}

async function run(ctx: HmpContext, line: string): Promise<string> {
  const w = words(line);
  const cmd = w[0];
  if (cmd === undefined) return '';
  const missing = (what: string): string => `Parameter '${what}' is missing\n`;
  switch (cmd) {
    case 'drive_add': {
      const args = w.slice(1);
      if (args[0] === '-n') return 'drive_add -n: adding a node this way is not supported; use blockdev-add\n';
      if (args.length < 1) return missing('pci_addr');
      if (args.length < 2) return missing('opts');
      try {
        await addDrive(ctx.machine, ctx.plugged, parseKeyval('drive_add', args.slice(1).join(' ')), true);
      } catch (e) {
        return `${(e as Error).message.replace(/^drive_add: /, '')}\n`;
      }
      return 'OK\n';
    }
    case 'drive_del': {
      const id = w[1];
      if (id === undefined) return missing('id');
      const be = findBackend(id);
      if (!be) return `Device '${id}' not found\n`;
      // QEMU's hmp_drive_del: further I/O of an attached device must not pause the guest.
      if (be.device) be.setErrorPolicy('report', 'report');
      // The machine's reference is the one drive_del drops: the device, if any, keeps its own
      // until it is unplugged, and a later backend with this name is a different object.
      ctx.plugged.owned.delete(be);
      await driveDel(be);
      return '';
    }
    case 'info': {
      const what = w[1];
      if (what === undefined) return 'info: a subcommand is required (block, status)\n';
      if (what === 'block') return infoBlock(ctx.plugged, w[2]);
      if (what === 'status') {
        const s = ctx.runState.status;
        return `VM status: ${s === 'running' ? 'running' : s === 'paused' ? 'paused' : `paused (${s})`}\n`;
      }
      return `unknown command: 'info ${what}'\n`;
    }
    case 'stop':
      ctx.runState.stop('paused');
      return '';
    case 'c':
    case 'cont':
      ctx.runState.cont();
      return '';
    case 'device_add':
    case 'device_del': {
      const arg = w[1];
      if (arg === undefined) return missing(cmd === 'device_add' ? 'device' : 'id');
      try {
        if (cmd === 'device_del') ctx.devices.del(arg);
        else ctx.devices.add(parseKeyval('device_add', arg, 'driver'));
      } catch (e) {
        if (e instanceof QmpError || e instanceof DeviceError) return `Error: ${e.message}\n`;
        return `Error: ${(e as Error).message.replace(/^device_add: /, '')}\n`;
      }
      return '';
    }
    default:
      return `unknown command: '${cmd}'\n`;
  }
}

export function registerHmp(monitor: QmpMonitor, ctx: HmpContext): void {
  monitor.register(defineCommand({
    name: 'human-monitor-command',
    doc: 'Runs an HMP command line and returns its output',
    args: {
      'command-line': { type: 'str', doc: 'the HMP command line' },
      'cpu-index': { type: 'int', optional: true, doc: 'the CPU the command applies to' },
    },
    run: async (a) => {
      if (a['cpu-index'] !== undefined && a['cpu-index'] !== 0) throw new QmpError('GenericError', "Parameter 'cpu-index' expects a CPU number");
      const out = await run(ctx, a['command-line']);
      return out.replace(/\r?\n/g, '\r\n');
    },
  }));
}
