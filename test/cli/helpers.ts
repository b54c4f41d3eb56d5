// Shared helpers for the CLI suites: a built bundle, running it and qemu-img, temp dirs.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const bundle = join(root, 'dist', 'spindle.mjs');

function newestMtime(dir: string): number {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    t = Math.max(t, e.isDirectory() ? newestMtime(p) : statSync(p).mtimeMs);
  }
  return t;
}

/** Rebuilds dist/ when src/ or hw/ is newer (`npm test` has already built it). */
export async function ensureBuilt(): Promise<void> {
  const newest = Math.max(newestMtime(join(root, 'src')), newestMtime(join(root, 'hw')));
  if (existsSync(bundle) && statSync(bundle).mtimeMs >= newest) return;
  const r = spawnSync(process.execPath, [join(root, 'scripts', 'build.mjs')], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`building the CLI failed: ${r.stderr}`);
}

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

export function spindle(...args: string[]): Run {
  const r = spawnSync(process.execPath, [bundle, ...args], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs qemu-io commands on an image; throws with its output if one fails. */
export function qemuIo(fmt: string, img: string, ...cmds: string[]): void {
  const r = spawnSync('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), img], { encoding: 'utf8' });
  // qemu-io can exit 0 after a failed command: its message is the only sign.
  if (r.status !== 0 || /error|fail/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${cmds.join('; ')}: ${r.stdout}${r.stderr}`);
}

export function qemuImg(...args: string[]): Run {
  const r = spawnSync('qemu-img', args, { encoding: 'utf8', timeout: 60_000 });
  if (r.error) throw new Error(`qemu-img is needed by these tests (Debian qemu-utils): ${r.error.message}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Asserts a run succeeded, showing its output when it did not. */
export function ok(r: Run): Run {
  if (r.status !== 0) throw new Error(`exit ${r.status}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

export function tempDir(): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'spindle-cli-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Bytes the file system allocated for the file. */
export function allocated(path: string): number {
  return statSync(path).blocks * 512;
}

/**
 * The CLI suites' 3-deep chain base.qcow2 <- mid.qcow2 <- top.qcow2 (names in the files, as
 * qemu-img records them), each layer with the shared qemu-io writes plus the suite's own.
 */
export function qcow2Chain(path: (name: string) => string, extra: { base?: string[]; mid?: string[]; top?: string[]; midSize?: string } = {}): void {
  ok(qemuImg('create', '-f', 'qcow2', path('base.qcow2'), '4M'));
  qemuIo('qcow2', path('base.qcow2'), 'write -P 0x11 0 128k', 'write -P 0x22 1000k 3000', 'write -z 2M 64k', ...(extra.base ?? []));
  ok(qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', path('mid.qcow2'), ...(extra.midSize ? [extra.midSize] : [])));
  qemuIo('qcow2', path('mid.qcow2'), 'write -P 0x33 64k 64k', 'write -z 1M 128k', 'discard 0 64k', ...(extra.mid ?? []));
  ok(qemuImg('create', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', path('top.qcow2'), '5M'));
  qemuIo('qcow2', path('top.qcow2'), 'write -P 0x44 3M 100k', ...(extra.top ?? []));
}
