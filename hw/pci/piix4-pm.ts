/**
 * The PIIX4 power-management function (00:01.3 on QEMU's pc): its I/O block at the base the
 * firmware writes to PMBA (config 0x40), switched on by PMREGMISC (0x80) bit 0, with the PM1
 * event and control registers and the ACPI PM timer (3.579545 MHz, 24 bits) firmware and
 * kernels use for delays; and the APM control port (0xb2) through which an OS asks for ACPI
 * mode, granted at once as QEMU does. Sleep type 0 (S5 in the firmware's tables) with SLP_EN
 * powers the machine off. Without SMM the function says SMM is already set up (DEVACTB's
 * APMC enable, as QEMU's smm=off does), so firmware does not try to enter it.
 */
import type { IoRegion } from '../core/address-space.js';
import type { Machine } from '../core/machine.js';
import { PciFunction } from './pci-device.js';

const PMBA = 0x40;
const PMREGMISC = 0x80;
const DEVACTB_APMC = 0x5b;
const PM_IO_SIZE = 64;
const PM_TIMER_HZ = 3579545;
const APM_CNT = 0xb2;
const ACPI_ENABLE = 0xf1;
const ACPI_DISABLE = 0xf0;
const SCI_EN = 0x0001;
const SLP_EN = 0x2000;

export class Piix4Pm {
  readonly fn = new PciFunction('PIIX4_PM', { vendor: 0x8086, device: 0x7113, classCode: 0x068000, revision: 3, interruptPin: 1 });
  private mapped = -1;
  private pm1Status = 0;
  private pm1Enable = 0;
  private pm1Control = 0;
  private readonly start = performance.now();
  private readonly region: IoRegion;
  private apmStatus = 0;
  /** The guest asked for soft power-off (S5). */
  onPowerOff: (() => void) | null = null;

  constructor(private readonly machine: Machine, o: { smm: boolean }) {
    const c = this.fn.config;
    c[PMBA] = 1; // an I/O base
    this.fn.setWritable(PMBA, 4, 0x0000ffc0);
    this.fn.setWritable(PMREGMISC, 1, 0x01);
    if (!o.smm) c[DEVACTB_APMC] = 0x02;
    this.fn.onConfigWrite = (off, size) => {
      if ((off < PMBA + 4 && off + size > PMBA) || (off <= PMREGMISC && off + size > PMREGMISC)) this.remap();
    };
    this.region = { name: 'PIIX4_PM pm-io', read: (off, size) => this.read(off, size), write: (off, size, v) => this.write(off, size, v) };
    machine.io.map(APM_CNT, 2, {
      name: 'PIIX4_PM apm',
      read: (off) => (off === 1 ? this.apmStatus : 0),
      write: (off, _size, v) => {
        if (off === 1) this.apmStatus = v & 0xff;
        else if ((v & 0xff) === ACPI_ENABLE) this.pm1Control |= SCI_EN;
        else if ((v & 0xff) === ACPI_DISABLE) this.pm1Control &= ~SCI_EN;
      },
    });
  }

  /** The timer's 24-bit count, from the host's monotonic clock. */
  private timer(): number {
    return Math.floor(((performance.now() - this.start) * PM_TIMER_HZ) / 1000) & 0xffffff;
  }

  private remap(): void {
    const c = this.fn.config;
    const base = (c[PMBA]! | (c[PMBA + 1]! << 8)) & 0xffc0;
    const want = c[PMREGMISC]! & 1 && base !== 0 ? base : -1;
    if (want === this.mapped) return;
    if (this.mapped >= 0) this.machine.io.unmap(this.mapped, this.region);
    this.mapped = -1;
    if (want >= 0) {
      this.machine.io.map(want, PM_IO_SIZE, this.region);
      this.mapped = want;
    }
  }

  private read(off: number, size: number): number {
    // One sample of the timer per access: bytes from two samples would tear, and a timer
    // that seems to step back reads as a wrap to firmware (4.7 s lost each time).
    const t = this.timer();
    let v = 0;
    for (let i = 0; i < size; i++) v |= this.readByte(off + i, t) << (8 * i);
    return v >>> 0;
  }

  private readByte(off: number, timer: number): number {
    switch (off) {
      case 0: case 1: return (this.pm1Status >> (8 * off)) & 0xff;
      case 2: case 3: return (this.pm1Enable >> (8 * (off - 2))) & 0xff;
      case 4: case 5: return (this.pm1Control >> (8 * (off - 4))) & 0xff;
      case 8: case 9: case 10: case 11: return (timer >> (8 * (off - 8))) & 0xff;
      default: return 0;
    }
  }

  private write(off: number, size: number, v: number): void {
    for (let i = 0; i < size; i++) {
      const b = (v >>> (8 * i)) & 0xff;
      const at = off + i;
      if (at === 0 || at === 1) this.pm1Status &= ~(b << (8 * at)); // write 1 to clear
      else if (at === 2 || at === 3) this.pm1Enable = (this.pm1Enable & ~(0xff << (8 * (at - 2)))) | (b << (8 * (at - 2)));
      else if (at === 4 || at === 5) {
        const v16 = (this.pm1Control & ~(0xff << (8 * (at - 4)))) | (b << (8 * (at - 4)));
        // SLP_EN is not latched: a sleep request is a one-shot. Only S5 (type 0) is done.
        this.pm1Control = v16 & ~SLP_EN;
        if (v16 & SLP_EN && ((v16 >> 10) & 7) === 0) this.onPowerOff?.();
      }
    }
  }
}
