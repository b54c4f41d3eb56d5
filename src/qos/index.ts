/**
 * spindle/qos: the guest side of device tests. Start a machine (`startMachine`, as libqtest
 * starts QEMU) or build one in process (`QtestClient.inProcess`), then drive its devices
 * with the guest-side drivers here, which speak only QEMU's qtest protocol.
 */
export { QtestClient, QtestFailure } from './qtest-client.js';
export { GuestAlloc } from './alloc.js';
export { QPciBus, QPciDevice, type BarMapping } from './pci.js';
export { startMachine, QmpConnection, type RunningMachine } from './machine.js';
