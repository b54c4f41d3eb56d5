/**
 * `spindle daemon`: Spindle's qemu-storage-daemon. Block nodes (--blockdev), iothreads
 * (--object) and QMP monitors (--chardev + --monitor); it serves until `quit`, SIGINT or
 * SIGTERM, then closes everything it opened.
 */
import { rmSync, writeFileSync } from 'node:fs';
import { createIoThread } from '../../block/iothread.js';
import { openNode, settleCloses } from '../../block/graph.js';
import type { NodeOptions } from '../../block/types.js';
import { registerMediaCommands } from '../../monitor/commands/media.js';
import { registerObjectCommands } from '../../monitor/commands/objects.js';
import { registerSnapshotCommands } from '../../monitor/commands/snapshot.js';
import { adoptMonitorNode, registerBlockCommands, releaseMonitorNodes } from '../../monitor/commands/block.js';
import { forwardCorruption } from '../../monitor/block-events.js';
import { registerThrottleCommands } from '../../monitor/commands/throttle.js';
import { ExportState, nbdAddress, registerExportCommands, vhostAddress } from '../../monitor/commands/exports.js';
import { defineCommand, QmpMonitor } from '../../monitor/qmp.js';
import { CliError } from '../fail.js';
import { socketEnd } from '../socket-end.js';
import { packageVersion } from '../version.js';
import { DAEMON_USAGE, parseDaemonArgs } from './args.js';

/** Monitors for the daemon: the commands a storage daemon has (no machine, no devices). */
export function daemonMonitor(stop: () => void, exports: ExportState): QmpMonitor {
  const [major, minor, micro] = packageVersion().split('.').map(Number);
  const monitor = new QmpMonitor({ major: major ?? 0, minor: minor ?? 0, micro: micro ?? 0, package: `spindle-${packageVersion()}` });
  monitor.register(defineCommand({
    name: 'quit',
    doc: 'Closes everything and exits',
    args: {},
    run: () => {
      monitor.emit('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
      setImmediate(stop);
    },
  }));
  registerMediaCommands(monitor);
  registerObjectCommands(monitor);
  registerSnapshotCommands(monitor);
  registerBlockCommands(monitor);
  registerThrottleCommands(monitor);
  registerExportCommands(monitor, exports);
  forwardCorruption(monitor);
  return monitor;
}

async function asCli(what: string, fn: () => unknown): Promise<void> {
  try {
    await fn();
  } catch (e) {
    throw new CliError(`${what}: ${(e as Error).message}`);
  }
}

/** --nbd-server and --export, through the same code as nbd-server-start and block-export-add. */
async function startExports(st: ExportState, server: Record<string, unknown> | null, exports: Record<string, unknown>[]): Promise<void> {
  if (server) await asCli('--nbd-server', () => st.start(nbdAddress(server['addr'] as Record<string, unknown>)));
  for (const e of exports) {
    if (e['type'] === 'vhost-user-blk') {
      const { type: _t, id, 'node-name': node, addr, writable, writethrough, 'num-queues': nq, 'logical-block-size': lbs, iothread, 'fixed-iothread': fixed, ...rest } = e;
      if (Object.keys(rest).length) throw new CliError(`--export: Parameter '${Object.keys(rest)[0]}' is unexpected`);
      if (typeof id !== 'string') throw new CliError("--export: Parameter 'id' is missing");
      if (typeof node !== 'string') throw new CliError("--export: Parameter 'node-name' is missing");
      if (nq !== undefined && typeof nq !== 'number') throw new CliError("--export: Parameter 'num-queues' expects a number");
      if (lbs !== undefined && typeof lbs !== 'number') throw new CliError("--export: Parameter 'logical-block-size' expects a number");
      if (iothread !== undefined && typeof iothread !== 'string') throw new CliError("--export: Parameter 'iothread' expects a string");
      await asCli('--export', () => st.addVhostUserBlk(id, node, {
        path: vhostAddress(addr), writable: writable === true, writethrough: writethrough === true, fixedIothread: fixed === true,
        ...(typeof nq === 'number' ? { numQueues: nq } : {}),
        ...(typeof lbs === 'number' ? { logicalBlockSize: lbs } : {}),
        ...(typeof iothread === 'string' ? { iothread } : {}),
      }));
      continue;
    }
    const { type: _t, id, 'node-name': node, name, description, writable, 'allocation-depth': depth, iothread, 'fixed-iothread': fixed, ...rest } = e;
    if (Object.keys(rest).length) throw new CliError(`--export: Parameter '${Object.keys(rest)[0]}' is unexpected`);
    if (typeof id !== 'string') throw new CliError("--export: Parameter 'id' is missing");
    if (typeof node !== 'string') throw new CliError("--export: Parameter 'node-name' is missing");
    if (iothread !== undefined && typeof iothread !== 'string') throw new CliError("--export: Parameter 'iothread' expects a string");
    await asCli('--export', () => st.add(id, node, {
      ...(typeof name === 'string' ? { name } : {}), ...(typeof description === 'string' ? { description } : {}),
      writable: writable === true, allocationDepth: depth === true, fixedIothread: fixed === true,
      ...(typeof iothread === 'string' ? { iothread } : {}),
    }));
  }
}

export async function runDaemon(argv: readonly string[]): Promise<void> {
  const cfg = parseDaemonArgs(argv);
  if (cfg.help) return void process.stdout.write(DAEMON_USAGE);
  if (cfg.version) return void process.stdout.write(`spindle daemon ${packageVersion()}\n`);
  let stop!: () => void;
  const stopped = new Promise<void>((r) => (stop = r));
  const closers: (() => void)[] = [];
  const exportState = new ExportState();
  const onSignal = (): void => stop();
  try {
    for (const t of cfg.iothreads) createIoThread(t.id, t.props);
    for (const b of cfg.blockdevs) {
      if (typeof b['node-name'] !== 'string') throw new CliError("--blockdev: 'node-name' must be specified for the root node");
      // Owned by the monitor, as blockdev-add's: blockdev-del may close it.
      adoptMonitorNode(await openNode(b as NodeOptions));
    }
    const monitor = daemonMonitor(stop, exportState);
    await startExports(exportState, cfg.nbdServer, cfg.exports);
    for (const id of cfg.monitors) closers.push(await socketEnd(cfg.chardevs.get(id)!, '--monitor', (s) => void monitor.attach(s)));
    if (cfg.pidfile) writeFileSync(cfg.pidfile, `${process.pid}\n`);
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    // A daemon with nothing listening still serves until it is told to stop.
    const keepAlive = setInterval(() => {}, 2 ** 30);
    await stopped;
    clearInterval(keepAlive);
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    for (const close of closers) close();
    await exportState.close();
    releaseMonitorNodes();
    await settleCloses();
    if (cfg.pidfile) rmSync(cfg.pidfile, { force: true });
  }
}
