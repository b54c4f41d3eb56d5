// `npm run bench:nbd`: nbdcopy of a 256 MiB raw image (page cache warm) out of Spindle's NBD
// export (`spindle daemon --nbd-server ... --export type=nbd`) and out of `qemu-nbd -r`, on the
// same file, in one run; best of 3 each, alternating, with the MiB/s and the ratio.
// Needs dist/ (npm run build), nbdcopy (libnbd-bin) and qemu-nbd (qemu-utils).
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const MiB = 1 << 20;
const SIZE = 256 * MiB;
const ROUNDS = 3;
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

function copy(uri) {
  const t0 = process.hrtime.bigint();
  const r = spawnSync('nbdcopy', [...extra, uri, 'null:'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`nbdcopy ${uri}: ${r.stderr}`);
  return Number(process.hrtime.bigint() - t0) / 1e9;
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
  for (let i = 0; i < ROUNDS; i++) {
    for (const who of i % 2 ? ['qemu', 'spindle'] : ['spindle', 'qemu']) {
      const t = copy(`nbd+unix:///b?socket=${who === 'spindle' ? spindleSock : qemuSock}`);
      best[who] = Math.min(best[who], t);
    }
  }
  const rate = (t) => SIZE / MiB / t;
  console.log(`nbdcopy ${SIZE / MiB} MiB to null: ${extra.join(' ')}`);
  console.log(`  spindle daemon  ${rate(best.spindle).toFixed(0).padStart(6)} MiB/s`);
  console.log(`  qemu-nbd        ${rate(best.qemu).toFixed(0).padStart(6)} MiB/s`);
  console.log(`  spindle/qemu    ${(best.qemu / best.spindle).toFixed(2)}x`);
  console.log(JSON.stringify({ bench: 'nbd', mib: SIZE / MiB, spindleMiBs: rate(best.spindle), qemuMiBs: rate(best.qemu), ratio: best.qemu / best.spindle }));
} finally {
  spindle.kill('SIGTERM');
  qemu.kill('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
}
