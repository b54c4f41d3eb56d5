// `npm run bench:linux`: a Linux guest's sequential read speed through each disk path, in one
// run. The same kernel, initramfs and command line boot four ways, each reading 64 MiB of the
// same image (pseudo-random, non-zero, made here in a temp dir) with
// `dd bs=1M count=64 iflag=direct`, 8 times per boot:
//   a  spindle virtio   node dist/spindle.mjs system ... -drive file=IMG,if=virtio,format=raw  (/dev/vda)
//   b  spindle ide      ... -drive file=IMG,if=ide,format=raw (PIIX IDE, bus-master DMA)       (/dev/sda)
//   c  v86 ide          plain v86, hda: { buffer } (the whole image in memory), no Spindle   (/dev/sda)
//   d  spindle qcow2    as a, over `qemu-img convert -O qcow2` of the image                  (/dev/vda)
// Every configuration is a fresh node process. The guest times each dd on its monotonic clock
// (/proc/timer_list, read without a fork); the host stamps the same lines as they arrive on
// COM1 as a cross-check, and reads the emulator process's CPU time (all threads) at each.
// The first reads of a boot are slower (v86's JIT warming up). Each configuration boots
// `rounds` times, the order reversed every round (the machine is noisy); a figure is the best
// over all its boots and runs. The guest's md5 of the disk's first MiB must equal the image's,
// or the bench fails.
// bench/linux-bench-main.ts (the initramfs, built by test/linux/guest-assets.ts) is bundled with
// esbuild into a temp file next to this one and imported, as bench/device-bench.mjs does.
// Needs dist/ (npm run build), the Linux guest cache (scripts/fetch-linux-guest.sh), qemu-img.
// Usage: node bench/linux-bench.mjs [rounds=2] [--keep] [--only=a,b,c,d] [--verbose]
//        node bench/linux-bench.mjs --plain-v86 KERNEL INITRD IMAGE BIOS MEM_MIB CMDLINE   (internal: config c)
import { spawn, execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const MiB = 1 << 20;
const MEM_MIB = 256;
const CMDLINE = 'console=ttyS0 cryptomgr.notests noisapnp';
/** The image is a little larger than the read, so the read never touches the disk's end. */
const IMAGE_MIB = 65;
const BOOT_TIMEOUT_MS = 600_000;
const READY = 'spindle-init: ready';
const HALTED = /\breboot: (System halted|Power down)$/;

if (process.argv[2] === '--plain-v86') await plainV86(process.argv.slice(3));
else await main();

// ---- config c: plain v86, in a process of its own --------------------------------------------

/**
 * v86 with its own IDE disk from an in-memory buffer, the options Spindle's createGuest uses
 * otherwise (hw/cpu/v86.ts), COM1 to stdout; exits 0 once the kernel halts.
 */
async function plainV86([kernel, initrd, image, bios, memMiB, cmdline]) {
  const { V86 } = await import('v86');
  const require = createRequire(import.meta.url);
  const own = (p) => {
    const b = readFileSync(p);
    return b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength);
  };
  const emu = new V86({
    wasm_path: require.resolve('v86/build/v86.wasm'),
    memory_size: Number(memMiB) * MiB,
    bios: { buffer: own(bios) },
    bzimage: { buffer: own(kernel) },
    initrd: { buffer: own(initrd) },
    cmdline,
    hda: { buffer: own(image) },
    autostart: true,
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
  });
  let line = '';
  emu.add_listener('serial0-output-byte', (b) => {
    const ch = String.fromCharCode(b);
    process.stdout.write(ch);
    if (ch === '\r') return;
    if (ch !== '\n') {
      line += ch;
      return;
    }
    const l = line;
    line = '';
    if (HALTED.test(l)) {
      emu.destroy();
      process.exit(0);
    }
  });
}

// ---- the bench --------------------------------------------------------------------------------

async function main() {
  const args = process.argv.slice(2);
  const rounds = Number(args.find((a) => /^\d+$/.test(a)) ?? 2);
  const keep = args.includes('--keep');
  const verbose = args.includes('--verbose');
  const only = (args.find((a) => a.startsWith('--only='))?.slice(7) ?? 'a,b,c,d').split(',');
  const spindle = join(root, 'dist', 'spindle.mjs');
  if (!existsSync(spindle)) fail(`${spindle} is missing: run npm run build first`);
  const log = (l) => process.stderr.write(`${l}\n`);
  const t0 = performance.now();

  const guest = await loadGuest();
  const { assets } = guest;
  const dir = mkdtempSync(join(tmpdir(), 'spindle-linux-bench-'));
  try {
    const initrd = join(dir, 'initrd.gz');
    writeFileSync(initrd, guest.initrd);
    const raw = join(dir, 'disk.raw');
    const image = makeImage(IMAGE_MIB * MiB);
    writeFileSync(raw, image);
    const wantMd5 = createHash('md5').update(image.subarray(0, MiB)).digest('hex');
    const qcow2 = join(dir, 'disk.qcow2');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
    log(`image: ${IMAGE_MIB} MiB pseudo-random, first MiB md5 ${wantMd5}; initrd ${(guest.initrd.length / MiB).toFixed(1)} MiB; kernel ${assets.version}`);

    const boot = ['-m', String(MEM_MIB), '-kernel', assets.kernel, '-initrd', initrd, '-append', CMDLINE, '-serial', 'stdio', '-display', 'none'];
    const configs = [
      { key: 'a', name: 'spindle virtio-blk raw', dev: 'vda', argv: [spindle, 'system', ...boot, '-drive', `file=${raw},if=virtio,format=raw`] },
      { key: 'b', name: 'spindle IDE BMDMA raw', dev: 'sda', argv: [spindle, 'system', ...boot, '-drive', `file=${raw},if=ide,format=raw`] },
      { key: 'c', name: 'v86 IDE in-memory', dev: 'sda', argv: [fileURLToPath(import.meta.url), '--plain-v86', assets.kernel, initrd, raw, assets.seabios, String(MEM_MIB), CMDLINE] },
      { key: 'd', name: 'spindle virtio-blk qcow2', dev: 'vda', argv: [spindle, 'system', ...boot, '-drive', `file=${qcow2},if=virtio,format=qcow2`] },
    ].filter((c) => only.includes(c.key));

    const results = new Map(configs.map((c) => [c.key, []]));
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? configs : [...configs].reverse();
      for (const c of order) {
        log(`round ${r + 1}/${rounds}: ${c.key} (${c.name}) ...`);
        const res = await bootOnce(c, guest, verbose);
        if (res.md5 !== wantMd5) fail(`${c.key} (${c.name}): the guest read md5 ${res.md5} from /dev/${c.dev}'s first MiB, the image's is ${wantMd5}`);
        log(`  boot-to-init ${res.bootToInit.toFixed(2)} s, reads ${res.runs.map((x) => `${x.guestS.toFixed(2)} s`).join(' ')} (host-seen ${res.runs.map((x) => x.hostS.toFixed(2)).join(' ')}; host CPU ${res.runs.map((x) => x.cpuS.toFixed(2)).join(' ')}), wall ${res.wall.toFixed(1)} s`);
        results.get(c.key).push(res);
      }
    }
    report(configs, results, guest, rounds, (performance.now() - t0) / 1000);
  } finally {
    if (keep) log(`kept ${dir}`);
    else rmSync(dir, { recursive: true, force: true });
  }
  process.exit(0);
}

function fail(msg) {
  process.stderr.write(`linux-bench: FAIL: ${msg}\n`);
  process.exit(1);
}

async function loadGuest() {
  const { build } = await import('esbuild');
  const out = join(root, 'bench', `linux-bench-${process.pid}.tmp.mjs`);
  try {
    await build({
      entryPoints: [join(root, 'bench/linux-bench-main.ts')],
      bundle: true,
      platform: 'node',
      target: 'node20',
      format: 'esm',
      outfile: out,
      logLevel: 'warning',
    });
    const mod = await import(pathToFileURL(out).href);
    return mod.makeLinuxBenchGuest();
  } finally {
    rmSync(out, { force: true });
  }
}

/** `bytes` of xorshift32 output (seeded), with no zero byte, so no read can pass by being zeroes. */
function makeImage(bytes) {
  const buf = Buffer.alloc(bytes);
  const w = new Uint32Array(buf.buffer, buf.byteOffset, bytes / 4);
  let x = 0x9e3779b9;
  for (let i = 0; i < w.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    w[i] = x | 0x01010101;
  }
  return buf;
}

/**
 * CPU time, in ns, of every thread of process `pid` so far (the first field of each thread's
 * /proc/PID/task/TID/schedstat): less disturbed by other work on the machine than wall time.
 * Threads that exited are not counted (node's threads live as long as the process).
 */
function cpuNs(pid) {
  let ns = 0;
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'latin1').split(' ')[0]);
    }
  } catch {
    return NaN;
  }
  return ns;
}

/**
 * Runs one configuration to the guest's halt: boot-to-init (spawn to the READY line on the host
 * clock), each dd's time (guest monotonic clock, and host arrival of its start/end lines), the md5.
 */
function bootOnce(c, guest, verbose) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const sec = () => (performance.now() - t0) / 1000;
    const child = spawn(process.execPath, c.argv, { stdio: ['ignore', 'pipe', 'pipe'] });
    const tail = [];
    const res = { bootToInit: NaN, runs: [], md5: null, scriptExit: null, wall: NaN, clock: null };
    const open = new Map();
    let buf = '';
    const onLine = (l, at) => {
      tail.push(l);
      if (tail.length > 40) tail.shift();
      if (verbose) process.stderr.write(`  [${at.toFixed(2)}] ${l}\n`);
      if (l === READY) res.bootToInit = at;
      const m = /^bench: (.*)$/.exec(l);
      const e = /^spindle-init: script exit (\d+)$/.exec(l);
      if (e) res.scriptExit = Number(e[1]);
      if (!m) return;
      const f = m[1].split(' ');
      if (f[0] === 'fail') res.failed = m[1];
      else if (f[0] === 'disk' && f[1] !== c.dev) res.failed = `the guest found /dev/${f[1]}, expected /dev/${c.dev}`;
      else if (f[0] === 'clock') res.clock = f[1];
      else if (f[0] === 'run' && f[3] === 'start') open.set(f[2], { t0: Number(f[4]), h0: at, c0: cpuNs(child.pid) });
      else if (f[0] === 'run' && f[3] === 'end') {
        const s = open.get(f[2]);
        res.runs.push({ guestS: (Number(f[4]) - s.t0) / 1e9, hostS: at - s.h0, cpuS: (cpuNs(child.pid) - s.c0) / 1e9 });
      } else if (f[0] === 'md5') res.md5 = f[2];
    };
    child.stdout.setEncoding('latin1');
    child.stdout.on('data', (d) => {
      const at = sec();
      buf += d;
      let i;
      while ((i = buf.indexOf('\n')) >= 0) {
        onLine(buf.slice(0, i).replace(/\r$/, ''), at);
        buf = buf.slice(i + 1);
      }
    });
    let stderr = '';
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), BOOT_TIMEOUT_MS);
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      res.wall = sec();
      const why =
        signal ? `killed by ${signal}${signal === 'SIGKILL' ? ` (timeout ${BOOT_TIMEOUT_MS / 1000} s?)` : ''}`
        : code !== 0 ? `exit code ${code}`
        : res.failed ? `guest: ${res.failed}`
        : res.scriptExit !== 0 ? `guest script exit ${res.scriptExit}`
        : res.runs.length !== guest.runs ? `${res.runs.length} dd runs seen, ${guest.runs} expected`
        : !res.md5 ? 'no md5 line'
        : Number.isNaN(res.bootToInit) ? `no '${READY}' line`
        : null;
      if (why) {
        reject(new Error(`${c.key} (${c.name}): ${why}\n--- last COM1 lines:\n${tail.join('\n')}\n--- stderr:\n${stderr.slice(-4000)}`));
        return;
      }
      resolve(res);
    });
  });
}

function report(configs, results, guest, rounds, wall) {
  const bytes = guest.readMiB * MiB;
  const best = new Map();
  for (const c of configs) {
    const boots = results.get(c.key);
    const runs = boots.flatMap((b) => b.runs);
    const g = Math.min(...runs.map((r) => r.guestS));
    const h = Math.min(...runs.map((r) => r.hostS));
    const cpu = Math.min(...runs.map((r) => r.cpuS));
    best.set(c.key, {
      key: c.key,
      name: c.name,
      dev: c.dev,
      bestS: g,
      mibPerSec: bytes / MiB / g,
      mbPerSec: bytes / 1e6 / g,
      hostBestS: h,
      hostMibPerSec: bytes / MiB / h,
      cpuBestS: cpu,
      cpuMibPerSec: bytes / MiB / cpu,
      allS: runs.map((r) => r.guestS),
      bootToInitS: Math.min(...boots.map((b) => b.bootToInit)),
      bootToInitAllS: boots.map((b) => b.bootToInit),
      wallS: boots.map((b) => b.wall),
    });
  }
  const c = best.get('c');
  const ratio = (k, f = 'mibPerSec') => (c && best.has(k) ? best.get(k)[f] / c[f] : null);
  const x = (r) => (r === null ? '-' : `${r.toFixed(2)}x`);
  const head = ['', 'configuration', 'dev', 'best s', 'MiB/s', 'MB/s', 'host MiB/s', 'vs c', 'CPU s', 'MiB/CPU s', 'vs c', 'boot-to-init s', 'all dd s', 'wall s'];
  const rows = [...best.values()].map((b) => [
    b.key, b.name, b.dev, b.bestS.toFixed(3), b.mibPerSec.toFixed(1), b.mbPerSec.toFixed(1), b.hostMibPerSec.toFixed(1),
    x(ratio(b.key)), b.cpuBestS.toFixed(3), b.cpuMibPerSec.toFixed(1), x(ratio(b.key, 'cpuMibPerSec')), b.bootToInitS.toFixed(2),
    b.allS.map((s) => s.toFixed(2)).join(' '), b.wallS.map((s) => s.toFixed(1)).join(' '),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const left = [0, 1, 2, 12, 13];
  const line = (r) => r.map((x, i) => (left.includes(i) ? x.padEnd(widths[i]) : x.padStart(widths[i]))).join('  ').trimEnd();
  console.log(`Linux guest: dd if=/dev/DEV of=/dev/null bs=1M count=${guest.readMiB} iflag=direct, ${guest.runs} per boot, ${rounds} boots per configuration (order reversed each round)`);
  console.log(`-m ${MEM_MIB}, kernel ${guest.assets.version}, append '${CMDLINE}'; md5 of the first MiB checked in every boot\n`);
  console.log(line(head));
  console.log(widths.map((w) => '-'.repeat(w)).join('  '));
  for (const r of rows) console.log(line(r));
  console.log(`
best s       fastest dd over all boots, timed in the guest (clock: ${[...new Set(configs.flatMap((c) => results.get(c.key).map((b) => b.clock)))].join(', ')})
host MiB/s   the same, timed by the arrival of the guest's before/after lines on the host
vs c         MiB/s over plain v86's own IDE disk (an in-memory buffer, no Spindle)
CPU s        least host CPU time (all threads of the emulator process) spent over one dd:
             the machine is shared, so this is the steadier measure of cost
boot-to-init process spawn to '${READY}' on COM1, best of the boots
whole bench  ${wall.toFixed(1)} s wall`);
  const json = {
    bench: 'linux',
    readMiB: guest.readMiB,
    runsPerBoot: guest.runs,
    rounds,
    kernel: guest.assets.version,
    configs: Object.fromEntries([...best.values()].map((b) => [b.key, b])),
    ratios: { a_c: ratio('a'), b_c: ratio('b'), d_c: ratio('d') },
    cpuRatios: { a_c: ratio('a', 'cpuMibPerSec'), b_c: ratio('b', 'cpuMibPerSec'), d_c: ratio('d', 'cpuMibPerSec') },
    wallS: wall,
  };
  console.log(JSON.stringify(json));
}
