// Crash safety of qcow2 metadata: for a workload of allocating writes, in-place writes,
// discards, write-zeroes, a grow and internal snapshots (create, delete), stop every write to
// the image file after write N (blkdebug x-stop-writes-after), for every N. Each result must
// pass `qemu-img check` with at most leaked clusters, every acknowledged write must read back
// (through QEMU), and an acknowledged snapshot must exist (or be gone) with its data.
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import type { BackendIO } from '../../src/backend/io.js';
import { blkdebugWrites } from '../../src/block/drivers/blkdebug.js';
import { createSnapshot, deleteSnapshot } from '../../src/block/drivers/qcow2/snapshot.js';
import { openNode, settleCloses, unref, withDrained } from '../../src/block/graph.js';
import { setWarningSink } from '../../src/block/warn.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-crash-');
const MiB = 1 << 20;

function run(cmd: string, args: string[]) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.error) throw new Error(`${cmd} is needed by this test (Debian qemu-utils): ${r.error.message}`);
  return r;
}

type Op =
  | { op: 'write'; off: number; len: number; seed: number }
  | { op: 'discard'; off: number; len: number }
  | { op: 'zero'; off: number; len: number }
  | { op: 'grow'; size: number }
  | { op: 'snapshot' | 'delete-snapshot'; name: string };

/** A fixed workload over a 4 MiB image with 4 KiB clusters, growing to 6 MiB. */
function workload(): Op[] {
  const ops: Op[] = [];
  let x = 12345;
  const rnd = (n: number) => ((x = (x * 1103515245 + 12345) >>> 0) % n);
  for (let i = 0; i < 14; i++) ops.push({ op: 'write', off: rnd(1000) * 4096 + (i % 3 ? rnd(4096) : 0), len: 1 + rnd(3 * 4096), seed: i });
  // From here on the writes, discards and zeroes meet clusters shared with s1.
  ops.push({ op: 'snapshot', name: 's1' });
  ops.push({ op: 'discard', off: 0, len: 64 * 1024 });
  ops.push({ op: 'zero', off: 512 * 1024, len: 32 * 1024 });
  for (let i = 0; i < 4; i++) ops.push({ op: 'write', off: rnd(200) * 4096, len: 4096, seed: 100 + i }); // some in place
  ops.push({ op: 'grow', size: 6 * MiB });
  for (let i = 0; i < 4; i++) ops.push({ op: 'write', off: 4 * MiB + rnd(400) * 4096 + 17, len: 5000, seed: 200 + i });
  ops.push({ op: 'snapshot', name: 's2' });
  ops.push({ op: 'delete-snapshot', name: 's1' });
  ops.push({ op: 'discard', off: 4 * MiB, len: 128 * 1024 });
  return ops;
}

interface Model {
  data: Buffer;
  /** 1 where the content is unknown (an unacknowledged request touched it). */
  unsure: Uint8Array;
  size: number;
  sizeUnsure: boolean;
  /** Snapshots by name: their data (with its unsure bytes) if they must exist, 'gone' if they must not, 'unsure'. */
  snapshots: Map<string, { data: Buffer; unsure: Uint8Array; size: number } | 'gone' | 'unsure'>;
}

type SnapOp = (op: 'snapshot' | 'delete-snapshot', name: string) => Promise<void>;

async function apply(io: BackendIO, grow: (n: number) => Promise<void>, snap: SnapOp, ops: Op[], m: Model): Promise<void> {
  for (const o of ops) {
    try {
      if (o.op === 'snapshot' || o.op === 'delete-snapshot') {
        m.snapshots.set(o.name, 'unsure');
        await snap(o.op, o.name);
        const data = { data: Buffer.from(m.data.subarray(0, m.size)), unsure: m.unsure.slice(0, m.size), size: m.size };
        m.snapshots.set(o.name, o.op === 'snapshot' ? data : 'gone');
        continue;
      }
      if (o.op === 'write') {
        const buf = pattern(o.len, o.seed);
        await io.write(o.off, buf);
        await io.flush();
        m.data.set(buf, o.off);
        m.unsure.fill(0, o.off, o.off + o.len);
      } else if (o.op === 'discard') {
        await io.discard(o.off, o.len);
        await io.flush();
        m.data.fill(0, o.off, o.off + o.len);
        m.unsure.fill(0, o.off, o.off + o.len);
      } else if (o.op === 'zero') {
        await io.writeZeroes(o.off, o.len, false);
        await io.flush();
        m.data.fill(0, o.off, o.off + o.len);
        m.unsure.fill(0, o.off, o.off + o.len);
      } else if (o.op === 'grow') {
        await grow(o.size);
        m.size = o.size;
      }
    } catch {
      if (o.op === 'grow') m.sizeUnsure = true;
      else if (o.op === 'write' || o.op === 'discard' || o.op === 'zero') m.unsure.fill(1, o.off, o.off + o.len);
    }
  }
}

async function crashRun(base: string, stopAfter: number, tag: string) {
  const img = join(dir, `${tag}.qcow2`);
  copyFileSync(base, img);
  const node = await openNode({
    driver: 'qcow2', discard: 'unmap',
    file: { driver: 'blkdebug', ...(stopAfter >= 0 ? { 'x-stop-writes-after': stopAfter } : {}), image: { driver: 'file', filename: img } },
  });
  const be = createBackend({ werror: 'report' }, node);
  unref(node);
  const io = be.attachDevice({ id: tag }, {});
  const m: Model = { data: Buffer.alloc(6 * MiB), unsure: new Uint8Array(6 * MiB), size: 4 * MiB, sizeUnsure: false, snapshots: new Map() };
  const snap: SnapOp = (op, name) => withDrained([node], async () => {
    if (op === 'snapshot') await createSnapshot(node, name);
    else await deleteSnapshot(node, name);
  });
  await apply(io, (n) => be.truncate(n), snap, workload(), m);
  const writes = blkdebugWrites(node.file!.node);
  be.detachDevice(be.device!);
  // After the stop, the close's metadata write-back fails: expected, and said as a warning.
  const warnings: string[] = [];
  const old = setWarningSink((w) => void warnings.push(w));
  try {
    be.unref();
    await settleCloses();
  } finally {
    setWarningSink(old);
  }
  if (stopAfter < 0) expect(warnings).toEqual([]);
  return { img, m, writes };
}

/** Bytes the model is sure of must read back. */
function compare(got: Buffer, want: Buffer, unsure: Uint8Array, n: number, label: string): void {
  for (let i = 0; i < n; i++) {
    if (!unsure[i] && got[i] !== want[i]) throw new Error(`${label}: acknowledged byte ${i} reads ${got[i]}, expected ${want[i]}`);
  }
}

function verify(img: string, m: Model, label: string): void {
  const check = run('qemu-img', ['check', '--output=json', img]);
  // 0: clean, 3: leaked clusters only. 2 would be corruption.
  expect([0, 3], `${label}: qemu-img check exit ${check.status}: ${check.stdout}${check.stderr}`).toContain(check.status);
  const report = JSON.parse(check.stdout) as { 'corruptions'?: number; 'check-errors'?: number };
  expect(report.corruptions ?? 0, label).toBe(0);
  expect(report['check-errors'] ?? 0, label).toBe(0);
  const raw = `${img}.raw`;
  const conv = run('qemu-img', ['convert', '-O', 'raw', img, raw]);
  expect(conv.status, `${label}: ${conv.stderr}`).toBe(0);
  const got = readFileSync(raw);
  if (!m.sizeUnsure) expect(got.length, label).toBe(m.size);
  compare(got, m.data, m.unsure, Math.min(got.length, m.size), label);
  rmSync(raw);
  for (const [name, want] of m.snapshots) {
    if (want === 'unsure') continue;
    // Its data as QEMU reads it (which fails for a snapshot that is not there).
    const conv = run('qemu-img', ['convert', '-l', `snapshot.name=${name}`, '-O', 'raw', img, raw]);
    if (want === 'gone') {
      expect(conv.stderr, `${label}: snapshot ${name} must be gone`).toMatch(/snapshot/i);
      expect(conv.status, `${label}: snapshot ${name} must be gone`).not.toBe(0);
      continue;
    }
    expect(conv.status, `${label}: ${conv.stderr}`).toBe(0);
    const snap = readFileSync(raw);
    expect(snap.length, label).toBe(want.size);
    compare(snap, want.data, want.unsure, want.size, `${label}, snapshot ${name}`);
    rmSync(raw);
  }
}

describe('qcow2 crash safety (blkdebug stops all writes after write N)', () => {
  it('survives a stop after every write of the workload', async () => {
    const base = join(dir, 'base.qcow2');
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', base, '4M']).status).toBe(0);
    const full = await crashRun(base, -1, 'full');
    expect(full.m.unsure.indexOf(1), 'every request succeeds without a crash').toBe(-1);
    expect(full.m.sizeUnsure).toBe(false);
    verify(full.img, full.m, 'no crash');
    expect(readFileSync(full.img).length).toBeGreaterThan(0);
    expect(full.writes).toBeGreaterThan(40);
    console.log(`workload: ${full.writes} modifying writes`);
    const clean = run('qemu-img', ['check', full.img]);
    expect(clean.status, clean.stdout).toBe(0); // without a crash there are no leaks either
    for (let n = 0; n < full.writes; n++) {
      const r = await crashRun(base, n, `stop${n}`);
      verify(r.img, r.m, `stop after write ${n}`);
    }
  }, 300_000);
});
