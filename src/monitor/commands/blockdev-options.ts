/**
 * blockdev-add's arguments: QEMU's flat union BlockdevOptions (qapi/block-core.json), checked
 * the way QEMU's QAPI input visitor checks them and with its messages, before the block layer
 * sees them:
 *
 *   { driver, node-name?, read-only?, cache?, ...base,  ...the driver's own members }
 *                                       file / backing / image: BlockdevRef
 *                                       (a node-name string, or nested BlockdevOptions)
 *
 * Each driver Spindle has lists QEMU's members for it; a member QEMU knows but Spindle's
 * driver does not implement passes here and is refused by openNode ("does not support the
 * option"), a member QEMU does not know is "unexpected". A driver registered without a table
 * here accepts its own option keys, untyped.
 *
 * Context: main loop.
 */
import { driverNames, getDriver } from '../../block/drivers/index.js';
import { findNode } from '../../block/graph.js';
import { QmpError } from '../errors.js';
import { checkArgs, type ArgSpec } from '../schema.js';

/** BlockdevOptionsBase. */
const BASE: ArgSpec = {
  driver: { type: 'str' },
  'node-name': { type: 'str', optional: true },
  discard: { type: { enum: ['ignore', 'unmap'] }, optional: true },
  cache: { type: { object: { direct: { type: 'bool', optional: true }, 'no-flush': { type: 'bool', optional: true } } }, optional: true },
  'read-only': { type: 'bool', optional: true },
  'auto-read-only': { type: 'bool', optional: true },
  'force-share': { type: 'bool', optional: true },
  'detect-zeroes': { type: { enum: ['off', 'on', 'unmap'] }, optional: true },
};

/** A child reference member: its QAPI type name and whether null (no child) is allowed. */
interface RefMember {
  readonly typeName: 'BlockdevRef' | 'BlockdevRefOrNull';
  readonly optional: boolean;
}

interface DriverSchema {
  readonly members: ArgSpec;
  readonly refs: { readonly [name: string]: RefMember };
}

const FILE_REF: RefMember = { typeName: 'BlockdevRef', optional: false };

const SCHEMAS: { readonly [driver: string]: DriverSchema } = {
  file: {
    members: {
      filename: { type: 'str' },
      'pr-manager': { type: 'str', optional: true },
      locking: { type: { enum: ['off', 'on', 'auto'] }, optional: true },
      aio: { type: { enum: ['threads', 'native', 'io_uring'] }, optional: true },
      'aio-max-batch': { type: 'int', optional: true },
      'drop-cache': { type: 'bool', optional: true },
      'x-check-cache-dropped': { type: 'bool', optional: true },
      // Spindle's own: which native engine serves the file.
      'x-engine': { type: 'any', optional: true },
    },
    refs: {},
  },
  'null-co': {
    members: {
      size: { type: 'int', optional: true },
      'latency-ns': { type: 'int', optional: true },
      'read-zeroes': { type: 'bool', optional: true },
    },
    refs: {},
  },
  raw: {
    members: { offset: { type: 'int', optional: true }, size: { type: 'int', optional: true } },
    refs: { file: FILE_REF },
  },
  qcow2: {
    members: {
      'lazy-refcounts': { type: 'bool', optional: true },
      'pass-discard-request': { type: 'bool', optional: true },
      'pass-discard-snapshot': { type: 'bool', optional: true },
      'pass-discard-other': { type: 'bool', optional: true },
      'discard-no-unref': { type: 'bool', optional: true },
      'overlap-check': { type: 'any', optional: true },
      'cache-size': { type: 'int', optional: true },
      'l2-cache-size': { type: 'int', optional: true },
      'l2-cache-entry-size': { type: 'int', optional: true },
      'refcount-cache-size': { type: 'int', optional: true },
      'cache-clean-interval': { type: 'int', optional: true },
      encrypt: { type: 'any', optional: true },
      'data-file': { type: 'any', optional: true },
    },
    refs: { file: FILE_REF, backing: { typeName: 'BlockdevRefOrNull', optional: true } },
  },
  blkdebug: {
    members: {
      config: { type: 'str', optional: true },
      align: { type: 'int', optional: true },
      'max-transfer': { type: 'int', optional: true },
      'opt-write-zero': { type: 'int', optional: true },
      'max-write-zero': { type: 'int', optional: true },
      'opt-discard': { type: 'int', optional: true },
      'max-discard': { type: 'int', optional: true },
      'inject-error': { type: { array: 'any' }, optional: true },
      'set-state': { type: { array: 'any' }, optional: true },
      'take-child-perms': { type: { array: 'any' }, optional: true },
      'unshare-child-perms': { type: { array: 'any' }, optional: true },
      'x-stop-writes-after': { type: 'int', optional: true },
    },
    // QEMU names the child 'image'; Spindle's descriptions name it 'file' (its edge's name).
    refs: { image: { typeName: 'BlockdevRef', optional: true }, file: { typeName: 'BlockdevRef', optional: true } },
  },
};

function fail(msg: string): never {
  throw new QmpError('GenericError', msg);
}

/** The schema of a driver: its table here, or (a driver added later) its option keys, untyped. */
function schemaOf(driver: string): DriverSchema {
  const s = SCHEMAS[driver];
  if (s) return s;
  const members: Record<string, { type: 'any'; optional: true }> = {};
  const refs: Record<string, RefMember> = {};
  for (const k of getDriver(driver).optionKeys) {
    if (k === 'file' || k === 'backing' || k === 'image') refs[k] = { typeName: 'BlockdevRefOrNull', optional: true };
    else members[k] = { type: 'any', optional: true };
  }
  return { members, refs };
}

/**
 * Checks one BlockdevOptions object (the top one, or a nested child's at `prefix`), then its
 * nested children. Throws QmpError with QEMU's message for the first problem.
 */
export function checkBlockdevOptions(o: Record<string, unknown>, prefix = ''): void {
  const driver = o['driver'];
  if (driver === undefined) fail(`Parameter '${prefix}driver' is missing`);
  if (typeof driver !== 'string') fail(`Invalid parameter type for '${prefix}driver', expected: string`);
  if (!driverNames().includes(driver)) fail(`Parameter '${prefix}driver' does not accept value '${driver}'`);
  const schema = schemaOf(driver);
  const spec: ArgSpec = { ...BASE, ...schema.members };
  // Types and required members first, then strays: the order QEMU's visitor reports them in.
  checkArgs(spec, o, true, prefix);
  for (const [name, ref] of Object.entries(schema.refs)) {
    const v = o[name];
    const path = `${prefix}${name}`;
    if (v === undefined) {
      if (!ref.optional) fail(`Parameter '${path}' is missing`);
      continue;
    }
    if (v === null && ref.typeName === 'BlockdevRefOrNull') continue;
    if (typeof v === 'string') {
      if (!findNode(v)) fail(`Cannot find device='${v}' nor node-name='${v}'`);
      continue;
    }
    if (typeof v !== 'object' || v === null || Array.isArray(v)) fail(`Invalid parameter type for '${path}', expected: ${ref.typeName}`);
    checkBlockdevOptions(v as Record<string, unknown>, `${path}.`);
  }
  if (driver === 'blkdebug' && o['image'] === undefined && o['file'] === undefined) fail(`Parameter '${prefix}image' is missing`);
  for (const k of Object.keys(o)) if (!(k in spec) && !(k in schema.refs)) fail(`Parameter '${prefix}${k}' is unexpected`);
}
