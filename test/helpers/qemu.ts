/**
 * Spawn helpers for the reference peer (Debian's qemu-utils: qemu-img, qemu-io).
 * Every helper throws with the tool's stderr when it fails, unless told to return the result.
 */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { expect } from 'vitest';

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

/**
 * A qcow2 image of compressed clusters (`qemu-img convert -c` of a raw file with runs of one
 * byte and runs of noise, zero elsewhere); returns the raw data.
 */
export function compressedImage(out: string, size: number, seed: number, opts: string[] = []): Buffer {
  const data = Buffer.alloc(size);
  let x = seed >>> 0;
  const r = (n: number): number => ((x = (Math.imul(x, 1103515245) + 12345) >>> 0), Math.floor((x / 4294967296) * n));
  for (let i = 0; i < 60; i++) {
    const n = 1 + r(80_000);
    const off = r(size - n);
    if (i % 2) data.fill(0x30 + i, off, off + n);
    else for (let k = 0; k < n; k++) data[off + k] = r(256);
  }
  const raw = `${out}.src.raw`;
  writeFileSync(raw, data);
  qemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', ...(opts.length ? ['-o', opts.join(',')] : []), raw, out]);
  rmSync(raw, { force: true });
  return data;
}

/** `qemu-img check` must be clean: no corruption and no leaks. */
export function expectClean(path: string): void {
  const r = qemuCheck(path);
  expect(r.stdout + r.stderr, `qemu-img check ${path}`).toContain('No errors were found');
  expect(r.status).toBe(0);
}

/** Byte-exact comparison that reports the first difference instead of two dumps. */
export function expectEqual(got: Buffer, want: Buffer, what: string): void {
  expect(got.length, `${what}: length`).toBe(want.length);
  if (got.equals(want)) return;
  let i = 0;
  while (got[i] === want[i]) i++;
  expect.fail(`${what}: first difference at byte ${i} (offset ${i % 65536} in its 64k): got ${got[i]}, want ${want[i]}`);
}
