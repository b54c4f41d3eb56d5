// qcow2 side by side with Debian's qemu-img, same flags, same run:
//  - `img bench` (4 KiB sequential requests, -t writeback -i io_uring) on an allocated
//    image (reads, in-place writes) and on a fresh one (reads of nothing, allocating
//    writes), queue depth 1 and 64;
//  - `img convert` of a 1 GiB fully allocated qcow2 to raw and to qcow2.
// Ratios above 1 mean Spindle is faster. Both tools convert with their defaults (target cache
// unsafe: no flush at the end). Page-cache writes on this kind of VM vary several-fold from run
// to run (the host faults guest memory in), so every case is the best of ROUNDS (4) runs per
// tool, taken in turns in both orders. Convert times include process start-up (about 0.08 s
// for Node, next to nothing for qemu-img). Usage: npm run build && node bench/qcow2-bench.mjs
import { spawnSync } from 'node:child_process';
import { closeSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
// SPINDLE_BIN: another build of the CLI (say, a saved copy to compare against).
const spindle = process.env.SPINDLE_BIN ?? join(root, 'dist', 'spindle.mjs');
const GiB = 1 << 30;
const ROUNDS = Number(process.env.ROUNDS ?? 4);
if (spawnSync('qemu-img', ['--version']).status !== 0) {
  console.log('qemu-img not found (install qemu-utils)');
  process.exit(1);
}
const dir = mkdtempSync(join(tmpdir(), 'spindle-qcow2-bench-'));
const run = (cmd, args) => {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  const secs = Number(process.hrtime.bigint() - t0) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed:\n${r.stdout}${r.stderr}`);
  return { out: r.stdout, secs };
};
const tool = {
  spindle: (args) => run(process.execPath, [spindle, 'img', ...args]),
  'qemu-img': (args) => run('qemu-img', args),
};

const raw = join(dir, 'data.raw');
{
  const fd = openSync(raw, 'w');
  const chunk = Buffer.alloc(1 << 20);
  for (let off = 0; off < GiB; off += chunk.length) {
    chunk.fill(off >>> 20);
    chunk.writeUInt32LE(off, 0);
    writeSync(fd, chunk, 0, chunk.length, off);
  }
  closeSync(fd);
}
const allocated = join(dir, 'allocated.qcow2');
run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, allocated]);

function fresh() {
  const f = join(dir, 'fresh.qcow2');
  rmSync(f, { force: true });
  run('qemu-img', ['create', '-q', '-f', 'qcow2', f, '1G']);
  return f;
}

function rate(name, args, count) {
  const { out } = tool[name](['bench', '-f', 'qcow2', '-t', 'writeback', '-i', 'io_uring', '-s', '4096', '-c', String(count), ...args]);
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  return count / Math.max(Number(m[1]), 1e-3);
}

const rows = [];
const fmt = (x) => Math.round(x).toLocaleString('en-US');
try {
  for (const [label, img, write, count] of [
    ['allocated, read', () => allocated, false, 400_000],
    ['allocated, write', () => allocated, true, 200_000],
    ['fresh, read', fresh, false, 400_000],
    ['fresh, write', fresh, true, 200_000],
  ]) {
    for (const depth of [1, 64]) {
      const n = depth === 1 ? count / 4 : count;
      const args = ['-d', String(depth), ...(write ? ['-w'] : [])];
      const best = { spindle: 0, 'qemu-img': 0 };
      // Turns in both orders: whoever runs right after a big file was deleted gets warm pages.
      for (let round = 0; round < ROUNDS; round++) {
        for (const name of round % 2 ? ['qemu-img', 'spindle'] : ['spindle', 'qemu-img']) {
          best[name] = Math.max(best[name], rate(name, [...args, img()], n));
        }
      }
      const [s, q] = [best.spindle, best['qemu-img']];
      rows.push([`bench ${label}`, String(depth), `${fmt(s)} req/s`, `${fmt(q)} req/s`, `${(s / q).toFixed(2)}x`]);
    }
  }
  for (const fmtOut of ['raw', 'qcow2']) {
    const times = { spindle: Infinity, 'qemu-img': Infinity };
    for (let round = 0; round < ROUNDS; round++) {
      for (const name of round % 2 ? ['qemu-img', 'spindle'] : ['spindle', 'qemu-img']) {
        const out = join(dir, `out-${name}.${fmtOut}`);
        rmSync(out, { force: true });
        // Each run starts with no dirty pages (the other tool's output gone, others' data on
        // disk): otherwise one tool's run pays for the writeback of what the one before left.
        spawnSync('sync');
        times[name] = Math.min(times[name], tool[name](['convert', '-f', 'qcow2', '-O', fmtOut, allocated, out]).secs);
        rmSync(out, { force: true });
      }
    }
    rows.push([`convert 1 GiB qcow2 -> ${fmtOut}`, '-', `${times.spindle.toFixed(2)} s`, `${times['qemu-img'].toFixed(2)} s`, `${(times['qemu-img'] / times.spindle).toFixed(2)}x`]);
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

const head = ['case', 'depth', 'spindle', 'qemu-img', 'ratio'];
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
const line = (r) => r.map((c, i) => (i < 2 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ');
console.log(line(head));
console.log(widths.map((w) => '-'.repeat(w)).join('  '));
for (const r of rows) console.log(line(r));
