/**
 * qcow2 consistency check and repair (`img check`), over check-scan.ts's counting.
 *
 * Repair differs from qemu-img in one deliberate way: a too-low refcount whose refcount block
 * exists is raised in place (qemu-img rebuilds the whole structure for a stored 0); a new
 * structure at the end of the file is written only when blocks are missing or damaged.
 * Repair writes stay crash safe: refcounts are raised (flushed) before anything stops being
 * protected, stale COPIED flags are cleared before refcounts are lowered, and COPIED flags are
 * set last. A crash at any point leaves leaks at worst.
 */
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';
import { CheckFailed, loaded, type CheckOptions, type CheckResult, type Checker, type EntryFix, type RepairMode } from './check-scan.js';
import { getRefcount, INCOMPAT, setRefcount } from './format.js';

export { CheckFailed, type CheckOptions, type CheckResult, type RepairMode } from './check-scan.js';

/** Writes planned refcount changes (raises or lowers) into their blocks. */
async function writeRefcounts(ck: Checker, plan: Map<number, number>, raise: boolean): Promise<void> {
  const bits = ck.g.refcountBits;
  for (const [c, v] of plan) {
    const s = ck.slot(c)!;
    if ((v > getRefcount(s.block, s.idx, bits)) !== raise) continue;
    setRefcount(s.block, s.idx, bits, v);
    const b0 = Math.floor((s.idx * bits) / 8);
    const b1 = Math.ceil(((s.idx + 1) * bits) / 8);
    await io.write(ck.file, s.off + b0, s.block.subarray(b0, b1));
  }
  if (plan.size) await io.flush(ck.file);
}

async function writeEntries(ck: Checker, fixes: EntryFix[], set: boolean): Promise<void> {
  const todo = fixes.filter((f) => f.set === set);
  for (const f of todo) {
    const b = Buffer.alloc(8);
    b.writeBigUInt64BE(f.value);
    await io.write(ck.file, f.pos, b);
  }
  if (todo.length) await io.flush(ck.file);
}

/**
 * A new refcount table and blocks past the end of the file, holding the counted refcounts
 * (minus the old structure's own clusters); one header write switches to it, so a crash
 * before that leaves the old structure and a longer file.
 */
async function rebuildStructure(ck: Checker): Promise<void> {
  const { rbEntries: rbE, refcountBits: bits } = ck.g;
  const cs = ck.cs;
  const want = Float64Array.from(ck.ref.subarray(0, ck.nb));
  for (const c of ck.structClusters) if (want[c]! > 0) want[c]!--;
  let base = Math.ceil(ck.fileLen / cs);
  for (let c = want.length - 1; c >= base; c--) if (want[c]) { base = c + 1; break; }
  let blocks = 1;
  let tClusters = 1;
  for (;;) {
    const nb = Math.ceil((base + tClusters + blocks) / rbE);
    const tc = Math.ceil((nb * 8) / cs);
    if (nb === blocks && tc === tClusters) break;
    blocks = nb;
    tClusters = tc;
  }
  const rcOf = (c: number): number => (c >= base ? 1 : c < want.length ? want[c]! : 0);
  const table = Buffer.alloc(tClusters * cs);
  const blocksAt = base + tClusters;
  for (let ti = 0; ti < blocks; ti++) {
    const blk = Buffer.alloc(cs);
    for (let k = 0; k < rbE; k++) {
      const c = ti * rbE + k;
      if (c >= base + tClusters + blocks) break;
      const v = rcOf(c);
      if (v) setRefcount(blk, k, bits, Math.min(v, ck.maxRc));
    }
    await io.write(ck.file, (blocksAt + ti) * cs, blk);
    table.writeBigUInt64BE(BigInt((blocksAt + ti) * cs), ti * 8);
  }
  await io.write(ck.file, base * cs, table);
  await io.flush(ck.file);
  const hdr = Buffer.alloc(12);
  hdr.writeBigUInt64BE(BigInt(base * cs), 0);
  hdr.writeUInt32BE(tClusters, 8);
  await io.write(ck.file, 48, hdr);
  await io.flush(ck.file);
}

/** After a successful repair the dirty and corrupt bits no longer hold (qemu-img clears them). */
async function markClean(ck: Checker): Promise<void> {
  const bits = INCOMPAT.DIRTY | INCOMPAT.CORRUPT;
  if (ck.h.version !== 3 || !(ck.h.incompatible & bits)) return;
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(ck.h.incompatible & ~bits);
  await io.write(ck.file, 72, b);
  await io.flush(ck.file);
}

/** One qemu-img style check with the given repair mode. */
async function pass(file: BlockChild, mode: RepairMode, log: (l: string) => void): Promise<Checker> {
  let c = await loaded(file, log);
  const before = { ...c.res };
  c.compare('none');
  let plan = new Map<number, number>();
  if (mode === 'all' && c.structural) {
    log('Rebuilding refcount structure');
    const old = c.res;
    await rebuildStructure(c);
    c = await loaded(file, log);
    // Nothing should leak in the new structure; lower it if something does (not counted).
    plan = c.compare('leaks');
    c.res.corruptionsFixed = Math.max(0, old.corruptions - c.res.corruptions);
    c.res.leaksFixed = Math.max(0, old.leaks - c.res.leaks);
  } else if (mode !== 'none') {
    // qemu-img can fix a stored 0 only by rebuilding, which -r leaks does not do.
    if (c.rebuild && mode === 'leaks') {
      log('ERROR need to rebuild refcount structures');
      throw new CheckFailed('EIO', 'Input/output error');
    }
    if (c.res.leaks || c.res.corruptions) {
      c.res = before;
      plan = c.compare(mode);
    }
  }
  const r = c.res;
  const repair = mode === 'all' || (mode === 'leaks' && !r.checkErrors && !r.corruptions && !r.leaks);
  const fixes = await c.checkCopied(async (k) => plan.get(k) ?? (await c.loadBlockOf(k), c.stored(k)), repair);
  if (mode !== 'none') {
    await writeRefcounts(c, plan, true);
    await writeEntries(c, fixes, false);
    await writeRefcounts(c, plan, false);
    await writeEntries(c, fixes, true);
    if (!r.checkErrors && !r.corruptions) await markClean(c);
  }
  return c;
}

function result(c: Checker, filename: string): CheckResult {
  const r = c.res;
  const out: CheckResult = { filename, format: 'qcow2', 'check-errors': r.checkErrors };
  const opt = (k: keyof CheckResult, v: number): void => {
    if (v) (out as unknown as Record<string, number>)[k] = v;
  };
  opt('image-end-offset', (c.highest + 1) * c.cs);
  opt('total-clusters', Math.ceil(c.h.size / c.cs));
  opt('allocated-clusters', r.allocated);
  opt('fragmented-clusters', r.fragmented);
  opt('compressed-clusters', r.compressed);
  opt('corruptions', r.corruptions);
  opt('leaks', r.leaks);
  opt('corruptions-fixed', r.corruptionsFixed);
  opt('leaks-fixed', r.leaksFixed);
  return out;
}

/**
 * Checks (and with `repair`, repairs) the qcow2 image behind `file`. The edge needs WRITE
 * (and RESIZE, the file may grow) to repair. After a repair that changed anything, the image
 * is checked again and that result is returned with the fixed counts, as qemu-img reports it.
 */
export async function checkQcow2(file: BlockChild, opts: CheckOptions): Promise<CheckResult> {
  const log = opts.log ?? (() => undefined);
  const name = opts.filename ?? String(file.node.options['filename'] ?? file.node.name);
  const first = await pass(file, opts.repair, log);
  const fixed = first.res;
  if (opts.repair === 'none' || (!fixed.leaksFixed && !fixed.corruptionsFixed)) return result(first, name);
  const again = await pass(file, 'none', log);
  again.res.leaksFixed = fixed.leaksFixed;
  again.res.corruptionsFixed = fixed.corruptionsFixed;
  return result(again, name);
}
