/**
 * A virtio device, independent of its transport: status, feature negotiation, queues, the
 * interrupt status (ISR) and the device-specific configuration. The transport (virtio-pci)
 * calls in for register accesses and is called back to deliver interrupts. Nothing here
 * throws out of a register access: a driver's protocol error marks the device broken
 * (DEVICE_NEEDS_RESET and a configuration interrupt, as virtio 1.0 section 2.1.2 allows).
 */
import type { GuestRam } from '../core/memory.js';
import { VirtQueue, type VirtQueueElement } from './virtqueue.js';

export const VIRTIO_CONFIG_S_ACKNOWLEDGE = 1;
export const VIRTIO_CONFIG_S_DRIVER = 2;
export const VIRTIO_CONFIG_S_DRIVER_OK = 4;
export const VIRTIO_CONFIG_S_FEATURES_OK = 8;
export const VIRTIO_CONFIG_S_NEEDS_RESET = 0x40;
export const VIRTIO_CONFIG_S_FAILED = 0x80;

export const VIRTIO_F_NOTIFY_ON_EMPTY = 24;
export const VIRTIO_F_ANY_LAYOUT = 27;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;

export const VIRTIO_ISR_QUEUE = 1;
export const VIRTIO_ISR_CONFIG = 2;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** How a device reaches its transport. */
export interface VirtioTransport {
  /** Queue `vq` has new used entries the driver wants to hear about. */
  notifyQueue(vq: VirtQueue): void;
  /** The configuration changed (or the device needs a reset). */
  notifyConfig(): void;
  /** The ISR went to zero (reset): lower INTx. */
  isrCleared(): void;
  /** Queue `vq`'s ring broke the protocol (a vhost-user back-end signals its err eventfd). */
  queueBroken?(vq: VirtQueue): void;
}

export abstract class VirtioDevice {
  status = 0;
  /** Features the device offers (modern interface; the legacy one sees the low 32 bits). */
  hostFeatures: bigint;
  guestFeatures = 0n;
  isr = 0;
  configGeneration = 0;
  /** The driver broke the protocol; nothing is processed until reset. */
  broken = false;
  brokenReason = '';
  readonly queues: VirtQueue[] = [];
  transport: VirtioTransport | null = null;
  private flushScheduled = false;
  private readonly dirty = new Set<VirtQueue>();

  constructor(readonly deviceId: number, hostFeatures: bigint, ram: GuestRam, numQueues: number, queueSize: number) {
    this.hostFeatures = hostFeatures | bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX);
    for (let i = 0; i < numQueues; i++) this.queues.push(new VirtQueue(ram, i, queueSize));
  }

  /** The device-specific configuration bytes (little-endian, as virtio 1.0 lays them out). */
  abstract readonly config: Uint8Array;
  /** A queue was kicked (or needs a look after DRIVER_OK / drained end). */
  protected abstract handleQueue(vq: VirtQueue): void;
  /** Device-specific part of reset. */
  protected abstract resetDevice(): void;
  /** Features were accepted (FEATURES_OK, or a legacy feature write). */
  protected featuresSet(): void {}
  /** A driver write into the device configuration. */
  configWrite(_off: number, _size: number, _value: number): void {}

  has(n: number): boolean {
    return (this.guestFeatures & bit(n)) !== 0n;
  }

  configRead(off: number, size: number): number {
    const c = this.config;
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + (off + i < c.length ? c[off + i]! : 0);
    return v >>> 0;
  }

  reset(): void {
    this.status = 0;
    this.guestFeatures = 0n;
    this.broken = false;
    this.brokenReason = '';
    this.isr = 0;
    this.dirty.clear();
    for (const q of this.queues) q.reset();
    this.resetDevice();
    this.transport?.isrCleared();
  }

  /** A status write from either interface. */
  setStatus(v: number, legacy: boolean): void {
    v &= 0xff;
    if (v === 0) return this.reset();
    const before = this.status;
    if (!legacy && v & VIRTIO_CONFIG_S_FEATURES_OK && !(before & VIRTIO_CONFIG_S_FEATURES_OK)) {
      const ok = (this.guestFeatures & ~this.hostFeatures) === 0n && this.has(VIRTIO_F_VERSION_1);
      if (ok) this.applyFeatures();
      else v &= ~VIRTIO_CONFIG_S_FEATURES_OK;
    }
    // NEEDS_RESET is the device's to set; the driver cannot clear it.
    this.status = (v & ~VIRTIO_CONFIG_S_NEEDS_RESET) | (before & VIRTIO_CONFIG_S_NEEDS_RESET);
    if (v & VIRTIO_CONFIG_S_DRIVER_OK && !(before & VIRTIO_CONFIG_S_DRIVER_OK)) this.kickAll();
  }

  /**
   * Start without a transport's status register (a vhost-user back-end: the front-end negotiated
   * for us): take `features` (masked to what is offered) and set DRIVER_OK. No queue is kicked.
   */
  activate(features: bigint): void {
    this.guestFeatures = features & this.hostFeatures;
    this.applyFeatures();
    this.status = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;
  }

  /** What the legacy interface offers: the low 32 bits, plus the legacy-only NOTIFY_ON_EMPTY and ANY_LAYOUT. */
  legacyFeatures(): number {
    return Number((this.hostFeatures | bit(VIRTIO_F_NOTIFY_ON_EMPTY) | bit(VIRTIO_F_ANY_LAYOUT)) & 0xffffffffn);
  }

  /** The legacy interface's feature write: takes effect at once. */
  setLegacyFeatures(low: number): void {
    this.guestFeatures = BigInt((low & this.legacyFeatures()) >>> 0);
    this.applyFeatures();
  }

  private applyFeatures(): void {
    const ev = this.has(VIRTIO_RING_F_EVENT_IDX);
    const empty = this.has(VIRTIO_F_NOTIFY_ON_EMPTY);
    for (const q of this.queues) {
      q.eventIdx = ev;
      q.notifyOnEmpty = empty;
    }
    this.featuresSet();
  }

  /** The driver notified queue `index`. */
  kick(index: number): void {
    const q = this.queues[index];
    if (!q || this.broken || !(this.status & VIRTIO_CONFIG_S_DRIVER_OK) || !q.ready) return;
    try {
      this.handleQueue(q);
    } catch (e) {
      this.markBroken(`queue ${index}: ${(e as Error).message}`, q);
    }
  }

  kickAll(): void {
    for (let i = 0; i < this.queues.length; i++) this.kick(i);
  }

  /** The driver broke the protocol (on queue `vq`, if one): stop, and tell it (virtio 1.0 2.1.2). */
  markBroken(why: string, vq?: VirtQueue): void {
    if (this.broken) return;
    this.broken = true;
    this.brokenReason = why;
    if (vq) this.transport?.queueBroken?.(vq);
    if (this.has(VIRTIO_F_VERSION_1)) {
      this.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
      if (this.status & VIRTIO_CONFIG_S_DRIVER_OK) this.notifyConfig();
    }
  }

  notifyConfig(): void {
    this.configGeneration = (this.configGeneration + 1) & 0xff;
    if (!(this.status & VIRTIO_CONFIG_S_DRIVER_OK)) return;
    this.isr |= VIRTIO_ISR_QUEUE | VIRTIO_ISR_CONFIG;
    this.transport?.notifyConfig();
  }

  /** Returns a completed chain; the used index and interrupt follow once per batch. */
  complete(q: VirtQueue, e: VirtQueueElement, len: number): void {
    if (!q.push(e, len)) return;
    this.dirty.add(q);
    if (!this.flushScheduled) {
      this.flushScheduled = true;
      // After the current JavaScript run: completions delivered together (one engine batch)
      // publish together, and the driver hears of them without waiting for the loop's turn.
      queueMicrotask(this.flushAll);
    }
  }

  /**
   * With EVENT_IDX, a queue with requests in flight does not ask the driver for a kick: each
   * completion batch looks at the ring instead, and the kick is asked for again once nothing is
   * in flight. A driver on another CPU (a vhost-user front-end's guest) then exits to notify far
   * less often at depth. Set by the device's owner, as what to do for a queue after a completion
   * batch (usually `kick`, unless the owner has stopped serving that queue).
   */
  pollOnCompletion: ((q: VirtQueue) => void) | null = null;

  private readonly flushAll = (): void => {
    this.flushScheduled = false;
    for (const q of this.dirty) {
      if (q.flush() && !this.broken) {
        this.isr |= VIRTIO_ISR_QUEUE;
        this.transport?.notifyQueue(q);
      }
    }
    const poll = this.pollOnCompletion;
    if (poll) for (const q of this.dirty) poll(q);
    this.dirty.clear();
  };
}
