/**
 * `img create -f qcow2`: qemu-img's option names, values, checks and printed line, over
 * createQcow2 in the block layer. Every check runs before anything is printed or created,
 * so a refused command leaves one line on stderr and no file.
 */
import { attachRoot, detachRoot, openNode, unref } from '../../block/graph.js';
import { createQcow2, planQcow2, type Qcow2CreateOptions } from '../../block/drivers/qcow2/create.js';
import type { BlockParent } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import { CliError, oneLine } from '../fail.js';
import { createRawFile } from './create.js';
import { combinePath, readImageHead } from './qcow2-info.js';
import { parseSize } from './size.js';

export interface Qcow2CliOptions {
  o?: string[];
  b?: string;
  F?: string;
  u?: boolean;
  q?: boolean;
}

/** The options we implement, in the order qemu-img lists them for `-o help`. */
const HELP: [string, string, string][] = [
  ['backing_file', 'str', 'File name of a base image'],
  ['backing_fmt', 'str', 'Image format of the base image'],
  ['cluster_size', 'size', 'qcow2 cluster size'],
  ['compat', 'str', 'Compatibility level (v2 [0.10] or v3 [1.1])'],
  ['compression_type', 'str', 'Compression method used for image cluster compression'],
  ['extended_l2', 'bool (on/off)', 'Extended L2 tables'],
  ['lazy_refcounts', 'bool (on/off)', 'Postpone refcount updates'],
  ['preallocation', 'str', 'Preallocation mode (allowed values: off, metadata, falloc, full)'],
  ['refcount_bits', 'num', 'Width of a reference count entry in bits'],
  ['size', 'size', 'Virtual disk size'],
];
const KNOWN = new Set(HELP.map(([k]) => k));
/** qemu-img options Spindle does not implement (yet): named, not "invalid". */
const UNSUPPORTED = /^(data_file|data_file_raw|encryption|encrypt\..*)$/;

/** The order of qemu-img's "Formatting ..." line (its option table's order). */
const PRINT_ORDER = ['cluster_size', 'extended_l2', 'preallocation', 'compression_type', 'size', 'compat', 'backing_file', 'backing_fmt', 'lazy_refcounts', 'refcount_bits'];
const PRINT_DEFAULTS: Record<string, string> = { cluster_size: '65536', extended_l2: 'off', compression_type: 'zlib', lazy_refcounts: 'off', refcount_bits: '16' };

export function qcow2Help(withFilename: boolean): string {
  const lines = HELP.map(([k, t, d]) => `  ${`${k}=<${t}>`.padEnd(22)} - ${d}`);
  if (withFilename) return `Supported options:\n${lines.join('\n')}\n`;
  return `Supported qcow2 options:\n${lines.join('\n')}\n\nThe protocol level may support further options.\nSpecify the target filename to include those options.\n`;
}

/** Splits `a=b,c=d` as QEMU does: `,,` is a literal comma inside a value. */
function splitList(list: string): string[] {
  const out: string[] = [];
  let cur = '';
  for (let i = 0; i < list.length; i++) {
    if (list[i] !== ',') cur += list[i];
    else if (list[i + 1] === ',') { cur += ','; i++; }
    else { out.push(cur); cur = ''; }
  }
  out.push(cur);
  return out.filter((s) => s !== '');
}

/** Parses the -o lists; later values win, as in qemu-img. Returns null for `help`. */
function parseList(lists: readonly string[]): Map<string, string> | null {
  const m = new Map<string, string>();
  for (const list of lists) {
    for (const item of splitList(list)) {
      if (item === 'help' || item === '?') return null;
      const eq = item.indexOf('=');
      const key = eq < 0 ? item : item.slice(0, eq);
      if (UNSUPPORTED.test(key)) throw new CliError(`Option '${key}' is not supported by Spindle yet`);
      if (!KNOWN.has(key)) throw new CliError(`Invalid parameter '${key}'`);
      m.set(key, eq < 0 ? 'on' : item.slice(eq + 1));
    }
  }
  return m;
}

function parseBool(key: string, v: string | undefined): boolean | undefined {
  if (v === undefined) return undefined;
  if (['on', 'yes', 'true', 'y'].includes(v)) return true;
  if (['off', 'no', 'false', 'n'].includes(v)) return false;
  throw new CliError(`Parameter '${key}' expects 'on' or 'off'`);
}

function parseSizeOpt(key: string, v: string): number {
  try {
    return parseSize(v, 'qcow2');
  } catch {
    throw new CliError(`Parameter '${key}' expects a non-negative number below 2^64 (optional suffix k, M, G, T, P or E)`);
  }
}

/** strtoull with base 0, as QEMU parses number options: 0x hex, leading-0 octal. */
function parseNumber(key: string, v: string): number {
  const m = /^(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)$/i.exec(v.trim());
  if (!m) throw new CliError(`Parameter '${key}' expects a number`);
  const s = m[1]!;
  return /^0x/i.test(s) ? parseInt(s, 16) : s.length > 1 && s[0] === '0' ? parseInt(s, 8) : Number(s);
}

/**
 * The backing image's size, to use when SIZE is omitted; opening it also proves it exists.
 * A qcow2 backing file is read from its header, so its own backing chain is not opened
 * (qemu-img does not need it either).
 */
async function backingSize(path: string, fmt: string): Promise<number> {
  if (fmt === 'qcow2') {
    const head = await readImageHead(path, true);
    return head.header.size;
  }
  const node = await openNode({ driver: fmt, 'read-only': true, file: { driver: 'file', filename: path, 'read-only': true } });
  try {
    return node.length;
  } finally {
    unref(node);
  }
}

const CREATOR: BlockParent = { parentKind: 'job', describeUser: () => 'img create' };

export async function imgCreateQcow2(filename: string, sizeArg: string | undefined, opts: Qcow2CliOptions): Promise<void> {
  const fail = (msg: string): never => {
    throw new CliError(`${filename}: ${msg}`);
  };
  let o: Map<string, string> | null;
  try {
    o = parseList(opts.o ?? []);
  } catch (e) {
    return fail(oneLine(e));
  }
  if (!o) {
    process.stdout.write(qcow2Help(true));
    return;
  }
  if (opts.b !== undefined) o.set('backing_file', opts.b);
  if (opts.F !== undefined) o.set('backing_fmt', opts.F);
  let size: number | undefined;
  if (sizeArg !== undefined) {
    if (o.has('size')) fail('The image size must be specified only once');
    size = parseSize(sizeArg, 'qcow2'); // its message names no file, as qemu-img's does
  } else if (o.has('size')) {
    try {
      size = parseSizeOpt('size', o.get('size')!);
    } catch (e) {
      fail(oneLine(e));
    }
  }

  const c: Qcow2CreateOptions = { size };
  try {
    if (o.has('cluster_size')) c.clusterSize = parseSizeOpt('cluster_size', o.get('cluster_size')!);
    if (o.has('refcount_bits')) c.refcountBits = parseNumber('refcount_bits', o.get('refcount_bits')!);
    c.lazyRefcounts = parseBool('lazy_refcounts', o.get('lazy_refcounts'));
    c.extendedL2 = parseBool('extended_l2', o.get('extended_l2'));
  } catch (e) {
    return fail(oneLine(e));
  }
  c.compat = o.get('compat');
  c.preallocation = o.get('preallocation');
  c.backingFile = o.get('backing_file');
  c.backingFormat = o.get('backing_fmt');
  const ct = o.get('compression_type');
  if (ct !== undefined && ct !== 'zlib') {
    fail(ct === 'zstd' ? "Compression type 'zstd' is not supported by Spindle yet" : `Parameter 'compression-type' does not accept value '${ct}'`);
  }

  if (c.backingFile !== undefined) {
    // qemu-img 7.2 refuses to guess the backing format (a raw guess would be unsafe).
    if (!c.backingFormat) fail('Backing file specified without backing format');
    if (!opts.u) {
      const full = combinePath(filename, c.backingFile);
      try {
        const bsize = await backingSize(full, c.backingFormat!);
        if (size === undefined) size = c.size = bsize;
      } catch (e) {
        let msg = oneLine(e);
        if (/bad magic/.test(msg)) msg = `Image is not in ${c.backingFormat} format`;
        else if (!msg.startsWith('Could not open') && !msg.startsWith('Unknown driver')) msg = `Could not open '${full}': ${msg}`;
        fail(`${msg.replace(/ \(known: .*\)$/, '')}; could not open backing image`);
      }
    }
  }

  try {
    planQcow2(c);
  } catch (e) {
    fail(oneLine(e));
  }

  if (!opts.q) {
    const printed = new Map(o);
    if (size !== undefined) printed.set('size', String(size));
    if (c.clusterSize !== undefined) printed.set('cluster_size', String(c.clusterSize));
    if (c.refcountBits !== undefined) printed.set('refcount_bits', String(c.refcountBits));
    const fields = PRINT_ORDER.filter((k) => printed.has(k) || k in PRINT_DEFAULTS).map((k) => `${k}=${printed.get(k) ?? PRINT_DEFAULTS[k]}`);
    process.stdout.write(`Formatting '${filename}', fmt=qcow2 ${fields.join(' ')}\n`);
  }

  createRawFile(filename, 0);
  const node = await openNode({ driver: 'file', filename }).catch((e: unknown) => fail(oneLine(e)));
  try {
    const edge = attachRoot(CREATOR, node, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, shared: Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED });
    try {
      await createQcow2(edge, c);
    } finally {
      detachRoot(edge);
    }
  } catch (e) {
    fail(oneLine(e));
  } finally {
    unref(node);
  }
}
