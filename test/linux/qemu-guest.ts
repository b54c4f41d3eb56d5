/**
 * Real QEMU (qemu-system-x86_64) booting the amd64 Linux guest (scripts/fetch-linux-guest.sh amd64)
 * with its disks on vhost-user-blk sockets served by a storage daemon, and the daemon itself.
 *
 *   startStorageDaemon(argv) ── pidfile ──► daemon serving SOCK
 *   startQemuGuest({ disks: [{ socket: SOCK }] }) ──► QEMU: memfd guest RAM (vhost-user maps it),
 *       vhost-user-blk-pci per disk, -kernel/-initrd, COM1 on stdio
 *   guest.waitFor(marker) ── console lines, in order; guest.type(text) ── the guest's console stdin
 *
 * No sleeps: callers wait on lines the guest's /init prints (guestInit, GUEST_READY). Every wait
 * and the whole run are bounded; a timeout kills QEMU and the error carries the console's tail.
 * Context: test code only.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, readFileSync } from 'node:fs';

export type Accel = 'kvm' | 'tcg';

/** KVM when /dev/kvm opens read-write; else TCG. `$SPINDLE_QEMU_ACCEL=kvm|tcg` decides instead. */
export function qemuAccel(): Accel {
  const forced = process.env.SPINDLE_QEMU_ACCEL;
  if (forced === 'kvm' || forced === 'tcg') return forced;
  try {
    closeSync(openSync('/dev/kvm', constants.O_RDWR));
    return 'kvm';
  } catch {
    return 'tcg';
  }
}

let probed: Promise<Accel> | undefined;

/**
 * qemuAccel(), except that KVM must also boot `kernel` to its first printk within 10 s: nested
 * KVM in some cloud VMs opens fine but hangs every Linux guest right after decompression. Probed
 * once per process (about a second when KVM works); says so on stderr when it falls back to TCG.
 */
export function workingAccel(kernel: string): Promise<Accel> {
  if (qemuAccel() === 'tcg' || process.env.SPINDLE_QEMU_ACCEL === 'kvm') return Promise.resolve(qemuAccel());
  probed ??= (async () => {
    // No initrd, no disks: the kernel panics for want of a root, and -no-reboot ends QEMU.
    const g = startQemuGuest({ kernel, disks: [], accel: 'kvm', timeoutMs: 15_000 });
    try {
      await g.waitFor('] Linux version', 10_000);
      return 'kvm';
    } catch (e) {
      console.warn(`/dev/kvm opens but Linux does not boot under KVM here; using TCG. (${(e as Error).message.replace(/ Console tail:[\s\S]*/, '')})`);
      return 'tcg';
    } finally {
      await g.kill();
    }
  })();
  return probed;
}

/** The last `n` lines of `text`, for error messages. */
export function tail(text: string, n = 40): string {
  return text.split('\n').slice(-n).join('\n');
}

export interface QemuDisk {
  /** The daemon's vhost-user-blk UNIX socket. */
  socket: string;
  /** Virtqueues the device offers (the guest uses at most one a vCPU). */
  numQueues?: number;
}

export interface QemuGuestOptions {
  kernel: string;
  initrd?: string;
  /** Appended to `console=ttyS0 panic=-1`. */
  append?: string;
  disks: QemuDisk[];
  /** Default qemuAccel(); see workingAccel. */
  accel?: Accel;
  /** vCPUs, default 1. */
  smp?: number;
  /** Guest RAM in MiB (default 512). Above ~2.75 GiB, q35 puts part of it above 4 GiB. */
  memMiB?: number;
  /** The whole run, boot to exit: past it QEMU is killed. */
  timeoutMs: number;
}

export interface QemuExit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface QemuGuest {
  proc: ChildProcess;
  /** Console (COM1) output so far, CRs stripped; QEMU's stderr appended after exit. */
  output(): string;
  /**
   * The first console line after the previous match that contains `marker` (or matches it);
   * rejects with the console tail if QEMU exits or `timeoutMs` passes first.
   */
  waitFor(marker: string | RegExp, timeoutMs?: number): Promise<string>;
  /** Writes to the guest's console (what its `read` gets). */
  type(text: string): void;
  /** Resolves when QEMU exits; rejects (after killing it) on the run's timeout. */
  exited: Promise<QemuExit>;
  /** Kills QEMU if still running (SIGKILL by default) and waits for it. */
  kill(signal?: NodeJS.Signals): Promise<QemuExit>;
}

const running = new Set<ChildProcess>();

/** SIGKILLs every QEMU and daemon this module started that is still running (for afterAll). */
export function killAll(): void {
  for (const p of running) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
  running.clear();
}

function track(p: ChildProcess): void {
  running.add(p);
  p.once('exit', () => running.delete(p));
}

/** QEMU's command line for `o`. */
export function qemuArgs(o: QemuGuestOptions): string[] {
  const accel = o.accel ?? qemuAccel();
  const args = [
    '-machine', `q35,accel=${accel},memory-backend=mem`,
    // Under KVM the host CPU, less arch-capabilities: nested KVM (e.g. on AMD EPYC cloud hosts)
    // advertises MSR 0x10a but refuses QEMU's write to it, and QEMU aborts. Under TCG, all TCG has.
    '-cpu', accel === 'kvm' ? 'host,-arch-capabilities' : 'max',
    '-smp', String(o.smp ?? 1),
    '-m', `${o.memMiB ?? 512}M`,
    // vhost-user: the daemon maps guest RAM from the fds QEMU sends, so RAM must be a shared memfd.
    '-object', `memory-backend-memfd,id=mem,size=${o.memMiB ?? 512}M,share=on`,
    '-nodefaults', '-nographic', '-no-reboot', '-serial', 'stdio',
    '-kernel', o.kernel, ...(o.initrd ? ['-initrd', o.initrd] : []),
    // panic=-1: a panic reboots, which -no-reboot turns into an exit instead of a hang.
    '-append', `console=ttyS0 panic=-1 ${o.append ?? ''}`.trim(),
  ];
  o.disks.forEach((d, i) => {
    // reconnect=1: QEMU waits for and redials the daemon (and one that restarts) rather than failing.
    args.push('-chardev', `socket,id=vu${i},path=${d.socket},reconnect=1`);
    args.push('-device', `vhost-user-blk-pci,chardev=vu${i},num-queues=${d.numQueues ?? 1}`);
  });
  return args;
}

/** Starts QEMU; see QemuGuest. */
export function startQemuGuest(o: QemuGuestOptions): QemuGuest {
  const proc = spawn('qemu-system-x86_64', qemuArgs(o), { stdio: ['pipe', 'pipe', 'pipe'] });
  track(proc);
  let out = '';
  let err = '';
  let partial = '';
  const lines: string[] = [];
  let cursor = 0; // lines before it were matched or skipped by an earlier waitFor
  const waiters = new Set<() => void>();
  let exit: QemuExit | null = null;
  const output = (): string => out + (exit && err ? `\n[qemu stderr]\n${err}` : '');

  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  proc.stdout!.on('data', (d: Buffer) => {
    const s = d.toString('latin1').replace(/\r/g, '');
    out += s;
    partial += s;
    const parts = partial.split('\n');
    partial = parts.pop()!;
    if (parts.length === 0) return;
    lines.push(...parts);
    for (const w of [...waiters]) w();
  });
  proc.stdin!.on('error', () => {}); // typing at a guest that just died is not the failure to report

  const exited = new Promise<QemuExit>((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`QEMU did not finish within ${o.timeoutMs} ms; killed. Console tail:\n${tail(output())}`));
    }, o.timeoutMs);
    proc.once('error', (e) => {
      clearTimeout(timer);
      reject(new Error(`qemu-system-x86_64 failed to start (Debian qemu-system-x86): ${e.message}`));
    });
    // 'close', not 'exit': stdout and stderr are drained by then.
    proc.once('close', (code, signal) => {
      clearTimeout(timer);
      exit = { code, signal };
      for (const w of [...waiters]) w();
      resolve(exit);
    });
  });
  exited.catch(() => {}); // observed through waitFor / kill / the caller's await

  const waitFor = (marker: string | RegExp, timeoutMs = o.timeoutMs): Promise<string> =>
    new Promise((resolve, reject) => {
      const hit = (l: string): boolean => (typeof marker === 'string' ? l.includes(marker) : marker.test(l));
      let timer: NodeJS.Timeout | undefined;
      const check = (): void => {
        for (; cursor < lines.length; cursor++) {
          if (hit(lines[cursor]!)) {
            done();
            resolve(lines[cursor++]!);
            return;
          }
        }
        if (exit) {
          done();
          reject(new Error(`QEMU exited (${exit.code ?? exit.signal}) before printing ${String(marker)}. Console tail:\n${tail(output())}`));
        }
      };
      const done = (): void => {
        waiters.delete(check);
        clearTimeout(timer);
      };
      timer = setTimeout(() => {
        done();
        proc.kill('SIGKILL');
        reject(new Error(`no ${String(marker)} on the console within ${timeoutMs} ms; QEMU killed. Console tail:\n${tail(output())}`));
      }, timeoutMs);
      waiters.add(check);
      check();
    });

  const kill = async (signal: NodeJS.Signals = 'SIGKILL'): Promise<QemuExit> => {
    if (!exit) proc.kill(signal);
    return exited.catch(() => exit ?? { code: null, signal });
  };

  return { proc, output, waitFor, type: (t) => void proc.stdin!.write(t), exited, kill };
}

export interface StorageDaemon {
  proc: ChildProcess;
  pid: number;
  /** stderr and stdout so far. */
  log(): string;
  /** Resolves when it exits. */
  exited: Promise<QemuExit>;
  /** SIGTERM (qemu-storage-daemon's clean shutdown), SIGKILL after `graceMs`; resolves on exit. */
  stop(graceMs?: number): Promise<QemuExit>;
}

/**
 * Starts a storage daemon: `argv` is its command (`['qemu-storage-daemon']` or
 * `[node, dist/spindle.mjs, 'daemon']`, which take the same options), `args` its options;
 * `--pidfile PIDFILE` is added. Resolves once the pidfile exists, which both write when their
 * exports are listening; rejects with its output if it exits first or takes over `timeoutMs`.
 */
export async function startStorageDaemon(argv: string[], args: string[], pidfile: string, timeoutMs = 20_000): Promise<StorageDaemon> {
  const proc = spawn(argv[0]!, [...argv.slice(1), ...args, '--pidfile', pidfile], { stdio: ['ignore', 'pipe', 'pipe'] });
  track(proc);
  let log = '';
  proc.stdout!.on('data', (d: Buffer) => (log += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (log += d.toString()));
  let exit: QemuExit | null = null;
  const exitNow = (): QemuExit | null => exit; // (TS cannot see the callbacks assign it)
  const exited = new Promise<QemuExit>((resolve) => {
    proc.once('error', (e) => {
      log += `spawn ${argv[0]}: ${e.message}\n`;
      resolve((exit = { code: null, signal: null }));
    });
    proc.once('close', (code, signal) => resolve((exit = { code, signal })));
  });
  // Polling a file's existence is the daemon's own readiness signal, not a timing guess.
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(pidfile) || readFileSync(pidfile, 'utf8').trim() === '') {
    const e = exitNow();
    if (e) throw new Error(`${argv.join(' ')} exited (${e.code ?? e.signal}) before writing ${pidfile}:\n${log}`);
    if (Date.now() > deadline) {
      proc.kill('SIGKILL');
      throw new Error(`${argv.join(' ')} wrote no pidfile within ${timeoutMs} ms:\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const stop = async (graceMs = 10_000): Promise<QemuExit> => {
    if (exit) return exit;
    proc.kill('SIGTERM');
    const t = setTimeout(() => proc.kill('SIGKILL'), graceMs);
    const e = await exited;
    clearTimeout(t);
    return e;
  };
  return { proc, pid: proc.pid!, log: () => log, exited, stop };
}
