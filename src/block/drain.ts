/**
 * Drained sections.
 *
 * Draining a node quiesces it and, through `childDrainedBegin`, every parent above it up to
 * the backends (which stop taking new device requests and tell the device). It then waits
 * until no request is in flight in the node, its ancestors or its descendants. Sections
 * nest; the parents hear only the first begin and the last end.
 */
import { assertMainLoop } from './context.js';
import type { BlockChild, BlockNode } from './node.js';

interface DrainWait {
  nodes: BlockNode[];
  resolve: () => void;
}
const waits: DrainWait[] = [];
/** Read on every request completion; non-zero only while someone waits for a drain. */
export let drainWaiting = 0;

function quiesce(n: BlockNode): void {
  if (n.quiesce++ === 0) {
    for (const e of n.parents) e.parent.childDrainedBegin?.(e);
  }
}
function unquiesce(n: BlockNode): void {
  if (n.quiesce <= 0) throw new Error(`drainedEnd on '${n.name}' without drainedBegin`);
  if (--n.quiesce === 0) {
    for (const e of n.parents) e.parent.childDrainedEnd?.(e);
  }
}

/** A node parent hears that its child drains: it quiesces too (up to the backends). */
export function nodeChildDrainedBegin(parent: BlockNode, _child: BlockChild): void {
  quiesce(parent);
}
export function nodeChildDrainedEnd(parent: BlockNode, _child: BlockChild): void {
  unquiesce(parent);
}

function related(n: BlockNode, acc: Set<BlockNode>): void {
  const up = (x: BlockNode): void => {
    if (acc.has(x)) return;
    acc.add(x);
    for (const e of x.parents) if (e.parent.parentKind === 'node') up(e.parent as BlockNode);
  };
  const down = (x: BlockNode): void => {
    for (const c of x.children) {
      if (!acc.has(c.node)) {
        acc.add(c.node);
        down(c.node);
      }
    }
  };
  up(n);
  down(n);
}

function busy(nodes: readonly BlockNode[]): boolean {
  for (const n of nodes) if (n.inFlight > 0) return true;
  return false;
}

/** Called by the I/O layer after a completion while drainWaiting > 0. */
export function pollDrains(): void {
  for (let i = waits.length - 1; i >= 0; i--) {
    const w = waits[i]!;
    if (!busy(w.nodes)) {
      waits.splice(i, 1);
      drainWaiting--;
      w.resolve();
    }
  }
}

/** Resolves when nothing is in flight in `node` or below it (without quiescing anyone). */
export function idleBelow(node: BlockNode): Promise<void> | null {
  const set = new Set<BlockNode>([node]);
  const down = (x: BlockNode): void => {
    for (const c of x.children) if (!set.has(c.node)) { set.add(c.node); down(c.node); }
  };
  down(node);
  const nodes = [...set];
  if (!busy(nodes)) return null;
  return new Promise<void>((resolve) => {
    waits.push({ nodes, resolve });
    drainWaiting++;
  });
}

/**
 * Begins a drained section on `node` and resolves once nothing is in flight around it.
 * Context: main loop.
 */
export function drainedBegin(node: BlockNode): Promise<void> {
  assertMainLoop('drainedBegin');
  quiesce(node);
  const set = new Set<BlockNode>();
  related(node, set);
  const nodes = [...set];
  if (!busy(nodes)) return Promise.resolve();
  return new Promise<void>((resolve) => {
    waits.push({ nodes, resolve });
    drainWaiting++;
  });
}

/** Ends a drained section. Context: main loop. */
export function drainedEnd(node: BlockNode): void {
  assertMainLoop('drainedEnd');
  unquiesce(node);
}

/** Runs `fn` with every node in `nodes` drained, ending the sections however `fn` ends. */
export async function withDrained<T>(nodes: readonly BlockNode[], fn: () => T | Promise<T>): Promise<T> {
  assertMainLoop('withDrained');
  const uniq = [...new Set(nodes)];
  let begun = 0;
  try {
    for (const n of uniq) {
      const p = drainedBegin(n);
      begun++;
      await p;
    }
    return await fn();
  } finally {
    for (let i = 0; i < begun; i++) drainedEnd(uniq[i]!);
  }
}

/**
 * Keeps a parent's quiesce state consistent when an edge to a drained node appears or goes.
 * Context: graph module.
 */
export function edgeAttached(e: BlockChild): void {
  if (e.node.quiesce > 0) e.parent.childDrainedBegin?.(e);
}
export function edgeDetached(e: BlockChild): void {
  if (e.node.quiesce > 0) e.parent.childDrainedEnd?.(e);
}
