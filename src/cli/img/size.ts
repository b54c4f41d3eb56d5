/**
 * Sizes as qemu-img reads and prints them.
 *
 * Input: plain bytes (decimal or 0x hex), or a decimal (fractions allowed) with one of the
 * binary suffixes k/K, M, G, T, P, E; 'b'/'B' means bytes. Output: three significant
 * digits with an IEC unit ("1 GiB", "3.5 MiB", "0 B"), switching unit at 1000 so a value
 * never prints as four digits.
 */
import { CliError } from '../fail.js';

const SIZE_HELP =
  'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';
const SHIFT: Record<string, bigint> = { B: 0n, K: 10n, M: 20n, G: 30n, T: 40n, P: 50n, E: 60n };
const INT64_MAX = (1n << 63n) - 1n;

/** Parses an image size; throws CliError with qemu-img's message when it is not one. */
export function parseSize(text: string, fmt = 'raw'): number {
  const m = /^\s*(?:(0x[0-9a-f]+)|(\d+)(?:\.(\d+))?)\s*([bkmgtpe])?$/i.exec(text);
  // A fraction needs a unit, or "1.5" would silently mean 1 byte.
  if (!m || (m[3] !== undefined && (m[4] === undefined || /b/i.test(m[4])))) throw new CliError(SIZE_HELP);
  const shift = SHIFT[(m[4] ?? 'B').toUpperCase()]!;
  let bytes: bigint;
  if (m[1] !== undefined) {
    bytes = BigInt(m[1]) << shift;
  } else {
    // Exact arithmetic on the fraction: floor((int.frac) * 2^shift).
    const frac = m[3] ?? '';
    const scale = 10n ** BigInt(frac.length);
    bytes = ((BigInt(m[2]!) * scale + BigInt(frac || '0')) << shift) / scale;
  }
  if (bytes > INT64_MAX) throw new CliError(`Invalid image size specified. Must be between 0 and ${INT64_MAX}.`);
  if (bytes > BigInt(Number.MAX_SAFE_INTEGER)) throw new CliError(`The image size is too large for file format '${fmt}'`);
  return Number(bytes);
}

/** Parses a non-negative integer option value (counts, depths, offsets with suffixes). */
export function parseCount(text: string, what: string, min = 0): number {
  let n: number;
  try {
    n = parseSize(text);
  } catch {
    throw new CliError(`Invalid ${what} specified: '${text}'`);
  }
  if (n < min) throw new CliError(`Invalid ${what} specified: '${text}' (must be at least ${min})`);
  return n;
}

const UNITS = ['', 'Ki', 'Mi', 'Gi', 'Ti', 'Pi', 'Ei'];

/** C's "%.3g" for the non-negative values printed here. */
function g3(x: number): string {
  if (x === 0) return '0';
  const exp = Math.floor(Math.log10(x));
  let s = x.toPrecision(3);
  if (s.includes('e') || exp >= 3) {
    // %g switches to exponent form once the rounded value needs a fourth digit.
    const [mant, e] = x.toExponential(2).split('e');
    const m2 = mant!.replace(/\.?0+$/, '');
    const ev = Number(e);
    return `${m2}e${ev < 0 ? '-' : '+'}${String(Math.abs(ev)).padStart(2, '0')}`;
  }
  if (s.includes('.')) s = s.replace(/\.?0+$/, '');
  return s;
}

/** Human size like qemu-img: "1 GiB", "4 KiB", "0 B". */
export function sizeToStr(bytes: number): string {
  // Unit index: floor(log2(bytes * 1024 / 1000) / 10), so 1000..1023 already use the next unit.
  let i = 0;
  if (bytes > 0) {
    const e = Math.floor(Math.log2(bytes / (1000 / 1024)));
    i = Math.min(UNITS.length - 1, Math.max(0, Math.floor(e / 10)));
  }
  return `${g3(bytes / 2 ** (10 * i))} ${UNITS[i]}B`;
}
