/**
 * blkdebug: a filter that injects errors on events, for fault-injection tests.
 *
 * Rules follow QEMU's: `inject-error` rules fire on an event (in a state, optionally only
 * for requests touching `offset`), fail with `errno` once or always; `set-state` rules move
 * the state machine on an event. Requests raise their own events (read_aio, write_aio,
 * flush_to_disk, discard, write_zeroes); format drivers raise theirs with debugEvent().
 * `align` forces a request alignment, to exercise read-modify-write.
 */
import { BlockError, errnoOf, ioError, type ErrnoCode } from '../error.js';
import * as io from '../io.js';
import { stateOf, type BlockChild, type BlockNode } from '../node.js';
import { defaultChildPerms } from '../perms.js';
import { ChildRole, type BlockDriver } from '../types.js';
import { parseBool, parseNum } from './null.js';

export interface InjectRule {
  event: string;
  state?: number;
  errno: number;
  once: boolean;
  immediately: boolean;
  offset?: number;
  /** Spindle extension: let this many matching requests through before failing. */
  skip: number;
}
interface SetStateRule {
  event: string;
  state?: number;
  newState: number;
}
interface BlkdebugState {
  state: number;
  inject: InjectRule[];
  setState: SetStateRule[];
  /** Rules armed by an event, checked by the next request. */
  active: InjectRule[];
  align: number;
  /** Spindle extension for crash tests: every modifying request after this many fails (-1: never). */
  stopAfter: number;
  /** Modifying requests seen (write, write-zeroes, discard, truncate). */
  writes: number;
}

const ERRNO_BY_NUMBER: Record<number, ErrnoCode> = { 5: 'EIO', 28: 'ENOSPC', 1: 'EPERM', 22: 'EINVAL', 123: 'ENOMEDIUM', 95: 'ENOTSUP', 122: 'EDQUOT' };

function list(v: unknown, name: string): Record<string, unknown>[] {
  if (v === undefined) return [];
  const arr = Array.isArray(v) ? v : [v];
  for (const r of arr) {
    if (typeof r !== 'object' || r === null) throw new BlockError('EINVAL', `Parameter '${name}' expects a list of rule objects`);
  }
  return arr as Record<string, unknown>[];
}

function parseErrno(v: unknown): number {
  if (v === undefined) return 5;
  if (typeof v === 'string' && /^E[A-Z]+$/.test(v)) return errnoOf(v as ErrnoCode);
  return parseNum(v, 'errno', 5);
}

/** Raises `event` on every blkdebug node at or below `child` (format drivers call this). */
export function debugEvent(child: BlockChild | undefined, event: string): void {
  for (let e = child; e; e = e.node.file) {
    if (e.node.driver === blkdebugDriver) fire(e.node, event);
  }
}

function fire(node: BlockNode, event: string): void {
  const s = stateOf<BlkdebugState>(node);
  const old = s.state;
  for (const r of s.inject) {
    if (r.event === event && (r.state === undefined || r.state === old) && !s.active.includes(r)) s.active.push(r);
  }
  for (const r of s.setState) {
    if (r.event === event && (r.state === undefined || r.state === old)) s.state = r.newState;
  }
}

/** Fires the request's event and returns the errno to fail it with, or 0. */
function check(node: BlockNode, event: string, offset: number, bytes: number): number {
  fire(node, event);
  const s = stateOf<BlkdebugState>(node);
  for (let i = 0; i < s.active.length; i++) {
    const r = s.active[i]!;
    if (r.offset !== undefined && !(r.offset >= offset && r.offset < offset + Math.max(bytes, 1))) continue;
    if (r.skip > 0) {
      r.skip--;
      s.active.splice(i, 1);
      return 0;
    }
    s.active.splice(i, 1);
    if (r.once) s.inject.splice(s.inject.indexOf(r), 1);
    return r.errno;
  }
  return 0;
}

/** Counts a modifying request; EIO once the configured number of them has gone through. */
function stopped(node: BlockNode): number {
  const s = stateOf<BlkdebugState>(node);
  s.writes++;
  return s.stopAfter >= 0 && s.writes > s.stopAfter ? 5 : 0;
}

function fail(node: BlockNode, errno: number, op: string, offset: number): BlockError {
  const code = ERRNO_BY_NUMBER[errno];
  return code ? ioError(-errnoOf(code), op, { node: node.name, offset }) : ioError(-errno, op, { node: node.name, offset });
}

function image(node: BlockNode): BlockChild {
  return node.file!;
}

export const blkdebugDriver: BlockDriver = {
  format: 'blkdebug',
  isFilter: true,
  // 'file' too: the child is named 'file', so that is the key its description uses.
  optionKeys: ['image', 'file', 'inject-error', 'set-state', 'align', 'max-transfer', 'config', 'x-stop-writes-after'],

  async open(node, o, ctx) {
    if (o['config'] !== undefined) throw new BlockError('ENOTSUP', "blkdebug: 'config' files are not supported; give rules as 'inject-error' and 'set-state'");
    const inject = list(o['inject-error'], 'inject-error').map((r): InjectRule => {
      if (typeof r['event'] !== 'string') throw new BlockError('EINVAL', "blkdebug: every inject-error rule needs an 'event'");
      const offset = r['offset'] ?? (r['sector'] !== undefined ? parseNum(r['sector'], 'sector', 0) * 512 : undefined);
      return {
        event: r['event'],
        state: r['state'] === undefined ? undefined : parseNum(r['state'], 'state', 0),
        errno: parseErrno(r['errno']),
        once: parseBool(r['once'], 'once', false),
        immediately: parseBool(r['immediately'], 'immediately', false),
        offset: offset === undefined ? undefined : parseNum(offset, 'offset', 0),
        skip: parseNum(r['x-skip'], 'x-skip', 0),
      };
    });
    const setState = list(o['set-state'], 'set-state').map((r): SetStateRule => {
      if (typeof r['event'] !== 'string') throw new BlockError('EINVAL', "blkdebug: every set-state rule needs an 'event'");
      return {
        event: r['event'],
        state: r['state'] === undefined ? undefined : parseNum(r['state'], 'state', 0),
        newState: parseNum(r['new_state'] ?? r['new-state'], 'new_state', 1),
      };
    });
    const align = parseNum(o['align'], 'align', 0);
    if (align && (align & (align - 1))) throw new BlockError('EINVAL', `blkdebug: 'align' must be a power of two, not ${align}`);
    // The image child is named 'file' so the generic views (node.file) find it; 'image' is QEMU's option name.
    const stopAfter = o['x-stop-writes-after'] === undefined ? -1 : parseNum(o['x-stop-writes-after'], 'x-stop-writes-after', 0);
    node.opaque = { state: 1, inject, setState, active: [], align, stopAfter, writes: 0 } satisfies BlkdebugState;
    await ctx.openChild(node, (o['image'] ?? o['file']) as never, 'file', ChildRole.DATA | ChildRole.FILTERED | ChildRole.PRIMARY);
  },
  refreshLimits(node) {
    const a = stateOf<BlkdebugState>(node).align;
    return a ? { requestAlignment: Math.max(a, image(node).node.limits.requestAlignment) } : {};
  },
  getLength: (node) => image(node).node.length,
  childPerms: (_n, _c, perm, shared) => defaultChildPerms(perm, shared, false),
  readv(node, offset, bytes, iov, flags, cb) {
    const err = check(node, 'read_aio', offset, bytes);
    if (err) return void process.nextTick(cb, fail(node, err, 'read', offset));
    io.readv(image(node), offset, bytes, iov, flags, cb);
  },
  writev(node, offset, bytes, iov, flags, cb) {
    const err = stopped(node) || check(node, 'write_aio', offset, bytes);
    if (err) return void process.nextTick(cb, fail(node, err, 'write', offset));
    io.writev(image(node), offset, bytes, iov, flags, cb);
  },
  async flush(node) {
    const err = check(node, 'flush_to_disk', 0, 0);
    if (err) throw fail(node, err, 'flush', 0);
  },
  async discard(node, offset, bytes) {
    const err = stopped(node) || check(node, 'discard', offset, bytes);
    if (err) throw fail(node, err, 'discard', offset);
    await io.discard(image(node), offset, bytes);
  },
  async writeZeroes(node, offset, bytes, flags) {
    const err = stopped(node) || check(node, 'write_zeroes', offset, bytes);
    if (err) throw fail(node, err, 'write-zeroes', offset);
    await io.writeZeroes(image(node), offset, bytes, flags);
  },
  async truncate(node, length, exact) {
    if (stopped(node)) throw fail(node, 5, 'truncate', length);
    await io.truncate(image(node), length, exact);
  },
  describe(node) {
    const s = stateOf<BlkdebugState>(node);
    return {
      'inject-error': s.inject.map((r) => ({ event: r.event, state: r.state, errno: r.errno, once: r.once, immediately: r.immediately, offset: r.offset })),
      'set-state': s.setState.map((r) => ({ event: r.event, state: r.state, new_state: r.newState })),
      ...(s.align ? { align: s.align } : {}),
    };
  },
};

/** Test hook: modifying requests seen so far. */
export function blkdebugWrites(node: BlockNode): number {
  return stateOf<BlkdebugState>(node).writes;
}

/** Test hook: the blkdebug state number. */
export function blkdebugState(node: BlockNode): number {
  return stateOf<BlkdebugState>(node).state;
}
