// `npm run bench:devices`: the device models' own cost per request. 4 KiB random reads
// (4 KiB-aligned, seeded) over a 1 GiB null-co disk (read-zeroes off) through virtio-blk-pci
// at queue depth 32 and through PIIX IDE bus-master DMA (READ DMA EXT) at depth 1 (IDE has one
// command in flight per channel) and depth 2 (both channels at once), driven in-process by a
// JS "guest" writing rings / PRD tables into guest RAM and touching the registers directly
// (no qtest protocol, no socket). bench/device-bench-main.ts is bundled with esbuild into a
// temp file next to this one (inside the package, so the native addon's loader finds the
// package root) and imported here, so no build step is needed beyond `npm ci`.
// Usage: node bench/device-bench.mjs [virtio-requests=200000] [ide-requests=50000]
import { build } from 'esbuild';
import { rmSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const virtioRequests = Number(process.argv[2] ?? 200_000);
const ideRequests = Number(process.argv[3] ?? 50_000);
const warmup = 20_000;

const out = join(root, 'bench', `device-bench-${process.pid}.tmp.mjs`);
let mod;
try {
  await build({
    entryPoints: [join(root, 'bench/device-bench-main.ts')],
    bundle: true,
    platform: 'node',
    target: 'node20',
    format: 'esm',
    outfile: out,
    // As scripts/build.mjs: a `require` for the native addon's loader inside the ESM bundle.
    banner: { js: "import { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
    logLevel: 'warning',
  });
  mod = await import(pathToFileURL(out).href);
} finally {
  rmSync(out, { force: true });
}

const res = await mod.runDeviceBench({ virtioRequests, ideRequests, warmup, log: (l) => process.stderr.write(`${l}\n`) });

const fmt = (rate) => Math.round(rate).toLocaleString('en-US');
const us = (v) => v.toFixed(2);
const base = new Map(res.baselines.map((b) => [b.depth, b.reqPerSec]));
const head = ['device', 'depth', 'req/s', 'vs null-co', 'wall µs', 'null-co µs', 'guest µs', 'timer µs', 'device µs', 'note'];
const rows = res.rows.map((r) => [
  r.device, String(r.depth), fmt(r.reqPerSec), `${(r.reqPerSec / base.get(r.depth)).toFixed(2)}x`,
  us(r.wallUs), us(r.backendUs), us(r.guestUs), us(r.timerUs), us(r.deviceUs), r.note,
]);
const table = (head, rows, left) => {
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (r) => r.map((c, i) => (left.includes(i) ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join('  ').trimEnd();
  console.log(line(head));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows) console.log(line(r));
};

console.log(`4 KiB random reads (4 KiB-aligned) over a 1 GiB null-co disk (read-zeroes off), in-process guest`);
console.log(`requests: virtio ${virtioRequests.toLocaleString('en-US')}, IDE ${ideRequests.toLocaleString('en-US')}; each figure the best of 3 runs after a ${warmup.toLocaleString('en-US')}-request warm-up\n`);
table(head, rows, [0, 9]);
console.log('\nnull-co alone (BackendIO.readv in a loop, same backend, same offsets):');
table(['depth', 'req/s'], res.baselines.map((b) => [String(b.depth), fmt(b.reqPerSec)]), []);
console.log(`
Per request: wall = run time / requests (single-threaded JS: wall = CPU time).
  null-co = wall per request of a BackendIO.readv loop at the same depth on the same backend
            (null-co, the backend layer, and the event-loop turns its completions take);
  guest   = hrtime-measured guest-driver work (reaping, PRNG, ring and register values;
            the register accesses themselves are excluded);
  timer   = those hrtime calls (${res.timerNs.toFixed(0)} ns each);
  device  = wall - null-co - guest - timer: register dispatch, the device model, interrupt
            delivery and any extra event-loop turns it schedules.
A difference of measurements: read it to about +/-0.1-0.2 us. IDE keeps one command in flight
per channel, so depth 32 is not possible: depth 1 is one channel, depth 2 both channels.`);
process.exit(0);
