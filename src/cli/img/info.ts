/**
 * `img info`: qemu-img's fields, names and shapes, so scripts written against
 * `qemu-img info --output=json` read Spindle's output unchanged.
 */
import type { BlockNode } from '../../block/node.js';
import { CliError } from '../fail.js';
import { openImage, parseJsonFilename } from './open.js';
import { sizeToStr } from './size.js';

export interface InfoOptions {
  f?: string;
  output?: string;
  forceShare?: boolean;
}

/** Host bytes allocated: the first node down the primary chain whose driver knows. */
function actualSize(node: BlockNode): number | undefined {
  for (let n: BlockNode | undefined = node; n; n = n.primary?.node) {
    if (n.driver.allocatedSize) return n.driver.allocatedSize(n);
  }
  return undefined;
}

/** QEMU prints json: filenames re-serialised, with a space after ':' and ','. */
function spaced(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(spaced).join(', ')}]`;
  if (typeof v === 'object' && v !== null) {
    return `{${Object.entries(v).map(([k, x]) => `${JSON.stringify(k)}: ${spaced(x)}`).join(', ')}}`;
  }
  return JSON.stringify(v);
}

export async function imgInfo(filename: string, opts: InfoOptions): Promise<void> {
  const output = opts.output ?? 'human';
  if (output !== 'human' && output !== 'json') throw new CliError('--output must be used with human or json as argument.');
  const img = await openImage({ filename, fmt: opts.f, readOnly: true, forceShare: opts.forceShare });
  try {
    const node = img.node;
    const json = parseJsonFilename(filename);
    const info: Record<string, unknown> = {
      'virtual-size': img.io.getLength(),
      filename: json ? `json:${spaced(json)}` : filename,
      format: node.driver.format,
    };
    info['actual-size'] = actualSize(node) ?? 0;
    // Formats (not protocols) report their dirty flag; raw has none to set.
    if (!node.driver.protocol) info['dirty-flag'] = false;
    if (output === 'json') {
      process.stdout.write(`${JSON.stringify(info, null, 4)}\n`);
      return;
    }
    const vs = info['virtual-size'] as number;
    process.stdout.write(
      `image: ${info.filename as string}\n` +
        `file format: ${info.format as string}\n` +
        `virtual size: ${sizeToStr(vs)} (${vs} bytes)\n` +
        `disk size: ${sizeToStr(info['actual-size'] as number)}\n`,
    );
  } finally {
    img.close();
  }
}
