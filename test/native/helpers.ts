// Shared helpers for the native engine suites: temp dirs, promise wrappers
// over the callback API, and the list of engine kinds to run.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createEngine, type EngineKind, type IoEngine } from '../../src/native/engine.js';

/** io_uring probe: a refused io_uring_setup is only acceptable with SPINDLE_NO_IO_URING=1. */
export function ioUringAvailable(): boolean {
  try {
    createEngine({ kind: 'io_uring', entries: 4 }).destroy();
    return true;
  } catch {
    return false;
  }
}

export const kinds: EngineKind[] =
  process.env.SPINDLE_NO_IO_URING === '1' && !ioUringAvailable() ? ['threads'] : ['io_uring', 'threads'];

export function tempDir(): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'spindle-native-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

export function read(e: IoEngine, fd: number, iov: Uint8Array[], offset: number): Promise<number> {
  return new Promise((resolve) => e.readv(fd, iov, offset, resolve));
}
export function write(e: IoEngine, fd: number, iov: Uint8Array[], offset: number): Promise<number> {
  return new Promise((resolve) => e.writev(fd, iov, offset, resolve));
}
export function fsync(e: IoEngine, fd: number, datasync: boolean): Promise<number> {
  return new Promise((resolve) => e.fsync(fd, datasync, resolve));
}
export function fallocate(e: IoEngine, fd: number, mode: number, offset: number, len: number): Promise<number> {
  return new Promise((resolve) => e.fallocate(fd, mode, offset, len, resolve));
}

/** Deterministic bytes: pattern(seed, n)[i] depends on seed and i. */
export function pattern(seed: number, n: number): Buffer {
  const b = Buffer.alloc(n);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0;
    b[i] = x & 0xff;
  }
  return b;
}
