/** One vring as the front-end set it up: size, base, addresses in guest memory, eventfds. */
import { closeFd, EventFdWatcher } from '../../native/unix-fd.js';
import type { GuestMemoryTable, GuestView } from './memory.js';

export interface VringAddresses {
  readonly flags: number;
  /** The front-end's user addresses as sent (kept to re-translate after a new SET_MEM_TABLE). */
  readonly descUser: number;
  readonly availUser: number;
  readonly usedUser: number;
  readonly logGuest: number;
  /** Descriptor table: 16 * num bytes. */
  readonly desc: GuestView;
  /** Available ring: 6 + 2 * num bytes (flags, idx, ring[num], used_event). */
  readonly avail: GuestView;
  /** Used ring: 6 + 8 * num bytes (flags, idx, ring[num], avail_event). */
  readonly used: GuestView;
}

/**
 * One vring's state. The control plane writes every field except lastAvailIdx, which the data
 * plane advances while the ring runs and GET_VRING_BASE reports.
 */
export class Vring {
  /** Queue size from SET_VRING_NUM (0: not set). */
  num = 0;
  /** SET_VRING_BASE: the next avail index to process. */
  base = 0;
  /** The data plane's position; reset to base by SET_VRING_BASE. */
  lastAvailIdx = 0;
  addr: VringAddresses | null = null;
  /** -1: none (or polling, when the front-end sent the no-fd bit). */
  kickFd = -1;
  /** Watches kickFd (and owns it: closing the watcher closes the fd). */
  kick: EventFdWatcher | null = null;
  callFd = -1;
  errFd = -1;
  /** Started by SET_VRING_KICK, stopped by GET_VRING_BASE ("Ring states"). */
  started = false;
  /** SET_VRING_ENABLE; see VhostUserBlkBackend.ringEnabled() for the effective state. */
  enabled = false;
  constructor(readonly index: number) {}

  /**
   * SET_VRING_KICK: watch `fd` (-1: none, the ring is polled), calling `kicked` on each kick;
   * a fd that breaks is reported through `broke` and dropped.
   */
  setKick(fd: number, kicked: () => void, broke: (why: string) => void): void {
    this.stopKick();
    this.kickFd = fd;
    if (fd < 0) return;
    const w = new EventFdWatcher(fd, (err) => {
      if (!err) return kicked();
      // Not an eventfd, or it broke: the ring can only be driven by a new kick fd now.
      broke(`ring ${this.index}: kick fd: ${err.message}`);
      if (this.kick === w) {
        this.kick = null;
        this.kickFd = -1;
      }
      w.close();
    });
    this.kick = w;
  }

  /** Stop watching (and close) the kick fd: the front-end may reuse it once the ring stops. */
  stopKick(): void {
    this.kick?.close();
    this.kick = null;
    this.kickFd = -1;
  }

  /** SET_VRING_CALL / SET_VRING_ERR: adopt `fd` (-1: none), closing the one it replaces. */
  setFd(key: 'callFd' | 'errFd', fd: number): void {
    const old = this[key];
    this[key] = fd;
    if (old >= 0) closeFd(old);
  }

  /** The session ended: every fd closed, the ring forgotten. Errors go to `failed`. */
  close(failed: (e: unknown) => void): void {
    this.started = false;
    this.enabled = false;
    this.addr = null;
    for (const f of [() => this.stopKick(), () => this.setFd('callFd', -1), () => this.setFd('errFd', -1)]) {
      try {
        f();
      } catch (e) {
        failed(e);
      }
    }
  }
}


/** A ring's addresses (the front-end's user addresses) as views of `memory`; null unless all three fit. */
export function translateRing(
  memory: GuestMemoryTable, num: number, flags: number, descUser: number, usedUser: number, availUser: number, logGuest: number,
): VringAddresses | null {
  const desc = memory.uva(descUser, 16 * num);
  const avail = memory.uva(availUser, 6 + 2 * num);
  const used = memory.uva(usedUser, 6 + 8 * num);
  if (!desc || !avail || !used) return null;
  return { flags, descUser, availUser, usedUser, logGuest, desc, avail, used };
}
