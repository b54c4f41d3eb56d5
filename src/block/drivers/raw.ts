/**
 * raw: the image is the bytes of its `file` child, optionally a window [offset, offset+size).
 */
import { BlockError } from '../error.js';
import * as io from '../io.js';
import { stateOf, type BlockNode } from '../node.js';
import { defaultChildPerms } from '../perms.js';
import { ChildRole, Perm, type BlockDriver } from '../types.js';
import { parseNum } from './null.js';

interface RawState {
  offset: number;
  /** Fixed size of the window, or -1 to follow the file. */
  size: number;
}

function file(node: BlockNode) {
  const f = node.file;
  if (!f) throw new BlockError('EIO', `raw node '${node.name}' has no file child`, { node: node.name });
  return f;
}

export const rawDriver: BlockDriver = {
  format: 'raw',
  optionKeys: ['file', 'offset', 'size'],

  async open(node, o, ctx) {
    const offset = parseNum(o['offset'], 'offset', 0);
    const size = o['size'] === undefined ? -1 : parseNum(o['size'], 'size', 0);
    const window = offset !== 0 || size >= 0;
    const role = window ? ChildRole.DATA | ChildRole.PRIMARY : ChildRole.DATA | ChildRole.FILTERED | ChildRole.PRIMARY;
    node.opaque = { offset, size } satisfies RawState;
    const child = (await ctx.openChild(node, o['file'] as never, 'file', role))!;
    const flen = child.node.length;
    if (offset > flen) throw new BlockError('EINVAL', `The sum of offset (${offset}) and size (0) has to be smaller or equal to the actual size of the containing file (${flen})`);
    if (size >= 0 && offset + size > flen) {
      throw new BlockError('EINVAL', `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the actual size of the containing file (${flen})`);
    }
  },
  getLength(node) {
    const s = stateOf<RawState>(node);
    return s.size >= 0 ? s.size : Math.max(0, file(node).node.length - s.offset);
  },
  childPerms(node, _child, perm, shared) {
    const p = defaultChildPerms(perm, shared, false);
    // A window cannot follow a resize of the file below it.
    if (stateOf<RawState>(node).size >= 0) p.perm &= ~Perm.RESIZE;
    return p;
  },
  readv(node, offset, bytes, iov, flags, cb) {
    io.readv(file(node), offset + stateOf<RawState>(node).offset, bytes, iov, flags, cb);
  },
  writev(node, offset, bytes, iov, flags, cb) {
    io.writev(file(node), offset + stateOf<RawState>(node).offset, bytes, iov, flags, cb);
  },
  async discard(node, offset, bytes) {
    await io.discard(file(node), offset + stateOf<RawState>(node).offset, bytes);
  },
  async writeZeroes(node, offset, bytes, flags) {
    await io.writeZeroes(file(node), offset + stateOf<RawState>(node).offset, bytes, flags);
  },
  async blockStatus(node, offset, bytes) {
    const s = stateOf<RawState>(node);
    const f = file(node);
    const st = await io.blockStatus(f, offset + s.offset, bytes);
    return { ...st, bytes: Math.min(st.bytes, bytes) };
  },
  async truncate(node, length, exact) {
    const s = stateOf<RawState>(node);
    if (s.size >= 0 || s.offset) throw new BlockError('ENOTSUP', `Cannot resize raw node '${node.name}' with an offset or size window`, { node: node.name });
    await io.truncate(file(node), length, exact);
  },
  describe(node) {
    const s = stateOf<RawState>(node);
    const d: Record<string, unknown> = {};
    if (s.offset) d['offset'] = s.offset;
    if (s.size >= 0) d['size'] = s.size;
    return d;
  },
};
