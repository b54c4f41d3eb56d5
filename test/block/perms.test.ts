// Seed 001 scenario (d): permission conflicts are refused, naming both users, and roll back whole.
import { describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { attachRoot, detachRoot, openNode, replaceNode, setRootPerms, unref } from '../../src/block/graph.js';
import type { BlockParent } from '../../src/block/node.js';
import { Perm } from '../../src/block/types.js';
import { registerOverlayDriver } from '../helpers/overlay-driver.js';

registerOverlayDriver();
const user = (name: string): BlockParent => ({ parentKind: 'job', describeUser: () => `job '${name}'` });
const SHARE_READS = Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED;

describe('permissions', () => {
  it('two writers on one node: the second is refused, naming both and the permission', async () => {
    const n = await openNode({ driver: 'null-co', 'node-name': 'pw-node' });
    const a = createBackend({ name: 'pwA', perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: SHARE_READS }, n);
    const before = { perm: n.perm, shared: n.shared, parents: [...n.parents] };
    let err: Error | undefined;
    try {
      createBackend({ name: 'pwB', perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: SHARE_READS }, n);
    } catch (e) {
      err = e as Error;
    }
    expect(err).toBeDefined();
    expect((err as { code?: string }).code).toBe('EPERM');
    expect(err!.message).toContain("'pw-node'");
    expect(err!.message).toContain("block device 'pwA'");
    expect(err!.message).toContain("block device 'pwB'");
    expect(err!.message).toContain("'write'");
    // Nothing changed: same parents and permissions, and pwB's name is not taken.
    expect(n.parents).toEqual(before.parents);
    expect(n.perm).toBe(before.perm);
    expect(n.shared).toBe(before.shared);
    const b = createBackend({ name: 'pwB', perm: Perm.CONSISTENT_READ, shared: Perm.ALL }, n);
    b.unref();
    a.unref();
    unref(n);
  });

  it('a user that shares no WRITE blocks a later writer until it goes', async () => {
    const n = await openNode({ driver: 'null-co', 'node-name': 'pr-node' });
    const reader = attachRoot(user('reader'), n, 'source', { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ });
    expect(() => attachRoot(user('writer'), n, 'target', { perm: Perm.WRITE, shared: Perm.ALL }))
      .toThrow(/job 'writer' \(as 'target'\) wants 'write', but job 'reader' \(as 'source'\) does not share it/);
    expect(n.parents).toHaveLength(1);
    detachRoot(reader);
    const w = attachRoot(user('writer'), n, 'target', { perm: Perm.WRITE, shared: Perm.ALL });
    expect(n.perm & Perm.WRITE).toBeTruthy();
    // And now a reader that will not share WRITE is refused in turn.
    expect(() => attachRoot(user('reader2'), n, 'source', { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ }))
      .toThrow(/job 'writer'.*wants 'write'.*job 'reader2'.*does not share it|job 'reader2'.*does not share/);
    detachRoot(w);
    unref(n);
  });

  it('permissions pass through formats: a writer above raw conflicts with a reader of the file', async () => {
    const raw = await openNode({ driver: 'raw', 'node-name': 'pt-raw', file: { driver: 'null-co', 'node-name': 'pt-null' } });
    const file = raw.file!.node;
    const w = createBackend({ name: 'ptW' }, raw);
    expect(raw.file!.perm & Perm.WRITE).toBeTruthy();
    expect(() => attachRoot(user('strict'), file, 'x', { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ }))
      .toThrow(/node 'pt-raw' \(as 'file'\) wants 'write'.*job 'strict'/);
    w.unref();
    // With the writer gone the raw node takes no write on its file, and the strict reader fits.
    expect(raw.file!.perm & Perm.WRITE).toBe(0);
    const s = attachRoot(user('strict'), file, 'x', { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ });
    detachRoot(s);
    unref(raw);
  });

  it('a read-only node refuses writers', async () => {
    const n = await openNode({ driver: 'null-co', 'node-name': 'ro-node', 'read-only': true });
    expect(() => attachRoot(user('w'), n, 'x', { perm: Perm.WRITE, shared: Perm.ALL })).toThrow(/read-only.*job 'w'/);
    // A backend asking for write on a read-only medium drops to read-only (like a CD-ROM).
    const b = createBackend({ name: 'roB' }, n);
    expect(b.root!.perm & Perm.WRITE).toBe(0);
    b.unref();
    unref(n);
  });

  it('a refused replace rolls back every moved edge', async () => {
    const a = await openNode({ driver: 'null-co', 'node-name': 'rb-a' });
    const b = await openNode({ driver: 'null-co', 'node-name': 'rb-b' });
    const dev = createBackend({ name: 'rbDev' }, a);
    const strict = attachRoot(user('strict'), b, 'x', { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ });
    await expect(replaceNode(a, b)).rejects.toThrow(/does not share/);
    expect(dev.root!.node).toBe(a);
    expect(a.parents).toEqual([dev.root]);
    expect(b.parents).toEqual([strict]);
    expect(a.perm & Perm.WRITE).toBeTruthy();
    expect(b.perm & Perm.WRITE).toBe(0);
    detachRoot(strict);
    await replaceNode(a, b);
    expect(dev.root!.node).toBe(b);
    expect(a.parents).toHaveLength(0);
    dev.unref();
    unref(a);
    unref(b);
  });

  it('changing a root edge is a transaction too', async () => {
    const n = await openNode({ driver: 'null-co', 'node-name': 'sr-node' });
    const r = attachRoot(user('r'), n, 'x', { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ });
    const w = attachRoot(user('w'), n, 'y', { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    expect(() => setRootPerms(w, { perm: Perm.WRITE, shared: Perm.ALL })).toThrow(/job 'w'.*wants 'write'.*job 'r'/);
    expect(w.perm).toBe(Perm.CONSISTENT_READ);
    expect(n.perm).toBe(Perm.CONSISTENT_READ);
    detachRoot(r);
    detachRoot(w);
    unref(n);
  });
});
