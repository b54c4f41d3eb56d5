// Seed 004 scenario (c): the children list stays consistent through every graph change.
import { describe, expect, it } from 'vitest';
import {
  allNodes, attachChild, detachChild, dropIntermediate, findNode, openNode, ref, replaceNode, setBacking, settleCloses, unref,
} from '../../src/block/graph.js';
import { read, readv } from '../../src/block/io.js';
import { attachRoot, detachRoot } from '../../src/block/graph.js';
import type { BlockNode, BlockParent } from '../../src/block/node.js';
import { ChildRole, Perm } from '../../src/block/types.js';
import { graphConsistent, registerOverlayDriver } from '../helpers/overlay-driver.js';

registerOverlayDriver();

const user = (name: string): BlockParent => ({ parentKind: 'job', describeUser: () => `job '${name}'` });
const nul = (name: string, size = 1 << 20) => openNode({ driver: 'null-co', 'node-name': name, size });
const overlay = (name: string, backing?: string) =>
  openNode({ driver: 'x-test-overlay', 'node-name': name, ...(backing ? { backing } : { size: 1 << 20 }) });

function expectConsistent(): void {
  expect(graphConsistent(allNodes())).toEqual([]);
}

describe('node names and lifetimes', () => {
  it('generates unique #block names and refuses duplicates and bad names', async () => {
    const a = await openNode({ driver: 'null-co' });
    const b = await openNode({ driver: 'null-co' });
    expect(a.name).toMatch(/^#block\d+$/);
    expect(b.name).not.toBe(a.name);
    const n = await nul('n1');
    await expect(nul('n1')).rejects.toThrow(/Duplicate nodes with node-name='n1'/);
    await expect(nul('1bad')).rejects.toThrow(/must start with a letter/);
    await expect(openNode({ driver: 'null-co', 'node-name': 'x'.repeat(32) })).rejects.toThrow(/longer than 31/);
    await expect(openNode({ driver: 'nope' })).rejects.toThrow(/Unknown driver 'nope'/);
    await expect(openNode({ driver: 'null-co', bogus: 1 })).rejects.toThrow(/does not support the option 'bogus'/);
    for (const x of [a, b, n]) unref(x);
    expect(findNode('n1')).toBeUndefined();
  });

  it('only the last unref deletes a node; its name is then free', async () => {
    const n = await nul('life');
    ref(n);
    unref(n);
    expect(n.deleted).toBe(false);
    expect(findNode('life')).toBe(n);
    unref(n);
    expect(n.deleted).toBe(true);
    expect(() => unref(n)).toThrow(/dead node/);
    const again = await nul('life');
    expect(again).not.toBe(n);
    unref(again);
  });

  it('a node referenced as a child outlives its creator reference', async () => {
    const base = await nul('keep-base');
    const top = await overlay('keep-top', 'keep-base');
    unref(base);
    expect(base.deleted).toBe(false);
    expect(base.refcnt).toBe(1);
    unref(top);
    expect(top.deleted).toBe(true);
    expect(base.deleted).toBe(true);
    await settleCloses();
  });
});

describe('deleting a node with requests in flight below it', () => {
  it('keeps its children until the requests finish', async () => {
    const raw = await openNode({ driver: 'raw', 'node-name': 'if-raw', file: { driver: 'null-co', 'node-name': 'if-null', 'latency-ns': 20_000_000 } });
    const e = attachRoot(user('if'), raw, 'x', { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    let result: unknown = 'pending';
    readv(e, 0, 512, [Buffer.alloc(512)], 0, (err) => (result = err));
    const file = raw.file!.node;
    detachRoot(e);
    unref(raw);
    expect(raw.deleted).toBe(true);
    expect(findNode('if-raw')).toBeUndefined();
    expect(file.deleted).toBe(false); // still serving the request
    expect(raw.children).toHaveLength(1);
    await settleCloses();
    expect(result).toBeNull();
    expect(file.deleted).toBe(true);
  });
});

describe('children list consistency (seed 004)', () => {
  it('file and backing are views of the one children list', async () => {
    const base = await nul('v-base');
    const top = await overlay('v-top', 'v-base');
    expect(top.children).toHaveLength(1);
    expect(top.backing).toBe(top.children[0]);
    expect(top.backing!.node).toBe(base);
    expect(top.backing!.role & ChildRole.COW).toBeTruthy();
    expect(top.file).toBeUndefined();
    expect(base.parents).toEqual([top.backing]);
    expectConsistent();
    unref(top);
    unref(base);
  });

  it('set-backing moves the edge and frees the old backing', async () => {
    const b1 = await nul('sb-1');
    const b2 = await nul('sb-2');
    const top = await overlay('sb-top', 'sb-1');
    unref(b1);
    await setBacking(top, b2);
    expect(top.backing!.node).toBe(b2);
    expect(top.children).toHaveLength(1);
    expect(b1.deleted).toBe(true);
    expect(b2.parents).toHaveLength(1);
    expectConsistent();
    await setBacking(top, null);
    expect(top.backing).toBeUndefined();
    expect(b2.parents).toHaveLength(0);
    expect(b2.refcnt).toBe(1);
    expectConsistent();
    unref(top);
    unref(b2);
  });

  it('replaceNode moves every parent, except the new node itself', async () => {
    const a = await nul('rp-a');
    const top1 = await overlay('rp-t1', 'rp-a');
    const top2 = await overlay('rp-t2', 'rp-a');
    const job = attachRoot(user('rp'), a, 'source', { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    // b is an overlay over a: after the replace, everyone reads a through b.
    const b = await overlay('rp-b', 'rp-a');
    await replaceNode(a, b);
    expect(top1.backing!.node).toBe(b);
    expect(top2.backing!.node).toBe(b);
    expect(job.node).toBe(b);
    expect(b.backing!.node).toBe(a);
    expect(a.parents).toEqual([b.backing]);
    expectConsistent();
    detachRoot(job);
    for (const n of [top1, top2, b, a]) unref(n);
    expect(a.deleted).toBe(true);
  });

  it('dropping an intermediate node leaves top over base and frees the middle', async () => {
    const base = await nul('di-base');
    const mid = await overlay('di-mid', 'di-base');
    const top = await overlay('di-top', 'di-mid');
    unref(mid);
    await dropIntermediate(top, base);
    expect(mid.deleted).toBe(true);
    expect(top.backing!.node).toBe(base);
    expect(base.parents.map((p) => p.parent)).toEqual([top]);
    expectConsistent();
    const buf = Buffer.alloc(4096, 1);
    await read(top.backing!, 0, buf);
    expect(buf.every((x) => x === 0)).toBe(true);
    unref(top);
    unref(base);
    expect(base.deleted).toBe(true);
  });

  it('the same child attached twice is two edges, detached one at a time', async () => {
    const parent = await overlay('tw-p');
    const child = await nul('tw-c');
    const e0 = await attachChild(parent, child, 'children.0', ChildRole.DATA);
    const e1 = await attachChild(parent, child, 'children.1', ChildRole.DATA);
    expect(child.parents).toEqual([e0, e1]);
    expect(child.refcnt).toBe(3);
    expectConsistent();
    await detachChild(e0);
    expect(child.parents).toEqual([e1]);
    expect(parent.children.map((c) => c.name)).toEqual(['children.1']);
    expect(child.refcnt).toBe(2);
    expectConsistent();
    unref(child);
    unref(parent);
    expect(child.deleted).toBe(true);
  });

  it('refuses cycles and leaves the graph unchanged', async () => {
    const a = await overlay('cy-a');
    const b = await overlay('cy-b', 'cy-a');
    await expect(setBacking(a, b)).rejects.toThrow(/cycle/);
    expect(a.backing).toBeUndefined();
    expectConsistent();
    unref(b);
    unref(a);
  });

  it('a failed open leaves no node and no name behind', async () => {
    const before = allNodes().length;
    await expect(openNode({ driver: 'raw', 'node-name': 'bad-raw', file: { driver: 'file', 'node-name': 'bad-file', filename: '/nonexistent/x.img' } }))
      .rejects.toThrow(/Could not open '\/nonexistent\/x.img'/);
    expect(findNode('bad-raw')).toBeUndefined();
    expect(findNode('bad-file')).toBeUndefined();
    expect(allNodes().length).toBe(before);
  });
});

export type { BlockNode };
