/**
 * The guest side of `npm run bench:linux` (bench/linux-bench.mjs bundles this with esbuild and
 * imports it): one initramfs, the same for every configuration, whose /init finds the one disk
 * (/dev/vda or /dev/sda), reads 64 MiB of it with O_DIRECT `dd` RUNS times, timing each read
 * from the guest's monotonic clock (read by the shell itself, no fork, so only the dd's own
 * fork+exec is in the interval), then prints the md5 of the disk's first MiB for the host to
 * check. The first reads are slower: v86's JIT is still compiling the guest's I/O paths.
 *
 * Lines the host parses (all start with "bench: "):
 *   bench: disk vda
 *   bench: clock timer_list                    (or uptime)
 *   bench: run vda 1 start 12345678901         (CLOCK_MONOTONIC ns)
 *   bench: run vda 1 end 12456789012
 *   bench: md5 vda 0123456789abcdef0123456789abcdef
 *   bench: fail <why>
 *
 * Context: test code only, synchronous file reads.
 */
import { buildInitrd, guestInit, linuxGuestAssets, type LinuxGuestAssets } from '../test/linux/guest-assets.js';

/** The guest's dd reads this many 1 MiB blocks. */
export const READ_MIB = 64;
/** dd runs per boot; the host takes the fastest. */
export const RUNS = 8;
/** Every driver any configuration needs, so one initrd serves all of them. */
const MODULES = ['virtio_pci', 'virtio_blk', 'ata_piix', 'sd_mod'];

const SCRIPT = `
DEV=
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  for d in vda sda; do [ -b /dev/$d ] && DEV=$d; done
  [ -n "$DEV" ] && break
  sleep 0.1
done
[ -n "$DEV" ] || { echo "bench: fail no /dev/vda or /dev/sda"; cat /proc/partitions; exit 1; }
echo "bench: disk $DEV"
# T = CLOCK_MONOTONIC in ns, read by the shell itself (no fork): the "now at N nsecs" line of
# /proc/timer_list, else /proc/uptime (10 ms steps).
if [ -r /proc/timer_list ]; then
  CLK=timer_list
  stamp() { { read -r l; read -r l; read -r l; } </proc/timer_list; set -- $l; T=$3; }
else
  CLK=uptime
  stamp() { read -r l rest </proc/uptime; T=\${l%.*}\${l#*.}0000000; }
fi
echo "bench: clock $CLK"
echo 3 > /proc/sys/vm/drop_caches
for i in $(seq ${RUNS}); do
  stamp
  echo "bench: run $DEV $i start $T"
  dd if=/dev/$DEV of=/dev/null bs=1M count=${READ_MIB} iflag=direct 2>/tmp/dd.err
  rc=$?
  stamp
  [ $rc = 0 ] || { cat /tmp/dd.err; echo "bench: fail dd exit $rc"; exit 1; }
  echo "bench: run $DEV $i end $T"
  grep -q "^${READ_MIB}+0 records in" /tmp/dd.err || { cat /tmp/dd.err; echo "bench: fail short read"; exit 1; }
done
sum=$(dd if=/dev/$DEV bs=1M count=1 2>/dev/null | md5sum)
echo "bench: md5 $DEV \${sum%% *}"
`;

export interface LinuxBenchGuest {
  assets: LinuxGuestAssets;
  /** gzip'ed newc initramfs. */
  initrd: Buffer;
  readMiB: number;
  runs: number;
}

/** The kernel, firmware and the bench's initramfs. Throws if the Linux guest is not fetched. */
export function makeLinuxBenchGuest(): LinuxBenchGuest {
  const assets = linuxGuestAssets();
  const initrd = buildInitrd({ init: guestInit(SCRIPT), modules: MODULES });
  return { assets, initrd, readMiB: READ_MIB, runs: RUNS };
}
