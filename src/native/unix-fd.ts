// Host facts for vhost-user (native/src/unixfd/): UNIX stream sockets that
// carry file descriptors (SCM_RIGHTS), shared mappings of fds as ArrayBuffers,
// eventfd and memfd. Readiness comes from a uv_poll_t on Node's own loop; the
// socket classes here are thin: reads and writes are synchronous, non-blocking
// syscalls made from the readiness callback.
import { lstatSync, unlinkSync } from 'node:fs';
import { constants } from 'node:os';
import { native, type NativeUnixSocket } from './addon.js';
import { check, EngineError } from './errors.js';

const EAGAIN = constants.errno.EAGAIN;
const EINTR = constants.errno.EINTR;
const ECONNABORTED = constants.errno.ECONNABORTED;
const EADDRINUSE = constants.errno.EADDRINUSE;
const ECONNREFUSED = constants.errno.ECONNREFUSED;

/** One recvmsg: bytes received into the caller's buffer and the fds that came with them. */
export interface ReceivedMessage {
  /** 0 means EOF: the peer closed (no further readiness callbacks). */
  bytes: number;
  /** Received fds (CLOEXEC); the caller owns them and must close them. */
  fds: number[];
}

/**
 * A connected AF_UNIX stream socket that carries fds. Set one readiness handler with
 * onReadable(); in it call recv() until it returns null (would block) or EOF.
 */
export class UnixConnection {
  private readonly h: NativeUnixSocket;
  private eof = false;
  private closedFlag = false;

  /** Adopt a connected socket fd (it is closed by close()). */
  constructor(fd: number) {
    this.h = new native.UnixSocket(fd);
  }

  /** Connect to a listening UNIX socket (non-blocking connect; EAGAIN when its backlog is full). */
  static connect(path: string): UnixConnection {
    const fd = check(native.unixConnect(path), `Could not connect to UNIX socket ${path}`);
    return new UnixConnection(fd);
  }

  /** A connected pair (socketpair(2)). */
  static pair(): [UnixConnection, UnixConnection] {
    const r = native.socketPair();
    if (typeof r === 'number') throw EngineError.from(r, 'Could not create a socket pair');
    return [new UnixConnection(r[0]), new UnixConnection(r[1])];
  }

  get fd(): number {
    return this.h.fd;
  }
  /** The peer closed and recv() returned EOF. */
  get ended(): boolean {
    return this.eof;
  }
  get closed(): boolean {
    return this.closedFlag;
  }
  /** Whether readiness is being watched (false after close(), EOF or a poll error). */
  get polling(): boolean {
    return this.h.polling;
  }

  /**
   * Set the readiness handler (once). `handler(null)`: readable, call recv() until null or EOF
   * (polling is level-triggered, an undrained socket calls again). `handler(err)`: polling failed
   * and has stopped. Never called after close() or after recv() returned EOF.
   */
  onReadable(handler: (err: EngineError | null) => void): void {
    if (this.closedFlag) throw new Error('UnixConnection.onReadable: connection is closed');
    this.h.start((status) => {
      handler(status < 0 ? EngineError.from(status, `Polling UNIX socket fd ${this.h.fd} failed`) : null);
    });
  }

  /**
   * One recvmsg into buf: null when nothing is available (EAGAIN), { bytes: 0 } at EOF.
   * Throws EngineError on errors, 'EMSGSIZE' when more than maxFds fds came (they are closed).
   */
  recv(buf: Uint8Array, maxFds = 8): ReceivedMessage | null {
    const r = this.h.recvmsg(buf, maxFds);
    if (typeof r === 'number') {
      if (r === -EAGAIN || r === -EINTR) return null;
      throw EngineError.from(r, `recvmsg on UNIX socket fd ${this.h.fd} failed`);
    }
    if (r[0] === 0 && r[1].length === 0) this.eof = true;
    return { bytes: r[0], fds: r[1] };
  }

  /**
   * One sendmsg of buf with fds attached (the fds stay ours: the kernel duplicates them).
   * Returns bytes sent (may be short); throws EngineError, 'EAGAIN' when the socket buffer is full.
   */
  send(buf: Uint8Array, fds: readonly number[] = []): number {
    return check(this.h.sendmsg(buf, fds), `sendmsg on UNIX socket fd ${this.h.fd} failed`);
  }

  /** Whether watching this socket keeps the process alive (default true). */
  setRef(ref: boolean): void {
    this.h.setRef(ref);
  }

  /** Stop polling and close the fd; idempotent. */
  close(): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    check(this.h.close(), 'close of UNIX socket failed');
  }
}

/**
 * Watches an eventfd we own (a vhost-user kick): the counter is read natively on readiness and
 * `handler` runs once per wake-up, however many kicks it covers. close() stops and closes the fd.
 */
export class EventFdWatcher {
  private readonly h: NativeUnixSocket;
  private closedFlag = false;

  constructor(fd: number, handler: (err: EngineError | null) => void) {
    this.h = new native.UnixSocket(fd, true);
    this.h.start((status) => {
      handler(status < 0 ? EngineError.from(status, `Polling eventfd ${fd} failed`) : null);
    });
  }

  get fd(): number {
    return this.h.fd;
  }

  setRef(ref: boolean): void {
    this.h.setRef(ref);
  }

  /** Stop (false) or restart (true) watching, leaving the fd open for another watcher. */
  setWatching(on: boolean): void {
    if (!this.closedFlag) this.h.setWatching(on);
  }

  close(): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    check(this.h.close(), 'close of eventfd failed');
  }
}

export interface ListenOptions {
  /** listen(2) backlog, default 16. */
  backlog?: number;
  /** Whether the listener keeps the process alive (default true, like net.Server). */
  ref?: boolean;
  /** accept(2) errors other than EAGAIN/EINTR/ECONNABORTED (e.g. EMFILE); default: thrown as uncaught. */
  onError?: (err: EngineError) => void;
}

/** A listening AF_UNIX stream socket; each accepted connection is handed to onConnection, not started. */
export class UnixListener {
  readonly path: string;
  private readonly h: NativeUnixSocket;
  private closedFlag = false;

  private constructor(path: string, fd: number) {
    this.path = path;
    this.h = new native.UnixSocket(fd);
  }

  /**
   * Listens on `path`. A socket file left behind by a server that died (nothing accepts on it)
   * is replaced, as QEMU's listeners do; one a live server listens on is not: EADDRINUSE.
   */
  static listen(path: string, onConnection: (conn: UnixConnection) => void, opts: ListenOptions = {}): UnixListener {
    let rc = native.unixListen(path, opts.backlog ?? 16);
    if (rc === -EADDRINUSE && removeStaleSocket(path)) rc = native.unixListen(path, opts.backlog ?? 16);
    const fd = check(rc, `Could not listen on UNIX socket ${path}`);
    const l = new UnixListener(path, fd);
    if (opts.ref === false) l.h.setRef(false);
    l.h.start((status) => {
      if (status < 0) {
        const err = EngineError.from(status, `Polling listener ${path} failed`);
        if (opts.onError) opts.onError(err);
        else throw err;
        return;
      }
      while (!l.closedFlag) {
        const c = l.h.accept();
        if (c === -EAGAIN) return;
        if (c === -EINTR || c === -ECONNABORTED) continue;
        if (c < 0) {
          const err = EngineError.from(c, `accept on ${path} failed`);
          if (opts.onError) opts.onError(err);
          else throw err;
          return;
        }
        onConnection(new UnixConnection(c));
      }
    });
    return l;
  }

  get fd(): number {
    return this.h.fd;
  }
  get closed(): boolean {
    return this.closedFlag;
  }

  setRef(ref: boolean): void {
    this.h.setRef(ref);
  }

  /** Stop accepting and close the socket; unlinks the path unless told not to. Idempotent. */
  close(unlink = true): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    const rc = this.h.close();
    if (unlink) {
      try {
        unlinkSync(this.path);
      } catch {
        // already gone
      }
    }
    check(rc, `close of listener ${this.path} failed`);
  }
}

/**
 * Unlinks `path` if it is a socket file no one listens on (connecting is refused: its server
 * died); returns whether it did. A live server's socket, or any other file, is left alone.
 */
export function removeStaleSocket(path: string): boolean {
  try {
    if (!lstatSync(path).isSocket()) return false;
  } catch {
    return false;
  }
  const fd = native.unixConnect(path);
  if (fd >= 0) closeFd(fd);
  if (fd !== -ECONNREFUSED) return false;
  unlinkSync(path);
  return true;
}

function checkRange(what: string, v: number, min: number): void {
  if (!Number.isSafeInteger(v) || v < min) throw new RangeError(`${what} must be an integer >= ${min}, got ${v}`);
}

/**
 * mmap(MAP_SHARED) of [offset, offset+length) of fd as an ArrayBuffer (offset need not be
 * page-aligned). The ArrayBuffer owns the mapping: it is munmap'ed when the ArrayBuffer is
 * collected, or at once by unmapFd(). Throws RangeError for zero/negative/overflowing ranges
 * and EngineError for the kernel's refusals (EBADF, EACCES, ENOMEM for too-large lengths, ...).
 */
export function mmapFd(fd: number, length: number, offset = 0, writable = true): ArrayBuffer {
  const r = native.mmapFd(fd, length, offset, writable);
  if (typeof r === 'number') {
    throw EngineError.from(r, `Could not map ${length} bytes at ${offset} of fd ${fd}${writable ? ' writable' : ''}`);
  }
  return r;
}

/** One fd range of a layout: [offset, offset+size) of fd placed at `at` (all page-aligned). */
export interface LayoutPiece {
  fd: number;
  offset: number;
  at: number;
  size: number;
}

/**
 * One ArrayBuffer of `length` bytes in which each piece's fd range is mapped MAP_SHARED
 * read-write at its `at`; the rest is reserved PROT_NONE (never touch it: the caller keeps the
 * map of what is mapped). Released by unmapFd() or collection, like mmapFd's.
 */
export function mmapLayout(length: number, pieces: readonly LayoutPiece[]): ArrayBuffer {
  const r = native.mmapLayout(length, pieces.map((p) => p.fd), pieces.map((p) => p.offset), pieces.map((p) => p.at), pieces.map((p) => p.size));
  if (typeof r === 'number') throw EngineError.from(r, `Could not map a ${length}-byte layout of ${pieces.length} fd ranges`);
  return r;
}

/**
 * Unmap an ArrayBuffer from mmapFd now: the buffer is detached first (every view of it becomes
 * length 0, so no JavaScript can touch the unmapped pages). Throws 'EINVAL' for anything else.
 */
export function unmapFd(buffer: ArrayBuffer): void {
  check(native.unmap(buffer), 'Could not unmap: not a live mapping from mmapFd');
}

/** Live mmapFd mappings in this process (for leak checks). */
export function liveMappings(): number {
  return native.mappingCount();
}

/**
 * Asks for a send buffer of `bytes` on a socket (SO_SNDBUF; the kernel caps it at
 * net.core.wmem_max). Best effort: false if the kernel refused.
 */
export function setSendBuffer(fd: number, bytes: number): boolean {
  return native.setSendBuffer(fd, bytes) === 0;
}

/**
 * Sends `head`, then `length` bytes of `fileFd` from `offset`, on a non-blocking socket
 * (sendfile: from the page cache, no copy through JavaScript). Returns the bytes sent, which
 * may be fewer than all when the socket filled up; or, with nothing sent, -errno: -ENODATA
 * when a page of the range is not cached (the call never waits for the disk), -ENOSYS when
 * the kernel cannot tell (no cachestat before Linux 6.5), -EAGAIN when the socket is full.
 */
export function sendFileRange(sockFd: number, head: Uint8Array, fileFd: number, offset: number, length: number): number {
  return native.sendFileRange(sockFd, head, fileFd, offset, length);
}

/** eventfd(2), CLOEXEC; non-blocking by default. */
export function eventfd(initial = 0, nonblocking = true): number {
  checkRange('eventfd initial', initial, 0);
  return check(native.eventfd(initial, nonblocking), 'Could not create an eventfd');
}

/** Add value (>= 1) to the eventfd counter (a kick or a call). */
export function eventfdWrite(fd: number, value = 1): void {
  checkRange('eventfdWrite value', value, 1);
  check(native.eventfdWrite(fd, value), `Could not write eventfd ${fd}`);
}

/** Read and reset the counter: its value, or 0 when it was 0 (non-blocking eventfd). */
export function eventfdRead(fd: number): number {
  const r = native.eventfdRead(fd);
  if (r === -EAGAIN) return 0;
  return check(r, `Could not read eventfd ${fd}`);
}

/** close(2) of a raw fd (received over a socket, eventfd, memfd). */
export function closeFd(fd: number): void {
  check(native.close(fd), `Could not close fd ${fd}`);
}

/** memfd_create(2) (CLOEXEC, sealing allowed) of `size` bytes: shareable memory for guests and tests. */
export function memfdCreate(name: string, size: number): number {
  checkRange('memfdCreate size', size, 0);
  return check(native.memfdCreate(name, size), `Could not create memfd ${name} of ${size} bytes`);
}
