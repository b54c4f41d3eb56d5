/**
 * `spindle tour` (what `npm start` runs): the block layer's contracts shown on a scratch
 * raw image, one numbered step at a time. Deterministic: the same lines every run.
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createBackend, driveDel } from '../backend/backend.js';
import type { DeviceOps } from '../backend/device-ops.js';
import { openNode, settleCloses, unref } from '../block/graph.js';
import { blockStatus } from '../block/io.js';
import { Perm } from '../block/types.js';
import { getEngine } from '../native/engine.js';
import { oneLine } from './fail.js';
import { createRawFile } from './img/create.js';
import { sizeToStr } from './img/size.js';

const MiB = 1 << 20;
let stepNo = 0;
const step = (text: string): void => void process.stdout.write(`\n${++stepNo}. ${text}\n`);
const say = (text: string): void => void process.stdout.write(`   ${text}\n`);

/** Runs `fn`, which must fail, and prints its error. */
async function refused(what: string, fn: () => unknown): Promise<void> {
  try {
    await fn();
    say(`${what}: unexpectedly succeeded`);
    process.exitCode = 1;
  } catch (e) {
    say(`${what}: ${(e as { code?: string }).code ?? 'error'}: ${oneLine(e)}`);
  }
}

export async function runTour(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'spindle-tour-'));
  try {
    const path = join(dir, 'disk.img');
    step('Create a 64 MiB raw image (a file that is all hole)');
    createRawFile(path, 64 * MiB);
    say(`created disk.img, ${sizeToStr(64 * MiB)}; I/O engine: ${getEngine().kind}`);

    step("Open file -> raw under backend 'drive0' and attach device 'disk0'");
    const node = await openNode({ driver: 'raw', file: { driver: 'file', filename: path } });
    const drive0 = createBackend({ name: 'drive0' }, node);
    const dev = { id: 'disk0' };
    const ops: DeviceOps = {
      changeMedia: (load) => say(`[disk0] changeMedia(${load})`),
      resize: () => say('[disk0] resize()'),
    };
    const io = drive0.attachDevice(dev, ops);
    say(`node '${node.name}' (raw) over '${node.file!.node.name}' (file); the device holds only a BackendIO`);

    step('Write a 64 KiB pattern at 1 MiB and read it back');
    const buf = getEngine().allocBuffer(64 * 1024).fill(0x5a);
    await io.write(MiB, buf);
    const back = getEngine().allocBuffer(64 * 1024);
    await io.read(MiB, back);
    say(`read back ${back.equals(buf) ? 'matches' : 'DIFFERS'} (first byte 0x${back[0]!.toString(16)})`);

    step('Block status: where is data, where are holes?');
    for (let off = 0; off < 4 * MiB; ) {
      const st = await blockStatus(drive0.root!, off, 4 * MiB - off);
      say(`[${off}, ${off + st.bytes}) ${st.data ? 'data' : 'hole (reads as zeroes)'}`);
      off += st.bytes;
    }

    step('A second writer on the same node is refused, naming both users');
    await refused('createBackend(WRITE)', () => createBackend({ perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL }, node));

    step('blkdebug over null-co: an injected EIO on write_aio');
    const dbg = await openNode({ driver: 'blkdebug', 'inject-error': [{ event: 'write_aio', errno: 5 }], image: { driver: 'null-co', size: MiB } });
    const faulty = createBackend({}, dbg);
    unref(dbg);
    const probe = { id: 'probe' };
    const fio = faulty.attachDevice(probe);
    await fio.read(0, back.subarray(0, 4096));
    say('read: ok');
    await refused('write', () => fio.write(0, buf.subarray(0, 4096)));
    faulty.detachDevice(probe);
    faulty.unref();

    step('Media change: remove the node, then insert it again');
    await drive0.removeNode();
    await refused('read with no medium', () => io.read(0, back.subarray(0, 4096)));
    drive0.insertNode(node);
    unref(node); // the backend's root edge holds it from here
    await io.read(MiB, back);
    say(`read after insert: ${back.equals(buf) ? 'same data' : 'DIFFERS'}`);

    step("drive_del drive0 while disk0 still holds it");
    await driveDel(drive0);
    await refused('read', () => io.read(0, back.subarray(0, 4096)));
    const again = createBackend({ name: 'drive0' });
    say(`the name is free: a new backend '${again.name}' exists, and it is not the old one: ${again !== drive0}`);
    again.unref();
    drive0.detachDevice(dev);
    say(`disk0 unplugged: the old backend is ${drive0.dead ? 'gone' : 'STILL ALIVE'}`);
    getEngine().freeBuffer(buf);
    getEngine().freeBuffer(back);
  } finally {
    await settleCloses();
    rmSync(dir, { recursive: true, force: true });
  }
  step('Done: scratch directory removed');
}
