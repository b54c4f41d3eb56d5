/**
 * `img amend -o ...`: change a qcow2 image's options in place, as `qemu-img amend` does:
 * compat (upgrade to v3; downgrade to v2 after writing zero clusters out), lazy_refcounts
 * and size. backing_file/backing_fmt may only repeat the current values (qemu-img sends
 * changes to `rebase`). The header is rewritten once, at the end, in one write
 * (drivers/qcow2/rebase.ts). Also the -o list parser shared with `measure`.
 */
import { COMPAT, defaultFeatureTable, EXT_FEATURE_TABLE, INCOMPAT, V2_HEADER_LENGTH, V3_HEADER_LENGTH } from '../../block/drivers/qcow2/format.js';
import { rewriteHeader } from '../../block/drivers/qcow2/rebase.js';
import { qstate } from '../../block/drivers/qcow2/state.js';
import type { BackendIO } from '../../backend/io.js';
import * as io from '../../block/io.js';
import type { BlockChild } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import { CliError, oneLine } from '../fail.js';
import { probe, parseJsonFilename } from './open.js';
import { Progress } from './progress.js';
import { openWritable } from './resize.js';
import { parseSize } from './size.js';

/** Splits `a=b,c=d` lists as QEMU does (`,,` is a comma); later values win. null for help. */
export function parseOptionList(lists: readonly string[], known: readonly string[], createOnly: readonly string[] = []): Map<string, string> | null {
  const m = new Map<string, string>();
  for (const list of lists) {
    const items: string[] = [];
    let cur = '';
    for (let i = 0; i < list.length; i++) {
      if (list[i] !== ',') cur += list[i];
      else if (list[i + 1] === ',') { cur += ','; i++; }
      else { items.push(cur); cur = ''; }
    }
    items.push(cur);
    for (const item of items) {
      if (item === '') continue;
      if (item === 'help' || item === '?') return null;
      const eq = item.indexOf('=');
      const key = eq < 0 ? item : item.slice(0, eq);
      if (createOnly.includes(key)) throw new CliError(`Invalid parameter '${key}'. This option is only supported for image creation`);
      if (!known.includes(key)) throw new CliError(`Invalid parameter '${key}'`);
      m.set(key, eq < 0 ? 'on' : item.slice(eq + 1));
    }
  }
  return m;
}

export function parseOnOff(key: string, v: string): boolean {
  if (['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (['off', 'no', 'false', 'n'].includes(v)) return false;
  throw new CliError(`Parameter '${key}' expects 'on' or 'off'`);
}

const AMEND_KEYS = ['backing_file', 'backing_fmt', 'compat', 'data_file', 'data_file_raw', 'lazy_refcounts', 'refcount_bits', 'size'];
const CREATE_ONLY = ['cluster_size', 'extended_l2', 'preallocation', 'compression_type', 'encryption', 'encrypt.format'];
const HELP = `Amend options for 'qcow2':
  backing_file=<str>     - File name of a base image
  backing_fmt=<str>      - Image format of the base image
  compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])
  lazy_refcounts=<bool (on/off)> - Postpone refcount updates
  refcount_bits=<num>    - Width of a reference count entry in bits
  size=<size>            - Virtual disk size
`;

export interface AmendOptions {
  f?: string;
  o?: string[];
  p?: boolean;
  q?: boolean;
  forceShare?: boolean;
}

function versionOf(compat: string): 2 | 3 {
  if (compat === '0.10' || compat === 'v2') return 2;
  if (compat === '1.1' || compat === 'v3') return 3;
  throw new CliError(`Unknown compatibility level ${compat}`);
}

export async function imgAmend(filename: string, opts: AmendOptions): Promise<void> {
  if (!opts.o?.length) throw new CliError('Must specify options (-o)');
  const fmt = opts.f ?? (parseJsonFilename(filename) ? undefined : probe(filename));
  if (fmt !== undefined && fmt !== 'qcow2') throw new CliError(`Format driver '${fmt}' does not support option amendment`);
  const o = parseOptionList(opts.o, AMEND_KEYS, CREATE_ONLY);
  if (o === null) {
    process.stdout.write(HELP);
    return;
  }
  if (o.has('data_file') || o.has('data_file_raw')) throw new CliError('External data files are not supported by Spindle yet');
  const img = await openWritable({ filename, fmt: 'qcow2', forceShare: opts.forceShare, discardUnmap: true }, { perm: Perm.RESIZE });
  try {
    const root = img.backend.root!;
    const node = root.node;
    const h = qstate(node).header;
    const version = o.has('compat') ? versionOf(o.get('compat')!) : h.version;
    const lazy = o.has('lazy_refcounts') ? parseOnOff('lazy_refcounts', o.get('lazy_refcounts')!) : undefined;
    if (lazy && version === 2) throw new CliError('Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)');
    if (o.has('refcount_bits')) {
      const bits = Number(o.get('refcount_bits'));
      if (!Number.isInteger(bits) || bits < 1 || bits > 64 || (bits & (bits - 1))) throw new CliError('Refcount width must be a power of two and may not exceed 64 bits');
      if (version === 2 && bits !== 16) throw new CliError('Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
      if (bits !== 2 ** h.refcountOrder) throw new CliError('Changing the refcount width is not supported by Spindle yet');
    }
    if (o.has('backing_file') || o.has('backing_fmt')) {
      if ((o.get('backing_file') ?? null) !== h.backingFile || (o.get('backing_fmt') ?? null) !== h.backingFormat) {
        throw new CliError("Cannot amend the backing file. You can use 'qemu-img rebase' instead.");
      }
    }
    const downgrade = version === 2 && h.version === 3;
    if (downgrade) {
      if (h.refcountOrder !== 4) throw new CliError('compat=0.10 requires refcount_bits=16');
      const incompat = h.incompatible & ~INCOMPAT.COMPRESSION;
      if (incompat) throw new CliError(`Cannot downgrade an image with incompatible features 0x${incompat.toString(16)} set`);
    }
    let size: number | undefined;
    if (o.has('size')) {
      try {
        size = parseSize(o.get('size')!);
      } catch (e) {
        throw new CliError(`Parameter 'size' expects a size: ${oneLine(e)}`);
      }
    }
    if (size !== undefined && size % 512) throw new CliError('The new size must be a multiple of 512');
    const progress = new Progress(!!opts.p && !opts.q);
    if (size !== undefined && size !== io.getLength(root)) {
      try {
        await io.truncate(root, size);
      } catch (e) {
        throw new CliError(`Error resizing image: ${oneLine(e)}`);
      }
    }
    if (downgrade) await writeOutZeroClusters(img.io, root, progress);
    await img.io.flush();
    const lazyBit = lazy === undefined ? h.compatible & COMPAT.LAZY_REFCOUNTS : lazy ? COMPAT.LAZY_REFCOUNTS : 0n;
    if (version !== h.version || (version === 3 && lazyBit !== (h.compatible & COMPAT.LAZY_REFCOUNTS))) {
      try {
        await rewriteHeader(node.file!, (nh) => {
          nh.version = version;
          if (version === 2) {
            nh.headerLength = V2_HEADER_LENGTH;
            nh.compatible = 0n;
            nh.autoclear = 0n;
            nh.incompatible = 0n;
            nh.extensions = nh.extensions.filter((e) => e.type !== EXT_FEATURE_TABLE);
          } else {
            nh.headerLength = Math.max(nh.headerLength, V3_HEADER_LENGTH);
            nh.compatible = (nh.compatible & ~COMPAT.LAZY_REFCOUNTS) | lazyBit;
            if (!nh.extensions.some((e) => e.type === EXT_FEATURE_TABLE) && 2 ** nh.clusterBits > 4096) {
              nh.extensions.push({ type: EXT_FEATURE_TABLE, data: defaultFeatureTable() });
            }
          }
        });
      } catch (e) {
        throw new CliError(`Could not update the header of '${filename}': ${oneLine(e)}`);
      }
    }
    progress.finish();
  } finally {
    img.close();
  }
}

/**
 * Version 2 has no zero clusters: each becomes unallocated where nothing shows through
 * (no backing file: a discard), or a cluster of written zeroes.
 */
async function writeOutZeroClusters(dev: BackendIO, root: BlockChild, progress: Progress): Promise<void> {
  const node = root.node;
  const size = io.getLength(root);
  const zero = Buffer.alloc(1 << 20);
  // Pass 0 discards (or writes), pass 1 writes what a discard could not free (a partial last
  // cluster), pass 2 only checks.
  for (let pass = 0; pass < 3; pass++) {
    let found = false;
    for (let off = 0; off < size; ) {
      const st = await io.blockStatus(root, off, size - off);
      if (st.allocated && st.zero) {
        found = true;
        if (pass === 2) throw new CliError(`Could not write out the zero clusters at offset ${off}`);
        if (node.backing || pass === 1) {
          for (let p = off; p < off + st.bytes; p += zero.length) await dev.write(p, zero.subarray(0, Math.min(zero.length, off + st.bytes - p)));
        } else {
          await dev.discard(off, st.bytes);
        }
      }
      off += st.bytes;
      progress.update(off + pass * size, size * 2);
    }
    if (!found) return;
  }
}
