/**
 * `img measure`: how many bytes a new image needs, for a size (--size) or to hold an
 * existing image's data, as `qemu-img measure` computes it. qcow2 targets: the metadata of
 * a fully allocated image (measureQcow2) plus the data clusters the source uses; raw
 * targets: the virtual size, rounded up to 512 bytes.
 */
import { measureQcow2, type Qcow2CreateOptions } from '../../block/drivers/qcow2/create.js';
import { qstate } from '../../block/drivers/qcow2/state.js';
import { getDriver } from '../../block/drivers/index.js';
import { CliError, oneLine } from '../fail.js';
import { parseOptionList, parseOnOff } from './amend.js';
import { chainStatus } from './map.js';
import { openImage } from './open.js';
import { qdictOrder } from './qdict.js';
import { parseSize } from './size.js';

export interface MeasureOptions {
  O?: string;
  o?: string[];
  size?: string;
  f?: string;
  output?: string;
  forceShare?: boolean;
}

const QCOW2_KEYS = ['backing_file', 'backing_fmt', 'cluster_size', 'compat', 'compression_type', 'extended_l2', 'lazy_refcounts', 'preallocation', 'refcount_bits', 'size', 'encrypt.format', 'data_file', 'data_file_raw'];
const RAW_KEYS = ['preallocation', 'size'];

function sizeOpt(key: string, v: string): number {
  try {
    return parseSize(v);
  } catch {
    throw new CliError(`Parameter '${key}' expects a non-negative number below 2^64 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.`);
  }
}

function qcow2Options(o: Map<string, string>): Qcow2CreateOptions {
  const c: Qcow2CreateOptions = {};
  if (o.has('cluster_size')) c.clusterSize = sizeOpt('cluster_size', o.get('cluster_size')!);
  if (o.has('refcount_bits')) c.refcountBits = Number(o.get('refcount_bits'));
  if (o.has('extended_l2')) c.extendedL2 = parseOnOff('extended_l2', o.get('extended_l2')!);
  c.compat = o.get('compat');
  const p = o.get('preallocation');
  if (p !== undefined && !['off', 'metadata', 'falloc', 'full'].includes(p)) throw new CliError(`invalid parameter value: ${p}`);
  c.preallocation = p;
  if (o.has('data_file') || o.has('encrypt.format')) throw new CliError('Measuring encrypted images or images with an external data file is not supported by Spindle yet');
  return c;
}

/** Bytes of the clusters that hold data somewhere in the source's chain. */
async function dataBytes(filename: string, opts: MeasureOptions, cs: number): Promise<{ size: number; data: number; bitmaps: boolean }> {
  const img = await openImage({ filename, fmt: opts.f, readOnly: true, forceShare: opts.forceShare });
  try {
    const root = img.backend.root!;
    const size = img.io.getLength();
    const node = root.node;
    const bitmaps = node.driver.format === 'qcow2' && qstate(node).header.version === 3;
    let clusters = 0;
    let lastCluster = -1;
    for (let off = 0; off < size; ) {
      const a = await chainStatus(root, off, size - off);
      if (!a.zero && a.data && a.allocated) {
        const first = Math.max(Math.floor(off / cs), lastCluster + 1);
        const last = Math.floor((off + a.bytes - 1) / cs);
        if (last >= first) clusters += last - first + 1;
        lastCluster = Math.max(lastCluster, last);
      }
      off += a.bytes;
    }
    return { size, data: clusters * cs, bitmaps };
  } finally {
    img.close();
  }
}

export async function imgMeasure(files: string[], opts: MeasureOptions): Promise<void> {
  const output = opts.output ?? 'human';
  if (output !== 'human' && output !== 'json') throw new CliError('--output must be used with human or json as argument.');
  if (files.length > 1) throw new CliError('At most one filename argument is allowed.');
  const filename = files[0];
  if (filename !== undefined && opts.size !== undefined) throw new CliError('--size N cannot be used together with a filename.');
  if (filename === undefined && opts.size === undefined) throw new CliError('Either --size N or one filename must be specified.');
  if (filename === undefined && opts.f !== undefined) throw new CliError('--image-opts, -f, and -l require a filename argument.');
  const fmt = opts.O ?? 'raw';
  if (fmt !== 'raw' && fmt !== 'qcow2') {
    try {
      getDriver(fmt);
    } catch {
      throw new CliError(`Unknown file format '${fmt}'`);
    }
    throw new CliError(`Block driver '${fmt}' does not support size measurement`);
  }
  let o: Map<string, string> | null;
  try {
    o = parseOptionList(opts.o ?? [], fmt === 'qcow2' ? QCOW2_KEYS : RAW_KEYS);
  } catch (e) {
    throw new CliError(`${oneLine(e)}`);
  }
  if (o === null) throw new CliError("'-o help' is not supported by measure in Spindle; see 'spindle img create -f qcow2 -o help'");
  const given = opts.size !== undefined ? parseSize(opts.size) : undefined;

  let required: number;
  let full: number;
  let bitmaps: number | undefined;
  if (fmt === 'raw') {
    const p = o.get('preallocation');
    if (p !== undefined && !['off', 'falloc', 'full'].includes(p)) throw new CliError(`invalid parameter value: ${p}`);
    const size = given ?? (await dataBytes(filename!, opts, 512)).size;
    required = full = Math.ceil(size / 512) * 512;
  } else {
    const c = qcow2Options(o);
    const cs = c.clusterSize ?? 65536;
    let size = given;
    let data = 0;
    let src: { size: number; data: number; bitmaps: boolean } | undefined;
    if (size === undefined) {
      src = await dataBytes(filename!, opts, cs);
      size = src.size;
    }
    let m: { required: number; fullyAllocated: number };
    try {
      m = measureQcow2({ ...c, size });
    } catch (e) {
      throw new CliError(oneLine(e));
    }
    const virtual = m.fullyAllocated - m.required;
    if (src) data = o.has('backing_file') ? virtual : src.data;
    required = m.required + data;
    full = m.fullyAllocated;
    if (c.preallocation === 'full' || c.preallocation === 'falloc') required = full;
    const v3 = (c.compat ?? '1.1') !== '0.10' && c.compat !== 'v2';
    if (src && v3 && src.bitmaps) bitmaps = 0; // Spindle keeps no persistent bitmaps
  }
  if (output === 'json') {
    const j: Record<string, number> = { required, 'fully-allocated': full };
    if (bitmaps !== undefined) j['bitmaps'] = bitmaps;
    process.stdout.write(`${JSON.stringify(qdictOrder(j), null, 4)}\n`);
  } else {
    let out = `required size: ${required}\nfully allocated size: ${full}\n`;
    if (bitmaps !== undefined) out += `bitmaps size: ${bitmaps}\n`;
    process.stdout.write(out);
  }
}
