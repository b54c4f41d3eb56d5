// The worker's cluster table with a memory bound (native/src/vhostblk/map.h): past it the
// oldest chunk of 4096 entries is evicted, but kept ("retired") until reclaim(), because a
// worker may still be using an entry from it; until then a withdrawal still finds and counts
// its entries, so the caller knows to wait for the worker before the clusters change.
import { describe, expect, it } from 'vitest';
import { VhostBlkMap } from '../../src/native/vhost-blk-map.js';

const C = 4096; // 4 KiB clusters
const CHUNK = 4096; // entries in a chunk
const at = (chunk: number, i = 0): number => (chunk * CHUNK + i) * C;

describe('VhostBlkMap with a bound', () => {
  it('evicts the oldest chunk past the bound; a withdrawal counts retired entries until reclaim', () => {
    const map = new VhostBlkMap(12, 64 << 20, 2 * CHUNK * 8); // two chunks of entries
    map.set(at(0), 10 * C, 1 << 30, true);
    map.set(at(1), 5 * C, 2 * 2 ** 30, false);
    expect([map.size, map.retired]).toEqual([15, 0]);
    map.set(at(2), C, 3 * 2 ** 30, true); // a third chunk: chunk 0 goes
    expect([map.size, map.retired]).toEqual([6, 1]);
    // Its clusters are withdrawn from the retired chunk too (a request may hold one of them).
    expect(map.invalidate(at(0, 2), 3 * C)).toBe(3);
    expect(map.invalidate(at(0, 2), 3 * C)).toBe(0);
    expect(map.invalidate(at(0), 10 * C)).toBe(7);
    // Chunk 0 again: the oldest now is chunk 1.
    map.set(at(0), C, 4 * 2 ** 30, true);
    expect([map.size, map.retired]).toEqual([2, 2]);
    expect(map.invalidate(at(1), 5 * C)).toBe(5);
    map.reclaim();
    expect(map.retired).toBe(0);
    expect(map.invalidate(at(1), 5 * C)).toBe(0); // freed: nothing left to withdraw
    map.clear();
    expect(map.size).toBe(0);
  });

  it('without a bound nothing is evicted', () => {
    const map = new VhostBlkMap(12, 64 << 20);
    for (let k = 0; k < 4; k++) map.set(at(k), 2 * C, k * 2 ** 30, true);
    expect([map.size, map.retired]).toEqual([8, 0]);
    expect(() => new VhostBlkMap(12, 1 << 20, -1)).toThrow(/maxBytes must be an integer >= 0/);
  });
});
