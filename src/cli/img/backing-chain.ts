/**
 * `img info --backing-chain`: the image and each of its backing files, top first, as
 * qemu-img prints them: a JSON list of ImageInfo objects, or the human blocks separated
 * by blank lines. Each backing file is named as its overlay resolves it
 * (full-backing-filename) and opened with the recorded backing format.
 */
import { resolve } from 'node:path';
import { CliError } from '../fail.js';
import { humanInfo, imageInfo, type InfoOptions } from './info.js';
import { parseJsonFilename } from './open.js';

/** Every layer's ImageInfo, top first. Nothing is printed until the whole chain is read. */
export async function chainInfo(filename: string, opts: InfoOptions): Promise<Record<string, unknown>[]> {
  const out: Record<string, unknown>[] = [];
  const seen = new Set<string>();
  let name = filename;
  let fmt = opts.f;
  for (;;) {
    const key = parseJsonFilename(name) ? name : resolve(name);
    if (seen.has(key)) throw new CliError(`Backing file '${name}' creates an infinite loop.`);
    seen.add(key);
    const info = await imageInfo(name, { f: fmt, forceShare: opts.forceShare });
    out.push(info);
    const backing = info['backing-filename'] as string | undefined;
    if (backing === undefined) return out;
    name = (info['full-backing-filename'] as string | undefined) ?? backing;
    fmt = info['backing-filename-format'] as string | undefined;
  }
}

export async function infoBackingChain(filename: string, opts: InfoOptions, output: string): Promise<void> {
  const list = await chainInfo(filename, opts);
  process.stdout.write(output === 'json' ? `${JSON.stringify(list, null, 4)}\n` : list.map(humanInfo).join('\n'));
}
