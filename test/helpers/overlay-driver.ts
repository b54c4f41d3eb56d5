/**
 * A small copy-on-write overlay kept in memory, for graph tests that need a driver with a
 * backing child before qcow2 exists. Reads of blocks it never wrote go to the backing node.
 */
import { getDriver, registerDriver } from '../../src/block/drivers/index.js';
import * as io from '../../src/block/io.js';
import { stateOf } from '../../src/block/node.js';
import { backingChildPerms, defaultChildPerms } from '../../src/block/perms.js';
import { ChildRole, type BlockDriver } from '../../src/block/types.js';

const BLOCK = 4096;
interface OverlayState {
  size: number;
  blocks: Map<number, Buffer>;
}

export const overlayDriver: BlockDriver = {
  format: 'x-test-overlay',
  supportsBacking: true,
  optionKeys: ['size', 'backing'],
  async open(node, o, ctx) {
    const backing = await ctx.openChild(node, o['backing'] as never, 'backing', ChildRole.COW, true);
    const size = typeof o['size'] === 'number' ? o['size'] : backing?.node.length ?? 0;
    node.opaque = { size, blocks: new Map() } satisfies OverlayState;
  },
  refreshLimits: () => ({ requestAlignment: BLOCK }),
  getLength: (n) => stateOf<OverlayState>(n).size,
  childPerms: (_n, c, perm, shared) => (c.role & ChildRole.COW ? backingChildPerms(perm, shared) : defaultChildPerms(perm, shared, true)),
  async coReadv(node, offset, bytes, iov) {
    const s = stateOf<OverlayState>(node);
    const out = Buffer.alloc(bytes);
    for (let pos = 0; pos < bytes; pos += BLOCK) {
      const blk = s.blocks.get((offset + pos) / BLOCK);
      if (blk) blk.copy(out, pos);
      else if (node.backing && offset + pos < node.backing.node.length) {
        const n = Math.min(BLOCK, node.backing.node.length - offset - pos);
        await io.read(node.backing, offset + pos, out.subarray(pos, pos + n));
      }
    }
    let o = 0;
    for (const seg of iov) {
      seg.set(out.subarray(o, o + seg.length));
      o += seg.length;
    }
  },
  async coWritev(node, offset, bytes, iov) {
    const s = stateOf<OverlayState>(node);
    const data = Buffer.concat(iov.map((x) => Buffer.from(x.buffer, x.byteOffset, x.length))).subarray(0, bytes);
    for (let pos = 0; pos < bytes; pos += BLOCK) s.blocks.set((offset + pos) / BLOCK, Buffer.from(data.subarray(pos, pos + BLOCK)));
  },
  async blockStatus(node, offset, bytes) {
    const s = stateOf<OverlayState>(node);
    const first = Math.floor(offset / BLOCK);
    const alloc = s.blocks.has(first);
    let end = (first + 1) * BLOCK;
    while (end < offset + bytes && s.blocks.has(end / BLOCK) === alloc) end += BLOCK;
    return { bytes: Math.min(end, offset + bytes) - offset, data: alloc, zero: false, allocated: alloc, node };
  },
  describe: (n) => ({ size: stateOf<OverlayState>(n).size }),
};

export function registerOverlayDriver(): void {
  try {
    getDriver(overlayDriver.format);
  } catch {
    registerDriver(overlayDriver);
  }
}

/** Asserts the children/parents lists agree everywhere reachable from `nodes`. */
export function graphConsistent(nodes: Iterable<import('../../src/block/node.js').BlockNode>): string[] {
  const problems: string[] = [];
  for (const n of nodes) {
    if (n.deleted) continue;
    for (const c of n.children) {
      if (c.parent !== n) problems.push(`${n.name}: child edge ${c.name} has another parent`);
      if (!c.node.parents.includes(c)) problems.push(`${n.name}: child ${c.node.name} lacks the edge in parents`);
    }
    for (const p of n.parents) {
      if (p.node !== n) problems.push(`${n.name}: parent edge points at ${p.node.name}`);
      if (p.parent.parentKind === 'node' && !(p.parent as typeof n).children.includes(p)) {
        problems.push(`${n.name}: parent ${p.parent.describeUser()} lacks the edge in children`);
      }
    }
    if (n.refcnt < n.parents.length) problems.push(`${n.name}: refcnt ${n.refcnt} < parents ${n.parents.length}`);
  }
  return problems;
}
