/**
 * `spindle system`: builds the machine the command line describes, opens its block devices,
 * and serves qtest and QMP until `quit`, SIGINT or SIGTERM. No CPU runs yet: the qtest
 * client plays the guest (the CPU adapter comes with the boot issue).
 */
import { appendFileSync, existsSync, mkdtempSync, readFileSync, rmSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { connect, createServer, type Socket } from 'node:net';
import { PcMachine } from '../../../hw/pc/pc.js';
import { serveQtestSocket, startQtestServer } from '../../../hw/qtest/server.js';
import { settleCloses, unref } from '../../block/graph.js';
import { QmpMonitor } from '../../monitor/qmp.js';
import { CliError } from '../fail.js';
import { packageRoot, packageVersion } from '../version.js';
import { parseSystemArgs, type SocketSpec } from './args.js';
import { createRawFile } from '../img/create.js';
import { imgCreateQcow2 } from '../img/create-qcow2.js';
import { bootGuest } from './boot.js';
import { plugDevices, type Plugged } from './devices.js';

/**
 * Connects to (QEMU's default) or listens on a UNIX socket; `onSocket` gets each connection.
 * Returns what closes it.
 */
async function socketEnd(spec: SocketSpec, what: string, onSocket: (s: Socket) => void): Promise<() => void> {
  if (!spec.server) {
    return new Promise((resolve, reject) => {
      const s = connect(spec.path);
      s.once('error', (e) => reject(new CliError(`${what}: Failed to connect to '${spec.path}': ${e.message}`)));
      s.once('connect', () => {
        onSocket(s);
        resolve(() => s.destroy());
      });
    });
  }
  try {
    unlinkSync(spec.path);
  } catch {
    // nothing there
  }
  const srv = createServer(onSocket);
  await new Promise<void>((resolve, reject) => {
    srv.once('error', (e) => reject(new CliError(`${what}: Failed to listen on '${spec.path}': ${e.message}`)));
    srv.listen(spec.path, () => resolve());
  });
  return () => void srv.close();
}

/**
 * The embedded default: a qcow2 overlay over a raw base, in a scratch directory, as the
 * primary IDE disk of Spindle's own guest program, whose verdict ends the run.
 */
async function embeddedDefault(): Promise<{ argv: string[]; cleanup: () => void }> {
  const guest = join(packageRoot(), 'build', 'roms', 'guest.elf');
  if (!existsSync(guest)) throw new CliError(`the embedded guest program is not built (${guest}): run 'npm run build'`);
  const dir = mkdtempSync(join(tmpdir(), 'spindle-default-'));
  const base = join(dir, 'base.raw');
  createRawFile(base, 8 << 20);
  const overlay = join(dir, 'disk.qcow2');
  await imgCreateQcow2(overlay, undefined, { q: true, b: base, F: 'raw' });
  process.stdout.write(`spindle: booting the embedded guest (roms/guest) from ${overlay} over ${base}\n`);
  return {
    argv: ['-machine', 'pc', '-m', '32', '-kernel', guest, '-drive', `file=${overlay},if=ide,format=qcow2`, '-serial', 'stdio', '-display', 'none'],
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
  if (cfg.kernel && cfg.qtest) throw new CliError('-kernel and -qtest: a machine is driven by a CPU or by qtest, not both');
  const machine = new PcMachine({ ramSize: cfg.ramSize });
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
      if (cfg.qtest.server) {
        const srv = await startQtestServer(cfg.qtest.path, machine, log ? { log } : {});
        closers.push(() => srv.close());
      } else {
        closers.push(await socketEnd(cfg.qtest, '-qtest', (s) => serveQtestSocket(s, machine, log ? { log } : {})));
      }
    }
    const [major, minor, micro] = packageVersion().split('.').map(Number);
    const monitor = new QmpMonitor({ major: major ?? 0, minor: minor ?? 0, micro: micro ?? 0, package: `spindle-${packageVersion()}` });
    monitor.register({
      name: 'quit',
      run: () => {
        monitor.emit('SHUTDOWN', { guest: false, reason: 'host-qmp-quit' });
        setImmediate(stop);
      },
    });
    monitor.register({ name: 'query-status', run: () => ({ status: 'running', singlestep: false, running: true }) });
    for (const m of cfg.monitors) closers.push(await socketEnd(m, '-mon', (s) => void monitor.attach(s)));
    const onSignal = (): void => stop();
    process.once('SIGINT', onSignal);
    process.once('SIGTERM', onSignal);
    if (cfg.kernel) {
      let kernel: Buffer;
      try {
        kernel = readFileSync(cfg.kernel);
      } catch (e) {
        throw new CliError(`-kernel: could not read '${cfg.kernel}': ${(e as Error).message}`);
      }
      const serial = cfg.serial === 'stdio' || verdict ? (s: string) => void process.stdout.write(s) : null;
      const passed = await bootGuest(machine, { kernel, serial, verdict }, stopped);
      if (passed === false) process.exitCode = 1;
      if (passed !== null) stop();
    }
    await stopped;
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  } finally {
    for (const close of closers) await close();
    // Devices let go of their backends first, then the backends and nodes go.
    for (const d of machine.allDevices().reverse()) machine.removeDevice(d.id);
    for (const be of plugged?.backends ?? []) if (!be.dead) be.unref();
    for (const n of plugged?.nodes ?? []) unref(n);
    await settleCloses();
  }
}
