/**
 * spindle/qos: the guest side of device tests. Start a machine (`startMachine`, as libqtest
 * starts QEMU) or build one in process (`QtestClient.inProcess`), then drive its devices
 * with the guest-side drivers here, which speak only QEMU's qtest protocol.
 */
export { QtestClient, QtestFailure } from './qtest-client.js';
export { GuestAlloc } from './alloc.js';
export { QPciBus, QPciDevice, type BarMapping } from './pci.js';
export { startMachine, QmpConnection, type RunningMachine } from './machine.js';
export { QAtaChannel, ATA_ST, BM, type Prd, type TaskFile, type DmaResult, type PacketResult } from './ata.js';
export { QVirtioPciDevice, QVirtQueue, turn, type QVirtioOpenOptions } from './virtio.js';
export { QVirtioBlk, type QBlkReqOptions, type QBlkResult } from './virtio-blk.js';
export { XenGuest, XenBlkfront, XENBUS, waitFor, type IoResult } from './xen-blkfront.js';
