/** How QMP names the device a block backend is attached to. */
import { VirtioBlkPci } from '../../../hw/block/virtio-blk.js';
import type { BlockBackend } from '../../backend/backend.js';

/**
 * What QEMU calls the device a backend is attached to: its id, or for virtio-blk-pci the QOM
 * path of the virtio device inside it (which holds the backend there).
 */
export function qdevOf(be: BlockBackend): string | null {
  const dev = be.device;
  if (!dev) return null;
  if (dev instanceof VirtioBlkPci) return `/machine/${dev.id.includes('.anon') ? 'peripheral-anon' : 'peripheral'}/${dev.id}/virtio-backend`;
  return dev.id;
}
