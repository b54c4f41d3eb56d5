/**
 * Spawn helpers for the reference peer (Debian's qemu-utils: qemu-img, qemu-io).
 * Every helper throws with the tool's stderr when it fails, unless told to return the result.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, rmSync } from 'node:fs';

export interface RunResult {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a tool; throws if it cannot start. */
export function run(cmd: string, args: readonly string[], cwd?: string): RunResult {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000, cwd, maxBuffer: 64 << 20 });
  if (r.error) throw new Error(`${cmd} is needed by these tests (Debian qemu-utils): ${r.error.message}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Runs a tool and throws unless it exits 0. */
export function runOk(cmd: string, args: readonly string[], cwd?: string): string {
  const r = run(cmd, args, cwd);
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.status}:\n${r.stderr}${r.stdout}`);
  return r.stdout;
}

export function qemuImg(args: readonly string[], cwd?: string): string {
  return runOk('qemu-img', args, cwd);
}

/** `qemu-img create -f qcow2 [-o opts] [-b backing -F fmt] path size`. */
export function createImage(path: string, size: number | string, opts: string[] = [], backing?: { file: string; fmt: string }, cwd?: string): string {
  const args = ['create', '-q', '-f', 'qcow2'];
  if (opts.length) args.push('-o', opts.join(','));
  if (backing) args.push('-b', backing.file, '-F', backing.fmt);
  args.push(path, String(size));
  qemuImg(args, cwd);
  return path;
}

/**
 * Runs qemu-io commands (e.g. 'write -P 0x5a 65000 1000') on an image, one process.
 * qemu-io reports request errors on stdout and still exits 0, so its output is checked too.
 */
export function qemuIo(path: string, cmds: readonly string[], fmt = 'qcow2', cwd?: string): string {
  const args = ['-f', fmt];
  for (const c of cmds) args.push('-c', c);
  args.push(path);
  const out = runOk('qemu-io', args, cwd);
  if (/error|failed|Pattern verification failed/i.test(out)) throw new Error(`qemu-io ${cmds.join('; ')} on ${path}:\n${out}`);
  return out;
}

/** The whole virtual disk as qemu reads it (`qemu-img convert -O raw`). */
export function qemuRaw(path: string, out = `${path}.qemu-raw`, fmt = 'qcow2'): Buffer {
  qemuImg(['convert', '-f', fmt, '-O', 'raw', path, out]);
  try {
    return readFileSync(out);
  } finally {
    rmSync(out, { force: true });
  }
}

/** `qemu-img check` (JSON-free): exit status and text. */
export function qemuCheck(path: string): RunResult {
  return run('qemu-img', ['check', '-f', 'qcow2', path]);
}

export interface ImageInfo {
  'virtual-size': number;
  format: string;
  'cluster-size'?: number;
  'backing-filename'?: string;
  'backing-filename-format'?: string;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  snapshots?: { name: string }[];
  [k: string]: unknown;
}

export function qemuInfo(path: string): ImageInfo {
  return JSON.parse(qemuImg(['info', '--output=json', '-U', path])) as ImageInfo;
}

export function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}
