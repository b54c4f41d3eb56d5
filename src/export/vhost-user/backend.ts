/**
 * The vhost-user-blk back-end's control plane (specs/vhost-user.rst): one session per front-end
 * connection, reading framed messages with their fds, negotiating features, holding the guest
 * memory table and each vring's setup (size, base, addresses as views of guest memory, kick /
 * call / err eventfds, enable state), and the virtio-blk config space. No virtqueue is processed
 * here: `rings`, `memory` and the hooks are what the data plane will consume.
 *
 * Errors: a malformed or refused request is answered with a REPLY_ACK failure when the front-end
 * asked for one (REPLY_ACK negotiated and need_reply set); otherwise the back-end closes the
 * connection, the only signal the protocol leaves it ("Communication"). Nothing a peer sends
 * throws out of the readiness callback.
 *
 * Message framing and payload readers are in messages.ts, the config space in blk-config.ts,
 * the options and hooks in backend-options.ts.
 */
import { closeFd, UnixConnection } from '../../native/unix-fd.js';
import { VIRTIO_BLK_F_CONFIG_WCE } from '../../../hw/virtio/virtio-blk-abi.js';
import { BLK_CFG_CAPACITY, BLK_CFG_WCE, blkFeatures, MAX_QUEUE_SIZE, PROTOCOL_FEATURES, SECTOR } from './blk-features.js';
import { BackendChannel, VHOST_USER_SET_SLAVE_REQ_FD } from './backend-channel.js';
import { blkConfigSpace, getConfig, setConfig } from './blk-config.js';
import { translateRing, Vring } from './vring.js';
import { GuestMemoryTable } from './memory.js';
import { InflightMemory, type InflightQueue } from './inflight.js';
import { checkedOptions, type VhostUserBlkHooks, type VhostUserBlkOptions } from './backend-options.js';
import {
  closeFdQuietly, memTableRegions, MessageReader, noPayload, refuse, sendReply, u64, vringAddr, vringFd, vringState,
  VhostUserRefused, type Message,
} from './messages.js';
import {
  bit, dataView, MAX_MEM_REGIONS, requestName, u64Payload, VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_CONFIG, VHOST_USER_GET_FEATURES, VHOST_USER_GET_INFLIGHT_FD, VHOST_USER_GET_MAX_MEM_SLOTS, VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM, VHOST_USER_GET_VRING_BASE, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_PROTOCOL_F_CONFIG, VHOST_USER_PROTOCOL_F_SLAVE_REQ,
  VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD, VHOST_USER_PROTOCOL_F_REPLY_ACK, VHOST_USER_RESET_OWNER, VHOST_USER_SET_CONFIG,
  VHOST_USER_SET_INFLIGHT_FD,
  VHOST_USER_SET_FEATURES, VHOST_USER_SET_MEM_TABLE, VHOST_USER_SET_OWNER, VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR, VHOST_USER_SET_VRING_BASE, VHOST_USER_SET_VRING_CALL, VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_ERR, VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_NUM,
  VRING_STATE_PAYLOAD, vringStatePayload,
} from './protocol.js';

export { VhostUserRefused };
export type { VhostUserBlkHooks, VhostUserBlkOptions };

/** One front-end session over one connection. */
export class VhostUserBlkBackend {
  readonly numQueues: number;
  readonly readOnly: boolean;
  /** Logical block size (bytes). */
  readonly blockSize: number;
  readonly offeredFeatures: bigint;
  /** SET_FEATURES (0n until then). */
  ackedFeatures = 0n;
  /** SET_PROTOCOL_FEATURES (0n until then). */
  ackedProtocolFeatures = 0n;
  owned = false;
  memory: GuestMemoryTable = GuestMemoryTable.empty();
  /** The inflight buffer (GET/SET_INFLIGHT_FD), or null: nothing is recorded. */
  inflight: InflightMemory | null = null;
  readonly rings: readonly Vring[];
  /** The virtio-blk config space as served by GET_CONFIG. */
  readonly config: Uint8Array;
  /** Refused requests, newest last (diagnostics). */
  readonly errors: string[] = [];
  private readonly hooks: VhostUserBlkHooks;
  private readonly reader = new MessageReader();
  private closedFlag = false;
  /** The back-end request channel (SET_SLAVE_REQ_FD), for config-change notices. */
  private channel: BackendChannel | null = null;
  private reason: Error | null = null;
  /** A deferred reply is pending: no further message is read until it is sent. */
  private paused = false;
  /** An fd the reply being built carries (GET_INFLIGHT_FD); closed once sent. */
  private replyFd = -1;

  constructor(readonly conn: UnixConnection, o: VhostUserBlkOptions) {
    const { numQueues: nq, segMax, blockSize: bs } = checkedOptions(o);
    this.numQueues = nq;
    this.blockSize = bs;
    this.readOnly = o.readOnly ?? false;
    this.offeredFeatures = blkFeatures(this.readOnly);
    this.hooks = o.hooks ?? {};
    this.rings = Array.from({ length: nq }, (_, i) => new Vring(i));
    this.config = blkConfigSpace({ length: o.length, numQueues: nq, segMax, readOnly: this.readOnly, writeCache: o.writeCache ?? true, blockSize: bs });
    conn.onReadable((err) => {
      if (err) this.close(err);
      else this.readable();
    });
  }

  get closed(): boolean {
    return this.closedFlag;
  }
  /** Why the session ended (null: still open, or an orderly EOF). */
  get closeReason(): Error | null {
    return this.reason;
  }
  get writeCache(): boolean {
    return this.config[BLK_CFG_WCE] !== 0;
  }

  hasFeature(n: number): boolean {
    return (this.ackedFeatures & bit(n)) !== 0n;
  }
  hasProtocolFeature(n: number): boolean {
    return (this.ackedProtocolFeatures & bit(n)) !== 0n;
  }

  /**
   * Whether a ring is enabled: by SET_VRING_ENABLE once VHOST_USER_F_PROTOCOL_FEATURES was
   * negotiated, otherwise from the start ("Ring states").
   */
  ringEnabled(ring: Vring): boolean {
    return this.hasFeature(VHOST_USER_F_PROTOCOL_FEATURES) ? ring.enabled : true;
  }

  /** Everything the data plane needs to process the ring: started, enabled, sized and addressed. */
  ringReady(ring: Vring): boolean {
    return ring.started && this.ringEnabled(ring) && ring.num > 0 && ring.addr !== null && !this.closedFlag;
  }

  /** Ring `ring`'s inflight record, or null (not negotiated, no buffer, or one too small for the ring). */
  inflightFor(ring: Vring): InflightQueue | null {
    const q = this.inflight?.queue(ring.index) ?? null;
    return q && ring.num <= q.capacity ? q : null;
  }

  /** Translate a guest-physical range (descriptor buffers) through the current table. */
  translate(gpa: number, len: number): Uint8Array | null {
    return this.memory.gpa(gpa, len)?.bytes ?? null;
  }

  /**
   * The export's length changed (block_resize): the config space's capacity follows, and the
   * front-end hears of it on the back-end channel (it re-reads the config and tells the guest).
   * Returns whether the front-end was told.
   */
  setCapacity(length: number): boolean {
    const sectors = BigInt(Math.floor(length / SECTOR));
    const dv = new DataView(this.config.buffer, this.config.byteOffset);
    if (dv.getBigUint64(BLK_CFG_CAPACITY, true) === sectors) return false;
    dv.setBigUint64(BLK_CFG_CAPACITY, sectors, true);
    if (!this.channel || !this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_CONFIG)) return false;
    return this.channel.configChanged();
  }

  /** End the session: close the socket, unmap guest memory, close every fd held. Idempotent. */
  close(reason: Error | null = null): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    this.reason = reason;
    const errs: unknown[] = [];
    const attempt = (f: () => void): void => {
      try {
        f();
      } catch (e) {
        errs.push(e);
      }
    };
    attempt(() => this.conn.close());
    if (this.channel) attempt(() => this.channel!.close());
    this.channel = null;
    for (const r of this.rings) r.close((e) => errs.push(e));
    attempt(() => this.memory.close());
    this.memory = GuestMemoryTable.empty();
    if (this.inflight) attempt(() => this.inflight!.close());
    this.inflight = null;
    for (const fd of this.reader.discard()) attempt(() => closeFd(fd));
    if (this.hooks.closed) attempt(() => this.hooks.closed!(this, reason));
    if (errs.length > 0 && !this.reason) this.reason = errs[0] instanceof Error ? errs[0] : new Error(String(errs[0]));
  }

  // --- framing ---

  private readable(): void {
    try {
      while (!this.closedFlag && !this.paused) {
        const msg = this.reader.read(this.conn);
        if (msg === null) return;
        if (msg === 'more') continue;
        if (msg === 'eof') {
          const mid = this.reader.midMessage;
          this.close(mid ? new Error('vhost-user: the front-end closed the connection mid-message') : null);
          return;
        }
        this.dispatch(msg);
      }
    } catch (e) {
      this.close(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private send(request: number, payload: Uint8Array): void {
    sendReply(this.conn, request, payload);
  }

  private dispatch(msg: Message): void {
    if (msg.request === VHOST_USER_GET_VRING_BASE && this.hooks.ringStopping && msg.fds.length === 0 && msg.payload.length >= VRING_STATE_PAYLOAD) {
      const ring = this.rings[dataView(msg.payload).getUint32(0, true)];
      const wait = ring ? this.hooks.ringStopping(this, ring) : undefined;
      if (ring && wait) {
        this.paused = true;
        const resume = (): void => {
          if (this.closedFlag) return;
          this.paused = false;
          try {
            this.send(msg.request, this.stopRing(ring));
          } catch (e) {
            this.close(e instanceof Error ? e : new Error(String(e)));
            return;
          }
          this.readable();
        };
        wait.then(resume, resume);
        return;
      }
      if (ring) {
        this.send(msg.request, this.stopRing(ring));
        return;
      }
    }
    const ackWanted = (msg.flags & VHOST_USER_NEED_REPLY_MASK) !== 0 && this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_REPLY_ACK);
    let reply: Uint8Array | null;
    try {
      reply = this.handle(msg);
    } catch (e) {
      for (const fd of msg.fds) closeFdQuietly(fd);
      msg.fds.length = 0;
      const text = `${requestName(msg.request)}: ${e instanceof Error ? e.message : String(e)}`;
      this.errors.push(text);
      if (e instanceof VhostUserRefused && ackWanted) {
        this.send(msg.request, u64Payload(1));
        return;
      }
      throw new Error(`vhost-user: ${text}`);
    } finally {
      // Whatever a handler did not adopt is not ours to keep.
      for (const fd of msg.fds) closeFdQuietly(fd);
    }
    if (reply) {
      const fd = this.replyFd;
      this.replyFd = -1;
      try {
        sendReply(this.conn, msg.request, reply, fd >= 0 ? [fd] : []);
      } finally {
        if (fd >= 0) closeFdQuietly(fd);
      }
    } else if (ackWanted) this.send(msg.request, u64Payload(0));
  }

  /** Handle one message: an explicit reply payload, or null (success, acked if asked). */
  private handle(m: Message): Uint8Array | null {
    switch (m.request) {
      case VHOST_USER_GET_FEATURES:
        return u64Payload(this.offeredFeatures);
      case VHOST_USER_SET_FEATURES: {
        const f = u64(m);
        const extra = f & ~this.offeredFeatures;
        if (extra !== 0n) refuse(`features 0x${extra.toString(16)} were not offered`);
        this.ackedFeatures = f;
        return null;
      }
      case VHOST_USER_GET_PROTOCOL_FEATURES:
        return u64Payload(PROTOCOL_FEATURES);
      case VHOST_USER_SET_PROTOCOL_FEATURES: {
        const f = u64(m);
        const extra = f & ~PROTOCOL_FEATURES;
        if (extra !== 0n) refuse(`protocol features 0x${extra.toString(16)} were not offered`);
        this.ackedProtocolFeatures = f;
        return null;
      }
      case VHOST_USER_SET_OWNER:
        noPayload(m);
        this.owned = true;
        return null;
      case VHOST_USER_RESET_OWNER:
        // Deprecated; the spec recommends ignoring it or disabling all rings. We disable them.
        noPayload(m);
        for (const r of this.rings) r.enabled = false;
        return null;
      case VHOST_USER_GET_QUEUE_NUM:
        return u64Payload(this.numQueues);
      case VHOST_USER_GET_MAX_MEM_SLOTS:
        return u64Payload(MAX_MEM_REGIONS);
      case VHOST_USER_SET_MEM_TABLE:
        this.setMemTable(m);
        return null;
      case VHOST_USER_SET_VRING_NUM: {
        const [ring, num] = this.vringState(m);
        if (num < 1 || num > MAX_QUEUE_SIZE || (num & (num - 1)) !== 0) refuse(`ring ${ring.index}: size ${num} is not a power of 2 up to ${MAX_QUEUE_SIZE}`);
        if (ring.started) refuse(`ring ${ring.index} is started`);
        if (ring.addr && ring.num !== num) ring.addr = null; // the old layout no longer fits
        ring.num = num;
        return null;
      }
      case VHOST_USER_SET_VRING_BASE: {
        const [ring, base] = this.vringState(m);
        if (base > 0xffff) refuse(`ring ${ring.index}: base ${base} is not a 16-bit index`);
        if (ring.started) refuse(`ring ${ring.index} is started`);
        ring.base = base;
        ring.lastAvailIdx = base;
        return null;
      }
      case VHOST_USER_GET_VRING_BASE: {
        const [ring] = this.vringState(m);
        return this.stopRing(ring);
      }
      case VHOST_USER_SET_VRING_ADDR:
        this.setVringAddr(m);
        return null;
      case VHOST_USER_SET_VRING_KICK:
      case VHOST_USER_SET_VRING_CALL:
      case VHOST_USER_SET_VRING_ERR:
        this.setVringFd(m);
        return null;
      case VHOST_USER_SET_VRING_ENABLE: {
        const [ring, on] = this.vringState(m);
        if (on > 1) refuse(`ring ${ring.index}: enable ${on} is not 0 or 1`);
        ring.enabled = on === 1;
        this.hooks.ringChanged?.(this, ring);
        return null;
      }
      case VHOST_USER_SET_SLAVE_REQ_FD: {
        if (!this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_SLAVE_REQ)) refuse('SLAVE_REQ protocol feature not negotiated');
        if (m.fds.length !== 1) refuse(`${m.fds.length} fds, expected 1`);
        const conn = new UnixConnection(m.fds.pop()!);
        this.channel?.close();
        this.channel = new BackendChannel(conn, (why) => this.errors.push(why));
        return null;
      }
      case VHOST_USER_GET_INFLIGHT_FD: {
        if (!this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)) refuse('INFLIGHT_SHMFD protocol feature not negotiated');
        const a = InflightMemory.allocate(m, this.numQueues);
        this.setInflight(a.memory);
        this.replyFd = a.fd;
        return a.reply;
      }
      case VHOST_USER_SET_INFLIGHT_FD:
        if (!this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD)) refuse('INFLIGHT_SHMFD protocol feature not negotiated');
        this.setInflight(InflightMemory.adopt(m, this.numQueues));
        return null;
      case VHOST_USER_GET_CONFIG:
        return getConfig(this.config, m, this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_CONFIG), this.errors);
      case VHOST_USER_SET_CONFIG:
        if (setConfig(this.config, m, this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_CONFIG), this.hasFeature(VIRTIO_BLK_F_CONFIG_WCE))) {
          this.hooks.writeCacheChanged?.(this, this.config[BLK_CFG_WCE] === 1);
        }
        return null;
      default:
        refuse(`unsupported request`);
    }
  }

  /** GET_VRING_BASE once the data plane let go of the ring: stop it and report its base. */
  private stopRing(ring: Vring): Uint8Array {
    ring.started = false;
    ring.stopKick();
    return vringStatePayload(ring.index, ring.lastAvailIdx & 0xffff);
  }

  // --- payload readers ---

  private ring(index: number): Vring {
    const r = this.rings[index];
    if (!r) refuse(`ring index ${index} out of range (${this.numQueues} queues)`);
    return r;
  }

  private vringState(m: Message): [Vring, number] {
    const [index, value] = vringState(m);
    return [this.ring(index), value];
  }

  // --- handlers ---

  /** A new inflight buffer; the old one is unmapped once the queues writing it let go. */
  private setInflight(mem: InflightMemory): void {
    this.inflight?.close();
    this.inflight = mem;
  }

  private setMemTable(m: Message): void {
    const descs = memTableRegions(m);
    let table: GuestMemoryTable;
    try {
      table = GuestMemoryTable.map(descs, m.fds);
    } catch (e) {
      refuse(e instanceof Error ? e.message : String(e));
    }
    const old = this.memory;
    this.memory = table;
    old.close();
    // Rings keep their user addresses across a new table (memory hot-plug): re-translate them.
    for (const r of this.rings) {
      if (!r.addr) continue;
      const a = r.addr;
      r.addr = translateRing(this.memory, r.num, a.flags, a.descUser, a.usedUser, a.availUser, a.logGuest);
    }
    this.hooks.memoryChanged?.(this);
  }

  private setVringAddr(m: Message): void {
    const v = vringAddr(m);
    const ring = this.ring(v.index);
    if (ring.num === 0) refuse(`ring ${ring.index}: SET_VRING_ADDR before SET_VRING_NUM`);
    const a = translateRing(this.memory, ring.num, v.flags, v.desc, v.used, v.avail, v.log);
    if (!a) refuse(`ring ${ring.index}: ring addresses are not inside the memory table`);
    ring.addr = a;
  }

  private setVringFd(m: Message): void {
    const v = vringFd(m);
    const ring = this.ring(v.index);
    const fd = v.noFd ? -1 : m.fds.pop()!;
    if (m.request !== VHOST_USER_SET_VRING_KICK) {
      const call = m.request === VHOST_USER_SET_VRING_CALL;
      ring.setFd(call ? 'callFd' : 'errFd', fd);
      if (call) this.hooks.callChanged?.(this, ring);
      return;
    }
    ring.setKick(fd, () => {
      if (ring.started && !this.closedFlag) this.hooks.ringKicked?.(this, ring);
    }, (why) => this.errors.push(why));
    // "The back-end must start ring upon receiving a kick"; like other back-ends we treat the
    // kick fd's arrival as the start (a no-fd kick means the ring is polled).
    ring.started = true;
    this.hooks.ringChanged?.(this, ring);
  }
}
