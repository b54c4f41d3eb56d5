/**
 * Compressed writes (`convert -c`): a whole guest cluster is deflated (raw zlib, as QEMU
 * writes it) and packed byte-wise after the previous compressed cluster, sharing host
 * clusters; each host cluster's refcount counts the compressed extents in it. Data that
 * does not shrink is written normally.
 */
import { deflateRawSync } from 'node:zlib';
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import { encodeCompressed } from './entries.js';
import { lookup } from './map.js';
import { unmappingEntries } from './mapping-watch.js';
import { qstate, type Qcow2State } from './state.js';
import { dropOld, ownL2Table } from './write.js';

/** Where the next compressed extent may start (0: start a new host cluster). */
const tails = new WeakMap<Qcow2State, number>();

/** Places `len` compressed bytes: raises their refcounts (in memory), returns the host offset. */
async function placeCompressed(s: Qcow2State, len: number): Promise<number> {
  const cs = s.geo.clusterSize;
  const tail = tails.get(s) ?? 0;
  const fileEnd = io.getLength(s.file);
  if (tail && tail % cs !== 0 && (tail % cs) + len <= cs && tail <= fileEnd + cs) {
    await s.refcounts.raiseDirty(Math.floor(tail / cs), 1);
    tails.set(s, tail + len);
    return tail;
  }
  const n = Math.ceil(len / cs);
  const host = await s.refcounts.allocDirty(n);
  tails.set(s, host + len);
  return host;
}

/**
 * Writes one whole guest cluster compressed. Returns false (writing nothing) when the data
 * does not compress well enough; the caller then writes it normally.
 */
export async function writeCompressed(node: BlockNode, offset: number, data: Buffer): Promise<boolean> {
  const s = qstate(node);
  const cs = s.geo.clusterSize;
  if (offset % cs || data.length > cs || (data.length < cs && offset + data.length < node.length)) {
    throw new BlockError('EINVAL', `qcow2 '${node.name}': compressed writes must cover one whole cluster (offset ${offset}, ${data.length} bytes)`, { node: node.name });
  }
  if (s.geo.l2EntrySize === 16) throw new BlockError('ENOTSUP', `qcow2 '${node.name}': compressed clusters with extended L2 entries are not supported`, { node: node.name });
  const full = data.length === cs ? data : Buffer.concat([data, Buffer.alloc(cs - data.length)]);
  const packed = deflateRawSync(full, { level: 6 });
  // An entry can describe at most the cluster size minus one sector of compressed data.
  if (packed.length >= cs - 512) return false;
  await s.lock.run(async () => {
    const m = await lookup(s, offset);
    const host = await placeCompressed(s, packed.length);
    await io.write(s.file, host, packed);
    const l2Offset = await ownL2Table(s, m);
    const table = await s.l2.get(l2Offset);
    const pos = m.l2Index * s.geo.l2EntrySize;
    unmappingEntries(s, table, m.l1Index, m.l2Index, 1);
    encodeCompressed(table, pos, s.geo.clusterBits, host, packed.length);
    s.l2.markDirty(l2Offset, pos, pos + 8);
    await dropOld(s, [m]);
  });
  return true;
}
