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
 */
import { closeFd, EventFdWatcher, type UnixConnection } from '../../native/unix-fd.js';
import { VIRTIO_BLK_F_CONFIG_WCE } from '../../../hw/virtio/virtio-blk-abi.js';
import {
  BLK_CFG_BLK_SIZE, BLK_CFG_CAPACITY, BLK_CFG_DISCARD_ALIGNMENT, BLK_CFG_MAX_DISCARD_SECTORS, BLK_CFG_MAX_DISCARD_SEG,
  BLK_CFG_MAX_WRITE_ZEROES_SECTORS, BLK_CFG_MAX_WRITE_ZEROES_SEG, BLK_CFG_WRITE_ZEROES_MAY_UNMAP, MAX_DISCARD_SECTORS, BLK_CFG_NUM_QUEUES, BLK_CFG_SEG_MAX, BLK_CFG_SIZE_MAX, BLK_CFG_WCE, BLK_CONFIG_SIZE,
  blkFeatures, MAX_QUEUE_SIZE, PROTOCOL_FEATURES, SECTOR, SIZE_MAX_BYTES,
} from './blk-features.js';
import { Vring, type VringAddresses } from './vring.js';
import { GuestMemoryTable, type MemoryRegionDesc } from './memory.js';
import {
  bit, CONFIG_HEADER, dataView, decodeHeader, encodeReply, HEADER_SIZE, MAX_CONFIG_SIZE, MAX_FDS,
  MAX_MEM_REGIONS, MAX_PAYLOAD, MEM_REGION_SIZE, MEM_TABLE_HEADER, requestName, safeU64, u64Payload,
  VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION, VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_CONFIG, VHOST_USER_GET_FEATURES, VHOST_USER_GET_MAX_MEM_SLOTS, VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM, VHOST_USER_GET_VRING_BASE, VHOST_USER_NEED_REPLY_MASK, VHOST_USER_PROTOCOL_F_CONFIG,
  VHOST_USER_PROTOCOL_F_REPLY_ACK, VHOST_USER_RESET_OWNER, VHOST_USER_SET_CONFIG,
  VHOST_USER_SET_FEATURES, VHOST_USER_SET_MEM_TABLE, VHOST_USER_SET_OWNER, VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR, VHOST_USER_SET_VRING_BASE, VHOST_USER_SET_VRING_CALL, VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_ERR, VHOST_USER_SET_VRING_KICK, VHOST_USER_SET_VRING_NUM, VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK, VHOST_USER_VRING_IDX_MASK, VHOST_USER_VRING_NOFD_MASK, VRING_ADDR_PAYLOAD,
  VRING_STATE_PAYLOAD, vringStatePayload,
} from './protocol.js';

export interface VhostUserBlkHooks {
  /** A ring was started (SET_VRING_KICK) or enabled; check backend.ringReady(). */
  ringChanged?(backend: VhostUserBlkBackend, ring: Vring): void;
  /** SET_VRING_CALL gave the ring a new call fd (or none). */
  callChanged?(backend: VhostUserBlkBackend, ring: Vring): void;
  /** The front-end kicked a started ring (one call per wake-up, however many kicks). */
  ringKicked?(backend: VhostUserBlkBackend, ring: Vring): void;
  /**
   * GET_VRING_BASE is about to reply ring.lastAvailIdx: stop processing the ring and update that
   * first. A promise defers the reply (and every later message) until it settles, so requests in
   * flight can complete into the used ring before the front-end takes the ring back.
   */
  ringStopping?(backend: VhostUserBlkBackend, ring: Vring): Promise<void> | void;
  /** A new memory table replaced the old one (views of the old one are detached). */
  memoryChanged?(backend: VhostUserBlkBackend): void;
  /** The front-end changed the write cache (SET_CONFIG of wce). */
  writeCacheChanged?(backend: VhostUserBlkBackend, enabled: boolean): void;
  /** The session ended; `reason` is null for an orderly EOF. Everything is unmapped and closed. */
  closed?(backend: VhostUserBlkBackend, reason: Error | null): void;
}

export interface VhostUserBlkOptions {
  /** Export length in bytes (capacity is length / 512). */
  length: number;
  /** Virtqueues offered (GET_QUEUE_NUM, config num_queues); default 1, at most 256. */
  numQueues?: number;
  readOnly?: boolean;
  /** Initial write-cache state (config wce); default true. */
  writeCache?: boolean;
  /** seg_max in the config; default 126 (a 128-entry queue less header and status). */
  segMax?: number;
  hooks?: VhostUserBlkHooks;
}

/** A refused request: REPLY_ACK failure when asked for, else the connection is closed. */
export class VhostUserRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'VhostUserRefused';
  }
}

interface Message {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: number[];
}

function refuse(message: string): never {
  throw new VhostUserRefused(message);
}

/** One front-end session over one connection. */
export class VhostUserBlkBackend {
  readonly numQueues: number;
  readonly readOnly: boolean;
  readonly offeredFeatures: bigint;
  /** SET_FEATURES (0n until then). */
  ackedFeatures = 0n;
  /** SET_PROTOCOL_FEATURES (0n until then). */
  ackedProtocolFeatures = 0n;
  owned = false;
  memory: GuestMemoryTable = GuestMemoryTable.empty();
  readonly rings: readonly Vring[];
  /** The virtio-blk config space as served by GET_CONFIG. */
  readonly config = new Uint8Array(BLK_CONFIG_SIZE);
  /** Refused requests, newest last (diagnostics). */
  readonly errors: string[] = [];
  private readonly hooks: VhostUserBlkHooks;
  private readonly hdr = new Uint8Array(HEADER_SIZE);
  private hdrHave = 0;
  private payload: Uint8Array | null = null;
  private payloadHave = 0;
  private pendingFds: number[] = [];
  private closedFlag = false;
  private reason: Error | null = null;
  /** A deferred reply is pending: no further message is read until it is sent. */
  private paused = false;

  constructor(readonly conn: UnixConnection, o: VhostUserBlkOptions) {
    if (!Number.isSafeInteger(o.length) || o.length < 0) throw new RangeError(`length must be a non-negative safe integer, got ${o.length}`);
    const nq = o.numQueues ?? 1;
    if (!Number.isInteger(nq) || nq < 1 || nq > 256) throw new RangeError(`numQueues must be 1..256, got ${nq}`);
    const segMax = o.segMax ?? 126;
    if (!Number.isInteger(segMax) || segMax < 1 || segMax > 0xffffffff) throw new RangeError(`segMax must be a positive u32, got ${segMax}`);
    this.numQueues = nq;
    this.readOnly = o.readOnly ?? false;
    this.offeredFeatures = blkFeatures(this.readOnly);
    this.hooks = o.hooks ?? {};
    this.rings = Array.from({ length: nq }, (_, i) => new Vring(i));
    const c = dataView(this.config);
    c.setBigUint64(BLK_CFG_CAPACITY, BigInt(Math.floor(o.length / SECTOR)), true);
    c.setUint32(BLK_CFG_SIZE_MAX, SIZE_MAX_BYTES, true);
    c.setUint32(BLK_CFG_SEG_MAX, segMax, true);
    c.setUint32(BLK_CFG_BLK_SIZE, SECTOR, true);
    this.config[BLK_CFG_WCE] = (o.writeCache ?? true) ? 1 : 0;
    c.setUint16(BLK_CFG_NUM_QUEUES, nq, true);
    if (!this.readOnly) {
      c.setUint32(BLK_CFG_MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS, true);
      c.setUint32(BLK_CFG_MAX_DISCARD_SEG, 1, true);
      c.setUint32(BLK_CFG_DISCARD_ALIGNMENT, 1, true);
      c.setUint32(BLK_CFG_MAX_WRITE_ZEROES_SECTORS, MAX_DISCARD_SECTORS, true);
      c.setUint32(BLK_CFG_MAX_WRITE_ZEROES_SEG, 1, true);
      this.config[BLK_CFG_WRITE_ZEROES_MAY_UNMAP] = 1;
    }
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

  /** Translate a guest-physical range (descriptor buffers) through the current table. */
  translate(gpa: number, len: number): Uint8Array | null {
    return this.memory.gpa(gpa, len)?.bytes ?? null;
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
    for (const r of this.rings) {
      r.started = false;
      r.enabled = false;
      r.addr = null;
      if (r.kick) attempt(() => r.kick!.close());
      r.kick = null;
      r.kickFd = -1;
      for (const k of ['kickFd', 'callFd', 'errFd'] as const) {
        const fd = r[k];
        r[k] = -1;
        if (fd >= 0) attempt(() => closeFd(fd));
      }
    }
    attempt(() => this.memory.close());
    this.memory = GuestMemoryTable.empty();
    const fds = this.pendingFds;
    this.pendingFds = [];
    for (const fd of fds) attempt(() => closeFd(fd));
    this.payload = null;
    if (this.hooks.closed) attempt(() => this.hooks.closed!(this, reason));
    if (errs.length > 0 && !this.reason) this.reason = errs[0] instanceof Error ? errs[0] : new Error(String(errs[0]));
  }

  // --- framing ---

  private readable(): void {
    try {
      while (!this.closedFlag && !this.paused) {
        // Read exactly what the current message still needs, so fds never cross messages.
        let target: Uint8Array;
        if (this.hdrHave < HEADER_SIZE) target = this.hdr.subarray(this.hdrHave);
        else target = this.payload!.subarray(this.payloadHave);
        const r = this.conn.recv(target, MAX_FDS);
        if (r === null) return;
        this.pendingFds.push(...r.fds);
        if (r.bytes === 0) {
          if (r.fds.length > 0) continue;
          const mid = this.hdrHave > 0;
          this.close(mid ? new Error('vhost-user: the front-end closed the connection mid-message') : null);
          return;
        }
        if (this.pendingFds.length > MAX_FDS) throw new Error(`vhost-user: more than ${MAX_FDS} fds with one message`);
        if (this.hdrHave < HEADER_SIZE) {
          this.hdrHave += r.bytes;
          if (this.hdrHave < HEADER_SIZE) continue;
          const h = decodeHeader(this.hdr);
          if ((h.flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
            throw new Error(`vhost-user: bad version in flags 0x${h.flags.toString(16)} (${requestName(h.request)})`);
          }
          if (h.size > MAX_PAYLOAD) throw new Error(`vhost-user: ${requestName(h.request)} payload of ${h.size} bytes exceeds ${MAX_PAYLOAD}`);
          this.payload = new Uint8Array(h.size);
          this.payloadHave = 0;
        } else {
          this.payloadHave += r.bytes;
        }
        if (this.payloadHave < this.payload!.length) continue;
        const h = decodeHeader(this.hdr);
        const msg: Message = { request: h.request, flags: h.flags, payload: this.payload!, fds: this.pendingFds };
        this.hdrHave = 0;
        this.payload = null;
        this.pendingFds = [];
        this.dispatch(msg);
      }
    } catch (e) {
      this.close(e instanceof Error ? e : new Error(String(e)));
    }
  }

  private send(request: number, payload: Uint8Array): void {
    const m = encodeReply(request, payload);
    const n = this.conn.send(m);
    // Replies are small and the front-end waits for each one; a short write means it is not reading.
    if (n !== m.length) throw new Error(`vhost-user: short write of ${requestName(request)} reply (${n} of ${m.length})`);
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
    if (reply) this.send(msg.request, reply);
    else if (ackWanted) this.send(msg.request, u64Payload(0));
  }

  /** Handle one message: an explicit reply payload, or null (success, acked if asked). */
  private handle(m: Message): Uint8Array | null {
    switch (m.request) {
      case VHOST_USER_GET_FEATURES:
        return u64Payload(this.offeredFeatures);
      case VHOST_USER_SET_FEATURES: {
        const f = this.u64(m);
        const extra = f & ~this.offeredFeatures;
        if (extra !== 0n) refuse(`features 0x${extra.toString(16)} were not offered`);
        this.ackedFeatures = f;
        return null;
      }
      case VHOST_USER_GET_PROTOCOL_FEATURES:
        return u64Payload(PROTOCOL_FEATURES);
      case VHOST_USER_SET_PROTOCOL_FEATURES: {
        const f = this.u64(m);
        const extra = f & ~PROTOCOL_FEATURES;
        if (extra !== 0n) refuse(`protocol features 0x${extra.toString(16)} were not offered`);
        this.ackedProtocolFeatures = f;
        return null;
      }
      case VHOST_USER_SET_OWNER:
        this.noPayload(m);
        this.owned = true;
        return null;
      case VHOST_USER_RESET_OWNER:
        // Deprecated; the spec recommends ignoring it or disabling all rings. We disable them.
        this.noPayload(m);
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
      case VHOST_USER_GET_CONFIG:
        return this.getConfig(m);
      case VHOST_USER_SET_CONFIG:
        this.setConfig(m);
        return null;
      default:
        refuse(`unsupported request`);
    }
  }

  /** GET_VRING_BASE once the data plane let go of the ring: stop it and report its base. */
  private stopRing(ring: Vring): Uint8Array {
    ring.started = false;
    // The front-end may reuse or close the kick eventfd; we stop watching it now.
    ring.kick?.close();
    ring.kick = null;
    ring.kickFd = -1;
    return vringStatePayload(ring.index, ring.lastAvailIdx & 0xffff);
  }

  // --- payload readers ---

  private noPayload(m: Message): void {
    if (m.fds.length > 0) refuse(`${m.fds.length} unexpected fds`);
  }

  private u64(m: Message): bigint {
    this.noPayload(m);
    if (m.payload.length < 8) refuse(`payload of ${m.payload.length} bytes, need a u64`);
    return dataView(m.payload).getBigUint64(0, true);
  }

  private ring(index: number): Vring {
    const r = this.rings[index];
    if (!r) refuse(`ring index ${index} out of range (${this.numQueues} queues)`);
    return r;
  }

  private vringState(m: Message): [Vring, number] {
    this.noPayload(m);
    if (m.payload.length < VRING_STATE_PAYLOAD) refuse(`payload of ${m.payload.length} bytes, need a vring state`);
    const dv = dataView(m.payload);
    return [this.ring(dv.getUint32(0, true)), dv.getUint32(4, true)];
  }

  // --- handlers ---

  private setMemTable(m: Message): void {
    const p = m.payload;
    if (p.length < MEM_TABLE_HEADER) refuse(`payload of ${p.length} bytes, need a memory table`);
    const dv = dataView(p);
    const n = dv.getUint32(0, true);
    if (n < 1 || n > MAX_MEM_REGIONS) refuse(`${n} regions (1..${MAX_MEM_REGIONS} supported)`);
    if (p.length < MEM_TABLE_HEADER + n * MEM_REGION_SIZE) refuse(`payload of ${p.length} bytes is short for ${n} regions`);
    if (m.fds.length !== n) refuse(`${n} regions but ${m.fds.length} fds`);
    const descs: MemoryRegionDesc[] = [];
    for (let i = 0; i < n; i++) {
      const o = MEM_TABLE_HEADER + i * MEM_REGION_SIZE;
      const guestPhysAddr = safeU64(dv, o);
      const size = safeU64(dv, o + 8);
      const userAddr = safeU64(dv, o + 16);
      const mmapOffset = safeU64(dv, o + 24);
      if (guestPhysAddr === null || size === null || userAddr === null || mmapOffset === null) refuse(`region ${i}: address beyond 2^53`);
      descs.push({ guestPhysAddr, size, userAddr, mmapOffset });
    }
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
      r.addr = this.translateRing(r.num, a.flags, a.descUser, a.usedUser, a.availUser, a.logGuest);
    }
    this.hooks.memoryChanged?.(this);
  }

  private translateRing(num: number, flags: number, descUser: number, usedUser: number, availUser: number, logGuest: number): VringAddresses | null {
    const desc = this.memory.uva(descUser, 16 * num);
    const avail = this.memory.uva(availUser, 6 + 2 * num);
    const used = this.memory.uva(usedUser, 6 + 8 * num);
    if (!desc || !avail || !used) return null;
    return { flags, descUser, availUser, usedUser, logGuest, desc, avail, used };
  }

  private setVringAddr(m: Message): void {
    this.noPayload(m);
    if (m.payload.length < VRING_ADDR_PAYLOAD) refuse(`payload of ${m.payload.length} bytes, need a vring address`);
    const dv = dataView(m.payload);
    const ring = this.ring(dv.getUint32(0, true));
    const flags = dv.getUint32(4, true);
    const desc = safeU64(dv, 8);
    const used = safeU64(dv, 16);
    const avail = safeU64(dv, 24);
    const log = safeU64(dv, 32) ?? 0;
    if (ring.num === 0) refuse(`ring ${ring.index}: SET_VRING_ADDR before SET_VRING_NUM`);
    if (desc === null || used === null || avail === null) refuse(`ring ${ring.index}: address beyond 2^53`);
    // virtio 1.x 2.7: descriptor table 16-byte, available ring 2-byte, used ring 4-byte aligned.
    if (desc % 16 !== 0 || avail % 2 !== 0 || used % 4 !== 0) refuse(`ring ${ring.index}: misaligned ring address`);
    const a = this.translateRing(ring.num, flags, desc, used, avail, log);
    if (!a) refuse(`ring ${ring.index}: ring addresses are not inside the memory table`);
    ring.addr = a;
  }

  private setVringFd(m: Message): void {
    const v = this.u64Fds(m);
    if (v > BigInt(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)) refuse(`payload 0x${v.toString(16)} has reserved bits`);
    const n = Number(v);
    const ring = this.ring(n & VHOST_USER_VRING_IDX_MASK);
    const noFd = (n & VHOST_USER_VRING_NOFD_MASK) !== 0;
    if (noFd && m.fds.length !== 0) refuse(`no-fd bit set but ${m.fds.length} fds came`);
    if (!noFd && m.fds.length !== 1) refuse(`${m.fds.length} fds, expected 1`);
    const fd = noFd ? -1 : m.fds.pop()!;
    if (m.request === VHOST_USER_SET_VRING_KICK) {
      ring.kick?.close();
      ring.kick = null;
      ring.kickFd = fd;
      if (fd >= 0) ring.kick = this.watchKick(ring, fd);
    } else {
      const key = m.request === VHOST_USER_SET_VRING_CALL ? 'callFd' : 'errFd';
      const old = ring[key];
      ring[key] = fd;
      if (key === 'callFd') this.hooks.callChanged?.(this, ring);
      if (old >= 0) closeFd(old);
    }
    if (m.request === VHOST_USER_SET_VRING_KICK) {
      // "The back-end must start ring upon receiving a kick"; like other back-ends we treat the
      // kick fd's arrival as the start (a no-fd kick means the ring is polled).
      ring.started = true;
      this.hooks.ringChanged?.(this, ring);
    }
  }

  private watchKick(ring: Vring, fd: number): EventFdWatcher {
    const w = new EventFdWatcher(fd, (err) => {
      if (err) {
        // Not an eventfd, or it broke: the ring can only be driven by a new kick fd now.
        this.errors.push(`ring ${ring.index}: kick fd: ${err.message}`);
        if (ring.kick === w) {
          ring.kick = null;
          ring.kickFd = -1;
        }
        w.close();
        return;
      }
      if (ring.started && !this.closedFlag) this.hooks.ringKicked?.(this, ring);
    });
    return w;
  }

  private u64Fds(m: Message): bigint {
    if (m.payload.length < 8) refuse(`payload of ${m.payload.length} bytes, need a u64`);
    return dataView(m.payload).getBigUint64(0, true);
  }

  private configRange(m: Message): { offset: number; size: number; flags: number } | null {
    if (m.payload.length < CONFIG_HEADER) return null;
    const dv = dataView(m.payload);
    const offset = dv.getUint32(0, true);
    const size = dv.getUint32(4, true);
    const flags = dv.getUint32(8, true);
    if (size > MAX_CONFIG_SIZE || m.payload.length < CONFIG_HEADER + size) return null;
    if (offset > BLK_CONFIG_SIZE || size > BLK_CONFIG_SIZE - offset) return null;
    return { offset, size, flags };
  }

  private getConfig(m: Message): Uint8Array {
    this.noPayload(m);
    const r = this.configRange(m);
    // "vhost-user back-end uses zero length of payload to indicate an error"
    if (!r || !this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_CONFIG)) {
      this.errors.push(`GET_CONFIG: refused ${r ? 'without the CONFIG protocol feature' : 'range'}`);
      return new Uint8Array(0);
    }
    const out = new Uint8Array(CONFIG_HEADER + r.size);
    out.set(m.payload.subarray(0, CONFIG_HEADER));
    out.set(this.config.subarray(r.offset, r.offset + r.size), CONFIG_HEADER);
    return out;
  }

  private setConfig(m: Message): void {
    this.noPayload(m);
    if (!this.hasProtocolFeature(VHOST_USER_PROTOCOL_F_CONFIG)) refuse('CONFIG protocol feature not negotiated');
    const r = this.configRange(m);
    if (!r) refuse('bad config range');
    if (r.flags !== VHOST_SET_CONFIG_TYPE_FRONTEND && r.flags !== VHOST_SET_CONFIG_TYPE_MIGRATION) refuse(`flags ${r.flags}`);
    const data = m.payload.subarray(CONFIG_HEADER, CONFIG_HEADER + r.size);
    const touchesWce = r.offset <= BLK_CFG_WCE && r.offset + r.size > BLK_CFG_WCE;
    if (r.flags === VHOST_SET_CONFIG_TYPE_FRONTEND) {
      // Only `writeback` is writable, and only with CONFIG_WCE (virtio 1.x 5.2.4).
      if (r.offset !== BLK_CFG_WCE || r.size !== 1) refuse(`offset ${r.offset} size ${r.size} is read-only`);
      if (!this.hasFeature(VIRTIO_BLK_F_CONFIG_WCE)) refuse('writeback is read-only without VIRTIO_BLK_F_CONFIG_WCE');
    }
    // For migration the front-end restores the whole space; the export itself owns every
    // field but writeback, so only that one is taken.
    if (!touchesWce) return;
    const v = data[BLK_CFG_WCE - r.offset]!;
    if (v > 1) refuse(`writeback ${v} is not 0 or 1`);
    const changed = this.config[BLK_CFG_WCE] !== v;
    this.config[BLK_CFG_WCE] = v;
    if (changed) this.hooks.writeCacheChanged?.(this, v === 1);
  }
}

function closeFdQuietly(fd: number): void {
  try {
    closeFd(fd);
  } catch {
    // already closed; nothing else to do
  }
}

