/**
 * NbdServer: listens on a UNIX socket or TCP (loopback unless told otherwise) and serves
 * named exports over the NBD protocol, fixed newstyle handshake only.
 *
 *   NbdServer ──listen──> net.Server ──accept──> NbdConn (one per client)
 *       └──exports: name -> NbdExport ──BlockBackend──> node
 *
 * Removal mirrors QEMU's `nbd-server-remove` / `block-export-del`: mode 'safe' refuses while
 * clients are connected ("export 'NAME' still in use"); mode 'hard' drops them at once (their
 * in-flight requests finish and the replies are dropped). Either way the name disappears for
 * new clients immediately and the export's backend is released once its last request is done.
 *
 * Context: main loop, every method.
 */
import { createServer, type AddressInfo, type Server } from 'node:net';
import { removeStaleSocket, setSendBuffer } from '../../native/unix-fd.js';
import { assertMainLoop } from '../../block/context.js';
import { BlockError } from '../../block/error.js';
import { NbdConn, type ConnHost } from './conn.js';
import { NbdExport, type ExportInfo, type NbdExportOptions } from './export.js';
import { MAX_STRING } from './protocol.js';

export type NbdListenAddress = { path: string } | { host?: string; port: number };

export interface NbdServerOptions {
  /** Clients that have not finished negotiating after this many seconds are dropped (QEMU: 10). */
  handshakeMaxSeconds?: number;
}

/** How long close() lets clients finish in-flight requests before cutting them off. */
const CLOSE_GRACE_MS = 5000;
/** SO_SNDBUF asked for on each client socket (the kernel caps it at net.core.wmem_max). */
const SEND_BUFFER = 4 << 20;

export class NbdServer implements ConnHost {
  readonly #exports = new Map<string, NbdExport>();
  readonly #conns = new Set<NbdConn>();
  readonly #servers: Server[] = [];
  #closing = false;
  #idleWaiters: (() => void)[] = [];
  readonly handshakeMs: number;

  constructor(o: NbdServerOptions = {}) {
    const secs = o.handshakeMaxSeconds ?? 10;
    if (!(secs >= 0) || !Number.isFinite(secs)) throw new BlockError('EINVAL', `handshakeMaxSeconds must be a number of seconds >= 0, not ${String(secs)}`);
    this.handshakeMs = secs * 1000;
  }

  get shuttingDown(): boolean {
    return this.#closing;
  }

  /**
   * Starts listening; resolves with the bound address (a path, or host and port: port 0
   * picks a free one). May be called more than once. Context: main loop.
   */
  listen(addr: NbdListenAddress): Promise<string | AddressInfo> {
    assertMainLoop('nbd listen');
    if (this.#closing) return Promise.reject(new BlockError('EINVAL', 'NBD server is closed'));
    const srv = createServer({ noDelay: true }, (sock) => {
      if (this.#closing) return void sock.destroy();
      // Read replies are large (256 KiB from nbdcopy, up to 32 MiB): with the default socket
      // buffer each one takes several writes and as many wake-ups.
      const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
      if (typeof fd === 'number' && fd >= 0) setSendBuffer(fd, SEND_BUFFER);
      this.#conns.add(new NbdConn(sock, this));
    });
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      const ready = (): void => {
        srv.off('error', reject);
        srv.on('error', () => undefined);
        this.#servers.push(srv);
        resolve(srv.address()!);
      };
      if ('path' in addr) {
        removeStaleSocket(addr.path); // left by a server that died, as QEMU replaces it
        srv.listen(addr.path, ready);
      }
      else srv.listen(addr.port, addr.host ?? '127.0.0.1', ready);
    });
  }

  /** Adds an export. Context: main loop. */
  addExport(o: NbdExportOptions): ExportInfo {
    assertMainLoop('nbd addExport');
    if (this.#closing) throw new BlockError('EINVAL', 'NBD server is closed');
    if (typeof o.name !== 'string' || Buffer.byteLength(o.name) > MAX_STRING) throw new BlockError('EINVAL', `Export name must be a string of at most ${MAX_STRING} bytes`);
    if (o.description !== undefined && Buffer.byteLength(o.description) > MAX_STRING) throw new BlockError('EINVAL', `Export description must be at most ${MAX_STRING} bytes`);
    if (this.#exports.has(o.name)) throw new BlockError('EEXIST', `NBD server already has export named '${o.name}'`);
    const exp = new NbdExport(o);
    this.#exports.set(o.name, exp);
    return exp.info();
  }

  /**
   * Removes an export: 'safe' refuses while clients use it, 'hard' disconnects them.
   * Resolves once the export's backend is released. Context: main loop.
   */
  async removeExport(name: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    assertMainLoop('nbd removeExport');
    const exp = this.#exports.get(name);
    if (!exp) throw new BlockError('ENOENT', `Export '${name}' is not found`);
    if (mode !== 'safe' && mode !== 'hard') throw new BlockError('EINVAL', `Parameter 'mode' does not accept value '${String(mode)}' (safe, hard)`);
    if (mode === 'safe' && exp.clients.size) {
      throw new BlockError('EBUSY', `export '${name}' still in use`);
    }
    this.#exports.delete(name);
    exp.dropClients();
    await exp.release();
  }

  /** The exports, as listed to clients. Context: main loop. */
  exports(): ExportInfo[] {
    return [...this.#exports.values()].map((e) => e.info());
  }

  /** Connected clients (handshake and transmission). */
  get clientCount(): number {
    return this.#conns.size;
  }

  /**
   * Stops listening, lets connected clients' in-flight requests finish (new ones fail with
   * ESHUTDOWN) and closes them, then releases every export. Context: main loop.
   */
  async close(): Promise<void> {
    assertMainLoop('nbd close');
    if (!this.#closing) {
      this.#closing = true;
      for (const s of this.#servers) s.close();
      for (const c of this.#conns) c.shutdown();
    }
    if (this.#conns.size) {
      const timer = setTimeout(() => {
        for (const c of this.#conns) c.abort();
      }, CLOSE_GRACE_MS);
      await new Promise<void>((r) => this.#idleWaiters.push(r));
      clearTimeout(timer);
    }
    const all = [...this.#exports.values()];
    this.#exports.clear();
    await Promise.all(all.map((e) => e.release()));
  }

  // ---- ConnHost ---------------------------------------------------------------------------
  findExport(name: string): NbdExport | undefined {
    return this.#exports.get(name);
  }
  listExports(): NbdExport[] {
    return [...this.#exports.values()];
  }
  connGone(c: NbdConn): void {
    this.#conns.delete(c);
    if (this.#conns.size === 0) for (const w of this.#idleWaiters.splice(0)) w();
  }
}
