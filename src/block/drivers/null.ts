/**
 * null-co: a node of a given size that reads zeroes and drops writes, with optional latency.
 * The standard test double, and the peer-neutral target for benchmarks.
 */
import { completeSoon, zeroIov } from '../complete.js';
import { BlockError } from '../error.js';
import { stateOf } from '../node.js';
import { Perm, type BlockDriver, type IoCallback } from '../types.js';

interface NullState {
  size: number;
  latencyNs: number;
  readZeroes: boolean;
}

function complete(s: NullState, cb: IoCallback): void {
  if (s.latencyNs > 0) setTimeout(cb, s.latencyNs / 1e6, null);
  else completeSoon(cb);
}

function parseBool(v: unknown, name: string, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  if (v === true || v === 'on' || v === 'true') return true;
  if (v === false || v === 'off' || v === 'false') return false;
  throw new BlockError('EINVAL', `Parameter '${name}' expects 'on' or 'off', not '${String(v)}'`);
}

function parseNum(v: unknown, name: string, dflt: number): number {
  if (v === undefined) return dflt;
  const n = typeof v === 'string' ? Number(v) : v;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0) {
    throw new BlockError('EINVAL', `Parameter '${name}' expects a non-negative integer, not '${String(v)}'`);
  }
  return n;
}

export const nullDriver: BlockDriver = {
  format: 'null-co',
  protocol: true,
  optionKeys: ['size', 'latency-ns', 'read-zeroes', 'filename'],

  async open(node, o) {
    const st: NullState = {
      size: parseNum(o['size'], 'size', 1 << 30),
      latencyNs: parseNum(o['latency-ns'], 'latency-ns', 0),
      readZeroes: parseBool(o['read-zeroes'], 'read-zeroes', true),
    };
    node.opaque = st;
  },
  getLength: (node) => stateOf<NullState>(node).size,
  childPerms: () => ({ perm: 0, shared: Perm.ALL }),
  readv(node, _offset, bytes, iov, _flags, cb) {
    const s = stateOf<NullState>(node);
    if (s.readZeroes) zeroIov(iov, bytes);
    complete(s, cb);
  },
  writev(node, _offset, _bytes, _iov, _flags, cb) {
    complete(stateOf<NullState>(node), cb);
  },
  async flush() {},
  async writeZeroes() {},
  async discard() {},
  async blockStatus(node, _offset, bytes) {
    const s = stateOf<NullState>(node);
    return { bytes, data: !s.readZeroes, zero: s.readZeroes, allocated: true, node };
  },
  async truncate(node, length) {
    stateOf<NullState>(node).size = length;
  },
  describe(node) {
    const s = stateOf<NullState>(node);
    return { size: s.size, 'latency-ns': s.latencyNs, 'read-zeroes': s.readZeroes };
  },
};

export { parseBool, parseNum };
