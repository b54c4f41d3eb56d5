/**
 * The device models' own cost per request: 4 KiB random reads (4 KiB-aligned, seeded PRNG,
 * over a 1 GiB null-co disk with read-zeroes off) through virtio-blk-pci at queue depth 32
 * and through PIIX IDE bus-master DMA (READ DMA EXT) at depth 1 (one channel) and depth 2
 * (both channels at once: IDE has one command in flight per channel).
 *
 * Driven in-process: the "guest" is JS code here that writes rings / PRD tables straight into
 * machine.ram.bytes and touches the device registers through Machine.memWrite / portWrite /
 * portRead (no qtest text protocol in the measured loop; qtest is used for setup only). Guest
 * state is preallocated: no allocation per request on the guest side.
 *
 * Interrupts: virtio's MSI-X vector is aimed at a little region mapped where the local APIC
 * would decode it (0xfee00000); IDE's INTRQ is caught by intercepting the IOAPIC lines. The
 * guest's interrupt handler runs from a microtask (as a vCPU takes the interrupt after the
 * device model has returned, not nested inside it), reaps completions and submits the next
 * requests.
 *
 * Method (everything here is single-threaded JS, so wall time = CPU time of the process):
 *   wall/req    = measured run's wall time / requests
 *   backend/req = wall/req of a loop calling BackendIO.readv directly at the same depth on the
 *                 same backend (null-co plus the BlockBackend layer plus the event loop turns
 *                 its completions take)
 *   guest/req   = sum of process.hrtime.bigint() intervals around the guest driver's own work
 *                 (reaping, PRNG, filling rings/registers values), register accesses excluded
 *   timer/req   = the cost of those hrtime calls themselves (calibrated)
 *   device/req  ≈ wall − backend − guest − timer: register dispatch, the device model, its
 *                 interrupt delivery and any extra event-loop turns it needs.
 * Each figure is the best of REPEATS runs after a warm-up run. It is a difference of
 * measurements: expect ±0.1-0.2 µs of noise.
 */
import { createBackend, type BlockBackend } from '../src/backend/backend.js';
import type { BackendIO } from '../src/backend/io.js';
import { openNode, unref } from '../src/block/graph.js';
import { PcMachine } from '../hw/pc/pc.js';
import { VirtioBlkPci } from '../hw/block/virtio-blk.js';
import { IdeDrive, PiixIde } from '../hw/ide/piix.js';
import { GuestAlloc } from '../src/qos/alloc.js';
import { QAtaChannel } from '../src/qos/ata.js';
import { QPciBus } from '../src/qos/pci.js';
import { QtestClient } from '../src/qos/qtest-client.js';
import { QVirtioBlk } from '../src/qos/virtio-blk.js';

const GiB = 1 << 30;
const BLOCK = 4096;
const BLOCKS = GiB / BLOCK;
const VIRTIO_DEPTH = 32;
const LAPIC_BASE = 0xfee00000;
/** Each measurement is the best of this many runs (after a warm-up run). */
const REPEATS = 3;

/** The fastest of REPEATS runs (the least disturbed by GC and the rest of the machine). */
async function best<T extends { wallNs: number }>(run: (i: number) => Promise<T>): Promise<T> {
  let b: T | null = null;
  for (let i = 0; i < REPEATS; i++) {
    const r = await run(i);
    if (!b || r.wallNs < b.wallNs) b = r;
  }
  return b!;
}

export interface Row {
  device: string;
  depth: number;
  note: string;
  requests: number;
  reqPerSec: number;
  wallUs: number;
  backendUs: number;
  guestUs: number;
  timerUs: number;
  deviceUs: number;
}

export interface Result {
  rows: Row[];
  baselines: { depth: number; reqPerSec: number }[];
  timerNs: number;
}

/** mulberry32: a small seeded PRNG (no allocation). */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

const now = (): bigint => process.hrtime.bigint();

/** Cost of one process.hrtime.bigint() call, in ns. */
function timerCost(): number {
  let best = Infinity;
  for (let round = 0; round < 5; round++) {
    const n = 200_000;
    let sink = 0n;
    const t0 = now();
    for (let i = 0; i < n; i++) sink ^= now();
    const t = Number(now() - t0) / n;
    if (sink === -1n) console.log('');
    best = Math.min(best, t);
  }
  return best;
}

async function nullBackend(name: string): Promise<BlockBackend> {
  const node = await openNode({ driver: 'null-co', size: GiB, 'read-zeroes': false });
  const b = createBackend({ name }, node);
  unref(node);
  return b;
}

/**
 * Backend only: `depth` requests in flight through BackendIO.readv, each completion issuing
 * the next one (same PRNG, same 4 KiB buffers). Returns the wall time in ns.
 */
function baselineRun(io: BackendIO, depth: number, total: number, seed: number): Promise<number> {
  const rand = prng(seed);
  const ram = new Uint8Array(depth * BLOCK);
  const iovs = Array.from({ length: depth }, (_, i) => [ram.subarray(i * BLOCK, (i + 1) * BLOCK)]);
  let submitted = 0;
  let completed = 0;
  return new Promise((resolve, reject) => {
    const t0 = now();
    const cbs = iovs.map((iov) => {
      const cb = (err: unknown): void => {
        if (err) return reject(err);
        if (++completed === total) return resolve(Number(now() - t0));
        if (submitted < total) {
          submitted++;
          io.readv((rand() % BLOCKS) * BLOCK, BLOCK, iov, 0, cb);
        }
      };
      return cb;
    });
    for (let i = 0; i < depth && submitted < total; i++) {
      submitted++;
      io.readv((rand() % BLOCKS) * BLOCK, BLOCK, iovs[i]!, 0, cbs[i]!);
    }
  });
}

async function baseline(b: BlockBackend, depth: number, total: number, warm: number): Promise<number> {
  const handle = { id: `baseline-d${depth}` };
  const io = b.attachDevice(handle);
  try {
    await baselineRun(io, depth, warm, 1);
    let best = Infinity;
    for (let i = 0; i < REPEATS; i++) best = Math.min(best, await baselineRun(io, depth, total, 2 + i));
    return best;
  } finally {
    await b.idle();
    b.detachDevice(handle);
  }
}

// ---------------------------------------------------------------- virtio-blk

interface VirtioRig {
  run(total: number, seed: number): Promise<{ wallNs: number; guestNs: number; kicks: number; irqs: number }>;
}

async function virtioRig(m: PcMachine, b: BlockBackend): Promise<VirtioRig> {
  const dev = new VirtioBlkPci({ id: 'vblk0', drive: b, bus: m.chipset.bus, queueSize: 256, numQueues: 1, disableLegacy: true });
  m.addDevice(dev);
  const qts = QtestClient.inProcess(m);
  const alloc = await GuestAlloc.forPc(qts);
  // Setup (not measured) through the qos driver: features (all offered: EVENT_IDX, INDIRECT,
  // VERSION_1), queue 0 of 256, DRIVER_OK; then MSI-X vector 0 at the "local APIC".
  const blk = await QVirtioBlk.start(qts, alloc, { queueSize: 256 });
  const vq = blk.vq(0);
  if (m.mmio.find(LAPIC_BASE)) throw new Error('0xfee00000 is already mapped');
  let onMsi: () => void = () => undefined;
  m.mmio.map(LAPIC_BASE, 0x1000, { name: 'bench lapic', read: () => 0, write: () => onMsi() });
  await blk.dev.setMsixEntry(0, LAPIC_BASE, 0x40);
  await blk.dev.enableMsix();
  if ((await blk.dev.setQueueVector(0, 0)) !== 0) throw new Error('virtio-blk refused MSI-X vector 0 for queue 0');
  await qts.writew(blk.dev.common + 0x16, 0);
  const notifyAddr = blk.dev.notifyBase + (await qts.readw(blk.dev.common + 0x1e)) * blk.dev.notifyMult;

  // Guest structures: slot s owns descriptors 3s (header, 16 B), 3s+1 (data, 4 KiB, W) and
  // 3s+2 (status, 1 B, W), written once; per request only the header's sector and an avail
  // entry are written.
  const num = vq.num;
  const ramBytes = m.ram.bytes;
  const dv = new DataView(ramBytes.buffer, ramBytes.byteOffset, ramBytes.byteLength);
  const hdrs = alloc.alloc(16 * VIRTIO_DEPTH);
  const data = alloc.alloc(BLOCK * VIRTIO_DEPTH);
  const stat = alloc.alloc(VIRTIO_DEPTH);
  const writeDesc = (i: number, addr: number, len: number, flags: number, next: number): void => {
    const d = vq.desc + 16 * i;
    dv.setUint32(d, addr, true);
    dv.setUint32(d + 4, 0, true);
    dv.setUint32(d + 8, len, true);
    dv.setUint16(d + 12, flags, true);
    dv.setUint16(d + 14, next, true);
  };
  for (let s = 0; s < VIRTIO_DEPTH; s++) {
    dv.setUint32(hdrs + 16 * s, 0, true); // VIRTIO_BLK_T_IN
    dv.setUint32(hdrs + 16 * s + 4, 0, true);
    writeDesc(3 * s, hdrs + 16 * s, 16, 1, 3 * s + 1);
    writeDesc(3 * s + 1, data + BLOCK * s, BLOCK, 1 | 2, 3 * s + 2);
    writeDesc(3 * s + 2, stat + s, 1, 2, 0);
  }
  const kickBuf = new Uint8Array(2); // queue index 0
  const availIdxAt = vq.avail + 2;
  const availRing = vq.avail + 4;
  const usedEventAt = vq.avail + 4 + 2 * num;
  const usedIdxAt = vq.used + 2;
  const usedRing = vq.used + 4;
  const availEventAt = vq.used + 4 + 8 * num;

  return {
    run(total, seed) {
      const rand = prng(seed);
      let availIdx = vq.availIdx;
      let lastUsed = vq.lastUsed;
      let submitted = 0;
      let completed = 0;
      let guestNs = 0n;
      let kicks = 0;
      let irqs = 0;
      let irqQueued = false;
      let fail: Error | null = null;
      return new Promise((resolve, reject) => {
        const put = (s: number): void => {
          const sector = (rand() % BLOCKS) * (BLOCK / 512);
          dv.setUint32(hdrs + 16 * s + 8, sector, true); // < 2^32 sectors: high word stays 0
          ramBytes[stat + s] = 0xff;
          dv.setUint16(availRing + 2 * (availIdx % num), 3 * s, true);
          availIdx = (availIdx + 1) & 0xffff;
          submitted++;
        };
        /** Publishes avail->idx; kicks unless EVENT_IDX says the device does not want one. */
        const publish = (old: number, t0: bigint): void => {
          dv.setUint16(availIdxAt, availIdx, true);
          const ev = dv.getUint16(availEventAt, true);
          const kick = ((availIdx - ev - 1) & 0xffff) < ((availIdx - old) & 0xffff);
          guestNs += now() - t0;
          if (kick) {
            kicks++;
            m.memWrite(notifyAddr, kickBuf);
          }
        };
        const isr = (): void => {
          irqQueued = false;
          irqs++;
          const t0 = now();
          const old = availIdx;
          const usedIdx = dv.getUint16(usedIdxAt, true);
          while (lastUsed !== usedIdx) {
            const e = usedRing + 8 * (lastUsed % num);
            const head = dv.getUint32(e, true);
            const s = head / 3;
            if (ramBytes[stat + s] !== 0 || dv.getUint32(e + 4, true) !== BLOCK + 1) fail ??= new Error(`virtio-blk: request in slot ${s} failed (status ${ramBytes[stat + s]})`);
            lastUsed = (lastUsed + 1) & 0xffff;
            completed++;
            if (submitted < total) put(s);
          }
          dv.setUint16(usedEventAt, lastUsed, true);
          if (fail) return reject(fail);
          if (completed === total) {
            guestNs += now() - t0;
            vq.availIdx = availIdx;
            vq.lastUsed = lastUsed;
            onMsi = () => undefined;
            return resolve({ wallNs: Number(now() - start), guestNs: Number(guestNs), kicks, irqs });
          }
          if (availIdx !== old) publish(old, t0);
          else guestNs += now() - t0;
        };
        onMsi = () => {
          if (!irqQueued) {
            irqQueued = true;
            queueMicrotask(isr);
          }
        };
        const start = now();
        const t0 = now();
        const old = availIdx;
        for (let s = 0; s < VIRTIO_DEPTH && submitted < total; s++) put(s);
        publish(old, t0);
      });
    },
  };
}

// ---------------------------------------------------------------- IDE bus-master DMA

interface IdeRig {
  run(channels: 1 | 2, total: number, seed: number): Promise<{ wallNs: number; guestNs: number; irqs: number }>;
}

const ATA = { ERR: 0x01, BSY: 0x80 } as const;
const BMS = { ERROR: 0x02, INTR: 0x04 } as const;

async function ideRig(m: PcMachine, backs: [BlockBackend, BlockBackend]): Promise<IdeRig> {
  const ide = new PiixIde({ id: 'ide', bus: m.chipset.bus, irqs: m.ioapic });
  m.addDevice(ide);
  ide.attach(0, 0, new IdeDrive({ id: 'hd0', kind: 'hd', drive: backs[0] }));
  ide.attach(1, 0, new IdeDrive({ id: 'hd1', kind: 'hd', drive: backs[1] }));
  const qts = QtestClient.inProcess(m);
  const alloc = await GuestAlloc.forPc(qts);
  const [c0, c1] = await QAtaChannel.piix(qts, new QPciBus(qts), alloc); // maps BAR4, bus mastering on
  const ramBytes = m.ram.bytes;
  const dv = new DataView(ramBytes.buffer, ramBytes.byteOffset, ramBytes.byteLength);

  // Per channel: a one-entry PRD table (4 KiB, end of table) and its buffer, written once.
  const chans = [c0, c1].map((c) => {
    const prd = alloc.alloc(8);
    const buf = alloc.alloc(BLOCK);
    dv.setUint32(prd, buf, true);
    dv.setUint32(prd + 4, 0x80000000 | BLOCK, true);
    return { cmd: c.cmdBase, bm: c.bmBase!, irq: c.irq, prd };
  });

  let onIrq: ((line: number) => void) | null = null;
  m.interceptIn('ioapic', (line, level) => {
    if (level && onIrq) onIrq(line);
  });

  return {
    run(channels, total, seed) {
      const rand = prng(seed);
      let submitted = 0;
      let completed = 0;
      let guestNs = 0n;
      let irqs = 0;
      let fail: Error | null = null;
      // The LBA bytes of the next command, per channel (computed by the guest, then written).
      const lba = new Uint8Array(6 * 2);
      return new Promise((resolve, reject) => {
        /** READ DMA EXT of 8 sectors at the next random LBA, then start the bus master. */
        const issue = (k: number, t0: bigint): void => {
          const c = chans[k]!;
          let l = (rand() % BLOCKS) * (BLOCK / 512);
          for (let i = 0; i < 6; i++, l = Math.floor(l / 256)) lba[6 * k + i] = l & 0xff;
          submitted++;
          guestNs += now() - t0;
          // bmdma_setup: PRD pointer, direction (to memory), start clear.
          m.portWrite(c.bm + 4, 4, c.prd);
          m.portWrite(c.bm, 1, 0x08);
          // Task file, high-order bytes first (48-bit), then DEV (LBA) and the command.
          m.portWrite(c.cmd + 1, 1, 0);
          m.portWrite(c.cmd + 1, 1, 0);
          m.portWrite(c.cmd + 2, 1, 0);
          m.portWrite(c.cmd + 2, 1, 8);
          m.portWrite(c.cmd + 3, 1, lba[6 * k + 3]!);
          m.portWrite(c.cmd + 3, 1, lba[6 * k]!);
          m.portWrite(c.cmd + 4, 1, lba[6 * k + 4]!);
          m.portWrite(c.cmd + 4, 1, lba[6 * k + 1]!);
          m.portWrite(c.cmd + 5, 1, lba[6 * k + 5]!);
          m.portWrite(c.cmd + 5, 1, lba[6 * k + 2]!);
          m.portWrite(c.cmd + 6, 1, 0x40);
          m.portWrite(c.cmd + 7, 1, 0x25); // READ DMA EXT
          // bmdma_start.
          m.portWrite(c.bm, 1, 0x09);
        };
        const isrs = chans.map((c, k) => {
          let queued = false;
          const isr = (): void => {
            queued = false;
            irqs++;
            // bmdma_stop / status: what a driver does on the interrupt (device accesses).
            const bmst = m.portRead(c.bm + 2, 1);
            if (!(bmst & BMS.INTR)) return; // not ours (shared line)
            m.portWrite(c.bm, 1, 0x08);
            const st = m.portRead(c.cmd + 7, 1); // clears INTRQ
            m.portWrite(c.bm + 2, 1, bmst); // write-one-to-clear INTR/ERROR
            const t0 = now();
            if (st & (ATA.ERR | ATA.BSY) || bmst & BMS.ERROR) fail ??= new Error(`ide.${k}: READ DMA EXT failed (status 0x${st.toString(16)}, bm 0x${bmst.toString(16)})`);
            completed++;
            if (fail) return reject(fail);
            if (completed === total) {
              guestNs += now() - t0;
              onIrq = null;
              return resolve({ wallNs: Number(now() - start), guestNs: Number(guestNs), irqs });
            }
            if (submitted < total) issue(k, t0);
            else guestNs += now() - t0;
          };
          return () => {
            if (!queued) {
              queued = true;
              queueMicrotask(isr);
            }
          };
        });
        const lines = chans.map((c) => c.irq);
        onIrq = (line) => {
          const k = lines.indexOf(line);
          if (k >= 0 && k < channels) isrs[k]!();
        };
        const start = now();
        for (let k = 0; k < channels && submitted < total; k++) issue(k, now());
      });
    },
  };
}

// ---------------------------------------------------------------- main

export interface Options {
  virtioRequests: number;
  ideRequests: number;
  warmup: number;
  log?: (line: string) => void;
}

export async function runDeviceBench(o: Options): Promise<Result> {
  const log = o.log ?? (() => undefined);
  const timerNs = timerCost();
  const rows: Row[] = [];
  const baselines: Result['baselines'] = [];
  const backendPerReq = new Map<number, number>();

  const vb = await nullBackend('bench-vblk');
  const ib: [BlockBackend, BlockBackend] = [await nullBackend('bench-ide0'), await nullBackend('bench-ide1')];

  // Baselines first, on the same backends the devices get afterwards.
  for (const [depth, back, n] of [[VIRTIO_DEPTH, vb, o.virtioRequests], [1, ib[0], o.ideRequests], [2, ib[0], o.ideRequests]] as const) {
    log(`null-co baseline, depth ${depth}...`);
    const ns = await baseline(back, depth, n, o.warmup);
    backendPerReq.set(depth, ns / n);
    baselines.push({ depth, reqPerSec: n / (ns / 1e9) });
  }

  const row = (device: string, depth: number, note: string, n: number, r: { wallNs: number; guestNs: number }, timerCalls: number): Row => {
    const wallUs = r.wallNs / n / 1e3;
    const backendUs = backendPerReq.get(depth)! / 1e3;
    const guestUs = r.guestNs / n / 1e3;
    const timerUs = (timerCalls * timerNs) / 1e3;
    return { device, depth, note, requests: n, reqPerSec: n / (r.wallNs / 1e9), wallUs, backendUs, guestUs, timerUs, deviceUs: wallUs - backendUs - guestUs - timerUs };
  };

  {
    log('virtio-blk-pci, depth 32...');
    const m = new PcMachine();
    const rig = await virtioRig(m, vb);
    await rig.run(o.warmup, 3);
    const r = await best((i) => rig.run(o.virtioRequests, 10 + i));
    // Timer calls: two per interrupt (start, and before the kick or at the end).
    rows.push(row('virtio-blk-pci', VIRTIO_DEPTH, `${(r.irqs / o.virtioRequests * VIRTIO_DEPTH).toFixed(1)} irq, ${(r.kicks / o.virtioRequests * VIRTIO_DEPTH).toFixed(1)} kick /32 req`, o.virtioRequests, r, (2 * r.irqs) / o.virtioRequests));
    await vb.idle();
    m.removeDevice('vblk0');
  }
  {
    const m = new PcMachine({ ramSize: 32 << 20 });
    const rig = await ideRig(m, ib);
    for (const ch of [1, 2] as const) {
      log(`piix3-ide bus-master DMA, ${ch} channel(s)...`);
      await rig.run(ch, o.warmup, 5);
      const r = await best((i) => rig.run(ch, o.ideRequests, 20 + i));
      // Timer calls: two per request (in the interrupt handler, then before the port writes).
      rows.push(row('piix3-ide BMDMA', ch, ch === 1 ? 'one channel: IDE has 1 cmd in flight' : 'ide.0 + ide.1 concurrently', o.ideRequests, r, 2));
    }
    await Promise.all(ib.map((b) => b.idle()));
    m.removeDevice('ide');
  }
  vb.unref();
  for (const b of ib) b.unref();
  return { rows, baselines, timerNs };
}
