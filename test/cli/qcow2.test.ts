// img create -f qcow2 and img info on qcow2 images, side by side with qemu-img on the same
// arguments: the printed line, the refusals, and info's JSON and human output.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qemuImg, spindle, tempDir, type Run } from './helpers.js';

const t = tempDir();
const mineDir = join(t.dir, 'mine');
const qemuDir = join(t.dir, 'qemu');
beforeAll(async () => {
  await ensureBuilt();
  for (const d of [mineDir, qemuDir]) {
    mkdirSync(d);
    ok(qemuImg('create', '-q', '-f', 'qcow2', join(d, 'base.qcow2'), '16M'));
    writeFileSync(join(d, 'base.raw'), Buffer.alloc(3 << 20));
  }
});
afterAll(t.cleanup);

let seq = 0;

/**
 * Runs `create` with the same arguments under both tools; `FILE` in args is replaced by
 * a same-named image in each tool's directory.
 */
function bothCreate(args: string[]): { mine: Run; theirs: Run; a: string; b: string } {
  const name = `c${seq++}.qcow2`;
  const a = join(mineDir, name);
  const b = join(qemuDir, name);
  const mine = spindle('img', 'create', '-f', 'qcow2', ...args.map((x) => (x === 'FILE' ? a : x)));
  const theirs = qemuImg('create', '-f', 'qcow2', ...args.map((x) => (x === 'FILE' ? b : x)));
  return { mine, theirs, a, b };
}

/** qemu-img check without opening the backing chain (some backing files do not exist). */
function check(path: string): void {
  const r = qemuImg('check', `json:${JSON.stringify({ driver: 'qcow2', backing: null, file: { driver: 'file', filename: path } })}`);
  expect(r.stdout + r.stderr).toMatch(/No errors were found on the image/);
  expect(r.status).toBe(0);
}

const good: string[][] = [
  ['FILE', '1G'],
  ['-o', 'cluster_size=4k,compat=0.10', 'FILE', '64M'],
  ['-o', 'compat=v3,lazy_refcounts=on,refcount_bits=8', 'FILE', '1G'],
  ['-o', 'compat=v2', 'FILE', '1G'],
  ['-o', 'cluster_size=2M,extended_l2=on', '-o', 'preallocation=metadata', 'FILE', '8M'],
  ['-o', 'cluster_size=512,refcount_bits=1,lazy_refcounts=yes', 'FILE', '100M'],
  ['-o', 'size=3M,cluster_size=64k,cluster_size=0x1000', 'FILE'],
  ['-o', 'refcount_bits=0x20,extended_l2=off', 'FILE', '1.5G'],
  ['-b', 'base.qcow2', '-F', 'qcow2', 'FILE'],
  ['-b', 'base.raw', '-F', 'raw', 'FILE', '5M'],
  ['-o', 'backing_file=base.raw,backing_fmt=raw', 'FILE'],
  ['-u', '-b', 'nowhere.qcow2', '-F', 'qcow2', 'FILE', '1M'],
  ['-o', 'preallocation=falloc', 'FILE', '1M'],
  ['-q', 'FILE', '1M'],
];

describe('img create -f qcow2', () => {
  for (const args of good) {
    it(`prints qemu-img's line and makes a checkable image: ${args.join(' ')}`, () => {
      const { mine, theirs, a, b } = bothCreate(args);
      ok(theirs);
      ok(mine);
      expect(mine.stdout).toBe(theirs.stdout.replace(b, a));
      expect(mine.stderr).toBe('');
      check(a);
      // Without preallocation (or with metadata), the bytes are qemu-img's own.
      if (!args.some((x) => /falloc/.test(x))) expect(readFileSync(a).equals(readFileSync(b))).toBe(true);
    });
  }

  const bad: [string[], string][] = [
    [['-o', 'cluster_size=1000', 'FILE', '1G'], 'Cluster size must be a power of two between 512 and 2048k'],
    [['-o', 'cluster_size=4M', 'FILE', '1G'], 'Cluster size must be a power of two between 512 and 2048k'],
    [['-o', 'refcount_bits=3', 'FILE', '1G'], 'Refcount width must be a power of two and may not exceed 64 bits'],
    [['-o', 'refcount_bits=x', 'FILE', '1G'], "Parameter 'refcount_bits' expects a number"],
    [['-o', 'compat=0.10,lazy_refcounts=on', 'FILE', '1G'], 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [['-o', 'compat=0.10,extended_l2=on', 'FILE', '1G'], 'Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
    [['-o', 'compat=0.10,refcount_bits=8', 'FILE', '1G'], 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)'],
    [['-o', 'extended_l2=on,cluster_size=4k', 'FILE', '1G'], 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
    [['-o', 'compat=1.2', 'FILE', '1G'], "Parameter 'version' does not accept value '1.2'"],
    [['-o', 'preallocation=bogus', 'FILE', '1G'], "Parameter 'preallocation' does not accept value 'bogus'"],
    [['-o', 'lazy_refcounts=maybe', 'FILE', '1G'], "Parameter 'lazy_refcounts' expects 'on' or 'off'"],
    [['-o', 'bogus=1', 'FILE', '1G'], "Invalid parameter 'bogus'"],
    [['-o', 'size=1M', 'FILE', '2M'], 'The image size must be specified only once'],
    [['FILE'], 'Image creation needs a size parameter'],
    [['-F', 'qcow2', 'FILE', '1M'], 'Backing format cannot be used without backing file'],
    [['-u', '-b', 'base.qcow2', 'FILE', '1M'], 'Backing file specified without backing format'],
    [['-b', 'base.qcow2', '-F', 'qcow2', '-o', 'preallocation=metadata', 'FILE', '1M'], 'Backing file and preallocation can only be used at the same time if extended_l2 is on'],
    [['-o', 'cluster_size=512', 'FILE', '4T'], "The image size is too large for file format 'qcow2' (try using a larger cluster size)"],
  ];
  for (const [args, msg] of bad) {
    it(`refuses like qemu-img, in one line: ${args.join(' ')}`, () => {
      const { mine, theirs, a, b } = bothCreate(args);
      expect(theirs.status).toBe(1);
      expect(theirs.stderr.split('\n')[0]).toBe(`qemu-img: ${b}: ${msg}`);
      expect(mine.status).toBe(1);
      // Unlike qemu-img, nothing is printed (or created) before the refusal.
      expect(mine.stdout).toBe('');
      expect(mine.stderr).toBe(`spindle img: ${a}: ${msg}\n`);
    });
  }

  it('names a backing file it cannot open, or of the wrong format', () => {
    let r = bothCreate(['-b', 'nonex.img', '-F', 'raw', 'FILE']).mine;
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^spindle img: .*c\d+\.qcow2: Could not open '.*mine\/nonex\.img': No such file or directory; could not open backing image\n$/);
    r = bothCreate(['-b', 'base.raw', '-F', 'qcow2', 'FILE']).mine;
    expect(r.stderr).toMatch(/^spindle img: .*: Image is not in qcow2 format; could not open backing image\n$/);
    r = bothCreate(['-b', 'base.raw', '-F', 'foo', 'FILE']).mine;
    expect(r.stderr).toMatch(/^spindle img: .*: Unknown driver 'foo'; could not open backing image\n$/);
  });

  it('-o help lists qemu-img\'s names for the options it implements', () => {
    const mine = ok(spindle('img', 'create', '-f', 'qcow2', '-o', 'help')).stdout.split('\n');
    const theirs = ok(qemuImg('create', '-f', 'qcow2', '-o', 'help')).stdout.split('\n');
    expect(mine[0]).toBe('Supported qcow2 options:');
    for (const line of mine) expect(theirs).toContain(line);
    expect(mine.filter((l) => l.startsWith('  ')).length).toBe(10);
  });
});

/** img info under both tools, on the same image. */
function infoBoth(path: string, ...extra: string[]): { mine: string; theirs: string } {
  return { mine: ok(spindle('img', 'info', ...extra, path)).stdout, theirs: ok(qemuImg('info', ...extra, path)).stdout };
}

function sameInfo(path: string): void {
  const j = infoBoth(path, '--output=json');
  const mine = JSON.parse(j.mine);
  const theirs = JSON.parse(j.theirs);
  // Same keys in the same order, the same values; actual-size is the host's count.
  expect(Object.keys(mine)).toEqual(Object.keys(theirs));
  expect(Math.abs(mine['actual-size'] - theirs['actual-size'])).toBeLessThanOrEqual(64 << 10);
  expect(j.mine.replace(/"actual-size": \d+/, '')).toBe(j.theirs.replace(/"actual-size": \d+/, ''));
  const h = infoBoth(path);
  const strip = (s: string) => s.replace(/^disk size: .*$/m, 'disk size:');
  expect(strip(h.mine)).toBe(strip(h.theirs));
}

describe('img info on qcow2', () => {
  const variants: [string, string[]][] = [
    ['default', ['1G']],
    ['v2', ['-o', 'compat=0.10', '64M']],
    ['lazy refcounts, 64-bit refcounts, extended L2, 2M clusters', ['-o', 'lazy_refcounts=on,refcount_bits=64,extended_l2=on,cluster_size=2M', '10G']],
    ['512-byte clusters', ['-o', 'cluster_size=512', '100M']],
    ['preallocated', ['-o', 'preallocation=metadata', '4M']],
  ];
  for (const [what, args] of variants) {
    it(`equals qemu-img's, JSON and human, for images made by either tool: ${what}`, () => {
      const { a, b } = bothCreate([...args.slice(0, -1), 'FILE', args[args.length - 1]!]);
      sameInfo(a);
      sameInfo(b);
    });
  }

  it('reports backing files, relative to the image\'s directory', () => {
    const { a, b } = bothCreate(['-b', 'base.qcow2', '-F', 'qcow2', 'FILE']);
    for (const p of [a, b]) {
      sameInfo(p);
      const j = JSON.parse(ok(spindle('img', 'info', '--output=json', p)).stdout);
      expect(j['backing-filename']).toBe('base.qcow2');
      expect(j['full-backing-filename']).toBe(join(p, '..', 'base.qcow2'));
      expect(j['backing-filename-format']).toBe('qcow2');
    }
    // A relative image name keeps the full backing name relative, as qemu-img does.
    const rel = relative(process.cwd(), a);
    expect(JSON.parse(ok(spindle('img', 'info', '--output=json', rel)).stdout)['full-backing-filename']).toBe(join(dirname(rel), 'base.qcow2'));
    sameInfo(rel);
  });

  it('works on an overlay whose backing file is missing, and with an absolute backing name', () => {
    const { a } = bothCreate(['-u', '-b', 'gone.qcow2', '-F', 'qcow2', 'FILE', '1M']);
    sameInfo(a);
    const abs = bothCreate(['-b', join(mineDir, 'base.raw'), '-F', 'raw', 'FILE']);
    sameInfo(abs.a);
    expect(ok(spindle('img', 'info', abs.a)).stdout).toMatch(/^backing file: \/.*base\.raw\n/m);
  });

  it('shows the dirty flag of an image left with lazy refcounts in use', () => {
    const { a } = bothCreate(['-o', 'lazy_refcounts=on', 'FILE', '1M']);
    // qemu-io dies (SIGKILL) after a write: the dirty bit stays set.
    spawnSync('qemu-io', ['-f', 'qcow2', '-c', 'write 0 64k', '-c', 'sigraise 9', a]);
    const j = JSON.parse(ok(spindle('img', 'info', '--output=json', a)).stdout);
    expect(j['dirty-flag']).toBe(true);
    expect(ok(spindle('img', 'info', a)).stdout).toMatch(/\ncleanly shut down: no\n/);
    sameInfo(a);
  });

  it('probes qcow2 and refuses -f qcow2 on something else', () => {
    const raw = join(mineDir, 'base.raw');
    const r = spindle('img', 'info', '-f', 'qcow2', raw);
    expect(r.status).toBe(1);
    expect(r.stderr).toBe(`spindle img: Could not open '${raw}': Image is not in qcow2 format\n`);
    expect(qemuImg('info', '-f', 'qcow2', raw).stderr).toBe(`qemu-img: Could not open '${raw}': Image is not in qcow2 format\n`);
  });
});
