// Public types of the native I/O engine (src/native/engine.ts re-exports them).

export type EngineKind = 'io_uring' | 'threads';
export interface EngineOptions {
  kind?: 'auto' | EngineKind;
  /** Ring size and maximum requests in flight (more are queued in JS); default 256. */
  entries?: number;
  /** Worker threads of the 'threads' engine; default 4. */
  threads?: number;
  /**
   * io_uring: register the slabs as fixed buffers (READ_FIXED/WRITE_FIXED for
   * single-segment slab requests).  Default true unless SPINDLE_NO_FIXED_BUFFERS=1;
   * silently off where the kernel or RLIMIT_MEMLOCK refuses.
   */
  fixedBuffers?: boolean;
  /**
   * Page-cached reads at low depth complete inline (RWF_NOWAIT), within the JavaScript run that
   * submitted them. Default true unless SPINDLE_NO_INLINE_READS=1 (tests that need a request to
   * stay in flight until a loop turn).
   */
  inlineReads?: boolean;
  /** @internal Raw EngineFlags bits for the native side (tests, benchmarks). */
  nativeFlags?: number;
}
/** result >= 0: bytes transferred (or 0 for fsync/fallocate); result < 0: -errno. */
export type IoDone = (result: number) => void;
export interface OpenOptions { write: boolean; create?: boolean; direct?: boolean; truncate?: boolean }
export interface EngineStats {
  submitted: number; completed: number; batches: number; enters: number;
  /** Requests on memory outside the slabs (one native call each). */
  fallbackRequests: number;
  /** Requests issued on registered (fixed) buffers. */
  fixedRequests: number;
  /** Page-cache writes done inline, and how often a slow one turned that off for a while. */
  inlineWrites: number;
  inlineBackoffs: number;
}
/** What the io_uring backend enabled (all zero for the thread pool). */
export interface EngineFeatures {
  /** IORING_SETUP_* flags the ring was created with. */
  setupFlags: number;
  /** Size of the fixed-buffer table; 0 when buffers are not registered. */
  fixedSlots: number;
}

export interface IoEngine {
  readonly kind: EngineKind;
  open(path: string, opts: OpenOptions): number;
  close(fd: number): void;
  /**
   * inline: the file is page-cached (not O_DIRECT), so the read may run at once on this thread
   * when the page cache holds all of it (RWF_NOWAIT), saving the completion's round trip; `done`
   * still runs later, never inside this call.
   */
  readv(fd: number, iov: readonly Uint8Array[], offset: number, done: IoDone, inline?: boolean): void;
  /**
   * inline: the file is page-cached (not O_DIRECT), so the write may run at once on this
   * thread, a few microseconds instead of a trip to a worker; `done` still runs later,
   * never inside this call. Slow inline writes turn the inline path off for a while.
   */
  writev(fd: number, iov: readonly Uint8Array[], offset: number, done: IoDone, inline?: boolean): void;
  fsync(fd: number, datasync: boolean, done: IoDone): void;
  /** mode: FALLOC_FL_* bits (see FALLOC). */
  fallocate(fd: number, mode: number, offset: number, len: number, done: IoDone): void;
  allocBuffer(size: number, align?: number): Buffer;
  freeBuffer(buf: Buffer): void;
  /**
   * True when every segment is slab memory whose address and length are
   * multiples of `align` (what O_DIRECT needs).  Memory outside the slabs has
   * an unknown address, so it reports false and callers bounce it.
   */
  isAligned(iov: readonly Uint8Array[], align: number): boolean;
  stats(): EngineStats;
  /** Resolves when nothing is in flight or queued. */
  idle(): Promise<void>;
  inFlight(): number;
  /** Waits for in-flight I/O, then stops the ring or threads; their callbacks still run (from a microtask). */
  destroy(): void;
}

export const FALLOC = { KEEP_SIZE: 1, PUNCH_HOLE: 2, ZERO_RANGE: 0x10 } as const;
