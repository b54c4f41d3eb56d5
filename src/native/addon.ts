// The only importer of the native addon. The .node file is found from the
// package root (the nearest ancestor directory whose package.json is named
// "spindle"), so this works from src/ under vitest and from an esbuild bundle
// in dist/.
import { createRequire } from 'node:module';
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Callback the native engine calls once per completion batch. */
export type NativeCompletion = (count: number) => void;

export interface NativeEngineHandle {
  /** Turn `count` descriptors into requests; returns 0 or -errno from the kernel entry. */
  submit(count: number): number;
  /** Slow path for buffers outside the slabs (bufs are held by the caller until completion). */
  /** A number: the write ran inline and this is its result. */
  submitExternal(op: number, id: number, fd: number, offset: number, bufs: readonly Uint8Array[]): number | undefined;
  areas(): { sub: ArrayBuffer; iov: ArrayBuffer; comp: ArrayBuffer; icomp: ArrayBuffer };
  enters(): number;
  /** [fixedRequests, setupFlags, fixedSlots] */
  /** [fixedRequests, setupFlags, fixedSlots, inlineWrites, inlineBackoffs] */
  features(): [number, number, number, number, number];
  /** Waits for in-flight I/O, stops the backend; returns outstanding (id, result) pairs. */
  destroy(): Int32Array;
}

export interface NativeAddon {
  NativeEngine: new (
    kind: 'io_uring' | 'threads',
    entries: number,
    threads: number,
    onComplete: NativeCompletion,
    /** EngineFlags bits (native/src/common.h): 1 no fixed buffers. */
    flags?: number,
  ) => NativeEngineHandle;
  allocSlab(size: number): [number, ArrayBuffer];
  /** An ArrayBuffer over part of a wasm memory that growing the memory does not detach. */
  aliasMemory(memory: WebAssembly.Memory, offset: number, length: number): ArrayBuffer;
  open(path: string, write: boolean, create: boolean, direct: boolean, truncate: boolean): number;
  close(fd: number): number;
  strerror(errno: number): string;
  /** [size, allocatedBytes, isBlockDevice, st_blksize] or -errno */
  fstat(fd: number): [number, number, boolean, number] | number;
  ftruncate(fd: number, length: number): number;
  seek(fd: number, offset: number, hole: boolean): number;
  blockSize(fd: number): [number, number] | number;
  /** type: 0 unlock, 1 read, 2 write */
  lock(fd: number, start: number, len: number, type: number): number;
  testLock(fd: number, start: number, len: number, type: number): number;
}

function findPackageRoot(from: string): string {
  let dir = from;
  for (;;) {
    const pj = join(dir, 'package.json');
    if (existsSync(pj)) {
      try {
        if ((JSON.parse(readFileSync(pj, 'utf8')) as { name?: unknown }).name === 'spindle') return dir;
      } catch {
        // unreadable package.json: keep walking up
      }
    }
    const up = dirname(dir);
    if (up === dir) throw new Error(`spindle: no package.json named "spindle" above ${from}`);
    dir = up;
  }
}

function load(): NativeAddon {
  const here = dirname(fileURLToPath(import.meta.url));
  const root = findPackageRoot(here);
  const file = join(root, 'build', 'Release', 'spindle_native.node');
  if (!existsSync(file)) {
    throw new Error(`spindle: native addon missing at ${file}; run "npm install" (node-gyp rebuild)`);
  }
  return createRequire(import.meta.url)(file) as NativeAddon;
}

export const native: NativeAddon = load();
