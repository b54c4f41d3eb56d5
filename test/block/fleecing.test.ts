// Seed 001 scenario (a): image fleecing. A backup-style job holds a reference and read
// permission on the source while a temporary overlay uses the source as backing and an
// export reads the overlay. Tearing down in any order frees everything exactly once.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createBackend, driveDel, liveBackends } from '../../src/backend/backend.js';
import { allNodes, attachRoot, detachRoot, openNode, ref, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockNode, BlockParent } from '../../src/block/node.js';
import { Perm } from '../../src/block/types.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { registerOverlayDriver } from '../helpers/overlay-driver.js';

registerOverlayDriver();
const dir = scratchDir();

function permutations<T>(xs: T[]): T[][] {
  if (xs.length <= 1) return [xs];
  return xs.flatMap((x, i) => permutations([...xs.slice(0, i), ...xs.slice(i + 1)]).map((p) => [x, ...p]));
}

async function buildFleecing(tag: string) {
  const img = join(dir, `${tag}.img`);
  writeFileSync(img, pattern(1 << 20, 7));
  const source = await openNode({ driver: 'raw', 'node-name': `src-${tag}`, file: { driver: 'file', filename: img } });
  const drive = createBackend({ name: `drive-${tag}` }, source);
  const dev = { id: `dev-${tag}` };
  const devIo = drive.attachDevice(dev, {});
  // The temporary overlay reads the source as backing; the export reads the overlay.
  const overlay = await openNode({ driver: 'x-test-overlay', 'node-name': `tmp-${tag}`, backing: source.name });
  const exp = createBackend({ name: `exp-${tag}`, perm: Perm.CONSISTENT_READ, shared: Perm.ALL }, overlay);
  // The backup job: a reference plus read on the source, write on the overlay.
  const job: BlockParent = { parentKind: 'job', describeUser: () => `job 'backup-${tag}'` };
  ref(source);
  const jobSrc = attachRoot(job, source, 'source', { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
  const jobDst = attachRoot(job, overlay, 'target', { perm: Perm.WRITE, shared: Perm.ALL });
  return { source, overlay, drive, dev, devIo, exp, job, jobSrc, jobDst };
}

describe('image fleecing (seed 001)', () => {
  it('the graph forms with the expected permissions and the export reads through', async () => {
    const g = await buildFleecing('shape');
    expect(g.source.parents.map((p) => p.parent.describeUser())).toEqual([
      "device 'dev-shape' (block device 'drive-shape')", "node 'tmp-shape'", "job 'backup-shape'",
    ]);
    // The overlay's users tolerate changing data, so its backing edge shares WRITE and the guest keeps writing.
    expect(g.overlay.backing!.shared & Perm.WRITE).toBeTruthy();
    const buf = Buffer.alloc(4096);
    await g.exp.attachDevice({ id: 'nbd' }, {}).read(8192, buf);
    expect(buf.equals(pattern(1 << 20, 7).subarray(8192, 8192 + 4096))).toBe(true);
    await g.devIo.write(0, Buffer.alloc(4096, 0xaa));
  });

  const steps = ['job', 'export', 'device', 'creator'] as const;
  for (const order of permutations([...steps])) {
    it(`tears down in order ${order.join(' > ')} and frees everything once`, async () => {
      const tag = order.map((s) => s[0]).join('');
      const g = await buildFleecing(tag);
      const nodes: BlockNode[] = [g.source, g.source.file!.node, g.overlay];
      for (const step of order) {
        if (step === 'job') {
          detachRoot(g.jobSrc);
          detachRoot(g.jobDst);
          unref(g.source);
        } else if (step === 'export') {
          g.exp.unref();
        } else if (step === 'device') {
          await driveDel(g.drive);
          g.drive.detachDevice(g.dev);
        } else {
          unref(g.source);
          unref(g.overlay);
        }
        // Until the last user goes, nothing it still needs is freed.
        if (step !== order[order.length - 1]) {
          if (!g.exp.dead) expect(g.overlay.deleted).toBe(false);
          if (!g.exp.dead || g.jobSrc.node.parents.includes(g.jobSrc)) expect(g.source.deleted).toBe(false);
        }
      }
      await settleCloses();
      for (const n of nodes) {
        expect(n.deleted).toBe(true);
        expect(n.refcnt).toBe(0);
      }
      expect(g.drive.dead && g.exp.dead).toBe(true);
      expect(allNodes().filter((n) => n.name.endsWith(tag))).toEqual([]);
      expect(liveBackends().filter((b) => b.name.endsWith(tag))).toEqual([]);
    });
  }
});
