// qcow2 against corrupt images: seeded, deterministic mutations of valid images that qemu-img
// and qemu-io build (header, L1, L2, refcount table and block, snapshot table, compressed
// data), each opened, read whole, written, flushed and closed by Spindle. Bad input must get
// a BlockError with an errno-like code and a message naming the image or the problem, never a
// crash, a hang, a raw RangeError/TypeError, or a changed file after corruption was reported;
// where qemu-img accepts the mutated image as consistent, Spindle must read what qemu reads.
//
// FUZZ_SEED=<n> picks another seed, FUZZ_CASES=<n> the number of cases per image.
import { closeSync, openSync, readFileSync, readSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BlockError } from '../../src/block/error.js';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../src/block/node.js';
import { Perm, type NodeOptions } from '../../src/block/types.js';
import { setWarningSink } from '../../src/block/warn.js';
import { compressedImage, createImage, qemuImg, qemuIo, run, sha256 } from '../helpers/qemu.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-qcow2-fuzz-');
const KiB = 1024;
const MiB = 1 << 20;
const SEED = Number(process.env['FUZZ_SEED'] ?? 0x5eed2024) >>> 0;
const CASES = Number(process.env['FUZZ_CASES'] ?? 60);
/** A case that has not finished after this long is a hang. */
const CASE_DEADLINE_MS = 20_000;
/** Disks longer than this (a mutated size) are read in part and not compared with qemu. */
const READ_CAP = 16 * MiB;
const ERRNO_CODES = new Set([
  'EIO', 'ENOSPC', 'ENOMEDIUM', 'EINVAL', 'EPERM', 'EACCES', 'EBUSY', 'ENOENT', 'ENOTSUP', 'EEXIST', 'EAGAIN',
  'ECANCELED', 'EROFS', 'EFBIG', 'ENOTDIR', 'EISDIR', 'ENXIO', 'EBADF', 'ENOMEM', 'EDQUOT', 'ETIMEDOUT',
]);
const user: BlockParent = { parentKind: 'job', describeUser: () => 'the qcow2 fuzz test' };

// ---------------------------------------------------------------------------------------------
// Deterministic randomness

function rng(seed: number): { int(n: number): number; pick<T>(a: readonly T[]): T; chance(p: number): boolean } {
  let x = seed >>> 0 || 1;
  const next = (): number => {
    // mulberry32
    x = (x + 0x6d2b79f5) >>> 0;
    let t = x;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    int: (n) => Math.floor(next() * n),
    pick: (a) => a[Math.floor(next() * a.length)]!,
    chance: (p) => next() < p,
  };
}
type Rng = ReturnType<typeof rng>;

// ---------------------------------------------------------------------------------------------
// Where the structures are (read from the header and the tables of the pristine image)

interface Region {
  name: string;
  off: number;
  len: number;
  /** Entry width in bytes for entry tables (8, or 16 for extended L2), 0 for byte regions. */
  entry: number;
}

interface Layout {
  cs: number;
  cb: number;
  fileLen: number;
  headerEnd: number;
  /** Offsets of the header extensions' type/length heads. */
  exts: number[];
  l1: Region;
  l2s: Region[];
  reftable: Region;
  refblocks: Region[];
  refBits: number;
  snap: Region | null;
  snapEntries: number[];
  /** Compressed data (compressed images): where the first compressed clusters' bytes are. */
  cdata: Region | null;
  /** Interesting offsets for targeted entry values. */
  metadata: number[];
}

const MASK = 0x00fffffffffffe00n;

function layout(b: Buffer): Layout {
  const cb = b.readUInt32BE(20);
  const cs = 2 ** cb;
  const version = b.readUInt32BE(4);
  const incompat = version === 3 ? b.readBigUInt64BE(72) : 0n;
  const ext = (incompat & 16n) !== 0n;
  const hlen = version === 3 ? b.readUInt32BE(100) : 72;
  const refOrder = version === 3 ? b.readUInt32BE(96) : 4;
  const exts: number[] = [];
  let off = hlen;
  while (off + 8 <= cs) {
    const t = b.readUInt32BE(off);
    if (t === 0) break;
    exts.push(off);
    off += 8 + Math.ceil(b.readUInt32BE(off + 4) / 8) * 8;
  }
  let headerEnd = off + 8;
  const bfo = Number(b.readBigUInt64BE(8));
  if (bfo) headerEnd = Math.max(headerEnd, bfo + b.readUInt32BE(16));
  const l1Size = b.readUInt32BE(36);
  const l1Off = Number(b.readBigUInt64BE(40));
  const l1: Region = { name: 'L1', off: l1Off, len: l1Size * 8, entry: 8 };
  const l2s: Region[] = [];
  for (let i = 0; i < l1Size; i++) {
    const o = Number(b.readBigUInt64BE(l1Off + i * 8) & MASK);
    if (o) l2s.push({ name: 'L2', off: o, len: cs, entry: ext ? 16 : 8 });
  }
  const rtOff = Number(b.readBigUInt64BE(48));
  const rtLen = b.readUInt32BE(56) * cs;
  const reftable: Region = { name: 'reftable', off: rtOff, len: rtLen, entry: 8 };
  const refblocks: Region[] = [];
  for (let i = 0; i < rtLen / 8; i++) {
    const o = Number(b.readBigUInt64BE(rtOff + i * 8) & ~0x1ffn);
    if (o) refblocks.push({ name: 'refblock', off: o, len: cs, entry: 0 });
  }
  const nbSnap = b.readUInt32BE(60);
  const snapOff = Number(b.readBigUInt64BE(64));
  let snap: Region | null = null;
  const snapEntries: number[] = [];
  if (nbSnap) {
    let p = snapOff;
    for (let i = 0; i < nbSnap; i++) {
      snapEntries.push(p);
      const extra = b.readUInt32BE(p + 36);
      const idLen = b.readUInt16BE(p + 12);
      const nameLen = b.readUInt16BE(p + 14);
      p += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
    }
    snap = { name: 'snapshots', off: snapOff, len: p - snapOff, entry: 0 };
  }
  let cdata: Region | null = null;
  for (const t of l2s) {
    for (let p = 0; p < cs && !cdata; p += t.entry) {
      const v = b.readBigUInt64BE(t.off + p);
      if (v & (1n << 62n)) {
        const x = BigInt(62 - (cb - 8));
        const o = Number(v & ((1n << x) - 1n));
        const sectors = Number((v >> x) & ((1n << BigInt(cb - 8)) - 1n)) + 1;
        cdata = { name: 'compressed data', off: o, len: (Math.floor(o / 512) + sectors) * 512 - o, entry: 0 };
      }
    }
  }
  const metadata = [0, l1Off, rtOff, ...l2s.map((r) => r.off), ...refblocks.map((r) => r.off)];
  if (snap) metadata.push(snapOff);
  return {
    cs, cb, fileLen: b.length, headerEnd, exts, l1, l2s, reftable, refblocks, refBits: 2 ** refOrder, snap, snapEntries, cdata, metadata,
  };
}

// ---------------------------------------------------------------------------------------------
// Mutations: 1-8 bytes per case, random or aimed at fields and entries

interface Mutation {
  what: string;
  apply(b: Buffer): void;
}

function put64(b: Buffer, off: number, v: bigint): void {
  b.writeBigUInt64BE(BigInt.asUintN(64, v), off);
}

/** Offsets an entry may be aimed at: past EOF, unaligned, huge, onto other metadata, zero. */
function targetOffsets(L: Layout, r: Rng): bigint[] {
  const end = BigInt(Math.ceil(L.fileLen / L.cs) * L.cs);
  const cs = BigInt(L.cs);
  return [
    0n, end, end + cs * 1000n, 1n << 40n, 1n << 52n, (1n << 56n) - cs, BigInt(r.pick(L.metadata)) + 512n * BigInt(1 + r.int(3)),
    BigInt(r.pick(L.metadata)), BigInt(r.pick(L.metadata)), BigInt(L.cs * (1 + r.int(Math.max(1, L.fileLen / L.cs)))),
  ];
}

function byteRegionMutation(reg: Region, r: Rng): Mutation {
  const n = 1 + r.int(8);
  const edits: [number, number][] = [];
  for (let i = 0; i < n; i++) edits.push([reg.off + r.int(reg.len), r.pick([0, 0xff, 0x80, 0x7f, 1, r.int(256), r.int(256)])]);
  return {
    what: `${reg.name}: ${edits.map(([o, v]) => `[${o}]=0x${v.toString(16)}`).join(' ')}`,
    apply: (b) => edits.forEach(([o, v]) => (b[o] = v)),
  };
}

function entryMutation(L: Layout, reg: Region, b0: Buffer, r: Rng): Mutation {
  const count = reg.len / reg.entry;
  const live: number[] = [];
  for (let i = 0; i < count; i++) if (b0.readBigUInt64BE(reg.off + i * reg.entry) !== 0n) live.push(i);
  const i = live.length && r.chance(0.8) ? r.pick(live) : r.int(count);
  const pos = reg.off + i * reg.entry;
  const old = b0.readBigUInt64BE(pos);
  const kind = r.int(reg.entry === 16 ? 9 : 7);
  let v = old;
  let what: string;
  switch (kind) {
    case 0: {
      const bit = r.pick([63, 62, 61, 56, 55, 9, 1, 0]);
      v = old ^ (1n << BigInt(bit));
      what = `flip bit ${bit}`;
      break;
    }
    case 1:
    case 2: {
      const t = r.pick(targetOffsets(L, r));
      v = (old & ~MASK) | (t & MASK) | (r.chance(0.5) ? 1n << 63n : 0n);
      if (t & 0x1ffn) v |= t & 0x1ffn; // unaligned
      what = `offset ${t}`;
      break;
    }
    case 3:
      v = 0n;
      what = 'zeroed';
      break;
    case 4:
      v = r.pick([0xffffffffffffffffn, 0x7fffffffffffffffn, 1n << 62n, (1n << 62n) | ((1n << 62n) - 1n), 1n << 63n]);
      what = `= 0x${v.toString(16)}`;
      break;
    case 5: {
      const j = r.pick(live.length ? live : [0]);
      v = b0.readBigUInt64BE(reg.off + j * reg.entry);
      what = `copy of entry ${j}`;
      break;
    }
    case 6: {
      const byte = r.int(8);
      const val = r.int(256);
      return { what: `${reg.name}@${reg.off} entry ${i} byte ${byte} = 0x${val.toString(16)}`, apply: (b) => void (b[pos + byte] = val) };
    }
    default: {
      // Extended L2: the subcluster bitmap half.
      const bm = r.pick([0xffffffffffffffffn, 0xffffffffn, 0xffffffff00000000n, 0x0000000100000001n, 0n, 1n << BigInt(r.int(64))]);
      return {
        what: `${reg.name}@${reg.off} entry ${i} bitmap = 0x${bm.toString(16)}`,
        apply: (b) => put64(b, pos + 8, kind === 7 ? bm : b.readBigUInt64BE(pos + 8) ^ bm),
      };
    }
  }
  return { what: `${reg.name}@${reg.off} entry ${i} ${what}`, apply: (b) => put64(b, pos, v) };
}

function refblockMutation(L: Layout, reg: Region, r: Rng): Mutation {
  const bits = L.refBits;
  const used = Math.ceil(L.fileLen / L.cs);
  const i = r.chance(0.85) ? r.int(Math.min(used, (L.cs * 8) / bits)) : r.int((L.cs * 8) / bits);
  const max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
  const val = r.pick([0, 0, 1, 2, max]);
  return {
    what: `refblock@${reg.off} refcount ${i} = ${val}`,
    apply: (b) => {
      if (bits < 8) {
        const per = 8 / bits;
        const at = reg.off + Math.floor(i / per);
        const shift = (i % per) * bits;
        const mask = ((1 << bits) - 1) << shift;
        b[at] = (b[at]! & ~mask) | ((val << shift) & mask);
      } else {
        const at = reg.off + (i * bits) / 8;
        if (bits === 8) b[at] = val;
        else if (bits === 16) b.writeUInt16BE(val, at);
        else if (bits === 32) b.writeUInt32BE(val >>> 0, at);
        else put64(b, at, BigInt(val));
      }
    },
  };
}

const HEADER_FIELDS: [string, number, number][] = [
  ['version', 4, 4], ['backing_file_offset', 8, 8], ['backing_file_size', 16, 4], ['cluster_bits', 20, 4],
  ['size', 24, 8], ['crypt_method', 32, 4], ['l1_size', 36, 4], ['l1_table_offset', 40, 8],
  ['refcount_table_offset', 48, 8], ['refcount_table_clusters', 56, 4], ['nb_snapshots', 60, 4],
  ['snapshots_offset', 64, 8], ['incompatible_features', 72, 8], ['compatible_features', 80, 8],
  ['autoclear_features', 88, 8], ['refcount_order', 96, 4], ['header_length', 100, 4],
];

function headerMutation(L: Layout, b0: Buffer, r: Rng): Mutation {
  if (L.exts.length && r.chance(0.15)) {
    const e = r.pick(L.exts);
    const which = r.int(3);
    const val = which === 0 ? r.pick([0xffffffff, L.cs, 0, 7, b0.readUInt32BE(e + 4) + 8]) : r.pick([0, 0x0537be77, 0x44415441, 0xe2792aca]);
    const at = which === 0 ? e + 4 : e;
    return { what: `extension@${e} ${which === 0 ? 'length' : 'type'} = 0x${val.toString(16)}`, apply: (b) => b.writeUInt32BE(val >>> 0, at) };
  }
  const [name, off, width] = r.pick(HEADER_FIELDS);
  const old = width === 8 ? b0.readBigUInt64BE(off) : BigInt(b0.readUInt32BE(off));
  const ends = BigInt(Math.ceil(L.fileLen / L.cs) * L.cs);
  const choices: bigint[] = [0n, 1n, old + 1n, old - 1n, old * 2n, old * 1000n, old ^ (1n << BigInt(r.int(width * 8))), (1n << BigInt(width * 8)) - 1n];
  if (width === 8) choices.push(1n << 63n, 1n << 53n, (1n << 55n) + 512n, ends, ends + 1000n * BigInt(L.cs), old + 512n, BigInt(r.pick(L.metadata)));
  else choices.push(0x80000000n, 22n, 8n, 7n, BigInt(r.int(70)));
  if (name.endsWith('_features')) choices.push(old | (1n << BigInt(r.pick([0, 1, 2, 3, 4, 5, 63]))));
  const v = BigInt.asUintN(width * 8, r.pick(choices));
  return {
    what: `header ${name} = ${v}`,
    apply: (b) => (width === 8 ? put64(b, off, v) : b.writeUInt32BE(Number(v), off)),
  };
}

function snapshotMutation(L: Layout, b0: Buffer, r: Rng): Mutation {
  const e = r.pick(L.snapEntries);
  const fields: [string, number, number][] = [
    ['l1_table_offset', 0, 8], ['l1_size', 8, 4], ['id_len', 12, 2], ['name_len', 14, 2], ['vm_state_size', 32, 4],
    ['extra_size', 36, 4], ['vm_state_size64', 40, 8], ['disk_size', 48, 8],
  ];
  const [name, off, width] = r.pick(fields);
  const at = e + off;
  const old = width === 8 ? b0.readBigUInt64BE(at) : width === 4 ? BigInt(b0.readUInt32BE(at)) : BigInt(b0.readUInt16BE(at));
  const ones = (1n << BigInt(width * 8)) - 1n;
  const v = BigInt.asUintN(width * 8, r.pick([0n, ones, old + 1n, old + 512n, old * 1000n, BigInt(L.fileLen) * 4n, BigInt(r.pick(L.metadata))]));
  return {
    what: `snapshot@${e} ${name} = ${v}`,
    apply: (b) => (width === 8 ? put64(b, at, v) : width === 4 ? b.writeUInt32BE(Number(v), at) : b.writeUInt16BE(Number(v), at)),
  };
}

/** One case: a region picked by weight, then a random-bytes or a targeted mutation. */
function mutation(L: Layout, b0: Buffer, r: Rng): Mutation {
  const regions: [number, () => Mutation][] = [
    [3, () => (r.chance(0.7) ? headerMutation(L, b0, r) : byteRegionMutation({ name: 'header', off: 0, len: L.headerEnd, entry: 0 }, r))],
    [2, () => (r.chance(0.75) ? entryMutation(L, L.l1, b0, r) : byteRegionMutation(L.l1, r))],
    [2, () => (r.chance(0.75) ? entryMutation(L, L.reftable, b0, r) : byteRegionMutation({ ...L.reftable, len: Math.min(L.reftable.len, 8 * Math.max(1, L.refblocks.length + 1)) }, r))],
  ];
  if (L.l2s.length) {
    regions.push([4, () => {
      const t = r.pick(L.l2s);
      return r.chance(0.8) ? entryMutation(L, t, b0, r) : byteRegionMutation(t, r);
    }]);
  }
  if (L.refblocks.length) {
    regions.push([2, () => {
      const t = r.pick(L.refblocks);
      return r.chance(0.7) ? refblockMutation(L, t, r) : byteRegionMutation({ ...t, len: Math.min(t.len, Math.ceil((Math.ceil(L.fileLen / L.cs) * L.refBits) / 8) + 8) }, r);
    }]);
  }
  if (L.snap) regions.push([3, () => (r.chance(0.7) ? snapshotMutation(L, b0, r) : byteRegionMutation(L.snap!, r))]);
  if (L.cdata) regions.push([2, () => byteRegionMutation(L.cdata!, r)]);
  const total = regions.reduce((a, [w]) => a + w, 0);
  let k = r.int(total);
  for (const [w, f] of regions) {
    if (k < w) return f();
    k -= w;
  }
  throw new Error('unreachable');
}

// ---------------------------------------------------------------------------------------------
// The images

interface Base {
  name: string;
  path: string;
  bytes: Buffer;
  layout: Layout;
  /** Files the image depends on (backing): must never change. */
  deps: { path: string; sum: string }[];
}
const bases = new Map<string, Base>();

function addBase(name: string, path: string, deps: string[] = []): void {
  const bytes = readFileSync(path);
  const chk = run('qemu-img', ['check', '-f', 'qcow2', path]);
  if (chk.status !== 0) throw new Error(`base image ${name} is not clean:\n${chk.stdout}${chk.stderr}`);
  bases.set(name, { name, path, bytes, layout: layout(bytes), deps: deps.map((p) => ({ path: p, sum: sha256(readFileSync(p)) })) });
}

function buildImages(): void {
  const p64 = createImage(join(dir, 'v3-64k.qcow2'), 4 * MiB);
  qemuIo(p64, [
    'write -P 0x11 0 192k', 'write -P 0x22 300k 70k', 'write -z 512k 128k', 'write -P 0x33 1M 256k', 'discard 1088k 128k',
    'write -P 0x44 3M 64k', 'write -z 3M 64k', 'write -P 0x55 4092k 4k',
  ]);
  addBase('v3-64k', p64);

  const p512 = createImage(join(dir, 'c512-rc1.qcow2'), 1 * MiB, ['cluster_size=512', 'refcount_bits=1']);
  qemuIo(p512, ['write -P 0x61 0 4k', 'write -P 0x62 100k 1500', 'write -z 200k 2k', 'write -P 0x63 600k 40k', 'discard 610k 8k', 'write -P 0x64 1020k 4k']);
  addBase('c512-rc1', p512);

  const pext = createImage(join(dir, 'extl2.qcow2'), 4 * MiB, ['extended_l2=on', 'cluster_size=64k']);
  qemuIo(pext, ['write -P 0x71 0 4k', 'write -P 0x72 70k 10k', 'write -z 200k 64k', 'write -P 0x73 1M 128k', 'write -z 1028k 8k', 'discard 1088k 64k', 'write -P 0x74 3M 3k']);
  addBase('extl2', pext);

  const pc = join(dir, 'compressed.qcow2');
  compressedImage(pc, 2 * MiB, 77);
  addBase('compressed', pc);

  const ps = createImage(join(dir, 'snapshot.qcow2'), 4 * MiB);
  qemuIo(ps, ['write -P 0x81 0 256k', 'write -P 0x82 1M 100k']);
  qemuImg(['snapshot', '-c', 'snap1', ps]);
  qemuIo(ps, ['write -P 0x83 64k 64k', 'write -P 0x84 1060k 10k', 'write -P 0x85 2M 64k']);
  addBase('snapshot', ps);

  const base = createImage(join(dir, 'backing-base.qcow2'), 4 * MiB);
  qemuIo(base, ['write -P 0x91 0 4M']);
  const ov = createImage(join(dir, 'overlay.qcow2'), 4 * MiB, [], { file: base, fmt: 'qcow2' });
  qemuIo(ov, ['write -P 0x92 64k 64k', 'write -P 0x93 1000k 100k', 'write -z 2M 128k', 'discard 3M 64k']);
  addBase('backing', ov, [base]);
}

// ---------------------------------------------------------------------------------------------
// Running one case

interface Failure {
  op: string;
  err: unknown;
}
interface Stats {
  cases: number;
  openFailed: number;
  readOnly: number;
  readErrors: number;
  writeErrors: number;
  clean: number;
  comparedWithQemu: number;
  messages: Map<string, number>;
}
const stats: Stats = { cases: 0, openFailed: 0, readOnly: 0, readErrors: 0, writeErrors: 0, clean: 0, comparedWithQemu: 0, messages: new Map() };

function fileSum(p: string): string {
  // A corrupt entry may make a file huge (a sparse write far away): its size tells it changed.
  const size = statSync(p).size;
  return size > 256 * MiB ? `size:${size}` : sha256(readFileSync(p));
}

/** The first `n` bytes of a file (which may have become huge). */
function head(p: string, n: number): Buffer {
  const fd = openSync(p, 'r');
  try {
    const b = Buffer.alloc(n);
    readSync(fd, b, 0, n, 0);
    return b;
  } finally {
    closeSync(fd);
  }
}

/** Header bytes Spindle never rewrites here: magic, version, backing name, cluster bits, size, crypt. */
const FIXED_HEADER = 36;

function normalise(msg: string, path: string): string {
  return msg.split(path).join('<img>').replace(/#block\d+/g, '#blockN').replace(/\b(0x)?\d+\b/g, 'N').slice(0, 160);
}

function withDeadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const t = new Promise<never>((_, rej) => {
    timer = setTimeout(() => rej(new Error(`${what}: did not finish within ${ms} ms (hang)`)), ms);
  });
  return Promise.race([p, t]).finally(() => clearTimeout(timer));
}

const isCorruptReport = (e: unknown): boolean => e instanceof BlockError && /corrupt/i.test(e.message);

/** Runs one mutated image; returns the problems found (empty: the case passed). */
async function runCase(base: Base, idx: number, m: Mutation): Promise<string[]> {
  const problems: string[] = [];
  const path = join(dir, `${base.name}-case${idx}.qcow2`);
  const img = Buffer.from(base.bytes);
  m.apply(img);
  writeFileSync(path, img);
  const sum0 = sha256(img);
  const failures: Failure[] = [];
  const fail = (op: string, err: unknown): void => void failures.push({ op, err });
  const L = base.layout;
  const warnings: string[] = [];
  const oldSink = setWarningSink((w) => void warnings.push(w));
  let node: BlockNode | null = null;
  let edge: BlockChild | null = null;
  /** sha256 of the file when corruption was first reported: nothing may change it later. */
  let sumAtDetection: string | null = null;
  let detectedBy = '';
  const noteDetection = (op: string, e: unknown): void => {
    if (sumAtDetection === null && isCorruptReport(e)) {
      sumAtDetection = fileSum(path);
      detectedBy = op;
    }
  };
  let readOnlyOpen = false;
  /** sha256 of the file when it was opened for the session (a failed open may have changed it). */
  let sumAtOpen = sum0;
  try {
    const opts = (ro: boolean): NodeOptions => ({ driver: 'qcow2', file: { driver: 'file', filename: path }, ...(ro ? { 'read-only': true } : {}) });
    try {
      node = await openNode(opts(false));
    } catch (e) {
      fail('open', e);
      const sum1 = fileSum(path);
      if (sum1 !== sum0) problems.push(`the failed read-write open changed the file (${String(e)})`);
      try {
        node = await openNode(opts(true));
        readOnlyOpen = true;
        sumAtOpen = sum1;
      } catch (e2) {
        fail('open read-only', e2);
        if (fileSum(path) !== sum1) problems.push('the failed read-only open changed the file');
        stats.openFailed++;
      }
    }
    if (node) {
      const writable = !node.readOnly;
      if (!writable) {
        readOnlyOpen = true;
        stats.readOnly++;
      }
      edge = attachRoot(user, node, 'root', { perm: Perm.CONSISTENT_READ | (writable ? Perm.WRITE : 0), shared: Perm.ALL });
      const len = node.length;
      const readLen = Math.min(len, READ_CAP);
      const got = Buffer.alloc(readLen);
      const r = rng(SEED ^ (idx * 7919));
      let readOk = true;
      for (let pos = 0; pos < readLen; ) {
        const n = Math.min(readLen - pos, r.pick([L.cs, 3 * L.cs + 512, 64 * KiB, 192 * KiB, 4096]));
        try {
          await io.read(edge, pos, got.subarray(pos, pos + n));
        } catch (e) {
          readOk = false;
          fail(`read ${pos}+${n}`, e);
          noteDetection('read', e);
        }
        pos += n;
      }
      if (!readOk) stats.readErrors++;
      // Writes: a whole cluster, one across a cluster boundary, a small one.
      const writes: [number, Buffer][] = [];
      if (writable && len >= 2 * L.cs) {
        const clusters = Math.floor(Math.min(len, READ_CAP) / L.cs);
        writes.push([r.int(clusters) * L.cs, pattern(L.cs, idx * 3 + 1)]);
        const b = (1 + r.int(clusters - 1)) * L.cs;
        writes.push([b - 300, pattern(700, idx * 3 + 2)]);
        writes.push([Math.floor(r.int(Math.min(len, READ_CAP) - 512) / 512) * 512, pattern(512, idx * 3 + 3)]);
      }
      let writeOk = true;
      for (const [off, data] of writes) {
        try {
          await io.write(edge, off, data);
        } catch (e) {
          writeOk = false;
          fail(`write ${off}+${data.length}`, e);
          noteDetection('write', e);
        }
      }
      if (writable) {
        try {
          await io.flush(edge);
        } catch (e) {
          writeOk = false;
          fail('flush', e);
          noteDetection('flush', e);
        }
      }
      if (!writeOk) stats.writeErrors++;
      detachRoot(edge);
      edge = null;
      unref(node);
      node = null;
      await settleCloses();

      const after = fileSum(path);
      if (readOnlyOpen && after !== sumAtOpen) problems.push('a read-only session changed the file');
      if (sumAtDetection !== null && after !== sumAtDetection) problems.push(`the file changed after the ${detectedBy} reported corruption`);
      if (!head(path, FIXED_HEADER).equals(img.subarray(0, FIXED_HEADER))) problems.push('the image header was overwritten');

      // Writes that reported success left an image Spindle still opens and reads them from.
      if (!failures.length && writes.length) {
        let again: BlockNode | null = null;
        let e2: BlockChild | null = null;
        try {
          again = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: path }, 'read-only': true });
          e2 = attachRoot(user, again, 'root', { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
          for (const [off, data] of writes) await io.read(e2, off, Buffer.alloc(data.length));
        } catch (e) {
          problems.push(`every request succeeded, but the image no longer opens or reads back: ${String(e)}`);
        } finally {
          if (e2) detachRoot(e2);
          if (again) unref(again);
          await settleCloses();
        }
      }

      // Where qemu-img calls the mutated image consistent, both must read the same.
      if (readOk && len <= READ_CAP) {
        const ref = join(dir, `${base.name}-case${idx}.ref.qcow2`);
        writeFileSync(ref, img);
        try {
          const chk = run('qemu-img', ['check', '-f', 'qcow2', ref]);
          if (chk.status === 0 || chk.status === 3) {
            const raw = `${ref}.raw`;
            const conv = run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', ref, raw]);
            if (conv.status === 0) {
              const want = readFileSync(raw);
              rmSync(raw, { force: true });
              stats.comparedWithQemu++;
              if (!want.equals(got)) {
                let i = 0;
                while (i < got.length && got[i] === want[i]) i++;
                problems.push(`read differs from qemu-img convert at byte ${i} (got ${got[i]}, qemu ${want[i]}; lengths ${got.length}/${want.length})`);
              } else if (writeOk && writes.length) {
                // The writes must read back (qemu's view of the file Spindle wrote), and the
                // file must stay consistent.
                for (const [off, data] of writes) data.copy(want, off);
                const post = run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', path, raw]);
                if (post.status !== 0) problems.push(`qemu-img cannot read the image after Spindle's writes: ${post.stderr}`);
                else {
                  const now = readFileSync(raw);
                  rmSync(raw, { force: true });
                  if (!now.equals(want)) problems.push("qemu-img reads something else than Spindle wrote");
                }
                const pchk = run('qemu-img', ['check', '-f', 'qcow2', path]);
                if (pchk.status !== 0 && pchk.status !== 3) problems.push(`qemu-img check after Spindle's writes: exit ${pchk.status}\n${pchk.stdout}`);
              }
            }
          }
        } finally {
          rmSync(ref, { force: true });
        }
      }
    }
  } catch (e) {
    problems.push(`unexpected: ${e instanceof Error ? e.stack : String(e)}`);
  } finally {
    setWarningSink(oldSink);
    if (edge) detachRoot(edge);
    if (node && !node.deleted) unref(node);
    await settleCloses();
  }
  for (const d of base.deps) if (sha256(readFileSync(d.path)) !== d.sum) problems.push(`the backing file ${d.path} changed`);
  // Every failure is a BlockError with an errno-like code and a message that says something.
  for (const f of failures) {
    const e = f.err;
    if (!(e instanceof BlockError)) {
      problems.push(`${f.op}: not a BlockError: ${e instanceof Error ? e.stack : String(e)}`);
      continue;
    }
    if (!ERRNO_CODES.has(e.code)) problems.push(`${f.op}: code ${e.code} is not errno-like`);
    if (!/qcow2|corrupt|image|'[^']+'/i.test(e.message)) problems.push(`${f.op}: message names neither the image nor the problem: ${e.message}`);
    const k = `${e.code} ${normalise(e.message, path)}`;
    stats.messages.set(k, (stats.messages.get(k) ?? 0) + 1);
  }
  if (process.env['FUZZ_VERBOSE']) {
    console.log(`${base.name} case ${idx} (${m.what}): ${failures.map((f) => `${f.op}: ${String(f.err)}`).join(' | ') || 'no error'}`);
  }
  if (!failures.length) stats.clean++;
  stats.cases++;
  if (!problems.length) rmSync(path, { force: true });
  return problems;
}

// ---------------------------------------------------------------------------------------------

beforeAll(() => {
  buildImages();
}, 60_000);

afterAll(() => {
  const msgs = [...stats.messages.entries()].sort((a, b) => b[1] - a[1]);
  const lines = [
    `qcow2 fuzz (seed ${SEED}): ${stats.cases} cases; open refused ${stats.openFailed}, read-only ${stats.readOnly}, read errors ${stats.readErrors}, ` +
      `write errors ${stats.writeErrors}, no error ${stats.clean}, compared with qemu-img ${stats.comparedWithQemu}`,
    `${msgs.length} distinct failure messages:`,
    ...msgs.map(([m, n]) => `  ${String(n).padStart(4)}  ${m}`),
  ];
  console.log(lines.join('\n'));
});

describe('qcow2 fuzz: targeted cases', () => {
  // open() used to clear the autoclear bits (a header write) before it opened the backing
  // file, so an open that then failed had changed the file.
  it('a read-write open that fails on the backing file leaves the file unchanged (autoclear set)', async () => {
    const base = bases.get('backing')!;
    const img = Buffer.from(base.bytes);
    img[95] = img[95]! | 1; // autoclear: bitmaps
    const bfo = Number(img.readBigUInt64BE(8));
    img[bfo + img.readUInt32BE(16) - 1] = 0x5f; // the backing file name no longer exists
    const p = join(dir, 'autoclear-bad-backing.qcow2');
    writeFileSync(p, img);
    const err = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: p } }).then(
      (n) => (unref(n), null),
      (e: unknown) => e,
    );
    await settleCloses();
    expect(err).toBeInstanceOf(BlockError);
    expect(sha256(readFileSync(p))).toBe(sha256(img));
  });
});

describe('qcow2 fuzz: targeted cases (reads)', () => {
  // A request over several L2 tables whose first cluster is a corrupt compressed one: its
  // read fails while the request still waits for the next L2 table to load. That failure
  // must reach the caller, not surface as an unhandled rejection (which ends a Node process).
  it('a failing cluster read inside a longer request is reported, not left unhandled', async () => {
    const base = bases.get('c512-rc1')!;
    const L = base.layout;
    const img = Buffer.from(base.bytes);
    const first = L.l2s[0]!;
    // Compressed, at a host offset past the end of the file.
    put64(img, first.off, (1n << 62n) | BigInt(L.fileLen + 64 * L.cs));
    const p = join(dir, 'compressed-past-eof.qcow2');
    writeFileSync(p, img);
    const n = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: p }, 'read-only': true });
    const e = attachRoot(user, n, 'root', { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    try {
      // Guest [0, 128 KiB): 4 L2 tables of 512-byte clusters (the 4th maps data at 100 KiB);
      // only the first is loaded when the compressed read fails.
      const err = await io.read(e, 0, Buffer.alloc(128 * KiB)).then(() => null, (x: unknown) => x);
      expect(err).toBeInstanceOf(BlockError);
      expect((err as BlockError).message).toMatch(/corrupt/);
    } finally {
      detachRoot(e);
      unref(n);
      await settleCloses();
    }
  });
});

describe('qcow2 fuzz: mutated images get clear errors, no crash, no hang, no damage', () => {
  for (const name of ['v3-64k', 'c512-rc1', 'extl2', 'compressed', 'snapshot', 'backing']) {
    it(name, async () => {
      const base = bases.get(name)!;
      const r = rng(SEED + [...name].reduce((a, c) => a * 31 + c.charCodeAt(0), 0));
      const report: string[] = [];
      for (let i = 0; i < CASES; i++) {
        const m = mutation(base.layout, base.bytes, r);
        const problems = await withDeadline(runCase(base, i, m), CASE_DEADLINE_MS, `${name} case ${i} (${m.what})`).catch((e: unknown) => [String(e)]);
        if (problems.length) report.push(`${name} case ${i} (${m.what}):\n    ${problems.join('\n    ')}`);
      }
      expect(report, report.join('\n')).toEqual([]);
    }, 120_000);
  }
});
