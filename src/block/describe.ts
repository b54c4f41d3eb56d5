/**
 * What a node says about itself: the blockdev-add arguments that recreate it, and the
 * facts `img info` and query-named-block-nodes print.
 */
import type { BlockNode } from './node.js';
import type { NodeOptions } from './types.js';

/**
 * The blockdev-add options that recreate `node` over its current children (referenced by
 * node name, so children must be recreated first: see describeTree). Context: main loop.
 */
export function describeNode(node: BlockNode): NodeOptions {
  const o: NodeOptions = { driver: node.driver.format, 'node-name': node.name };
  if (node.readOnly) o['read-only'] = true;
  if (node.detectZeroes !== 'off') o['detect-zeroes'] = node.detectZeroes;
  if (node.discardUnmap) o.discard = 'unmap';
  const cache = node.options.cache;
  if (cache && (cache.direct || cache['no-flush'])) o.cache = { ...cache };
  Object.assign(o, node.driver.describe?.(node) ?? {});
  for (const c of node.children) o[c.name] = c.node.name;
  return o;
}

/** blockdev-add calls, bottom-up, that recreate the whole tree under `node`. */
export function describeTree(node: BlockNode): NodeOptions[] {
  const out: NodeOptions[] = [];
  const seen = new Set<BlockNode>();
  const walk = (n: BlockNode): void => {
    if (seen.has(n)) return;
    seen.add(n);
    for (const c of n.children) walk(c.node);
    out.push(describeNode(n));
  };
  walk(node);
  return out;
}
