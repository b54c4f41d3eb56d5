/**
 * The xen bridge: Spindle's stand-in for Xen hypercalls under qtest (there is no hypervisor
 * and no CPU). It owns the simulated xenstore, grant table and event channels, and gives
 * the guest one small port-I/O window through which it does what hypercalls would.
 *
 * Ports 0x5a0-0x5bf (unused on the pc machine), all registers 32-bit little-endian:
 *
 *   0x5a0  R: signature 0x42584e53 ('SNXB')     W: command number (runs it at once)
 *   0x5a4  ARG0   0x5a8 ARG1   0x5ac ARG2   0x5b0 ARG3      (R/W)
 *   0x5b4  R: STATUS of the last command: 0, or a Linux errno (2 ENOENT, 7 E2BIG,
 *          16 EBUSY, 22 EINVAL, 34 ERANGE, 38 ENOSYS)
 *   0x5b8  R: RESULT of the last command
 *
 * Commands:
 *   1 XS_REQUEST   ARG0 request address, ARG1 request length, ARG2 reply address,
 *                  ARG3 reply capacity. The request is `op NUL path [NUL value]`, op one of
 *                  read, write, mkdir, rm, directory. The reply is the value (read) or the
 *                  child names each followed by NUL (directory); RESULT = reply length. A
 *                  reply longer than the capacity: E2BIG, nothing written, RESULT = length.
 *   2 GNTTAB_SETUP ARG0 guest address of the table (page aligned), ARG1 frames (0 = none).
 *   3 EVTCHN_ALLOC ARG0 remote domain (0, the backends) → RESULT port.
 *   4 EVTCHN_SEND  ARG0 port: notify the backend bound to it.
 *   5 EVTCHN_ACK   ARG0 port: clear its pending bit, lower its line; RESULT = was pending.
 *   6 EVTCHN_CLOSE ARG0 port.
 *   7 EVTCHN_PENDING ARG0 word index → RESULT that 32-bit word of the pending bitmap.
 *
 * The guest is domain 1 (DOMID_GUEST); backends are domain 0.
 */
import type { IoRegion } from '../core/address-space.js';
import { HwError } from '../core/error.js';
import type { GpioIn } from '../core/irq.js';
import type { Device, Machine } from '../core/machine.js';
import { EventChannels, EVTCHN_PORTS } from './event-channel.js';
import { GrantTable } from './grant-table.js';
import { XenStore } from './xenstore.js';

export const XEN_BRIDGE_BASE = 0x5a0;
export const XEN_BRIDGE_SIZE = 0x20;
export const XEN_BRIDGE_SIGNATURE = 0x42584e53;
export const DOMID_BACKEND = 0;
export const DOMID_GUEST = 1;

export const XenBridgeReg = { CMD: 0x00, ARG0: 0x04, ARG1: 0x08, ARG2: 0x0c, ARG3: 0x10, STATUS: 0x14, RESULT: 0x18 } as const;
export const XenBridgeCmd = {
  XS_REQUEST: 1,
  GNTTAB_SETUP: 2,
  EVTCHN_ALLOC: 3,
  EVTCHN_SEND: 4,
  EVTCHN_ACK: 5,
  EVTCHN_CLOSE: 6,
  EVTCHN_PENDING: 7,
} as const;
export const Errno = { ENOENT: 2, E2BIG: 7, EBUSY: 16, EINVAL: 22, ERANGE: 34, ENOSYS: 38 } as const;

/** One 'xen-evtchn' line group per machine, whichever bridge is plugged in now. */
const evtchnLines = new WeakMap<Machine, GpioIn>();

const MAX_XS_REQUEST = 4096;

export class XenBridge implements Device {
  readonly type = 'xen-bridge';
  readonly id: string;
  readonly store = new XenStore();
  private gnt: GrantTable | null = null;
  private ev: EventChannels | null = null;
  private machine: Machine | null = null;
  private readonly args = new Uint32Array(4);
  private status = 0;
  private result = 0;
  private readonly region: IoRegion;

  constructor(opts: { id: string }) {
    this.id = opts.id;
    this.region = {
      name: `${this.id} (xen-bridge)`,
      read: (off) => this.readReg(off),
      write: (off, size, value) => {
        if (size === 4) this.writeReg(off, value);
      },
    };
  }

  /** Grant table (throws unless realized). */
  get grants(): GrantTable {
    if (!this.gnt) throw new HwError('EINVAL', `xen bridge '${this.id}' is not realized`);
    return this.gnt;
  }

  get evtchn(): EventChannels {
    if (!this.ev) throw new HwError('EINVAL', `xen bridge '${this.id}' is not realized`);
    return this.ev;
  }

  get realized(): boolean {
    return this.machine !== null;
  }

  realize(m: Machine): void {
    if (this.machine) throw new HwError('EBUSY', `xen bridge '${this.id}' is already realized`);
    m.io.map(XEN_BRIDGE_BASE, XEN_BRIDGE_SIZE, this.region);
    let lines = evtchnLines.get(m);
    if (!lines) {
      lines = m.addGpioIn('xen-evtchn', 'xen-evtchn', EVTCHN_PORTS, () => undefined);
      evtchnLines.set(m, lines);
    }
    this.gnt = new GrantTable(m.ram);
    this.ev = new EventChannels(lines);
    this.machine = m;
    this.store.mkdir(`/local/domain/${DOMID_BACKEND}`);
    this.store.write(`/local/domain/${DOMID_GUEST}/domid`, String(DOMID_GUEST));
  }

  unrealize(m: Machine): void {
    if (this.machine !== m) return;
    m.io.unmap(XEN_BRIDGE_BASE, this.region);
    this.ev?.reset();
    this.gnt = null;
    this.ev = null;
    this.machine = null;
  }

  private readReg(off: number): number {
    switch (off) {
      case XenBridgeReg.CMD: return XEN_BRIDGE_SIGNATURE;
      case XenBridgeReg.ARG0: case XenBridgeReg.ARG1: case XenBridgeReg.ARG2: case XenBridgeReg.ARG3:
        return this.args[(off - XenBridgeReg.ARG0) >> 2]!;
      case XenBridgeReg.STATUS: return this.status;
      case XenBridgeReg.RESULT: return this.result;
      default: return 0xffffffff;
    }
  }

  private writeReg(off: number, value: number): void {
    if (off >= XenBridgeReg.ARG0 && off <= XenBridgeReg.ARG3 && off % 4 === 0) {
      this.args[(off - XenBridgeReg.ARG0) >> 2] = value;
      return;
    }
    if (off !== XenBridgeReg.CMD) return;
    this.status = 0;
    this.result = 0;
    try {
      this.run(value);
    } catch (err) {
      // A guest's bad request is answered with an errno, never thrown out of the port access.
      this.status = err instanceof HwError ? errnoOf(err) : Errno.EINVAL;
    }
  }

  private run(cmd: number): void {
    const [a0, a1, a2, a3] = this.args as unknown as [number, number, number, number];
    const m = this.machine!;
    switch (cmd) {
      case XenBridgeCmd.XS_REQUEST: {
        if (a1 > MAX_XS_REQUEST) throw new HwError('ERANGE', `xenstore request of ${a1} bytes`);
        const reply = this.xsRequest(new Uint8Array(m.ram.view(a0, a1)));
        this.result = reply.length;
        if (reply.length > a3) {
          this.status = Errno.E2BIG;
          return;
        }
        m.ram.write(a2, reply);
        return;
      }
      case XenBridgeCmd.GNTTAB_SETUP:
        this.grants.setup(a0, a1);
        return;
      case XenBridgeCmd.EVTCHN_ALLOC:
        this.result = this.evtchn.allocUnbound(a0);
        return;
      case XenBridgeCmd.EVTCHN_SEND:
        if (!this.evtchn.notifyBackend(a0)) throw new HwError('ENOENT', `event channel ${a0} is not open`);
        return;
      case XenBridgeCmd.EVTCHN_ACK:
        this.result = this.evtchn.ack(a0) ? 1 : 0;
        return;
      case XenBridgeCmd.EVTCHN_CLOSE:
        this.evtchn.close(a0);
        return;
      case XenBridgeCmd.EVTCHN_PENDING:
        if (a0 >= this.evtchn.pending.length) throw new HwError('ERANGE', `pending word ${a0}`);
        this.result = this.evtchn.pending[a0]!;
        return;
      default:
        this.status = Errno.ENOSYS;
    }
  }

  /** Runs one xenstore request in the bridge's text format; returns the reply bytes. */
  private xsRequest(req: Uint8Array): Uint8Array {
    const text = new TextDecoder().decode(req);
    const [op, path, ...rest] = text.split('\0');
    const value = rest.join('\0');
    const enc = (s: string): Uint8Array => new TextEncoder().encode(s);
    if (path === undefined) throw new HwError('EINVAL', 'xenstore request without a path');
    switch (op) {
      case 'read': {
        const v = this.store.read(path);
        if (v === undefined) throw new HwError('ENOENT', `xenstore: no ${path}`);
        return enc(v);
      }
      case 'write':
        this.store.write(path, value);
        return new Uint8Array(0);
      case 'mkdir':
        this.store.mkdir(path);
        return new Uint8Array(0);
      case 'rm':
        if (!this.store.rm(path)) throw new HwError('ENOENT', `xenstore: no ${path}`);
        return new Uint8Array(0);
      case 'directory': {
        const d = this.store.directory(path);
        if (!d) throw new HwError('ENOENT', `xenstore: no ${path}`);
        return enc(d.map((n) => `${n}\0`).join(''));
      }
      default:
        throw new HwError('EINVAL', `xenstore: unknown operation '${op}'`);
    }
  }
}

function errnoOf(err: HwError): number {
  switch (err.code) {
    case 'ENOENT': return Errno.ENOENT;
    case 'EBUSY': return Errno.EBUSY;
    case 'ERANGE': return Errno.ERANGE;
    default: return Errno.EINVAL;
  }
}
