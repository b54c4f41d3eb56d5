// iothreads: a node moves into one with everything connected to it, drained; a node a block
// backend uses is refused without force; an iothread in use cannot be deleted.
import { describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { mainContext } from '../../src/block/context.js';
import { openNode, unref } from '../../src/block/graph.js';
import { allIoThreads, createIoThread, deleteIoThread, setNodeIoThread } from '../../src/block/iothread.js';

describe('iothreads', () => {
  it('moves connected nodes together, drained; refuses a backend-held node without force', async () => {
    const t = createIoThread('iot-a', { 'poll-max-ns': 0 });
    expect(() => createIoThread('iot-a')).toThrow(/duplicate/);
    expect(() => createIoThread('1bad')).toThrow(/identifier/);
    const top = await openNode({ driver: 'raw', 'node-name': 'iot-top', file: { driver: 'null-co', 'node-name': 'iot-null', size: 1 << 20 } });
    const file = top.children[0]!.node;
    let drained = 0;
    const be = createBackend({ name: 'iot-be' }, top);
    const dev = { id: 'iot-dev' };
    be.attachDevice(dev, { drainedBegin: () => drained++ });
    await expect(setNodeIoThread(file, t)).rejects.toThrow(/Node iot-null is associated with a BlockBackend .*force=true/);
    expect(top.aioContext).toBe(mainContext);
    await setNodeIoThread(file, t, true);
    expect([top.aioContext, file.aioContext]).toEqual([t.ctx, t.ctx]); // the parent came along
    expect(drained).toBe(1); // the device saw one drained section
    expect(() => deleteIoThread('iot-a')).toThrow(/in use by node/);
    await setNodeIoThread(top, null, true);
    expect(file.aioContext).toBe(mainContext);
    deleteIoThread('iot-a');
    expect(allIoThreads().map((x) => x.id)).not.toContain('iot-a');
    be.detachDevice(dev);
    be.unref();
    unref(top);
  });
});
