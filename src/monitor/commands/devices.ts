/**
 * QMP's device_add and device_del on the pc machine, as QEMU words them.
 *
 * device_add makes the device through the same path as -device (src/cli/system/devices.ts)
 * and hot-plugs a PCI device through ACPI; IDE is refused (its bus on a pc cannot hotplug).
 *
 * device_del only asks. The flow to DEVICE_DELETED:
 *   device_del id ─> PcMachine.unplugRequest(id)
 *     PCI: the slot's "down" bit and the hotplug GPE raise the SCI; nothing goes yet ...
 *          ... the guest writes the slot to the eject register (0xae08)
 *     other (xen-disk): at once
 *   ─> removeDevice: unrealize, the device detaches from its backend (its reference goes)
 *   ─> deviceGone: the machine's reference to a -drive/drive_add backend given to the device
 *      goes too (QEMU's blockdev_auto_del), so it dies unless something else holds it
 *   ─> DEVICE_DELETED (virtio-backend child first, as QEMU, then the device)
 */
import type { PcMachine } from '../../../hw/pc/pc.js';
import { deviceGone, DeviceError, plugDevice, type DeviceProps, type Plugged } from '../../cli/system/devices.js';
import { defineCommand, QmpError, type QmpMonitor } from '../qmp.js';

/** QEMU's QOM path of a user-made device. */
export function peripheralPath(id: string): string {
  return `/machine/peripheral/${id}`;
}

export class DeviceCommands {
  constructor(private readonly monitor: QmpMonitor, private readonly machine: PcMachine, private readonly plugged: Plugged) {}

  /** device_add; throws QmpError. */
  add(props: DeviceProps): void {
    try {
      plugDevice(this.machine, this.plugged, props, true);
    } catch (e) {
      if (e instanceof DeviceError) throw new QmpError('GenericError', e.message);
      throw e;
    }
  }

  /** device_del: asks for the device to go; DEVICE_DELETED says when it went. Throws QmpError. */
  del(idOrPath: string): void {
    const id = idOrPath.startsWith('/machine/peripheral/') ? idOrPath.slice('/machine/peripheral/'.length) : idOrPath;
    const per = this.plugged.peripherals.get(id);
    if (!per || !this.machine.device(id) && !per.ide) throw new QmpError('DeviceNotFound', `Device '${idOrPath}' not found`);
    if (per.ide) {
      // IDE has no hotplug signalling: the drive goes at once (a Spindle extension; QEMU
      // refuses). The guest finds the position empty at its next command.
      const [bus, unit] = per.ide;
      this.plugged.ide.detach(bus, unit);
      this.plugged.ideUsed.delete(`${bus}.${unit}`);
      deviceGone(this.plugged, id);
      this.monitor.emit('DEVICE_DELETED', { device: id, path: peripheralPath(id) });
      return;
    }
    if (per.unplugging) throw new QmpError('GenericError', `Device ${id} is already in the process of unplug`);
    per.unplugging = true;
    this.machine.unplugRequest(id, () => {
      const gone = deviceGone(this.plugged, id);
      if (gone?.driver === 'virtio-blk-pci') this.monitor.emit('DEVICE_DELETED', { path: `${peripheralPath(id)}/virtio-backend` });
      this.monitor.emit('DEVICE_DELETED', { device: id, path: peripheralPath(id) });
    });
  }
}

export function registerDeviceCommands(monitor: QmpMonitor, devices: DeviceCommands): void {
  monitor.register(defineCommand({
    name: 'device_add',
    doc: "Adds a device; its properties are members beside 'driver' and 'id'",
    args: {
      driver: { type: 'str', doc: 'the device model (virtio-blk-pci, ide-hd, ide-cd, xen-disk)' },
      id: { type: 'str', optional: true, doc: "the device's id" },
    },
    open: true,
    run: (a) => {
      devices.add(a as DeviceProps);
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'device_del',
    doc: 'Asks for a device to be removed; DEVICE_DELETED follows when it is gone',
    args: { id: { type: 'str', doc: "the device's id or QOM path" } },
    run: (a) => {
      devices.del(a.id);
      return {};
    },
  }));
}
