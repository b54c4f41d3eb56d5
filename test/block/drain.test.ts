// Seed 002 scenario (e): graph changes run on the main loop only, and wait for drain.
import { describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { drainedBegin, drainedEnd } from '../../src/block/drain.js';
import { openNode, replaceNode, unref } from '../../src/block/graph.js';
import { readv } from '../../src/block/io.js';
import type { BlockError } from '../../src/block/error.js';

const slow = (name: string) => openNode({ driver: 'null-co', 'node-name': name, 'latency-ns': 20_000_000 });

describe('drain and the main-loop rule', () => {
  it('a graph change from I/O context (a completion callback) is refused', async () => {
    const a = await openNode({ driver: 'null-co', 'node-name': 'io-a' });
    const b = createBackend({ name: 'ioB' }, a);
    const errs: unknown[] = [];
    const pending: Promise<unknown>[] = [];
    await new Promise<void>((resolve) => {
      readv(b.root!, 0, 512, [Buffer.alloc(512)], 0, () => {
        // Async graph functions reject; sync ones throw. Either way they must refuse.
        for (const f of [() => openNode({ driver: 'null-co' }), () => replaceNode(a, a), () => b.unref()]) {
          try {
            const r = f() as unknown;
            if (r instanceof Promise) pending.push(r.catch((e: unknown) => errs.push(e)));
          } catch (e) {
            errs.push(e);
          }
        }
        resolve();
      });
    });
    await Promise.all(pending);
    expect(errs).toHaveLength(3);
    for (const e of errs) {
      expect((e as BlockError).code).toBe('EPERM');
      expect((e as Error).message).toMatch(/must run on the main loop, not in I\/O context/);
    }
    // Nothing was changed by the refused calls.
    expect(b.root!.node).toBe(a);
    expect(b.dead).toBe(false);
    b.unref();
    unref(a);
  });

  it('a graph change made while requests are in flight waits for them', async () => {
    const a = await slow('dr-a');
    const c = await openNode({ driver: 'null-co', 'node-name': 'dr-c' });
    const b = createBackend({ name: 'drB' }, a);
    const io = b.attachDevice({ id: 'drDev' }, {});
    const log: string[] = [];
    const reads = [0, 1, 2].map((i) =>
      io.read(i * 512, Buffer.alloc(512)).then(() => log.push(`read${i} done on ${b.root!.node.name}`)),
    );
    expect(a.inFlight).toBe(3);
    const replaced = replaceNode(a, c).then(() => log.push(`replaced, inFlight=${a.inFlight}`));
    await Promise.all([...reads, replaced]);
    expect(log).toEqual(['read0 done on dr-a', 'read1 done on dr-a', 'read2 done on dr-a', 'replaced, inFlight=0']);
    expect(b.root!.node).toBe(c);
    b.detachDevice(b.device!);
    b.unref();
    unref(a);
    unref(c);
  });

  it('drain tells the device, queues its new requests and issues them after', async () => {
    const a = await slow('dq-a');
    const b = createBackend({ name: 'dqB' }, a);
    const calls: string[] = [];
    const io = b.attachDevice({ id: 'dqDev' }, { drainedBegin: () => calls.push('begin'), drainedEnd: () => calls.push('end') });
    const first = io.read(0, Buffer.alloc(512)).then(() => calls.push('first done'));
    const drained = drainedBegin(a).then(() => calls.push('drained'));
    // Nested: the device hears only the outer begin/end.
    const nested = drainedBegin(a);
    const queued = io.read(512, Buffer.alloc(512)).then(() => calls.push('queued done'));
    await Promise.all([first, drained, nested]);
    expect(b.queued).toHaveLength(1);
    expect(a.inFlight).toBe(0);
    drainedEnd(a);
    expect(calls).toEqual(['begin', 'first done', 'drained']);
    drainedEnd(a);
    await queued;
    expect(calls).toEqual(['begin', 'first done', 'drained', 'end', 'queued done']);
    b.detachDevice(b.device!);
    b.unref();
    unref(a);
  });

  it('draining a child quiesces its parents up to the backend, and waits below', async () => {
    const raw = await openNode({ driver: 'raw', 'node-name': 'dc-raw', file: { driver: 'null-co', 'node-name': 'dc-null', 'latency-ns': 20_000_000 } });
    const b = createBackend({ name: 'dcB' }, raw);
    const io = b.attachDevice({ id: 'dcDev' }, {});
    let done = false;
    const r = io.read(0, Buffer.alloc(512)).then(() => (done = true));
    const file = raw.file!.node;
    await drainedBegin(file);
    expect(done).toBe(true);
    expect(raw.quiesce).toBe(1);
    expect(b.quiesce).toBe(1);
    drainedEnd(file);
    expect(raw.quiesce).toBe(0);
    expect(b.quiesce).toBe(0);
    await r;
    b.detachDevice(b.device!);
    b.unref();
    unref(raw);
  });
});
