/**
 * Reopen: change options (read-only <-> read-write, detect-zeroes, discard) of several
 * nodes as one transaction: prepare every node, recompute permissions with the new
 * read-only flags, then commit all, or abort all if anything refused.
 */
import { assertMainLoop } from './context.js';
import { withDrained } from './drain.js';
import { BlockError } from './error.js';
import type { BlockNode } from './node.js';
import { refreshPerms } from './perms.js';
import { ChildRole, type NodeOptions, type ReopenState } from './types.js';

export interface ReopenRequest {
  node: BlockNode;
  /** Options to change; absent keys keep their values. */
  options: Partial<NodeOptions>;
}

const REOPENABLE = new Set(['read-only', 'detect-zeroes', 'discard', 'auto-read-only']);

/** Children that hold this node's data follow its read-only flag unless asked otherwise. */
function withInherited(reqs: readonly ReopenRequest[]): ReopenRequest[] {
  const out = [...reqs];
  const have = new Set(reqs.map((r) => r.node));
  for (let i = 0; i < out.length; i++) {
    const r = out[i]!;
    const ro = r.options['read-only'];
    if (ro === undefined) continue;
    for (const c of r.node.children) {
      if (c.role & ChildRole.COW || have.has(c.node)) continue;
      have.add(c.node);
      out.push({ node: c.node, options: { 'read-only': ro } });
    }
  }
  return out;
}

/** Context: main loop. */
export async function reopenMultiple(reqs: readonly ReopenRequest[]): Promise<void> {
  assertMainLoop('reopen');
  for (const r of reqs) {
    for (const k of Object.keys(r.options)) {
      if (!REOPENABLE.has(k) && r.options[k] !== r.node.options[k]) {
        throw new BlockError('EINVAL', `Cannot change the option '${k}' of node '${r.node.name}' by reopening it`);
      }
    }
  }
  reqs = withInherited(reqs);
  await withDrained(reqs.map((r) => r.node), async () => {
    const states: ReopenState[] = reqs.map((r) => {
      const options = { ...r.node.options, ...r.options } as NodeOptions;
      return { node: r.node, options, readOnly: options['read-only'] === true };
    });
    const prepared: ReopenState[] = [];
    const oldRo = new Map<BlockNode, boolean>(states.map((s) => [s.node, s.node.readOnly]));
    try {
      for (const st of states) {
        await st.node.driver.reopen?.prepare(st);
        prepared.push(st);
      }
      for (const st of states) st.node.readOnly = st.readOnly;
      refreshPerms(states.map((s) => s.node));
    } catch (e) {
      for (const st of states) st.node.readOnly = oldRo.get(st.node)!;
      for (const st of prepared) st.node.driver.reopen?.abort(st);
      throw e;
    }
    for (const st of states) {
      st.node.driver.reopen?.commit(st);
      st.node.options = st.options;
      st.node.detectZeroes = st.options['detect-zeroes'] ?? 'off';
      st.node.discardUnmap = st.options.discard === 'unmap' || st.options.discard === 'on';
    }
  });
}

/** Reopens one node. Context: main loop. */
export function reopen(node: BlockNode, options: Partial<NodeOptions>): Promise<void> {
  return reopenMultiple([{ node, options }]);
}
