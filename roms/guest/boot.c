/*
 * Spindle's guest program, booted by multiboot with no firmware before it: nothing has
 * assigned PCI BARs, routed interrupts or initialised the PICs, so it does all of that
 * itself (pci.c, lib.c), then checks every disk it finds: the PIIX3 IDE drives (ide.c) and
 * the virtio-blk functions (virtio.c). Every line goes to COM1 prefixed "spindle guest: ",
 * the last one is the verdict (PASS, or FAIL with the first failed check), then it halts.
 */
#include "guest.h"

#define MULTIBOOT_MAGIC 0x1BADB002u
#define MULTIBOOT_FLAGS 0x00000000u

__attribute__((section(".multiboot"), used, aligned(4)))
static const unsigned int multiboot_header[3] = {MULTIBOOT_MAGIC, MULTIBOOT_FLAGS, -(MULTIBOOT_MAGIC + MULTIBOOT_FLAGS)};

void guest_main(unsigned int magic) {
  __asm__ volatile("cli");
  say("booted\n");
  if (magic != 0x2BADB002u) fail("not loaded by multiboot");
  pic_init();
  pci_setup();

  int disks = 0;
  struct pci_fn *ide = pci_find(0x8086, 0x7010, 0);
  if (ide) disks += ide_run(ide);
  else say("no PIIX3 IDE (8086:7010): IDE skipped\n");

  for (int i = 0;; i++) {
    struct pci_fn *v = pci_find(0x1af4, 0x1001, i);
    if (!v) break;
    disks += virtio_blk_run(v, i);
  }

  say("disks checked: ");
  put_dec((u32)disks);
  putc_serial('\n');
  if (!disks) fail("no disk found");
  if (fail_count()) {
    say("FAIL ");
    puts_serial(first_fail());
    if (fail_count() > 1) {
      puts_serial(" (and ");
      put_dec((u32)(fail_count() - 1));
      puts_serial(" more)");
    }
    putc_serial('\n');
  } else {
    say("PASS\n");
  }
  for (;;) __asm__ volatile("cli; hlt");
}

/* The multiboot loader jumps here with the magic in eax and the info pointer in ebx. The
 * stack goes at 2 MiB and .bss is cleared here rather than trusting every loader to do it. */
__asm__(".globl _start\n_start:\n"
        "  mov $0x200000, %esp\n"
        "  mov %eax, %esi\n"
        "  mov $__bss_start, %edi\n"
        "  mov $__bss_end, %ecx\n"
        "  sub %edi, %ecx\n"
        "  xor %eax, %eax\n"
        "  cld\n"
        "  rep stosb\n"
        "  push %esi\n"
        "  call guest_main\n"
        "1: hlt\n"
        "  jmp 1b\n");
