// `npm run bench:nbd`: nbdcopy of a 256 MiB raw image (page cache warm) out of Spindle's NBD
// export (`spindle daemon --nbd-server ... --export type=nbd`) and out of `qemu-nbd -r`, on the
// same file, in one run; a sample is COPIES copies in a row (one copy takes ~150 ms, of which
// nbdcopy's start-up is a noisy part); best of ROUNDS samples each, alternating, with the MiB/s,
// the ratio and each server's CPU time per GiB.
// Needs dist/ (npm run build), nbdcopy (libnbd-bin) and qemu-nbd (qemu-utils).
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const MiB = 1 << 20;
const SIZE = 256 * MiB;
const ROUNDS = 5;
const COPIES = 4;
const extra = process.argv.slice(2); // e.g. --connections=1

const dir = mkdtempSync(join(tmpdir(), 'spindle-nbd-bench-'));
const img = join(dir, 'bench.raw');
const buf = Buffer.allocUnsafe(SIZE);
let x = 12345;
for (let i = 0; i < SIZE; i += 4) {
  x = (x * 1103515245 + 12345) >>> 0;
  buf.writeUInt32LE(x, i);
}
writeFileSync(img, buf);

async function waitFor(path, proc) {
  for (let i = 0; i < 500 && !existsSync(path); i++) {
    if (proc.exitCode !== null) throw new Error(`server exited (${proc.exitCode})`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** utime + stime of process `pid` in seconds (all its threads). */
function cpuS(pid) {
  const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100;
}

/** COPIES copies in a row: [seconds, server CPU seconds]. */
function copy(uri, pid) {
  const c0 = cpuS(pid);
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < COPIES; i++) {
    const r = spawnSync('nbdcopy', [...extra, uri, 'null:'], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`nbdcopy ${uri}: ${r.stderr}`);
  }
  return [Number(process.hrtime.bigint() - t0) / 1e9, cpuS(pid) - c0];
}

const spindleSock = join(dir, 'spindle.sock');
const qemuSock = join(dir, 'qemu.sock');
const spindle = spawn(process.execPath, [join(root, 'dist', 'spindle.mjs'), 'daemon',
  '--blockdev', `driver=file,node-name=f,filename=${img},read-only=on`, '--blockdev', 'driver=raw,node-name=r,file=f,read-only=on',
  '--nbd-server', `addr.type=unix,addr.path=${spindleSock}`, '--export', 'type=nbd,id=e,node-name=r,name=b'], { stdio: 'inherit' });
const qemu = spawn('qemu-nbd', ['-r', '-t', '-f', 'raw', '-x', 'b', '-e', '8', '-k', qemuSock, img], { stdio: 'inherit' });
try {
  await waitFor(spindleSock, spindle);
  await waitFor(qemuSock, qemu);
  spawnSync('sh', ['-c', `cat '${img}' > /dev/null`]);
  const best = { spindle: Infinity, qemu: Infinity };
  const cpu = { spindle: 0, qemu: 0 };
  for (let i = 0; i < ROUNDS; i++) {
    for (const who of i % 2 ? ['qemu', 'spindle'] : ['spindle', 'qemu']) {
      const [t, c] = copy(`nbd+unix:///b?socket=${who === 'spindle' ? spindleSock : qemuSock}`, who === 'spindle' ? spindle.pid : qemu.pid);
      best[who] = Math.min(best[who], t);
      cpu[who] += c;
    }
  }
  const gib = (ROUNDS * COPIES * SIZE) / (1 << 30);
  const rate = (t) => (COPIES * SIZE) / MiB / t;
  console.log(`nbdcopy ${SIZE / MiB} MiB to null, ${COPIES} in a row, best of ${ROUNDS}: ${extra.join(' ')}`);
  console.log(`  spindle daemon  ${rate(best.spindle).toFixed(0).padStart(6)} MiB/s  ${(cpu.spindle / gib).toFixed(2)} CPU s/GiB`);
  console.log(`  qemu-nbd        ${rate(best.qemu).toFixed(0).padStart(6)} MiB/s  ${(cpu.qemu / gib).toFixed(2)} CPU s/GiB`);
  console.log(`  spindle/qemu    ${(best.qemu / best.spindle).toFixed(2)}x`);
  console.log(JSON.stringify({ bench: 'nbd', mib: SIZE / MiB, spindleMiBs: rate(best.spindle), qemuMiBs: rate(best.qemu), ratio: best.qemu / best.spindle,
    spindleCpuSPerGiB: cpu.spindle / gib, qemuCpuSPerGiB: cpu.qemu / gib }));
} finally {
  spindle.kill('SIGTERM');
  qemu.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
}
