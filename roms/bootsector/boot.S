# Spindle's firmware-boot probe: a 512-byte real-mode boot sector for SeaBIOS.
#
# The BIOS loads it at 0000:7C00 with DL = the boot drive. It talks on COM1 only (the
# machine has no display) and uses nothing of the BIOS but int 13h extended read/write,
# so it shows that the firmware found the drive and can move sectors through it:
#
#   spindle boot: drive XX        XX = DL in hex (80 a hard disk, E0.. a CD with SeaBIOS)
#   spindle guest: PASS           the sector at BASE+1 begins with "SPINDLE-SECTOR-1"
#   spindle guest: FAIL ...       which step failed, with int 13h's AH where there is one
#
# BASE is the dword at offset 12. It is 0 in the built image, so on a disk the probe reads
# LBA 1, the sector after itself. On a CD it is the boot file's own LBA: xorrisofs
# -boot-info-table writes its boot info table at offsets 8..63 of the boot image
# (PVD LBA, boot file LBA, boot file length, checksum, 40 reserved bytes), and int 13h
# on the CD counts 2048-byte sectors, so BASE+1 is the boot file's second 2 KiB. One image
# serves both: a disk puts the marker at byte 512, a CD's boot file at byte 2048.
#
# The byte at offset 64 is OPTIONS, 0 as built. A test sets bit 0 to make the probe also
# write: it stamps the marker sector "SPINDLE-WRITTEN!" (the rest unchanged), writes it
# to BASE+2 with int 13h AH=43h, reads BASE+2 back into another buffer and compares.
#
# Built by scripts/build-roms.mjs: as --32, then ld -Ttext 0x7c00 --oformat binary.

        .code16
        .text
        .globl _start
_start:
        jmp     start

        .org    8
info_pvd:       .long 0         # boot info table: LBA of the primary volume descriptor
info_base:      .long 0         # BASE: LBA of the boot file (0 on a disk)
info_length:    .long 0         # length of the boot file in bytes
info_csum:      .long 0         # checksum of the boot file from offset 64
        .org    64              # (40 reserved bytes of the table before this)
options:        .byte 0         # bit 0: write BASE+2 and read it back
drive:          .byte 0         # DL as the BIOS gave it

        .set    COM1, 0x3f8
        .set    BUF, 0x8000     # the marker sector (up to 2048 bytes)
        .set    BUF2, 0x9000    # the read-back of the write test

start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    $0x7c00, %sp
        sti
        ljmp    $0, $normalized # some BIOSes enter at 07C0:0000
normalized:
        cld
        movb    %dl, drive

        # COM1 8N1 without interrupts; the speed stays as the firmware set it (it does
        # not matter to an emulated UART, and the sector has no room for more).
        movw    $COM1+1, %dx
        xorb    %al, %al
        outb    %al, %dx        # IER: none
        incw    %dx
        incw    %dx
        movb    $0x03, %al
        outb    %al, %dx        # LCR: 8N1

        movw    $msg_drive, %si
        call    puts
        movb    drive, %al
        call    puthex
        call    newline

        movb    $0x42, %ah      # read BASE+1
        movw    $1, %bx
        movw    $BUF, %di
        call    xfer
        movw    $msg_read, %si
        jc      fail_ah

        movw    $BUF, %di
        movw    $marker, %si
        movw    $16, %cx
        repe cmpsb
        movw    $msg_marker, %si
        jne     fail

        testb   $1, options
        jz      pass

        movw    $written, %si   # stamp, write BASE+2
        movw    $BUF, %di
        movw    $16, %cx
        rep movsb
        movb    $0x43, %ah
        movw    $2, %bx
        movw    $BUF, %di
        call    xfer
        movw    $msg_write, %si
        jc      fail_ah

        movb    $0x42, %ah      # read BASE+2 back
        movw    $2, %bx
        movw    $BUF2, %di
        call    xfer
        movw    $msg_read, %si
        jc      fail_ah

        movw    $BUF, %si
        movw    $BUF2, %di
        movw    $512, %cx
        repe cmpsb
        movw    $msg_readback, %si
        jne     fail

pass:
        movw    $msg_pass, %si
        jmp     verdict

# int 13h failed: SI = the message, AH = the BIOS status.
fail_ah:
        pushw   %ax
        call    say
        popw    %ax
        movb    %ah, %al
        call    puthex
        jmp     verdict_end
# SI = the message after "spindle guest: ".
fail:
verdict:
        call    say
verdict_end:
        call    newline
halt:
        cli
        hlt
        jmp     halt

# "spindle guest: " and the string at SI.
say:
        pushw   %si
        movw    $msg_guest, %si
        call    puts
        popw    %si
        jmp     puts

# One sector between the boot drive and 0000:DI. AH = 42h (read) or 43h (write),
# BX = the sector relative to BASE. CF set and AH = status on failure.
xfer:
        movb    $1, dap_count  # (the BIOS sets it to the sectors moved)
        movw    %di, dap_offset
        movl    info_base, %ecx
        movzwl  %bx, %ebx
        addl    %ebx, %ecx
        movl    %ecx, dap_lba
        xorb    %al, %al        # 43h: write without verify
        movb    drive, %dl
        movw    $dap, %si
        int     $0x13
        ret

# Writes the NUL-terminated string at SI to COM1.
puts:
        lodsb
        testb   %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

newline:
        movb    $'\r', %al
        call    putc
        movb    $'\n', %al
        jmp     putc

# AL as two uppercase hex digits.
puthex:
        pushw   %ax
        shrb    $4, %al
        call    hexdigit
        popw    %ax
        andb    $0x0f, %al
hexdigit:
        addb    $'0', %al
        cmpb    $'9', %al
        jbe     putc
        addb    $'A'-'9'-1, %al
# AL to COM1, once the transmit holding register is empty (LSR bit 5).
putc:
        pushw   %dx
        movb    %al, %ah
        movw    $COM1+5, %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jz      1b
        movb    %ah, %al
        movw    $COM1, %dx
        outb    %al, %dx
        popw    %dx
        ret

# The disk address packet of int 13h AH=42h/43h.
dap:            .byte 16, 0     # size, reserved
dap_count:      .word 1         # sectors
dap_offset:     .word 0         # buffer offset
dap_segment:    .word 0         # buffer segment
dap_lba:        .long 0, 0      # first sector (64 bits)

marker:         .ascii "SPINDLE-SECTOR-1"
written:        .ascii "SPINDLE-WRITTEN!"
msg_drive:      .asciz "spindle boot: drive "
msg_guest:      .asciz "spindle guest: "
msg_pass:       .asciz "PASS"
msg_read:       .asciz "FAIL int13 read AH="
msg_write:      .asciz "FAIL int13 write AH="
msg_marker:     .asciz "FAIL no marker"
msg_readback:   .asciz "FAIL readback"

        .org    510
        .word   0xaa55
