/**
 * `npm run bench:vhost` (bench/vhost-bench.mjs bundles this with esbuild and imports it): fio
 * inside a QEMU guest whose disk is a vhost-user-blk export, Spindle's daemon against
 * qemu-storage-daemon, on the same image, in one run.
 *
 * For each format (raw, qcow2) and each daemon, in an order reversed every round: start the
 * daemon on the image, boot QEMU (KVM if it works, else TCG) with `-device vhost-user-blk-pci`,
 * and run three fio jobs in the guest (libaio, O_DIRECT, on /dev/vda): 4 KiB random reads at
 * iodepth 1 and 32, and 1 MiB sequential reads at iodepth 8. Before and after each job the
 * guest waits for the host (turn-taking over the console), so the host samples the daemon's
 * CPU time (utime + stime of the whole process, exited threads included) exactly around the
 * job. A figure is the best over the rounds.
 *
 * Lines the guest prints (all start with "bench: "):
 *   bench: wait <job>                 the host samples CPU, then types "go"
 *   bench: result <job> <KiB/s> <IOPS> <runtime ms> <virtio request interrupts>
 *   bench: fail <why>
 *
 * Context: bench code only.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildInitrd, guestInit, linuxGuestAssets } from '../test/linux/guest-assets.js';
import { killAll, startQemuGuest, startStorageDaemon, workingAccel, type Accel } from '../test/linux/qemu-guest.js';

export interface Job {
  name: string;
  rw: 'randread' | 'read';
  bs: string;
  depth: number;
}
export const JOBS: Job[] = [
  { name: 'rand4k-d1', rw: 'randread', bs: '4k', depth: 1 },
  { name: 'rand4k-d32', rw: 'randread', bs: '4k', depth: 32 },
  { name: 'seq1m-d8', rw: 'read', bs: '1M', depth: 8 },
];

export interface JobResult {
  kibps: number;
  iops: number;
  runtimeMs: number;
  /** Daemon CPU time during the job, in seconds. */
  cpuS: number;
  /** Virtio request-queue interrupts the guest took during the job (/proc/interrupts). */
  irqs: number;
}

export interface BenchOptions {
  dir: string;
  /** dist/spindle.mjs */
  bundle: string;
  imageMiB: number;
  runtimeS: number;
  rounds: number;
  formats: ('raw' | 'qcow2')[];
  /** Names of the JOBS to run; all of them when absent. */
  jobs?: string[];
  log: (s: string) => void;
}

export type Daemon = 'spindle' | 'qsd';
export type Results = Record<string, Record<Daemon, Record<string, JobResult>>>;
/** Per format and job: Spindle's IOPS over qsd's, one ratio per round in which both ran. */
export type RoundRatios = Record<string, Record<string, number[]>>;

function guestScript(runtimeS: number, jobList: Job[]): string {
  const jobs = jobList.map((j) => `${j.name}:${j.rw}:${j.bs}:${j.depth}`).join(' ');
  return `
export PATH=/bin:/usr/bin
irqs() { awk '/virtio.*req/ { for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) s += $i } END { print s + 0 }' /proc/interrupts; }
[ -b /dev/vda ] || { echo "bench: fail no /dev/vda"; cat /proc/partitions; exit 1; }
for spec in ${jobs}; do
  IFS=: read name rw bs depth <<EOF
$spec
EOF
  echo "bench: wait $name"
  read go
  i0=$(irqs)
  /usr/bin/fio --name=$name --filename=/dev/vda --direct=1 --ioengine=libaio --rw=$rw --bs=$bs \\
    --iodepth=$depth --runtime=${runtimeS} --time_based=1 --output-format=terse --terse-version=3 >/tmp/out 2>&1 \\
    || { echo "bench: fail fio $name: $(tail -c 300 /tmp/out)"; exit 1; }
  i1=$(irqs)
  awk -F';' -v n=$name -v irq=$((i1 - i0)) '{ print "bench: result", n, $7, $8, $9, irq }' /tmp/out
  echo "bench: wait $name-end"
  read go
done
`;
}

function fail(msg: string): never {
  throw new Error(msg);
}

/** utime + stime of process `pid` in seconds (all its threads, dead ones included). */
function cpuS(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'latin1');
  const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(f[11]) + Number(f[12])) / 100; // fields 14 and 15, in clock ticks (USER_HZ 100)
}

/** Pseudo-random, non-zero data: nothing reads faster for being zeroes or holes. */
function makeImage(path: string, mib: number): void {
  const buf = Buffer.alloc(mib << 20);
  const w = new Uint32Array(buf.buffer, buf.byteOffset, buf.length / 4);
  let x = 0x9e3779b9;
  for (let i = 0; i < w.length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    w[i] = x | 0x01010101;
  }
  writeFileSync(path, buf);
}

async function runOne(o: BenchOptions, jobs: Job[], accel: Accel, kernel: string, initrd: string, daemon: Daemon, fmt: string, image: string): Promise<Record<string, JobResult>> {
  const sock = join(o.dir, `${daemon}.sock`);
  const argv = daemon === 'spindle' ? [process.execPath, o.bundle, 'daemon'] : ['qemu-storage-daemon'];
  const d = await startStorageDaemon(argv, [
    '--blockdev', `driver=file,node-name=file0,filename=${image},cache.direct=off`,
    '--blockdev', `driver=${fmt},node-name=disk0,file=file0`,
    '--export', `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${sock},writable=on,num-queues=1`,
  ], join(o.dir, `${daemon}.pid`));
  const g = startQemuGuest({ kernel, initrd, disks: [{ socket: sock }], accel, timeoutMs: 60_000 + jobs.length * (o.runtimeS + 30) * 1000 });
  const out: Record<string, JobResult> = {};
  try {
    for (const j of jobs) {
      await g.waitFor(`bench: wait ${j.name}`);
      const c0 = cpuS(d.pid);
      g.type('go\n');
      const line = await g.waitFor(/^bench: (result|fail) /);
      if (line.startsWith('bench: fail')) throw new Error(`${daemon} ${fmt}: ${line}`);
      await g.waitFor(`bench: wait ${j.name}-end`);
      const c1 = cpuS(d.pid);
      g.type('go\n');
      const [, , , kib, iops, ms, irqs] = line.trim().split(/\s+/);
      out[j.name] = { kibps: Number(kib), iops: Number(iops), runtimeMs: Number(ms), cpuS: c1 - c0, irqs: Number(irqs) };
    }
    await g.exited;
  } finally {
    await g.kill();
    await d.stop();
  }
  return out;
}

export async function runVhostBench(o: BenchOptions): Promise<{ accel: Accel; results: Results; roundRatios: RoundRatios }> {
  const assets = linuxGuestAssets('amd64');
  const jobs = o.jobs ? o.jobs.map((n) => JOBS.find((j) => j.name === n) ?? fail(`vhost-bench: no job ${n} (${JOBS.map((j) => j.name).join(', ')})`)) : JOBS;
  const accel = await workingAccel(assets.kernel);
  o.log(`vhost-bench: QEMU under ${accel}; ${o.imageMiB} MiB image; fio ${o.runtimeS} s a job; ${o.rounds} round(s)`);
  const initrd = join(o.dir, 'initrd.gz');
  writeFileSync(initrd, buildInitrd({
    arch: 'amd64', init: guestInit(guestScript(o.runtimeS, jobs)), modules: ['virtio_pci', 'virtio_blk'], binaries: ['/usr/bin/fio'],
  }));
  const raw = join(o.dir, 'disk.raw');
  makeImage(raw, o.imageMiB);
  const images: Record<string, string> = { raw };
  if (o.formats.includes('qcow2')) {
    images['qcow2'] = join(o.dir, 'disk.qcow2');
    execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, images['qcow2']]);
  }
  const results: Results = {};
  const roundRatios: RoundRatios = {};
  try {
    for (let round = 0; round < o.rounds; round++) {
      const order: Daemon[] = round % 2 === 0 ? ['spindle', 'qsd'] : ['qsd', 'spindle'];
      for (const fmt of o.formats) {
        const thisRound: Partial<Record<Daemon, Record<string, JobResult>>> = {};
        for (const daemon of order) {
          let r: Record<string, JobResult>;
          try {
            r = await runOne(o, jobs, accel, assets.kernel, initrd, daemon, fmt, images[fmt]!);
          } catch (e) {
            // One run that hangs or fails (either daemon) costs that run, not the whole bench.
            o.log(`  round ${round + 1} ${fmt} ${daemon}: FAILED: ${(e as Error).message.split('\n')[0]}`);
            continue;
          }
          o.log(`  round ${round + 1} ${fmt} ${daemon}: ${jobs.map((j) => `${j.name} ${r[j.name]!.iops} IOPS`).join(', ')}`);
          const best = ((results[fmt] ??= { spindle: {}, qsd: {} })[daemon]);
          for (const [k, v] of Object.entries(r)) if (!best[k] || v.iops > best[k]!.iops) best[k] = v;
          thisRound[daemon] = r;
        }
        // The two daemons back to back share the machine's state of the moment: their ratio
        // is steadier than the ratio of bests.
        const s = thisRound.spindle;
        const q = thisRound.qsd;
        if (s && q) for (const j of jobs) if (s[j.name] && q[j.name]) ((roundRatios[fmt] ??= {})[j.name] ??= []).push(s[j.name]!.iops / q[j.name]!.iops);
      }
    }
  } finally {
    killAll();
  }
  return { accel, results, roundRatios };
}
