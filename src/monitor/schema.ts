/**
 * One typed definition per QMP command: its arguments (names, types, which are optional),
 * a line of documentation, and the handler, whose argument type the compiler derives from the
 * definition. The monitor validates a request against the definition before the handler runs,
 * with QEMU's messages for a missing, unexpected or mistyped member.
 */
import { QmpError } from './errors.js';

/** The argument types QMP commands use. */
export type ArgType =
  | 'str'
  | 'int'
  | 'number'
  | 'bool'
  | 'any'
  | { readonly enum: readonly string[] }
  | { readonly object: ArgSpec }
  | { readonly array: ArgType };

export interface ArgField {
  readonly type: ArgType;
  readonly optional?: boolean;
  readonly doc?: string;
}

export type ArgSpec = { readonly [name: string]: ArgField };

/** The TypeScript type of a value of `T`. */
export type ValueOf<T extends ArgType> = T extends 'str'
  ? string
  : T extends 'int' | 'number'
    ? number
    : T extends 'bool'
      ? boolean
      : T extends 'any'
        ? unknown
        : T extends { readonly enum: readonly (infer E)[] }
          ? E
          : T extends { readonly object: infer S extends ArgSpec }
            ? ArgsOf<S>
            : T extends { readonly array: infer I extends ArgType }
              ? ValueOf<I>[]
              : never;

type Required<S extends ArgSpec> = { [K in keyof S as S[K]['optional'] extends true ? never : K]: ValueOf<S[K]['type']> };
type Optional<S extends ArgSpec> = { [K in keyof S as S[K]['optional'] extends true ? K : never]?: ValueOf<S[K]['type']> };

/** The handler's view of a request's arguments. */
export type ArgsOf<S extends ArgSpec> = Required<S> & Optional<S>;

/** The client a command runs for (set by the monitor). */
export interface CommandClient {
  negotiated: boolean;
}

export interface CommandDef<S extends ArgSpec = ArgSpec> {
  readonly name: string;
  readonly doc: string;
  readonly args: S;
  /** Members beyond `args` are let through untouched (blockdev-add's driver options). */
  readonly open?: boolean;
  run(args: ArgsOf<S>, client: CommandClient): unknown;
}

/** Keeps the literal types of a definition, so its handler is typed by its arguments. */
export function defineCommand<const S extends ArgSpec>(def: CommandDef<S>): CommandDef {
  return def as unknown as CommandDef;
}

const TYPE_NAMES: Record<string, string> = { str: 'string', int: 'integer', number: 'number', bool: 'boolean' };

function typeName(t: ArgType): string {
  if (typeof t === 'string') return TYPE_NAMES[t] ?? t;
  if ('enum' in t) return 'string';
  if ('object' in t) return 'object';
  return 'array';
}

function fail(msg: string): never {
  throw new QmpError('GenericError', msg);
}

function checkValue(path: string, t: ArgType, v: unknown): void {
  const bad = (): never => fail(`Invalid parameter type for '${path}', expected: ${typeName(t)}`);
  if (t === 'any') return;
  if (t === 'str') {
    if (typeof v !== 'string') bad();
  } else if (t === 'int') {
    if (typeof v !== 'number' || !Number.isSafeInteger(v)) bad();
  } else if (t === 'number') {
    if (typeof v !== 'number' || !Number.isFinite(v)) bad();
  } else if (t === 'bool') {
    if (typeof v !== 'boolean') bad();
  } else if ('enum' in t) {
    if (typeof v !== 'string') bad();
    if (!t.enum.includes(v as string)) fail(`Parameter '${path}' does not accept value '${String(v)}'`);
  } else if ('object' in t) {
    if (!v || typeof v !== 'object' || Array.isArray(v)) bad();
    checkArgs(t.object, v as Record<string, unknown>, false, `${path}.`);
  } else {
    if (!Array.isArray(v)) bad();
    (v as unknown[]).forEach((x, i) => checkValue(`${path}[${i}]`, t.array, x));
  }
}

/** Throws QEMU's GenericError for the first thing wrong with `args`. */
export function checkArgs(spec: ArgSpec, args: Record<string, unknown>, open = false, prefix = ''): void {
  if (!open) for (const k of Object.keys(args)) if (!(k in spec)) fail(`Parameter '${prefix}${k}' is unexpected`);
  for (const [k, f] of Object.entries(spec)) {
    const v = args[k];
    if (v === undefined) {
      if (!f.optional) fail(`Parameter '${prefix}${k}' is missing`);
      continue;
    }
    checkValue(`${prefix}${k}`, f.type, v);
  }
}
