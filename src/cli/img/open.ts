/**
 * Turning a command line's image (filename, -f, -t, -i, -U) into an open block graph with
 * an anonymous backend and a device handle, the way every `img` command uses an image.
 *
 * Filenames are either paths (a format node over a `file` node) or `json:{...}`, QEMU's
 * pseudo-protocol whose JSON is the full blockdev-add options of the tree.
 */
import { closeSync, existsSync, openSync, readSync, statSync } from 'node:fs';
import { createBackend, type BackendOptions, type BlockBackend } from '../../backend/backend.js';
import type { BackendIO } from '../../backend/io.js';
import { driverNames, getDriver } from '../../block/drivers/index.js';
import { openNode, unref } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { Perm, type NodeOptions } from '../../block/types.js';
import { CliError, oneLine } from '../fail.js';

export type CacheMode = 'none' | 'writeback' | 'writethrough' | 'directsync' | 'unsafe';
const CACHE_MODES: readonly string[] = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'];

export interface ImageSpec {
  filename: string;
  /** -f; undefined means probe. */
  fmt?: string;
  cache?: string;
  /** -i: threads | io_uring | native. */
  aio?: string;
  readOnly: boolean;
  /** -U: share every permission (read an image another process is writing). */
  forceShare?: boolean;
  /** Punch holes for zero writes (convert's target). */
  discardUnmap?: boolean;
}

export interface OpenImage {
  readonly backend: BlockBackend;
  readonly io: BackendIO;
  readonly node: BlockNode;
  close(): void;
}

const DEVICE = { id: 'img' } as const;

export function checkCacheMode(mode: string): CacheMode {
  if (!CACHE_MODES.includes(mode)) throw new CliError(`Invalid cache mode '${mode}' (none, writeback, writethrough, directsync, unsafe)`);
  return mode as CacheMode;
}

/** A format name that is (or is not yet) a driver; qcow2 gets its own message until it lands. */
export function checkFormat(fmt: string): void {
  if (!driverNames().includes(fmt) && fmt === 'qcow2') throw new CliError("Format 'qcow2' is not supported yet");
  getDriver(fmt); // throws "Unknown driver 'x' (known: ...)"
}

export function parseJsonFilename(filename: string): NodeOptions | undefined {
  if (!filename.startsWith('json:')) return undefined;
  let o: unknown;
  try {
    o = JSON.parse(filename.slice(5));
  } catch (e) {
    throw new CliError(`Could not parse the JSON options of '${filename}': ${oneLine(e)}`);
  }
  if (typeof o !== 'object' || o === null || Array.isArray(o)) throw new CliError(`'${filename}': the JSON options must be an object`);
  return o as NodeOptions;
}

/** What a probe finds in the first bytes: qcow2 or raw. */
export function probe(path: string): string {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    return 'raw'; // the real open reports the error, in the block layer's words
  }
  try {
    const head = Buffer.alloc(4);
    readSync(fd, head, 0, 4, 0);
    if (head.toString('latin1') === 'QFI\xfb') return 'qcow2';
  } catch {
    // unreadable (a directory, say): leave it to the open
  } finally {
    closeSync(fd);
  }
  return 'raw';
}

const PROBE_WARNING = (f: string): string =>
  `WARNING: Image format was not specified for '${f}' and probing guessed raw.\n` +
  '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
  "         Specify the 'raw' format explicitly to remove the restrictions.\n";

/** Applies the node-wide settings (cache, read-only, aio, discard) down the whole tree. */
function applyToTree(o: NodeOptions, spec: ImageSpec, cache: { direct: boolean; 'no-flush': boolean }): void {
  if (o.cache === undefined) o.cache = { ...cache };
  if (spec.readOnly) o['read-only'] = true;
  if (spec.discardUnmap && o.discard === undefined) o.discard = 'unmap';
  if (o.driver === 'file' && spec.aio !== undefined && o['aio'] === undefined) o['aio'] = spec.aio;
  for (const key of ['file', 'image', 'backing']) {
    const child = o[key];
    if (typeof child === 'object' && child !== null) applyToTree(child as NodeOptions, spec, cache);
  }
}

/** blockdev-add options for the image, and the format that was used. */
export function imageOptions(spec: ImageSpec, warn = true): NodeOptions {
  const mode = checkCacheMode(spec.cache ?? 'writeback');
  let aio = spec.aio;
  if (aio !== undefined) {
    if (!['threads', 'io_uring', 'native'].includes(aio)) throw new CliError(`Invalid aio option: ${aio}`);
    if (aio === 'native') {
      // Linux native AIO needs O_DIRECT in QEMU; keep its rule so command lines behave alike.
      if (mode !== 'none' && mode !== 'directsync') {
        throw new CliError(`Could not open '${spec.filename}': aio=native was specified, but it requires cache.direct=on, which was not specified.`);
      }
      aio = 'io_uring';
    }
  }
  const cache = { direct: mode === 'none' || mode === 'directsync', 'no-flush': mode === 'unsafe' };
  const json = parseJsonFilename(spec.filename);
  let o: NodeOptions;
  if (json) {
    o = structuredClone(json);
    if (spec.fmt !== undefined && spec.fmt !== o.driver) {
      checkFormat(spec.fmt);
      o = { driver: spec.fmt, file: o };
    }
  } else {
    let fmt = spec.fmt;
    if (fmt === undefined) {
      fmt = probe(spec.filename);
      // A missing file gets the open's one-line error, not a warning about probing it.
      if (fmt === 'raw' && warn && !spec.readOnly && existsSync(spec.filename)) process.stderr.write(PROBE_WARNING(spec.filename));
    }
    checkFormat(fmt);
    // The engine opens directories happily; an image never is one.
    if (statSync(spec.filename, { throwIfNoEntry: false })?.isDirectory()) {
      throw new CliError(`Could not open '${spec.filename}': Is a directory`);
    }
    o = { driver: fmt, file: { driver: 'file', filename: spec.filename } };
  }
  applyToTree(o, { ...spec, aio }, cache);
  return o;
}

/**
 * Opens the image under an anonymous backend with a device attached. Readers take
 * consistent-read, writers add write; both share reads (and everything with -U), so
 * image locks conflict with other users exactly as qemu-img's do.
 */
export async function openImage(spec: ImageSpec): Promise<OpenImage> {
  const perm = spec.readOnly ? Perm.CONSISTENT_READ : Perm.CONSISTENT_READ | Perm.WRITE;
  const shared = spec.forceShare ? Perm.ALL : Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED;
  const mode = spec.cache ?? 'writeback';
  // writethrough/directsync: the backend flushes after every write.
  return openUnderBackend(spec.filename, imageOptions(spec), { perm, shared, writeCache: mode !== 'writethrough' && mode !== 'directsync' });
}

/**
 * Opens `options` under an anonymous backend taking `want` and attaches the tool as its
 * device; errors name `filename`. The backend's root edge holds the only node reference.
 */
export async function openUnderBackend(filename: string, options: NodeOptions, want: BackendOptions): Promise<OpenImage> {
  let node: BlockNode;
  try {
    node = await openNode(options);
  } catch (e) {
    const msg = oneLine(e);
    throw new CliError(msg.startsWith('Could not open') ? msg : `Could not open '${filename}': ${msg}`);
  }
  let backend: BlockBackend;
  try {
    backend = createBackend(want, node);
  } catch (e) {
    unref(node);
    throw new CliError(`Could not open '${filename}': ${oneLine(e)}`);
  }
  unref(node);
  const io = backend.attachDevice(DEVICE, {});
  return {
    backend, io, node,
    close() {
      backend.detachDevice(DEVICE);
      backend.unref();
    },
  };
}
