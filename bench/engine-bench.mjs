// Native engine benchmark: 4 KiB random reads from a page-cached 256 MiB file
// at depth 1 and 64, for each engine kind, plus `qemu-img bench` when present.
// Usage: node bench/engine-bench.mjs [seconds=3] [--kinds=io_uring,threads] [--no-qemu]
//          [--flags=N] (native EngineFlags bits: 1 = no fixed buffers)
//          [--ab=N [--rounds=3]] (io_uring only: alternate flags=0 and flags=N, print
//          medians and the median of paired ratios, for noisy machines)
// The engine is TypeScript, so it is bundled with esbuild first (compile-free
// for the rest of the repo); the bundle lives under build/ so the addon is
// found from the package root.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, mkdirSync, openSync, readSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (name) => args.find((a) => a.startsWith(`--${name}=`))?.split('=')[1];
const seconds = Number(args.find((a) => !a.startsWith('--')) ?? 3);
const nativeFlags = Number(opt('flags') ?? 0);
const abFlags = opt('ab');
const FILE_SIZE = 256 << 20;
const BS = 4096;
const BLOCKS = FILE_SIZE / BS;

const bundle = join(root, 'build', 'bench', 'engine-bench-bundle.mjs');
mkdirSync(dirname(bundle), { recursive: true });
execFileSync(join(root, 'node_modules', '.bin', 'esbuild'),
  [join(root, 'src/native/engine.ts'), '--bundle', '--platform=node', '--format=esm', `--outfile=${bundle}`, '--log-level=warning'],
  { stdio: 'inherit' });
const { createEngine } = await import(pathToFileURL(bundle).href);

// Create the file and read it once so every read below hits the page cache.
const path = join(tmpdir(), `spindle-engine-bench-${process.pid}.img`);
{
  const fd = openSync(path, 'w+');
  const chunk = Buffer.alloc(1 << 20);
  for (let off = 0; off < FILE_SIZE; off += chunk.length) {
    for (let i = 0; i < chunk.length; i += 4096) chunk.writeUInt32LE(off + i, i);
    writeSync(fd, chunk, 0, chunk.length, off);
  }
  for (let off = 0; off < FILE_SIZE; off += chunk.length) readSync(fd, chunk, 0, chunk.length, off);
  closeSync(fd);
}

// xorshift32: cheap, allocation-free random block numbers.
let seed = 0x9e3779b9;
function randomOffset() {
  seed ^= seed << 13; seed >>>= 0;
  seed ^= seed >>> 17;
  seed ^= seed << 5; seed >>>= 0;
  return (seed % BLOCKS) * BS;
}

function run(engine, depth, ms) {
  return new Promise((resolve) => {
    const fd = engine.open(path, { write: false });
    let count = 0;
    let errors = 0;
    let stopping = false;
    let live = depth;
    const t0 = performance.now();
    const cpu0 = process.cpuUsage();
    const deadline = t0 + ms;
    const slots = [];
    for (let i = 0; i < depth; i++) {
      const iov = [engine.allocBuffer(BS)];
      // One pre-bound callback per slot keeps the request going.
      const done = (res) => {
        if (res !== BS) errors++;
        count++;
        // performance.now() is cheap, but checking every 256 completions is cheaper.
        if ((count & 255) === 0 && performance.now() >= deadline) stopping = true;
        if (stopping) {
          if (--live === 0) {
            const elapsed = (performance.now() - t0) / 1000;
            const cpu = process.cpuUsage(cpu0);
            const cpuNs = ((cpu.user + cpu.system) * 1000) / count; // CPU ns per request: steadier than wall time
            engine.close(fd);
            for (const s of slots) engine.freeBuffer(s[0]);
            resolve({ rate: count / elapsed, cpuNs, errors });
          }
          return;
        }
        engine.readv(fd, iov, randomOffset(), done);
      };
      slots.push(iov);
      engine.readv(fd, iov, randomOffset(), done);
    }
  });
}

if (abFlags !== undefined) {
  // A/B on one machine state: alternate the two configurations, report medians.
  const rounds = Number(opt('rounds') ?? 3);
  const configs = [0, Number(abFlags)];
  const rates = new Map(configs.map((f) => [f, { 1: [], 64: [], cpu1: [], cpu64: [] }]));
  for (let round = 0; round < rounds; round++) {
    for (const flags of configs) {
      const engine = createEngine({ kind: 'io_uring', entries: 256, nativeFlags: flags });
      await run(engine, 64, 200);
      for (const depth of [1, 64]) {
        const r = await run(engine, depth, seconds * 1000);
        rates.get(flags)[depth].push(r.rate / 1e6);
        rates.get(flags)[`cpu${depth}`].push(r.cpuNs);
      }
      engine.destroy();
    }
  }
  const med = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];
  for (const flags of configs) {
    const r = rates.get(flags);
    console.log(`flags ${flags}: depth 1 ${med(r[1]).toFixed(3)} M req/s (${med(r.cpu1).toFixed(0)} cpu ns/req)` +
      `  depth 64 ${med(r[64]).toFixed(3)} M req/s (${med(r.cpu64).toFixed(0)} cpu ns/req)`);
  }
  // Paired: each round's B/A ratio, so slow drifts of the machine cancel out.
  const [a, b] = configs.map((f) => rates.get(f));
  const ratio = (d) => med(a[d].map((x, i) => b[d][i] / x));
  console.log(`flags ${configs[1]} / flags 0, median of paired ratios: depth 1 ${ratio(1).toFixed(3)}, depth 64 ${ratio(64).toFixed(3)}`);
  rmSync(path, { force: true });
  process.exit(0);
}

const kinds = (opt('kinds') ?? 'io_uring,threads').split(',');
const results = [];
for (const kind of kinds) {
  let engine;
  try {
    engine = createEngine({ kind, entries: 256, nativeFlags });
  } catch (e) {
    console.log(`${kind}: unavailable (${e.message})`);
    continue;
  }
  await run(engine, 64, 300); // warm up JIT and slabs
  for (const depth of [1, 64]) {
    const before = engine.stats();
    const { rate, errors } = await run(engine, depth, seconds * 1000);
    const after = engine.stats();
    const done = after.completed - before.completed;
    const perBatch = done / Math.max(1, after.batches - before.batches);
    const fixed = (after.fixedRequests ?? 0) - (before.fixedRequests ?? 0);
    console.log(`${kind.padEnd(8)} depth ${String(depth).padStart(2)}: ${(rate / 1e6).toFixed(3)} M req/s` +
      `  (${perBatch.toFixed(1)} req/batch${fixed ? `, ${Math.round((100 * fixed) / done)}% fixed` : ''}` +
      `${errors ? `, ${errors} errors` : ''})`);
    results.push({ kind, depth, rate });
  }
  engine.destroy();
}

const qemu = args.includes('--no-qemu') ? '' : spawnSync('sh', ['-c', 'command -v qemu-img'], { encoding: 'utf8' }).stdout.trim();
if (qemu) {
  for (const aio of ['io_uring', 'threads']) {
    const n = 2_000_000;
    const t0 = performance.now();
    const r = spawnSync(qemu, ['bench', '-f', 'raw', '-c', String(n), '-d', '64', '-s', '4k', '-S', '4k',
      '-i', aio, '-t', 'writeback', path], { encoding: 'utf8' });
    const elapsed = (performance.now() - t0) / 1000;
    if (r.status !== 0) {
      console.log(`qemu-img bench (${aio}): failed: ${(r.stderr || r.stdout).trim().split('\n').pop()}`);
      continue;
    }
    // qemu-img prints "Run completed in X seconds."; wall time is the fallback.
    const m = /completed in ([\d.]+) seconds/.exec(r.stdout);
    const secs = m ? Number(m[1]) : elapsed;
    console.log(`qemu-img bench ${aio.padEnd(8)} depth 64: ${(n / secs / 1e6).toFixed(3)} M req/s`);
  }
}
rmSync(path, { force: true });
