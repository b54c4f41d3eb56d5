/**
 * `img info`: qemu-img's fields, names and shapes, so scripts written against
 * `qemu-img info --output=json` read Spindle's output unchanged.
 */
import type { BlockNode } from '../../block/node.js';
import { CliError } from '../fail.js';
import { infoBackingChain } from './backing-chain.js';
import { openImage, parseJsonFilename, probe } from './open.js';
import { qcow2HeaderInfo } from './qcow2-info.js';
import { qdictOrder } from './qdict.js';
import { sizeToStr } from './size.js';
import { snapshotTable } from './snapshot.js';

export interface InfoOptions {
  f?: string;
  output?: string;
  forceShare?: boolean;
  backingChain?: boolean;
}

/** Host bytes allocated: the first node down the primary chain whose driver knows. */
function actualSize(node: BlockNode): number | undefined {
  for (let n: BlockNode | undefined = node; n; n = n.primary?.node) {
    if (n.driver.allocatedSize) return n.driver.allocatedSize(n);
  }
  return undefined;
}

/** QEMU prints json: filenames re-serialised, with a space after ':' and ','. */
function spaced(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(spaced).join(', ')}]`;
  if (typeof v === 'object' && v !== null) {
    return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${spaced(x)}`).join(', ')}}`;
  }
  return JSON.stringify(v);
}

/** ImageInfo of an image opened through the block layer. */
async function openedInfo(filename: string, opts: InfoOptions): Promise<Record<string, unknown>> {
  const img = await openImage({ filename, fmt: opts.f, readOnly: true, forceShare: opts.forceShare });
  try {
    const node = img.node;
    const json = parseJsonFilename(filename);
    const info: Record<string, unknown> = {
      'virtual-size': img.io.getLength(),
      filename: json ? `json:${spaced(json)}` : filename,
      format: node.driver.format,
    };
    info['actual-size'] = actualSize(node) ?? 0;
    // Formats (not protocols) report their dirty flag; raw has none to set.
    if (!node.driver.protocol) {
      info['dirty-flag'] = false;
      // A format's own ImageInfo fields (cluster-size, format-specific, ...).
      Object.assign(info, node.driver.info?.(node));
    }
    return info;
  } finally {
    img.close();
  }
}

/**
 * qcow2 images named by path are described from their header (one switch, here). Like
 * qemu-img info, this does not open the backing chain (an overlay whose backing file is
 * missing still has info), and it reports the backing fields the driver's info hook does
 * not (yet). json: filenames go through the driver.
 */
function headerOnly(filename: string, fmt: string | undefined): boolean {
  if (parseJsonFilename(filename)) return false;
  return (fmt ?? probe(filename)) === 'qcow2';
}

/** qemu-img's dump of a format-specific value: '-' in keys shown as ' ', 4 spaces a level. */
function dumpValue(v: unknown, indent: number): string {
  if (Array.isArray(v)) {
    return v.map((x, i) => {
      const composite = typeof x === 'object' && x !== null;
      return `${' '.repeat(indent * 4)}[${i}]:${composite ? '\n' : ' '}${dumpValue(x, indent + 1)}`;
    }).join('');
  }
  if (typeof v === 'object' && v !== null) {
    return Object.entries(v).map(([k, x]) => {
      const composite = typeof x === 'object' && x !== null;
      return `${' '.repeat(indent * 4)}${k.replace(/-/g, ' ')}:${composite ? '\n' : ' '}${dumpValue(x, indent + 1)}`;
    }).join('');
  }
  return `${String(v)}\n`;
}

/** The human form, in qemu-img's line order. */
export function humanInfo(info: Record<string, unknown>): string {
  const vs = info['virtual-size'] as number;
  let out =
    `image: ${info.filename as string}\n` +
    `file format: ${info.format as string}\n` +
    `virtual size: ${sizeToStr(vs)} (${vs} bytes)\n` +
    `disk size: ${sizeToStr(info['actual-size'] as number)}\n`;
  if (info['encrypted'] === true) out += 'encrypted: yes\n';
  if (info['cluster-size'] !== undefined) out += `cluster_size: ${info['cluster-size'] as number}\n`;
  if (info['dirty-flag'] === true) out += 'cleanly shut down: no\n';
  const backing = info['backing-filename'] as string | undefined;
  if (backing !== undefined) {
    const full = info['full-backing-filename'] as string | undefined;
    const note = full === undefined ? ' (cannot determine actual path)' : full !== backing ? ` (actual path: ${full})` : '';
    out += `backing file: ${backing}${note}\n`;
  }
  if (info['backing-filename-format'] !== undefined) out += `backing file format: ${info['backing-filename-format'] as string}\n`;
  const snapshots = info['snapshots'] as Record<string, unknown>[] | undefined;
  if (snapshots?.length) out += snapshotTable(snapshots);
  const spec = info['format-specific'] as { data?: unknown } | undefined;
  if (spec) out += `Format specific information:\n${dumpValue(spec.data, 1)}`;
  return out;
}

/** The ImageInfo of one image (not its backing files), keys in qemu's order. */
export async function imageInfo(filename: string, opts: InfoOptions): Promise<Record<string, unknown>> {
  return qdictOrder(headerOnly(filename, opts.f) ? await qcow2HeaderInfo(filename, opts.forceShare === true) : await openedInfo(filename, opts));
}

export async function imgInfo(filename: string, opts: InfoOptions): Promise<void> {
  const output = opts.output ?? 'human';
  if (output !== 'human' && output !== 'json') throw new CliError('--output must be used with human or json as argument.');
  if (opts.backingChain) return infoBackingChain(filename, opts, output);
  const info = await imageInfo(filename, opts);
  process.stdout.write(output === 'json' ? `${JSON.stringify(info, null, 4)}\n` : humanInfo(info));
}
