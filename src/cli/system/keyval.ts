/**
 * QEMU's option syntax: `key=value` pairs separated by commas, a doubled comma standing for a
 * comma inside a value, and for some options an implied key for a bare first item
 * (`-device virtio-blk-pci,drive=d0` is driver=virtio-blk-pci). Dotted keys build nested
 * objects (`file.filename=x` is { file: { filename: 'x' } }), as -blockdev takes them.
 */
import { CliError } from '../fail.js';

export type KeyvalObject = { [key: string]: string | KeyvalObject };

/** Splits on single commas; ",," is a literal comma. */
function splitItems(s: string): string[] {
  const items: string[] = [];
  let cur = '';
  for (let i = 0; i < s.length; i++) {
    const ch = s[i]!;
    if (ch !== ',') cur += ch;
    else if (s[i + 1] === ',') {
      cur += ',';
      i++;
    } else {
      items.push(cur);
      cur = '';
    }
  }
  items.push(cur);
  return items;
}

/**
 * Parses `text` for option `opt` (named in errors). `implied`: the key a bare first item
 * stands for; without it a bare item is an error, as in QEMU.
 */
export function parseKeyval(opt: string, text: string, implied?: string): KeyvalObject {
  const out: KeyvalObject = {};
  splitItems(text).forEach((item, i) => {
    const eq = item.indexOf('=');
    let key: string;
    let value: string;
    if (eq < 0) {
      if (i === 0 && implied) {
        key = implied;
        value = item;
      } else if (item === '') {
        if (i === 0 && text === '') throw new CliError(`${opt}: an argument is required`);
        throw new CliError(`${opt}: empty item in '${text}'`);
      } else {
        throw new CliError(`${opt}: Expected '=' after parameter '${item}'`);
      }
    } else {
      key = item.slice(0, eq);
      value = item.slice(eq + 1);
    }
    if (!/^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$/.test(key)) throw new CliError(`${opt}: Invalid parameter '${key}'`);
    const parts = key.split('.');
    let obj = out;
    for (const p of parts.slice(0, -1)) {
      const next = obj[p];
      if (typeof next === 'string') throw new CliError(`${opt}: Parameter '${p}' used inconsistently`);
      obj = obj[p] = next ?? {};
    }
    const last = parts[parts.length - 1]!;
    if (typeof obj[last] === 'object') throw new CliError(`${opt}: Parameter '${key}' used inconsistently`);
    obj[last] = value;
  });
  return out;
}

/** QEMU's on/off (and the yes/no/true/false it also takes) for option `name`. */
export function parseBool(opt: string, name: string, v: string | KeyvalObject | undefined, dflt: boolean): boolean {
  if (v === undefined) return dflt;
  if (v === 'on' || v === 'yes' || v === 'true') return true;
  if (v === 'off' || v === 'no' || v === 'false') return false;
  throw new CliError(`${opt}: Parameter '${name}' expects 'on' or 'off'`);
}

/** Sizes as QEMU takes them: a number with an optional k/M/G/T suffix; `unit` for a bare number. */
export function parseSize(opt: string, text: string, unit = 1): number {
  const m = /^(\d+(?:\.\d+)?)([kKmMgGtT]?)[bB]?$/.exec(text);
  if (!m) throw new CliError(`${opt}: invalid size '${text}'`);
  const mult = m[2] ? 1024 ** ' kmgt'.indexOf(m[2].toLowerCase()) : unit;
  const v = Number(m[1]) * mult;
  if (!Number.isSafeInteger(v)) throw new CliError(`${opt}: size '${text}' is not a whole number of bytes`);
  return v;
}

/** Keyval strings as the typed values QMP arguments are: numbers, booleans (arrays and objects inside). */
export function typedKeyval(v: unknown): unknown {
  if (Array.isArray(v)) return v.map(typedKeyval);
  if (typeof v === 'object' && v !== null) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, typedKeyval(x)]));
  if (v === 'on' || v === 'true') return true;
  if (v === 'off' || v === 'false') return false;
  if (typeof v === 'string' && /^\d+$/.test(v) && v.length < 16) return Number(v);
  return v;
}
