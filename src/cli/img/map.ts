/**
 * `img map`: where each guest range of an image comes from, as `qemu-img map` prints it.
 *
 * Each range is answered by one layer of the backing chain: the first, from the top, that
 * allocates it (data or zero), or the lowest one reached when none does. The qcow2 driver's
 * block status already reads through to the backing file for unallocated ranges and says
 * which node answered; this module walks the chain itself (`chainStatus`) so it knows the
 * depth and whether the answer is an allocation. The walk is shared with compare, measure,
 * commit and rebase.
 */
import { qstate } from '../../block/drivers/qcow2/state.js';
import { lookup, newMapping } from '../../block/drivers/qcow2/map.js';
import * as io from '../../block/io.js';
import type { BlockChild, BlockNode } from '../../block/node.js';
import { CliError } from '../fail.js';
import { combinePath } from './qcow2-info.js';
import { openImage, parseJsonFilename } from './open.js';
import { parseSize } from './size.js';

/** One layer's answer for a range, and where in the chain it came from. */
export interface ChainAnswer {
  bytes: number;
  data: boolean;
  zero: boolean;
  /** Allocated by `layer` (qemu's "present"). */
  allocated: boolean;
  /** Host offset in the layer's file, when known. */
  offset?: number;
  /** Backing layers between the top and `layer`. */
  depth: number;
  /** The format node of the layer that answered. */
  layer: BlockNode;
}

/**
 * Status of [offset, offset+bytes) through `edge`'s node and its backing chain, stopping
 * above `base` (commit: ranges only `base` or its backing files provide read as
 * unallocated). The answer holds for `bytes` (> 0) bytes.
 */
export async function chainStatus(edge: BlockChild, offset: number, bytes: number, base?: BlockNode): Promise<ChainAnswer> {
  let e = edge;
  let n = bytes;
  for (let depth = 0; ; depth++) {
    const st = await io.blockStatus(e, offset, n);
    n = Math.min(n, st.bytes);
    const node = e.node;
    const below = node.backing;
    // Unallocated here: the driver answered from below unless it had nothing below to ask
    // (no backing file, or the range lies past the backing file's end).
    if (st.allocated || !below || st.node === undefined || st.node === node || below.node === base) {
      const a: ChainAnswer = { bytes: n, data: st.data, zero: st.zero, allocated: st.allocated, depth, layer: node };
      if (st.offset !== undefined) a.offset = st.offset;
      if (!st.allocated && st.node !== node && below) {
        // Stopped at `base`: nothing above it allocates the range.
        a.data = false;
        a.zero = false;
        delete a.offset;
      }
      return a;
    }
    e = below;
  }
}

const preallocCache = new WeakMap<BlockNode, boolean>();

/**
 * QEMU's heuristic for qcow2 images whose data clusters may be holes in the file (metadata
 * preallocation, or files made sparse): at least max(10/9, +2) times more clusters in use
 * than the file system allocates. Only then does qemu ask the file about data clusters.
 */
async function sparseQcow2(layer: BlockNode): Promise<boolean> {
  const known = preallocCache.get(layer);
  if (known !== undefined) return known;
  const s = qstate(layer);
  const cs = s.geo.clusterSize;
  const f = layer.file!.node;
  const real = Math.floor((f.driver.allocatedSize?.(f) ?? Infinity) / cs);
  const threshold = Math.max(Math.floor((real * 10) / 9), real + 2);
  const end = Math.ceil(f.length / cs);
  let count = 0;
  for (let i = 0; i < end && count < threshold; i++) if ((await s.refcounts.get(i)) > 0) count++;
  const result = count >= threshold;
  preallocCache.set(layer, result);
  return result;
}

/** Adds what qemu-img map shows beyond the driver's status: zero clusters' host offsets, file holes. */
async function refine(a: ChainAnswer, start: number): Promise<ChainAnswer> {
  if (a.layer.driver.format !== 'qcow2' || !a.allocated) return a;
  const s = qstate(a.layer);
  const cs = s.geo.clusterSize;
  if (a.zero && a.offset === undefined && s.geo.l2EntrySize === 8) {
    // A zero cluster that keeps its allocation has a host offset; runs end where that changes.
    const m = newMapping();
    await lookup(s, start, m);
    const host = m.host ? m.host + (start % cs) : 0;
    let n = Math.min(a.bytes, cs - (start % cs));
    while (n < a.bytes) {
      await lookup(s, start + n, m);
      if ((m.host !== 0) !== (host !== 0) || (host && m.host !== host + n)) break;
      n = Math.min(a.bytes, n + cs);
    }
    a.bytes = n;
    if (host) a.offset = host;
  } else if (a.data && !a.zero && a.offset !== undefined && (await sparseQcow2(a.layer))) {
    const file = a.layer.file!;
    const fst = await io.blockStatus(file, a.offset, a.bytes);
    const toEof = a.offset + fst.bytes >= io.getLength(file);
    if (!(fst.zero && toEof)) a.bytes = Math.min(a.bytes, fst.bytes);
    if (fst.zero) a.zero = true;
  }
  return a;
}

export interface MapOptions {
  f?: string;
  output?: string;
  startOffset?: string;
  maxLength?: string;
  forceShare?: boolean;
}

interface Entry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  file?: string;
}

function offsetArg(text: string | undefined, what: string): number | undefined {
  if (text === undefined) return undefined;
  try {
    return parseSize(text);
  } catch {
    throw new CliError(`Invalid ${what} specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.`);
  }
}

/** The names qemu shows for each layer's file: the top as given, backing files as resolved. */
function layerName(top: BlockNode, topName: string, layer: BlockNode): string {
  let name = topName;
  for (let n: BlockNode | undefined = top; n; n = n.backing?.node) {
    if (n === layer) return name;
    const bf = n.driver.format === 'qcow2' ? qstate(n).header.backingFile : null;
    const fname = n.backing?.node.file?.node.options['filename'];
    name = bf ? combinePath(name, bf) : typeof fname === 'string' ? fname : n.backing?.node.name ?? '';
  }
  const f = layer.file?.node.options['filename'];
  return typeof f === 'string' ? f : layer.name;
}

function mergeable(a: Entry, b: Entry): boolean {
  return a.start + a.length === b.start && a.depth === b.depth && a.present === b.present && a.zero === b.zero && a.data === b.data &&
    a.file === b.file && (a.offset === undefined) === (b.offset === undefined) && (a.offset === undefined || a.offset + a.length === b.offset);
}

function jsonEntry(e: Entry): string {
  const off = e.offset !== undefined ? `, "offset": ${e.offset}` : '';
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${off}}`;
}

const hex = (n: number): string => (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16);

export async function imgMap(filename: string, opts: MapOptions): Promise<void> {
  const output = opts.output ?? 'human';
  if (output !== 'human' && output !== 'json') throw new CliError('--output must be used with human or json as argument.');
  const startOffset = offsetArg(opts.startOffset, 'start offset') ?? 0;
  const maxLength = offsetArg(opts.maxLength, 'max length');
  const img = await openImage({ filename, fmt: opts.f, readOnly: true, forceShare: opts.forceShare });
  try {
    const root = img.backend.root!;
    const top = root.node;
    const topName = parseJsonFilename(filename) ? (top.file?.node.options['filename'] as string | undefined) ?? filename : filename;
    let end = io.getLength(root);
    if (maxLength !== undefined) end = Math.min(end, startOffset + maxLength);
    const entries: Entry[] = [];
    const names = new Map<BlockNode, string>();
    for (let off = startOffset; off < end; ) {
      const a = await refine(await chainStatus(root, off, Math.min(end - off, 1 << 30)), off);
      let file = names.get(a.layer);
      if (file === undefined) names.set(a.layer, (file = layerName(top, topName, a.layer)));
      const e: Entry = { start: off, length: a.bytes, depth: a.depth, present: a.allocated, zero: a.zero, data: a.data, file };
      if (a.offset !== undefined) e.offset = a.offset;
      const last = entries[entries.length - 1];
      if (last && mergeable(last, e)) last.length += e.length;
      else entries.push(e);
      off += a.bytes;
    }
    if (!entries.length) entries.push({ start: startOffset, length: 0, depth: 0, present: false, zero: false, data: false });
    if (output === 'json') {
      process.stdout.write(`[${entries.map(jsonEntry).join(',\n')}]\n`);
    } else {
      let out = 'Offset          Length          Mapped to       File\n';
      for (const e of entries) if (e.data && !e.zero && e.offset !== undefined) out += `${hex(e.start)}${hex(e.length)}${hex(e.offset)}${e.file}\n`;
      process.stdout.write(out);
    }
  } finally {
    img.close();
  }
}
