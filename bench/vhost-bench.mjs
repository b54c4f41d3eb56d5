// `npm run bench:vhost`: fio in a QEMU guest on a vhost-user-blk disk served by Spindle's daemon
// and by qemu-storage-daemon, side by side in one run (see bench/vhost-bench-main.ts, bundled
// here with esbuild). Prints IOPS, MB/s and the daemon's CPU time per request for each, and the
// ratios Spindle / qemu-storage-daemon: of the best figures, and the median of the per-round
// ratios (the two daemons run back to back in each round).
// Needs dist/ (npm run build), the amd64 guest (scripts/fetch-linux-guest.sh amd64: kernel,
// busybox, fio), qemu-system-x86_64, qemu-storage-daemon, qemu-img.
// Usage: node bench/vhost-bench.mjs [--rounds=2] [--runtime=8] [--image-mib=512] [--formats=raw,qcow2] [--jobs=rand4k-d1,...] [--json] [--keep]
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = Object.fromEntries(process.argv.slice(2).map((a) => {
  const m = /^--([^=]+)(?:=(.*))?$/.exec(a);
  if (!m) throw new Error(`vhost-bench: unknown argument ${a}`);
  return [m[1], m[2] ?? true];
}));

const { build } = await import('esbuild');
const out = join(root, 'bench', `vhost-bench-${process.pid}.tmp.mjs`);
let mod;
try {
  await build({
    entryPoints: [join(root, 'bench/vhost-bench-main.ts')],
    bundle: true, platform: 'node', target: 'node20', format: 'esm', outfile: out, logLevel: 'warning',
  });
  mod = await import(pathToFileURL(out).href);
} finally {
  rmSync(out, { force: true });
}

const dir = mkdtempSync(join(tmpdir(), 'spindle-vhost-bench-'));
const log = (s) => process.stderr.write(s + '\n');
try {
  const { accel, results, roundRatios } = await mod.runVhostBench({
    dir, bundle: join(root, 'dist', 'spindle.mjs'), log,
    imageMiB: Number(args['image-mib'] ?? 512), runtimeS: Number(args.runtime ?? 8), rounds: Number(args.rounds ?? 2),
    formats: String(args.formats ?? 'raw,qcow2').split(','),
    jobs: args.jobs ? String(args.jobs).split(',') : undefined,
  });
  if (args.json) {
    process.stdout.write(JSON.stringify({ accel, results, roundRatios }, null, 2) + '\n');
  } else {
    const reqs = (r) => r.iops * (r.runtimeMs / 1000);
    const usPerReq = (r) => (r.cpuS * 1e6) / reqs(r);
    const irqPerReq = (r) => (r.irqs / reqs(r)).toFixed(2);
    console.log(`\nvhost-user-blk, fio in a QEMU guest (${accel}); best of ${args.rounds ?? 2} round(s)\n`);
    const median = (xs) => {
      if (!xs?.length) return '-';
      const v = [...xs].sort((a, b) => a - b);
      const m = v.length % 2 ? v[(v.length - 1) / 2] : (v[v.length / 2 - 1] + v[v.length / 2]) / 2;
      return `${m.toFixed(2)}x`;
    };
    console.log('| format | job | Spindle IOPS | qsd IOPS | IOPS ratio | median round ratio | Spindle MB/s | qsd MB/s | MB/s ratio | Spindle CPU µs/req | qsd CPU µs/req | Spindle guest IRQs/req | qsd guest IRQs/req |');
    console.log('|---|---|---|---|---|---|---|---|---|---|---|---|---|');
    for (const [fmt, byDaemon] of Object.entries(results)) {
      for (const job of mod.JOBS) {
        const s = byDaemon.spindle[job.name];
        const q = byDaemon.qsd[job.name];
        if (!s || !q) continue;
        const mb = (r) => r.kibps * 1024 / 1e6;
        console.log(`| ${fmt} | ${job.name} | ${s.iops} | ${q.iops} | **${(s.iops / q.iops).toFixed(2)}x** | ${median(roundRatios[fmt]?.[job.name])} | ${mb(s).toFixed(1)} | ${mb(q).toFixed(1)} | ${(s.kibps / q.kibps).toFixed(2)}x | ${usPerReq(s).toFixed(1)} | ${usPerReq(q).toFixed(1)} | ${irqPerReq(s)} | ${irqPerReq(q)} |`);
      }
    }
  }
} finally {
  if (args.keep) log(`kept ${dir}`);
  else rmSync(dir, { recursive: true, force: true });
}
process.exit(0);
