/**
 * The qcow2 snapshot table (qcow2.txt, "Snapshots"): its entries as read, validated and
 * written, and their JSON form for `info`.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';
import type { Qcow2Header } from './format.js';

export interface SnapshotInfo {
  id: string;
  name: string;
  l1Offset: number;
  l1Size: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  /** Bytes of saved VM state (Spindle saves none, but keeps what QEMU saved). */
  vmStateSize: number;
  /** Virtual size when the snapshot was taken (extra data; undefined in old entries). */
  diskSize?: number;
  /** Record/replay instruction count; -1 when not recorded. */
  icount: number;
  /** Extra data past the fields known here, kept byte for byte. */
  extraRest: Buffer;
}

export interface CreateOptions {
  /** Unique ID; default: one more than the largest numeric ID (as QEMU picks them). */
  id?: string;
  /** Default: now. */
  dateSec?: number;
  dateNsec?: number;
  /** Guest time at the snapshot; default 0 (no guest runs under the CLI). */
  vmClockNsec?: number;
  /** qemu-img records 0 (it has no record/replay); the spec's "disabled" value is -1. */
  icount?: number;
}

export const MAX_SNAPSHOTS = 65536;
export const MAX_TABLE_BYTES = 64 << 20;
/** vm_state_size_large, disk_size, icount. */
const KNOWN_EXTRA = 24;
const align8 = (n: number): number => Math.ceil(n / 8) * 8;

export function corrupt(msg: string): BlockError {
  return new BlockError('EIO', `qcow2 snapshot table is corrupt: ${msg}`);
}

/** Reads the snapshot table named by the header; also returns its size in bytes. */
export async function readSnapshotTable(file: BlockChild, h: Qcow2Header): Promise<{ list: SnapshotInfo[]; bytes: number }> {
  const list: SnapshotInfo[] = [];
  const room = Math.min(io.getLength(file) - h.snapshotsOffset, MAX_TABLE_BYTES);
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw corrupt(`${h.nbSnapshots} snapshots (at most ${MAX_SNAPSHOTS})`);
  // The table is read in growing chunks, not two reads per entry (it may hold 65536 entries).
  let buf = Buffer.alloc(0);
  const have = async (end: number, i: number): Promise<void> => {
    if (end <= buf.length) return;
    if (end > room) throw corrupt(`entry ${i} lies past the end of the file or of 64 MiB`);
    buf = Buffer.alloc(Math.min(room, Math.max(end, buf.length * 2, 65536)));
    await io.read(file, h.snapshotsOffset, buf);
  };
  let off = 0;
  for (let i = 0; i < h.nbSnapshots; i++) {
    await have(off + 40, i);
    const idLen = buf.readUInt16BE(off + 12);
    const nameLen = buf.readUInt16BE(off + 14);
    const extraLen = buf.readUInt32BE(off + 36);
    if (extraLen > 1024) throw corrupt(`entry ${i} has ${extraLen} bytes of extra data (at most 1024)`);
    await have(off + 40 + extraLen + idLen + nameLen, i);
    const e = buf.subarray(off, off + 40);
    const x = buf.subarray(off + 40, off + 40 + extraLen);
    const at = off + 40 + extraLen;
    list.push({
      l1Offset: Number(e.readBigUInt64BE(0)), l1Size: e.readUInt32BE(8),
      dateSec: e.readUInt32BE(16), dateNsec: e.readUInt32BE(20), vmClockNsec: Number(e.readBigUInt64BE(24)),
      vmStateSize: extraLen >= 8 ? Number(x.readBigUInt64BE(0)) : e.readUInt32BE(32),
      diskSize: extraLen >= 16 ? Number(x.readBigUInt64BE(8)) : undefined,
      icount: extraLen >= 24 ? Number(x.readBigInt64BE(16)) : -1,
      extraRest: Buffer.from(x.subarray(Math.min(extraLen, KNOWN_EXTRA))),
      id: buf.toString('utf8', at, at + idLen),
      name: buf.toString('utf8', at + idLen, at + idLen + nameLen),
    });
    off += align8(40 + extraLen + idLen + nameLen);
  }
  return { list, bytes: off };
}

/** The table's bytes; an entry without a recorded disk size gets `size` (QEMU does too). */
export function serializeSnapshotTable(list: readonly SnapshotInfo[], size: number): Buffer {
  const parts = list.map((sn) => {
    const id = Buffer.from(sn.id, 'utf8');
    const name = Buffer.from(sn.name, 'utf8');
    const extraLen = KNOWN_EXTRA + sn.extraRest.length;
    const b = Buffer.alloc(align8(40 + extraLen + id.length + name.length));
    b.writeBigUInt64BE(BigInt(sn.l1Offset), 0);
    b.writeUInt32BE(sn.l1Size, 8);
    b.writeUInt16BE(id.length, 12);
    b.writeUInt16BE(name.length, 14);
    b.writeUInt32BE(sn.dateSec >>> 0, 16);
    b.writeUInt32BE(sn.dateNsec >>> 0, 20);
    b.writeBigUInt64BE(BigInt(sn.vmClockNsec), 24);
    b.writeUInt32BE(sn.vmStateSize % 2 ** 32, 32); // the low half, as QEMU writes it
    b.writeUInt32BE(extraLen, 36);
    b.writeBigUInt64BE(BigInt(sn.vmStateSize), 40);
    b.writeBigUInt64BE(BigInt(sn.diskSize ?? size), 48);
    b.writeBigInt64BE(BigInt(sn.icount), 56);
    sn.extraRest.copy(b, 40 + KNOWN_EXTRA);
    id.copy(b, 40 + extraLen);
    name.copy(b, 40 + extraLen + id.length);
    return b;
  });
  return Buffer.concat(parts);
}

/** qemu's SnapshotInfo (QAPI) of an entry, as `qemu-img info --output=json` lists it. */
export function snapshotJson(sn: SnapshotInfo): Record<string, unknown> {
  const o: Record<string, unknown> = {
    id: sn.id, name: sn.name, 'vm-state-size': sn.vmStateSize, 'date-sec': sn.dateSec, 'date-nsec': sn.dateNsec,
    'vm-clock-sec': Math.floor(sn.vmClockNsec / 1e9), 'vm-clock-nsec': sn.vmClockNsec % 1e9,
  };
  if (sn.icount !== -1) o['icount'] = sn.icount;
  return o;
}

