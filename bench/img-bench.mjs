// `npm run bench`: `spindle img bench` next to Debian's `qemu-img bench`, same flags, same
// targets, same run. Targets: null-co (no I/O: the cost of each stack per request) and a
// page-cached 1 GiB raw file (the kernel's copy included); 4 KiB sequential reads at
// queue depth 1 and 64, in qemu-img's fastest mode here (-i io_uring -t writeback).
// Each tool's count is calibrated so its run takes ~1.5 s.
// Usage: node bench/img-bench.mjs [seconds=1.5]
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const spindle = join(root, 'dist', 'spindle.mjs');
const seconds = Number(process.argv[2] ?? 1.5);
const GiB = 1 << 30;

const hasQemu = spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).status === 0;
if (!hasQemu) console.log('qemu-img not found (install qemu-utils): printing spindle numbers only\n');

const tools = {
  spindle: (args) => [process.execPath, [spindle, 'img', 'bench', ...args]],
  'qemu-img': (args) => ['qemu-img', ['bench', ...args]],
};

/** Runs one bench, returns requests per second (count / the run's own reported time). */
function bench(tool, args, count) {
  const [cmd, argv] = tools[tool]([...args.slice(0, -1), '-c', String(count), args[args.length - 1]]);
  const r = spawnSync(cmd, argv, { encoding: 'utf8' });
  const m = /Run completed in ([\d.]+) seconds/.exec(r.stdout);
  if (r.status !== 0 || !m) throw new Error(`${tool} ${argv.join(' ')} failed:\n${r.stdout}${r.stderr}`);
  return count / Math.max(Number(m[1]), 1e-3);
}

/**
 * Grows the count until a run takes at least half of `seconds` (a short first run
 * underestimates a JIT-compiled stack), aiming at `seconds`; returns that run's rate.
 */
function measure(tool, args) {
  let count = 20000;
  for (;;) {
    const rate = bench(tool, args, count);
    if (count / rate >= seconds / 2 || count >= 50_000_000) return rate;
    count = Math.max(1000, Math.min(50_000_000, Math.round(rate * seconds)));
  }
}

// A page-cached raw file with real data (not a hole), read once to warm the cache.
const dir = mkdtempSync(join(tmpdir(), 'spindle-img-bench-'));
const file = join(dir, 'cached.img');
{
  const fd = openSync(file, 'w+');
  const chunk = Buffer.alloc(1 << 20);
  for (let off = 0; off < GiB; off += chunk.length) {
    chunk.writeUInt32LE(off, 0);
    chunk.fill(0xa5, 4);
    writeSync(fd, chunk, 0, chunk.length, off);
  }
  for (let off = 0; off < GiB; off += chunk.length) readSync(fd, chunk, 0, chunk.length, off);
  closeSync(fd);
}

const common = ['-t', 'writeback', '-i', 'io_uring', '-s', '4096'];
const targets = [
  // read-zeroes off for both: neither stack spends its time in memset.
  { name: 'null-co', args: [...common, `json:${JSON.stringify({ driver: 'null-co', size: GiB, 'read-zeroes': false })}`] },
  { name: 'raw file (page cache)', args: [...common, '-f', 'raw', file] },
];

const rows = [];
try {
  for (const t of targets) {
    for (const depth of [1, 64]) {
      const args = ['-d', String(depth), ...t.args];
      const s = measure('spindle', args);
      const q = hasQemu ? measure('qemu-img', args) : undefined;
      rows.push([t.name, String(depth), fmt(s), q === undefined ? '-' : fmt(q), q === undefined ? '-' : `${(s / q).toFixed(2)}x`]);
    }
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

function fmt(rate) {
  return Math.round(rate).toLocaleString('en-US');
}

const head = ['target', 'depth', 'spindle req/s', 'qemu-img req/s', 'ratio'];
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
const line = (r) => r.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
console.log('4 KiB sequential reads, -t writeback -i io_uring (same flags for both)');
console.log(line(head));
console.log(widths.map((w) => '-'.repeat(w)).join('  '));
for (const r of rows) console.log(line(r));
