/** The vhost-user-blk listener: one front-end session at a time. */
import { UnixConnection, UnixListener } from '../../native/unix-fd.js';
import { VhostUserBlkBackend, type VhostUserBlkHooks, type VhostUserBlkOptions } from './backend.js';

export interface VhostUserBlkServerOptions extends VhostUserBlkOptions {
  /** Called with each new session. */
  onSession?: (backend: VhostUserBlkBackend) => void;
}

/**
 * Listens on a UNIX socket and serves one front-end at a time: a connection arriving while a
 * session is live is closed at once (QEMU connects once per device).
 */
export class VhostUserBlkServer {
  readonly listener: UnixListener;
  private current: VhostUserBlkBackend | null = null;
  /** Connections turned away because a session was live. */
  rejected = 0;

  constructor(path: string, private readonly o: VhostUserBlkServerOptions) {
    this.listener = UnixListener.listen(path, (conn) => this.accept(conn));
  }

  get session(): VhostUserBlkBackend | null {
    return this.current && !this.current.closed ? this.current : null;
  }

  private accept(conn: UnixConnection): void {
    if (this.session) {
      this.rejected++;
      conn.close();
      return;
    }
    const userClosed = this.o.hooks?.closed;
    const hooks: VhostUserBlkHooks = {
      ...this.o.hooks,
      closed: (b, reason) => {
        if (this.current === b) this.current = null;
        userClosed?.(b, reason);
      },
    };
    this.current = new VhostUserBlkBackend(conn, { ...this.o, hooks });
    this.o.onSession?.(this.current);
  }

  /** Stop listening and end the live session. */
  close(): void {
    this.listener.close();
    this.current?.close();
    this.current = null;
  }
}
