/**
 * Option haggling of the fixed newstyle handshake ("Fixed newstyle negotiation", "Option
 * types" in specs/nbd-proto.md). Every option is answered synchronously from the export
 * table; the connection (the `Negotiator`) owns the socket and the negotiated state.
 *
 *   client flags ─> { IHAVEOPT opt len data } * ─> EXPORT_NAME | GO ─> transmission
 *                                              └─> ABORT ─> close
 */
import type { NbdExport } from './export.js';
import * as P from './protocol.js';

/** Negotiated state and the few things option handling needs of the connection. */
export interface Negotiator {
  fixedNewstyle: boolean;
  noZeroes: boolean;
  structured: boolean;
  /** Contexts chosen by the last SET_META_CONTEXT, and the export it named. */
  metaExport: string | null;
  metaBase: boolean;
  metaDepth: boolean;
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  shuttingDown(): boolean;
  /** Sends an option reply (fixed newstyle framing). */
  optReply(opt: number, type: number, payload?: Buffer): void;
  /** Sends raw bytes (the EXPORT_NAME answer). */
  sendRaw(b: Buffer): void;
  /** Enters transmission on `exp`; `align` > 1 when the client agreed to block sizes. */
  enterTransmission(exp: NbdExport, align: number): void;
  /** Ends the session after what was sent (soft) or at once (hard). */
  endSession(hard: boolean): void;
}

const utf8 = (b: Buffer, s: number, e: number): string => b.toString('utf8', s, e);

function errReply(n: Negotiator, opt: number, type: number, msg: string): void {
  n.optReply(opt, type, Buffer.from(msg.slice(0, P.MAX_STRING), 'utf8'));
}

/** Handles one option; `data` is its whole payload. */
export function handleOption(n: Negotiator, opt: number, data: Buffer): void {
  if (!n.fixedNewstyle && opt !== P.OPT_EXPORT_NAME) {
    // Plain newstyle has no option replies: the only thing left is to hang up.
    n.endSession(true);
    return;
  }
  if (n.shuttingDown() && opt !== P.OPT_ABORT) {
    if (opt === P.OPT_EXPORT_NAME) return n.endSession(true);
    return errReply(n, opt, P.REP_ERR_SHUTDOWN, 'Server is shutting down');
  }
  switch (opt) {
    case P.OPT_EXPORT_NAME: return exportName(n, data);
    case P.OPT_ABORT:
      n.optReply(opt, P.REP_ACK);
      return n.endSession(false);
    case P.OPT_LIST: return list(n, data);
    case P.OPT_STARTTLS:
      return errReply(n, opt, P.REP_ERR_POLICY, 'TLS not configured');
    case P.OPT_INFO:
    case P.OPT_GO: return infoGo(n, opt, data);
    case P.OPT_STRUCTURED_REPLY:
      if (data.length) return errReply(n, opt, P.REP_ERR_INVALID, 'option STRUCTURED_REPLY takes no data');
      if (n.structured) return errReply(n, opt, P.REP_ERR_INVALID, 'structured reply already negotiated');
      n.structured = true;
      return n.optReply(opt, P.REP_ACK);
    case P.OPT_LIST_META_CONTEXT:
    case P.OPT_SET_META_CONTEXT: return metaContext(n, opt, data);
    default:
      return errReply(n, opt, P.REP_ERR_UNSUP, `Unsupported option ${opt}`);
  }
}

function exportName(n: Negotiator, data: Buffer): void {
  const exp = n.findExport(utf8(data, 0, data.length));
  // "If the chosen export does not exist ... the server MUST terminate the session."
  if (!exp) return n.endSession(true);
  const b = Buffer.alloc(n.noZeroes ? 10 : 134);
  b.writeBigUInt64BE(BigInt(exp.size), 0);
  b.writeUInt16BE(exp.flags(n.structured), 8);
  n.sendRaw(b);
  n.enterTransmission(exp, 1);
}

function list(n: Negotiator, data: Buffer): void {
  if (data.length) return errReply(n, P.OPT_LIST, P.REP_ERR_INVALID, 'option LIST takes no data');
  for (const e of n.listExports()) {
    const name = Buffer.from(e.name, 'utf8');
    const desc = Buffer.from(e.description, 'utf8');
    const b = Buffer.alloc(4 + name.length + desc.length);
    b.writeUInt32BE(name.length, 0);
    name.copy(b, 4);
    desc.copy(b, 4 + name.length);
    n.optReply(P.OPT_LIST, P.REP_SERVER, b);
  }
  n.optReply(P.OPT_LIST, P.REP_ACK);
}

function info(type: number, body: Buffer): Buffer {
  const b = Buffer.alloc(2 + body.length);
  b.writeUInt16BE(type, 0);
  body.copy(b, 2);
  return b;
}

function infoGo(n: Negotiator, opt: number, data: Buffer): void {
  if (data.length < 6) return errReply(n, opt, P.REP_ERR_INVALID, 'option INFO/GO data too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > data.length - 6) return errReply(n, opt, P.REP_ERR_INVALID, 'export name length exceeds the option data');
  const name = utf8(data, 4, 4 + nameLen);
  const count = data.readUInt16BE(4 + nameLen);
  if (data.length !== 6 + nameLen + 2 * count) return errReply(n, opt, P.REP_ERR_INVALID, 'information request count does not match the option length');
  const wants = new Set<number>();
  for (let i = 0; i < count; i++) wants.add(data.readUInt16BE(6 + nameLen + 2 * i));
  const exp = n.findExport(name);
  if (!exp) return errReply(n, opt, P.REP_ERR_UNKNOWN, `export '${name}' not present`);

  const flags = exp.flags(n.structured);
  const ex = Buffer.alloc(10);
  ex.writeBigUInt64BE(BigInt(exp.size), 0);
  ex.writeUInt16BE(flags, 8);
  if (wants.has(P.INFO_NAME)) n.optReply(opt, P.REP_INFO, info(P.INFO_NAME, Buffer.from(exp.name, 'utf8')));
  if (wants.has(P.INFO_DESCRIPTION) && exp.description) n.optReply(opt, P.REP_INFO, info(P.INFO_DESCRIPTION, Buffer.from(exp.description, 'utf8')));
  // Block sizes always (as QEMU does); a client that asked for them must honour them.
  const min = exp.minBlock();
  const bs = Buffer.alloc(12);
  bs.writeUInt32BE(min, 0);
  bs.writeUInt32BE(Math.max(4096, min), 4);
  bs.writeUInt32BE(P.MAX_PAYLOAD, 8);
  n.optReply(opt, P.REP_INFO, info(P.INFO_BLOCK_SIZE, bs));
  n.optReply(opt, P.REP_INFO, info(P.INFO_EXPORT, ex));
  n.optReply(opt, P.REP_ACK);
  if (opt === P.OPT_GO) n.enterTransmission(exp, wants.has(P.INFO_BLOCK_SIZE) ? min : 1);
}

/** Contexts an export offers that a query matches ("Metadata querying"; qemu's "qemu:" wildcard). */
function matches(exp: NbdExport, q: string, listing: boolean): { base: boolean; depth: boolean } {
  const base = q === P.META_BASE_ALLOCATION || (listing && q === 'base:');
  const depth = exp.allocationDepth && (q === P.META_ALLOCATION_DEPTH || (listing && q === 'qemu:'));
  return { base, depth };
}

function metaContext(n: Negotiator, opt: number, data: Buffer): void {
  const set = opt === P.OPT_SET_META_CONTEXT;
  if (set) {
    n.metaExport = null;
    n.metaBase = n.metaDepth = false;
  }
  if (!n.structured) return errReply(n, opt, P.REP_ERR_INVALID, 'structured replies must be negotiated first');
  if (data.length < 8) return errReply(n, opt, P.REP_ERR_INVALID, 'option data too short');
  const nameLen = data.readUInt32BE(0);
  if (nameLen > P.MAX_STRING || 4 + nameLen + 4 > data.length) return errReply(n, opt, P.REP_ERR_INVALID, 'export name length exceeds the option data');
  const name = utf8(data, 4, 4 + nameLen);
  const count = data.readUInt32BE(4 + nameLen);
  const queries: string[] = [];
  let pos = 8 + nameLen;
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) return errReply(n, opt, P.REP_ERR_INVALID, 'query length exceeds the option data');
    const len = data.readUInt32BE(pos);
    if (len > P.MAX_STRING || pos + 4 + len > data.length) return errReply(n, opt, P.REP_ERR_INVALID, 'query length exceeds the option data');
    queries.push(utf8(data, pos + 4, pos + 4 + len));
    pos += 4 + len;
  }
  if (pos !== data.length) return errReply(n, opt, P.REP_ERR_INVALID, 'trailing bytes after the queries');
  const exp = n.findExport(name);
  if (!exp) return errReply(n, opt, P.REP_ERR_UNKNOWN, `export '${name}' not present`);
  let base = false;
  let depth = false;
  if (count === 0 && !set) {
    base = true;
    depth = exp.allocationDepth;
  }
  for (const q of queries) {
    const m = matches(exp, q, !set);
    base ||= m.base;
    depth ||= m.depth;
  }
  if (base) n.optReply(opt, P.REP_META_CONTEXT, metaReply(set ? CONTEXT_BASE : 0, P.META_BASE_ALLOCATION));
  if (depth) n.optReply(opt, P.REP_META_CONTEXT, metaReply(set ? CONTEXT_DEPTH : 0, P.META_ALLOCATION_DEPTH));
  if (set) {
    n.metaExport = name;
    n.metaBase = base;
    n.metaDepth = depth;
  }
  n.optReply(opt, P.REP_ACK);
}

/** Context ids this server hands out (transient per the spec; fixed here). */
export const CONTEXT_BASE = 0;
export const CONTEXT_DEPTH = 1;

function metaReply(id: number, name: string): Buffer {
  const s = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + s.length);
  b.writeUInt32BE(id, 0);
  s.copy(b, 4);
  return b;
}
