/**
 * The back-end's request channel to the front-end (specs/vhost-user.rst, "Back-end
 * communication"): a socket QEMU passes with SET_SLAVE_REQ_FD, on which the back-end says the
 * config space changed (a resize), and QEMU reads it again with GET_CONFIG and tells the guest.
 * Messages go without NEED_REPLY, so nothing is awaited; anything QEMU sends back is discarded.
 */
import type { UnixConnection } from '../../native/unix-fd.js';
import { encodeMessage, VHOST_USER_VERSION } from './protocol.js';

export const VHOST_USER_SET_SLAVE_REQ_FD = 21;
export const VHOST_USER_SLAVE_CONFIG_CHANGE_MSG = 2;

export class BackendChannel {
  private readonly scratch = new Uint8Array(256);
  private closedFlag = false;

  constructor(private readonly conn: UnixConnection, private readonly onError: (why: string) => void) {
    conn.onReadable((err) => {
      if (err) return this.close();
      try {
        for (;;) {
          const r = conn.recv(this.scratch, 0);
          if (r === null) return;
          if (r.bytes === 0) return this.close();
        }
      } catch (e) {
        this.onError(`back-end channel: ${(e as Error).message}`);
        this.close();
      }
    });
  }

  /** VHOST_USER_SLAVE_CONFIG_CHANGE_MSG; false if it could not be sent (the channel is gone or full). */
  configChanged(): boolean {
    if (this.closedFlag) return false;
    const m = encodeMessage(VHOST_USER_SLAVE_CONFIG_CHANGE_MSG, VHOST_USER_VERSION, new Uint8Array(0));
    try {
      return this.conn.send(m) === m.length;
    } catch (e) {
      this.onError(`back-end channel: ${(e as Error).message}`);
      this.close();
      return false;
    }
  }

  close(): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    this.conn.close();
  }
}
