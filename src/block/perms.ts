/**
 * The permission transaction.
 *
 * After any change of edges, permissions are recomputed top-down over every node below the
 * change, in topological order, into a scratch map. Conflicts and driver checks (image
 * locks) are tested against the scratch values; only when everything agrees are the edges
 * and nodes updated. A refused change leaves every applied permission as it was.
 */
import { BlockError } from './error.js';
import type { BlockChild, BlockNode } from './node.js';
import { Perm, permNames, type PermPair } from './types.js';

const WRITE_PERMS = Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE;

/** Nodes reachable downward from `starts`, parents before children. */
export function topoBelow(starts: readonly BlockNode[]): BlockNode[] {
  const seen = new Set<BlockNode>();
  const post: BlockNode[] = [];
  const visit = (n: BlockNode): void => {
    if (seen.has(n)) return;
    seen.add(n);
    for (const c of n.children) visit(c.node);
    post.push(n);
  };
  for (const s of starts) visit(s);
  return post.reverse();
}

function conflictMessage(node: BlockNode, wants: BlockChild, holder: BlockChild, bits: number): string {
  return (
    `Permission conflict on node '${node.name}': ${wants.parent.describeUser()} (as '${wants.name}') ` +
    `wants '${permNames(bits)}', but ${holder.parent.describeUser()} (as '${holder.name}') does not share it`
  );
}

/**
 * Recomputes permissions below `starts`. `pinned` fixes the values of edges whose parent is
 * not a node (backends, jobs) or that are being requested anew. Throws BlockError (EPERM)
 * naming both users and the permission; on throw nothing is applied.
 * Context: main loop.
 */
export function refreshPerms(starts: readonly BlockNode[], pinned?: ReadonlyMap<BlockChild, PermPair>): void {
  const order = topoBelow(starts);
  const next = new Map<BlockChild, PermPair>(pinned ?? []);
  const nodeVals = new Map<BlockNode, PermPair>();
  const checked: BlockNode[] = [];
  const val = (e: BlockChild): PermPair => next.get(e) ?? e;
  try {
    for (const n of order) {
      let perm = 0;
      let shared: number = Perm.ALL;
      const ps = n.parents;
      for (const e of ps) {
        const v = val(e);
        perm |= v.perm;
        shared &= v.shared;
      }
      for (const a of ps) {
        const va = val(a);
        if (!va.perm) continue;
        for (const b of ps) {
          if (a === b) continue;
          const bad = va.perm & ~val(b).shared;
          if (bad) throw new BlockError('EPERM', conflictMessage(n, a, b, bad), { node: n.name });
        }
      }
      if (n.readOnly && perm & WRITE_PERMS) {
        const writer = ps.find((e) => val(e).perm & WRITE_PERMS)!;
        throw new BlockError(
          'EPERM',
          `Block node '${n.name}' is read-only, but ${writer.parent.describeUser()} (as '${writer.name}') wants '${permNames(val(writer).perm & WRITE_PERMS)}'`,
          { node: n.name },
        );
      }
      if (n.driver.checkPerm) {
        checked.push(n);
        n.driver.checkPerm(n, perm, shared);
      }
      nodeVals.set(n, { perm, shared });
      for (const c of n.children) {
        if (!pinned?.has(c)) next.set(c, n.driver.childPerms(n, c, perm, shared));
      }
    }
  } catch (e) {
    for (const n of checked) n.driver.abortPerm?.(n);
    throw e;
  }
  for (const [e, v] of next) {
    e.perm = v.perm;
    e.shared = v.shared;
  }
  for (const [n, v] of nodeVals) {
    n.perm = v.perm;
    n.shared = v.shared;
    n.driver.setPerm?.(n, v.perm, v.shared);
  }
}

/** Default child permissions of a format or filter: pass through what parents need. */
export function defaultChildPerms(parentPerm: number, parentShared: number, forWrites: boolean): PermPair {
  let perm = parentPerm & (Perm.CONSISTENT_READ | Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE);
  if (parentPerm & (Perm.WRITE | Perm.RESIZE) && forWrites) perm |= Perm.WRITE_UNCHANGED;
  // A node below someone who reads consistently must read consistently too.
  if (parentPerm & Perm.CONSISTENT_READ) perm |= Perm.CONSISTENT_READ;
  const shared = (parentShared | Perm.WRITE_UNCHANGED | Perm.GRAPH_MOD) & Perm.ALL;
  return { perm, shared };
}

/**
 * Permissions for a backing (COW) child: only read it. Writes by others are tolerable only if
 * our own parents tolerate changing data (they share WRITE).
 */
export function backingChildPerms(parentPerm: number, parentShared: number): PermPair {
  const perm = parentPerm ? Perm.CONSISTENT_READ : 0;
  let shared = parentShared & Perm.WRITE ? Perm.WRITE | Perm.RESIZE : 0;
  shared |= Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.GRAPH_MOD;
  return { perm, shared };
}
