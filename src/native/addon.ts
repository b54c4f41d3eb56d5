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

  // ---- native/src/unixfd/: vhost-user host facts (fd passing, mmap, eventfd, memfd) ----
  /** Adopts a socket fd (made non-blocking); closed by close() or when collected. */
  UnixSocket: new (fd: number, eventfd?: boolean) => NativeUnixSocket;
  /** One reservation of `length` bytes with fd ranges mapped MAP_SHARED at page-aligned offsets -> ArrayBuffer | -errno. */
  mmapLayout(length: number, fds: number[], offsets: number[], gpas: number[], sizes: number[]): ArrayBuffer | number;
  /** AF_UNIX stream listener (non-blocking, CLOEXEC) -> fd | -errno. */
  unixListen(path: string, backlog: number): number;
  /** Non-blocking AF_UNIX stream connect -> fd | -errno (-EAGAIN when the backlog is full). */
  unixConnect(path: string): number;
  /** [fd, fd] | -errno: a connected AF_UNIX stream pair (non-blocking, CLOEXEC). */
  socketPair(): [number, number] | number;
  /** SO_SNDBUF of a socket -> 0 | -errno. */
  setSendBuffer(fd: number, bytes: number): number;
  sendFileRange(sockFd: number, head: Uint8Array, fileFd: number, offset: number, length: number): number;
  /** MAP_SHARED mapping as an external ArrayBuffer (munmap'ed when collected) | -errno; throws RangeError on bad ranges. */
  mmapFd(fd: number, length: number, offset: number, writable: boolean): ArrayBuffer | number;
  /** Detach an mmapFd ArrayBuffer and munmap it now -> 0 | -EINVAL (not a live mapping). */
  unmap(buffer: ArrayBuffer): number;
  /** Live mmapFd mappings in this process. */
  mappingCount(): number;
  /** eventfd(2) with EFD_CLOEXEC -> fd | -errno. */
  eventfd(initial: number, nonblocking: boolean): number;
  /** 0 | -errno */
  eventfdWrite(fd: number, value: number): number;
  /** counter value (> 0) | -errno (-EAGAIN when 0 and non-blocking) */
  eventfdRead(fd: number): number;
  /** memfd_create(MFD_CLOEXEC|MFD_ALLOW_SEALING) + ftruncate -> fd | -errno. */
  memfdCreate(name: string, size: number): number;

  // ---- native/src/vhostblk/: the vhost-user-blk fast path (see src/native/vhost-blk-worker.ts) ----
  /** Starts one native iothread serving split virtqueues (raw files, or mapped images). */
  VhostBlkWorker: new () => NativeVhostBlkWorker;
  /** Guest cluster -> host offset table of mapped queues; clusterBits 9..21, lengthBytes = disk length. */
  VhostBlkMap: new (clusterBits: number, lengthBytes: number, maxBytes?: number) => NativeVhostBlkMap;
}

/**
 * The cluster table of a mapped vhost-blk queue: JavaScript writes it, worker threads read it
 * without locks. After invalidate(), call the worker's barrier() before reusing the clusters.
 */
export interface NativeVhostBlkMap {
  /** Maps [guestOffset, +bytes) to host [hostOffset, +bytes); all cluster aligned (RangeError). Beyond the table: ignored. */
  set(guestOffset: number, bytes: number, hostOffset: number, writable: boolean): void;
  /** Unmaps every cluster overlapping [guestOffset, +bytes) (need not be aligned). */
  /** Returns how many of the clusters were mapped. */
  invalidate(guestOffset: number, bytes: number): number | undefined;
  clear(): void;
  /** Frees evicted chunks (after the worker's barrier). */
  reclaim(): void;
  /** Mapped clusters. */
  readonly size: number;
  /** Evicted chunks not yet freed. */
  readonly retired: number;
}

/**
 * Where a mapped queue sends what it does not serve. `ring` (Int32 slots holding u32 values,
 * free-running counters; JavaScript uses Atomics.load/store on its own and the worker's):
 * [0] fwdProd (worker), [1] fwdCons (JS), [2] cplProd (JS), [3] cplCons (worker), [4..15] 0;
 * forwarded heads at [16 + i % num] for i in [fwdCons, fwdProd); completions (head, used length)
 * at [16 + num + 2 * (i % num)] and the slot after, for i in [cplCons, cplProd). JavaScript
 * advances fwdCons past a head before it posts that head's completion (the ring holds `num`
 * heads: a head completed but not taken could be forwarded again into a full ring, which breaks
 * the queue), and writes guest data and the status byte before it stores cplProd.
 */
export interface NativeVhostBlkForward {
  /** At least 16 + 3 * num Int32s; kept alive by the worker; must not be transferred or detached. */
  ring: Int32Array;
  /** eventfd the worker writes after a batch that forwarded something (dup'd). */
  notifyFd: number;
  /** eventfd JavaScript writes after adding completions (dup'd). */
  completeFd: number;
}

/** addQueue options of the native vhost-user-blk worker (GPAs are offsets into the layout). */
export interface NativeVhostBlkQueue {
  /** The queue's own guest memory (layout and mapped spans); default: the worker's setMemory. */
  memory?: ArrayBuffer;
  spans?: [number, number][];
  num: number;
  desc: number;
  avail: number;
  used: number;
  lastAvail: number;
  usedIdx: number;
  eventIdx: boolean;
  kickFd: number;
  /** -1: no call fd. */
  callFd: number;
  /** Written when the worker finds the ring broken (vhost-user's err eventfd); -1 or absent: none. */
  errFd?: number;
  fd: number;
  capacitySectors: number;
  /** Logical block size (power of 2 from 512; default 512): requests must start and end on it. */
  blockSize?: number;
  readOnly: boolean;
  serial: string;
  writeCache: boolean;
  /** Negotiated VIRTIO_BLK_F_DISCARD / F_WRITE_ZEROES (default true); without: UNSUPP. */
  discard?: boolean;
  writeZeroes?: boolean;
  /** The node may free blocks (discard=unmap; default true): else discard is a no-op and write-zeroes keeps them allocated. */
  unmap?: boolean;
  /**
   * A mapped queue: guest offsets go through the map to offsets in `fd` (the image file); reads
   * and writes it cannot serve, flush, discard and write-zeroes are forwarded. Needs `forward`.
   */
  map?: NativeVhostBlkMap;
  forward?: NativeVhostBlkForward;
  /**
   * vhost-user inflight tracking (src/export/vhost-user/inflight.ts): the queue's region (at
   * least 16 + 16 * num bytes), the counter the next taken chain gets, and heads a previous
   * back-end left in flight, served (in this order) before the avail ring.
   */
  inflight?: { region: Uint8Array; counter: number; resubmit: number[] };
}

export interface NativeVhostBlkStats {
  lastAvail: number;
  usedIdx: number;
  /** Requests the worker served itself (forwarded ones are counted in `forwarded`). */
  requests: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests completed with a status other than VIRTIO_BLK_S_OK (served natively). */
  errors: number;
  /** Call-fd writes. */
  calls: number;
  /** Used-index publications. */
  batches: number;
  /** Kicks the driver sent (the kick eventfd's counts). */
  kicks: number;
  /** Calls held back while the driver kept adding chains (interrupt coalescing), and of those,
   * the ones that more completions joined before the call. */
  holds: number;
  holdsJoined: number;
  /** Nanoseconds the worker spent serving this ring (its own cost, without wake-ups). */
  busyNs: number;
  /** Requests forwarded to JavaScript (not counted in requests/errors/bytes). */
  forwarded: number;
  /** Forwarded requests whose completion the worker has not pushed yet. */
  inForward: number;
  /** Of `requests`: those whose I/O went (at least partly) through the worker's io_uring. */
  asyncRequests: number;
  /** Requests with I/O on the io_uring now (popped, used element not yet pushed). */
  inAsync: number;
  /** Why the queue stopped (a broken ring), or null. */
  broken: string | null;
}

/** Native vhost-user-blk worker (native/src/vhostblk/); all methods synchronous. */
export interface NativeVhostBlkWorker {
  setMemory(layout: ArrayBuffer, spans: readonly (readonly [number, number])[]): void;
  addQueue(index: number, q: NativeVhostBlkQueue): void;
  removeQueue(index: number): NativeVhostBlkStats;
  setCallFd(index: number, fd: number): void;
  setWriteCache(index: number, on: boolean): void;
  setCapacity(index: number, sectors: number): void;
  barrier(): void;
  kick(index: number): void;
  pause(): void;
  resume(): void;
  stats(index: number): NativeVhostBlkStats;
  destroy(): void;
  /** The worker thread's kernel thread id (0 until it runs or after destroy). */
  readonly threadId: number;
  /** The I/O policy: $SPINDLE_VHOST_IO at construction (default auto); sync without io_uring. Null after destroy. */
  readonly ioMode: VhostBlkIoMode | null;
  /** What does the asynchronous I/O: io_uring, a thread pool (no io_uring, or $SPINDLE_VHOST_RING=threads), or nothing. Null after destroy. */
  readonly ioEngine: 'io_uring' | 'threads' | 'sync' | null;
}

/**
 * How the vhost-blk worker does I/O: `auto` tries RWF_NOWAIT inline and sends what would block
 * to its io_uring, `async` sends every read/write/flush to the io_uring, `sync` does it all
 * with blocking syscalls on the worker thread.
 */
export type VhostBlkIoMode = 'sync' | 'async' | 'auto';

/** Native UNIX socket handle (native/src/unixfd/). */
export interface NativeUnixSocket {
  readonly fd: number;
  /** True between start() and close()/EOF/a poll error. */
  readonly polling: boolean;
  /**
   * Begin watching for readability (once per object). `callback(0)`: readable (level-triggered:
   * drain with accept/recvmsg until -EAGAIN); `callback(-errno)`: polling failed and has stopped.
   * Called through MakeCallback; never after close() or after recvmsg returned EOF.
   */
  start(callback: (status: number) => void): void;
  /** fd (non-blocking, CLOEXEC) | -errno (-EAGAIN: none pending). */
  accept(): number;
  /** [bytes, fds] | -errno; bytes 0 = EOF (polling stops). Too many fds: they are closed, -EMSGSIZE. */
  recvmsg(buf: Uint8Array, maxFds?: number): [number, number[]] | number;
  /** bytes sent | -errno; fds travel with the first byte. */
  sendmsg(buf: Uint8Array, fds?: readonly number[]): number;
  /** Whether a polling socket keeps the event loop alive (default true). */
  setRef(ref: boolean): void;
  /** Pause (false) or restart (true) readiness callbacks; the fd stays open. */
  setWatching(on: boolean): void;
  /** Stop polling, close the fd -> 0 | -errno; idempotent. */
  close(): number;
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
