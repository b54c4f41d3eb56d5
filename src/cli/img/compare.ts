/**
 * `img compare`: whether two images read the same, with qemu-img's messages and exit
 * codes (0 identical, 1 different, 2 an error). Ranges both images report as zero are not
 * read; everything else is read in chunks of up to 2 MiB and compared. A mismatch is
 * reported at the first differing 512-byte sector of its chunk, as qemu-img does.
 * Without -s, images of different sizes are identical if the longer one reads as zeroes
 * past the end of the shorter one.
 */
import { reportError } from '../fail.js';
import { chainStatus, type ChainAnswer } from './map.js';
import { openImage, type OpenImage } from './open.js';
import { Progress } from './progress.js';

export interface CompareOptions {
  f?: string;
  F?: string;
  s?: boolean;
  q?: boolean;
  p?: boolean;
  forceShare?: boolean;
}

const BUF = 2 << 20;
const SECTOR = 512;

/** Index of the first byte where a and b differ in [0, n), or -1. */
function firstDiff(a: Buffer, b: Buffer, n: number): number {
  if (a.compare(b, 0, n, 0, n) === 0) return -1;
  // Narrow down by sectors with memcmp, then by bytes.
  for (let s = 0; s < n; s += SECTOR) {
    const e = Math.min(n, s + SECTOR);
    if (a.compare(b, s, e, s, e) !== 0) for (let i = s; i < e; i++) if (a[i] !== b[i]) return i;
  }
  return -1;
}

/** What qemu's strict mode compares: the kind of the answer, not where it came from. */
function sameStatus(x: ChainAnswer, y: ChainAnswer): boolean {
  return x.allocated === y.allocated && x.zero === y.zero && x.data === y.data && (x.offset === undefined) === (y.offset === undefined);
}

class Mismatch {
  constructor(readonly message: string) {}
}

async function compareImages(a: OpenImage, b: OpenImage, opts: CompareOptions, say: (s: string) => void): Promise<number> {
  const ra = a.backend.root!;
  const rb = b.backend.root!;
  const sizeA = a.io.getLength();
  const sizeB = b.io.getLength();
  if (opts.s && sizeA !== sizeB) {
    say('Strict mode: Image size mismatch!\n');
    return 1;
  }
  const common = Math.min(sizeA, sizeB);
  const total = Math.max(sizeA, sizeB);
  const progress = new Progress(!!opts.p && !opts.q);
  const bufA = Buffer.alloc(BUF);
  const bufB = Buffer.alloc(BUF);
  const zero = Buffer.alloc(BUF);
  const differ = (off: number, i: number): never => {
    throw new Mismatch(`Content mismatch at offset ${off + Math.floor(i / SECTOR) * SECTOR}!\n`);
  };
  try {
    for (let off = 0; off < common; ) {
      const sa = await chainStatus(ra, off, common - off);
      const sb = await chainStatus(rb, off, common - off);
      let chunk = Math.min(sa.bytes, sb.bytes);
      if (opts.s && !sameStatus(sa, sb)) {
        say(`Strict mode: Offset ${off} block status mismatch!\n`);
        return 1;
      }
      if (!(sa.zero && sb.zero)) {
        chunk = Math.min(chunk, BUF);
        const da = sa.zero ? zero : bufA;
        const db = sb.zero ? zero : bufB;
        if (!sa.zero) await a.io.read(off, bufA.subarray(0, chunk));
        if (!sb.zero) await b.io.read(off, bufB.subarray(0, chunk));
        const i = firstDiff(da, db, chunk);
        if (i >= 0) differ(off, i);
      }
      off += chunk;
      progress.update(off, total);
    }
    if (sizeA !== sizeB) {
      say('Warning: Image size mismatch!\n');
      const [over, root] = sizeA > sizeB ? [a, ra] : [b, rb];
      for (let off = common; off < total; ) {
        const st = await chainStatus(root, off, total - off);
        let chunk = st.bytes;
        if (!st.zero) {
          chunk = Math.min(chunk, BUF);
          await over.io.read(off, bufA.subarray(0, chunk));
          const i = firstDiff(bufA, zero, chunk);
          if (i >= 0) differ(off, i);
        }
        off += chunk;
        progress.update(off, total);
      }
    }
  } catch (e) {
    if (!(e instanceof Mismatch)) throw e;
    progress.finish();
    say(e.message);
    return 1;
  }
  progress.finish();
  say('Images are identical.\n');
  return 0;
}

export async function imgCompare(fileA: string, fileB: string, opts: CompareOptions): Promise<void> {
  const say = (s: string): void => {
    if (!opts.q) process.stdout.write(s);
  };
  let a: OpenImage | undefined;
  let b: OpenImage | undefined;
  try {
    a = await openImage({ filename: fileA, fmt: opts.f, readOnly: true, forceShare: opts.forceShare });
    b = await openImage({ filename: fileB, fmt: opts.F, readOnly: true, forceShare: opts.forceShare });
    process.exitCode = await compareImages(a, b, opts, say);
  } catch (e) {
    reportError('spindle img', e);
    process.exitCode = 2; // qemu-img compare: 2 means "could not compare"
  } finally {
    b?.close();
    a?.close();
  }
}
