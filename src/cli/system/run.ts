/**
 * `spindle system`: builds the machine the command line describes, opens its block devices,
 * and runs it until the guest powers off, `quit`, SIGINT or SIGTERM. The guest is the v86
 * CPU (firmware, a Linux kernel, or a multiboot program), or with -qtest a test harness that
 * plays the guest through qtest.
 */
import { appendFileSync, closeSync, existsSync, mkdtempSync, openSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { PcMachine } from '../../../hw/pc/pc.js';
import { serveQtestSocket, startQtestServer } from '../../../hw/qtest/server.js';
import { settleCloses } from '../../block/graph.js';
import { defineCommand, QmpMonitor } from '../../monitor/qmp.js';
import { registerMediaCommands } from '../../monitor/commands/media.js';
import { forwardCorruption } from '../../monitor/block-events.js';
import { registerBlockCommands, releaseMonitorNodes } from '../../monitor/commands/block.js';
import { registerObjectCommands } from '../../monitor/commands/objects.js';
import { ExportState, registerExportCommands } from '../../monitor/commands/exports.js';
import { registerSnapshotCommands } from '../../monitor/commands/snapshot.js';
import { registerThrottleCommands } from '../../monitor/commands/throttle.js';
import { CliError } from '../fail.js';
import { packageRoot, packageVersion } from '../version.js';
import { parseSystemArgs } from './args.js';
import { socketEnd } from '../socket-end.js';
import { createRawFile } from '../img/create.js';
import { imgCreateQcow2 } from '../img/create-qcow2.js';
import { prepareGuest, runGuest, SerialWatch } from './boot.js';
import type { V86Guest } from '../../../hw/cpu/v86.js';
import { plugDevices, release, type Plugged } from './devices.js';
import { DeviceCommands, registerDeviceCommands } from '../../monitor/commands/devices.js';
import { registerRunStateCommands, RunState } from '../../monitor/commands/run-state.js';
import { registerHmp } from '../../monitor/hmp.js';

/**
 * The embedded default: two qcow2 overlays over one raw base (which starts with the marker
 * the guest looks for through the backing file), in a scratch directory: one the primary IDE
 * disk, one a virtio-blk disk, of Spindle's own guest program, whose verdict ends the run.
 */
async function embeddedDefault(): Promise<{ argv: string[]; cleanup: () => void }> {
  const guest = join(packageRoot(), 'build', 'roms', 'guest.elf');
  if (!existsSync(guest)) throw new CliError(`the embedded guest program is not built (${guest}): run 'npm run build'`);
  const dir = mkdtempSync(join(tmpdir(), 'spindle-default-'));
  const base = join(dir, 'base.raw');
  createRawFile(base, 8 << 20);
  const fd = openSync(base, 'r+');
  writeSync(fd, Buffer.from('SPINDLE-BASE', 'latin1'), 0, 12, 0);
  closeSync(fd);
  const ideDisk = join(dir, 'ide.qcow2');
  const virtioDisk = join(dir, 'virtio.qcow2');
  for (const overlay of [ideDisk, virtioDisk]) await imgCreateQcow2(overlay, undefined, { q: true, b: base, F: 'raw' });
  process.stdout.write(`spindle: booting the embedded guest (roms/guest) from ${ideDisk} (IDE) and ${virtioDisk} (virtio-blk) over ${base}\n`);
  return {
    argv: ['-machine', 'pc', '-m', '32', '-kernel', guest, '-drive', `file=${ideDisk},if=ide,format=qcow2`,
      '-drive', `file=${virtioDisk},if=virtio,format=qcow2`, '-serial', 'stdio', '-display', 'none'],
    cleanup: () => rmSync(dir, { recursive: true, force: true }),
  };
}

export async function runSystem(args: readonly string[]): Promise<void> {
  const def = args.length === 0 ? await embeddedDefault() : null;
  try {
    await runMachine(def ? def.argv : args, def !== null);
  } finally {
    def?.cleanup();
  }
}

async function runMachine(argv: readonly string[], verdict: boolean): Promise<void> {
  const cfg = parseSystemArgs(argv);
  const qtest = cfg.qtest !== null || cfg.accel === 'qtest';
  if (cfg.kernel && qtest) throw new CliError('-kernel and -qtest: a machine is driven by a CPU or by qtest, not both');
  const watch = new SerialWatch(cfg.serial === 'stdio' || verdict ? (s: string) => void process.stdout.write(s) : null);
  // The CPU owns guest RAM, so it comes first and the machine is built on its memory.
  const guest: V86Guest | null = qtest ? null : await prepareGuest(cfg, watch.byte);
  // v86 has no path for MSI writes to its local APIC (devices interrupt by INTx there) and no SMM.
  const machine = new PcMachine({ ramSize: cfg.ramSize, ...(guest ? { ram: guest.memory, msi: false, smm: false } : {}) });
  const closers: (() => Promise<void> | void)[] = [];
  let plugged: Plugged | null = null;
  let stop!: () => void;
  const stopped = new Promise<void>((r) => (stop = r));
  try {
    plugged = await plugDevices(machine, cfg);
    const logPath = cfg.qtestLog;
    if (logPath) writeFileSync(logPath, '');
    const log = logPath ? (line: string) => appendFileSync(logPath, `${line}\n`) : undefined;
    if (cfg.qtest) {
      if (cfg.qtest.server && cfg.qtest.kind === 'unix') {
        const srv = await startQtestServer(cfg.qtest.path, machine, log ? { log } : {});
        closers.push(() => srv.close());
      } else {
        closers.push(await socketEnd(cfg.qtest, '-qtest', (s) => serveQtestSocket(s, machine, log ? { log } : {})));
      }
    }
    const [major, minor, micro] = packageVersion().split('.').map(Number);
    const monitor = new QmpMonitor({ major: major ?? 0, minor: minor ?? 0, micro: micro ?? 0, package: `spindle-${packageVersion()}` });
    monitor.register(defineCommand({
      name: 'quit',
      doc: 'Stops the machine and exits',
      args: {},
      run: () => {
        monitor.emit('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
        setImmediate(stop);
      },
    }));
    registerMediaCommands(monitor);
    registerBlockCommands(monitor);
    registerThrottleCommands(monitor);
    registerSnapshotCommands(monitor);
    registerObjectCommands(monitor);
    const exportState = new ExportState();
    registerExportCommands(monitor, exportState);
    closers.push(() => exportState.close());
    closers.push(forwardCorruption(monitor));
    const runState = new RunState(monitor);
    if (guest) runState.cpu = guest;
    closers.push(runState.watchBlockEvents());
    registerRunStateCommands(monitor, runState);
    const devices = new DeviceCommands(monitor, machine, plugged);
    registerDeviceCommands(monitor, devices);
    registerHmp(monitor, { machine, plugged, devices, runState });
    for (const m of cfg.monitors) closers.push(await socketEnd(m, '-mon', (s) => void monitor.attach(s)));
    const onSignal = (): void => stop();
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    if (guest) {
      const end = await runGuest(guest, machine, watch, stopped, cfg.serial === 'stdio' && !verdict ? process.stdin : null);
      if (end === 'fail') process.exitCode = 1;
      if (end !== 'stopped') stop();
    }
    await stopped;
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  } finally {
    guest?.stop();
    for (const close of closers) await close();
    // Devices let go of their backends first, then the backends and nodes go. Unplugs the
    // guest never completed are not reported as done (no DEVICE_DELETED at quit).
    machine.cancelUnplugRequests();
    for (const d of machine.allDevices().reverse()) machine.removeDevice(d.id);
    if (plugged) for (const be of [...plugged.owned]) release(plugged, be);
    releaseMonitorNodes();
    await settleCloses();
    for (const d of plugged?.scratch ?? []) rmSync(d, { recursive: true, force: true });
  }
}
