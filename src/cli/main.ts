/**
 * `spindle`: the command-line front end. Parses with commander and dispatches; the
 * commands live in img/ and tour.ts. Every failure is one line on stderr
 * (`spindle img: ...` or `spindle: ...`) and exit status 1.
 */
import { Command, CommanderError } from 'commander';
import { settleCloses } from '../block/graph.js';
import { reportError } from './fail.js';
import { imgBench } from './img/bench.js';
import { imgCheck } from './img/check.js';
import { imgConvert } from './img/convert.js';
import { imgCreate } from './img/create.js';
import { imgInfo } from './img/info.js';
import { imgAmend } from './img/amend.js';
import { imgCommit } from './img/commit.js';
import { imgCompare } from './img/compare.js';
import { imgMap } from './img/map.js';
import { imgMeasure } from './img/measure.js';
import { imgRebase } from './img/rebase.js';
import { imgResize } from './img/resize.js';
import { imgSnapshot } from './img/snapshot.js';
import { runSystem } from './system/run.js';
import { runDaemon } from './daemon/run.js';
import { runTour } from './tour.js';
import { packageVersion } from './version.js';

/** Commander's own errors ("error: unknown option '-x'") in the CLI's one-line form. */
function errorOutput(prefix: string) {
  return {
    outputError: (str: string, write: (s: string) => void) => write(`${prefix}: ${str.replace(/^error: /, '').trim().replace(/\s*\n\s*/g, ' ')}\n`),
  };
}

const collect = (v: string, prev: string[] = []): string[] => [...prev, v];

function buildProgram(): Command {
  const program = new Command('spindle')
    .description('Spindle: a storage stack for virtual machines')
    .version(packageVersion(), '-V, --version')
    .exitOverride()
    .configureOutput(errorOutput('spindle'));

  program
    .command('system')
    .description('an emulated pc machine, with qemu-system-x86_64\'s options (-machine pc -qtest unix:PATH ...)');

  program
    .command('daemon')
    .description("a storage daemon, with qemu-storage-daemon's options (--blockdev, --chardev, --monitor, --object iothread, --pidfile)");

  program
    .command('tour')
    .description('a short, printed tour of the block layer on a scratch image')
    .action(() => runTour());

  const img = new Command('img').description('disk image utility (qemu-img compatible)').exitOverride().configureOutput(errorOutput('spindle img'));
  program.addCommand(img);

  img
    .command('create')
    .description('create a new disk image')
    .option('-f <fmt>', 'image format (default raw)')
    .option('-o <options>', 'format options, e.g. size=1G or cluster_size=64k (repeatable; -o help lists them)', collect)
    .option('-b <backing_file>', 'backing file (qcow2)')
    .option('-F <backing_fmt>', 'format of the backing file (required with -b)')
    .option('-u', 'unsafe: do not open the backing file (SIZE is then required)')
    .option('-q', 'quiet')
    .argument('[filename]')
    .argument('[size]', 'size in bytes, or with a k, M, G, T, P or E suffix')
    .action((filename: string | undefined, size: string | undefined, o) => imgCreate(filename, size, o));

  img
    .command('info')
    .description('show facts about an image')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('-U, --force-share', 'open the image with shared permissions')
    .option('--backing-chain', 'also show every backing file of the image')
    .argument('<filename>')
    .action((filename: string, o) => imgInfo(filename, o));

  img
    .command('check')
    .description('check an image for consistency, and optionally repair it')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('-r <mode>', 'repair: leaks (leaked clusters only) or all')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('-U, --force-share', 'open the image with shared permissions')
    .option('-q', 'quiet')
    .argument('<filename>')
    .action((filename: string, o) => imgCheck(filename, o));

  img
    .command('convert')
    .description('copy an image, leaving out zeroes')
    .option('-f <fmt>', 'source format (default: probe)')
    .option('-O <output_fmt>', 'target format (default raw)')
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .option('-t <cache>', 'target cache mode (default unsafe, as qemu-img: no sync at the end)')
    .option('-T <src_cache>', 'source cache mode (default writeback)')
    .option('-S <sparse_size>', 'zero runs of this many bytes are left as holes (default 4k, 0 = fully allocate)')
    .option('-n', 'skip target creation: write into the existing target')
    .option('-m <num>', 'requests in parallel (default 8)')
    .option('-W', 'allow out-of-order writes to the target')
    .option('--target-is-zero', 'the existing target (-n) already reads as zeroes: skip zeroing it')
    .option('-c', 'compress the target (qcow2)')
    .option('-o <options>', 'target format options (as for create)', (v: string, prev: string[] = []) => [...prev, v])
    .option('-U, --force-share', 'open the source with shared permissions')
    .option('-B <backing_file>', 'backing file of the new image (qcow2): only what differs from it is written')
    .option('-F <backing_fmt>', 'format of the -B backing file')
    .argument('<filename>')
    .argument('<output_filename>')
    .action((src: string, dst: string, o) => imgConvert(src, dst, o));

  img
    .command('bench')
    .description('run a simple I/O benchmark on an image')
    .option('-c <count>', 'number of requests (default 75000)')
    .option('-d <depth>', 'requests in parallel (default 64)')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('--flush-interval <n>', 'flush after every n writes')
    .option('--no-drain', 'flush without waiting for requests in flight')
    .option('-i <aio>', 'threads, io_uring or native')
    .option('-n', 'native AIO (as -i native; needs -t none)')
    .option('-o <offset>', 'first offset (default 0)')
    .option('--pattern <byte>', 'byte to write (default 0)')
    .option('-q', 'quiet')
    .option('-s <buffer_size>', 'bytes per request (default 4K)')
    .option('-S <step_size>', 'offset increment (default: buffer size)')
    .option('-t <cache>', 'cache mode (default writeback)')
    .option('-w', 'write instead of read')
    .option('-U, --force-share', 'open the image with shared permissions')
    .argument('<filename>')
    .action((filename: string, o) => imgBench(filename, o));

  img
    .command('map')
    .description('show where the data of an image comes from')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('--start-offset <offset>', 'first byte to map')
    .option('--max-length <length>', 'bytes to map at most')
    .option('-U, --force-share', 'open the image with shared permissions')
    .argument('<filename>')
    .action((filename: string, o) => imgMap(filename, o));

  img
    .command('compare')
    .description('check whether two images read the same (exit 0 identical, 1 different, 2 error)')
    .option('-f <fmt>', 'format of the first image (default: probe)')
    .option('-F <fmt>', 'format of the second image (default: probe)')
    .option('-s', 'strict: sizes and allocation must match too')
    .option('-q', 'quiet')
    .option('-p', 'show progress')
    .option('-U, --force-share', 'open the images with shared permissions')
    .argument('<filename1>')
    .argument('<filename2>')
    .action((a: string, b: string, o) => imgCompare(a, b, o));

  img
    .command('resize')
    .description('change the virtual size of an image')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('--shrink', 'allow shrinking (data past the new end is lost)')
    .option('--preallocation <mode>', 'off, falloc or full (raw) for the new area')
    .option('-q', 'quiet')
    .allowUnknownOption() // SIZE may be negative ("-1G"), as qemu-img takes it
    .argument('<filename>')
    .argument('<size>', '[+|-]size, with an optional k, M, G, T, P or E suffix')
    .action((filename: string, size: string, o) => imgResize(filename, size, o));

  img
    .command('measure')
    .description('compute the size a new image needs')
    .option('-O <output_fmt>', 'target format (default raw)')
    .option('-o <options>', 'target format options', collect)
    .option('--size <size>', 'measure an empty image of this size')
    .option('-f <fmt>', 'source format (default: probe)')
    .option('--output <ofmt>', 'human or json', 'human')
    .option('-U, --force-share', 'open the image with shared permissions')
    .argument('[filename...]')
    .action((files: string[], o) => imgMeasure(files, o));

  img
    .command('rebase')
    .description('change the backing file of an image')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('-F <backing_fmt>', 'format of the new backing file')
    .option('-b <backing_file>', 'the new backing file ("" for none)')
    .option('-u', 'unsafe: only rewrite the backing file name')
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .option('-t <cache>', 'cache mode of the image')
    .option('-T <src_cache>', 'cache mode of the backing files')
    .option('-U, --force-share', 'open the image with shared permissions')
    .argument('<filename>')
    .action((filename: string, o) => imgRebase(filename, o));

  img
    .command('commit')
    .description('write an image\'s data into its backing file')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('-b <base>', 'backing file to commit into (default: the immediate one)')
    .option('-d', 'do not empty the image afterwards')
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .option('-t <cache>', 'cache mode')
    .option('-r <rate_limit>', 'rate limit (accepted, not applied)')
    .argument('<filename>')
    .action((filename: string, o) => imgCommit(filename, o));

  img
    .command('snapshot')
    .description('list, create, apply or delete internal snapshots (qcow2)')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('-l', 'list the snapshots')
    .option('-c <snapshot>', 'create a snapshot', collect)
    .option('-a <snapshot>', 'apply a snapshot (revert the image to it)', collect)
    .option('-d <snapshot>', 'delete a snapshot', collect)
    .option('-q', 'quiet')
    .option('-U, --force-share', 'open the image with shared permissions')
    .argument('<filename>')
    .action((filename: string, o) => imgSnapshot(filename, o));

  img
    .command('amend')
    .description('change format options of an existing image')
    .option('-f <fmt>', 'image format (default: probe)')
    .option('-o <options>', 'options to change (compat, lazy_refcounts, size)', collect)
    .option('-p', 'show progress')
    .option('-q', 'quiet')
    .option('-U, --force-share', 'open the image with shared permissions')
    .argument('<filename>')
    .action((filename: string, o) => imgAmend(filename, o));

  return program;
}

async function main(argv: string[]): Promise<void> {
  const program = buildProgram();
  const isImg = argv[2] === 'img';
  const isSystem = argv[2] === 'system';
  const isDaemon = argv[2] === 'daemon';
  try {
    // QEMU's option syntaxes are not commander's: `system` and `daemon` parse their own.
    if (isSystem) await runSystem(argv.slice(3));
    else if (isDaemon) await runDaemon(argv.slice(3));
    else await program.parseAsync(argv);
  } catch (e) {
    // Commander already printed its own message (usage errors) or the help/version text.
    if (e instanceof CommanderError) process.exitCode = e.exitCode;
    else reportError(isImg ? 'spindle img' : isSystem ? 'spindle system' : isDaemon ? 'spindle daemon' : 'spindle', e);
  }
  await settleCloses();
  // The native engine keeps the event loop alive; stdout/stderr are synchronous here.
  process.exit(process.exitCode ?? 0);
}

void main(process.argv);
