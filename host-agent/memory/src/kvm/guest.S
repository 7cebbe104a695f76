# The pagecast micro-VM guest program (32-bit protected mode, flat segments,
# no paging). It dirties the pages of a working set, a batch at a time, and
# exits to the host after every batch so the host can pace it, pause it or
# stop it. Assemble with:
#   as --32 -o guest.o guest.S && objcopy -O binary -j .text guest.o guest.bin
# The bytes are embedded in guest.rs; a unit test re-assembles this file
# (when `as` is installed) and checks they still match.
#
# Parameter block at PARAMS (frame 1), all little-endian:
#   +0x00 u32 magic 0x50434754 ("TGCP")
#   +0x04 u32 batch: pages to write per batch (0: idle, only tick)
#   +0x08 u32 number of working-set ranges (at most 480)
#   +0x0c u32 current range
#   +0x10 u32 offset inside the current range
#   +0x18 u64 progress counter: one per page written and per idle tick
#   +0x100 ranges: { u32 first frame, u32 frame count } each
#
# Each page write stores the low 32 bits of the progress counter at word
# (counter mod 1024) of the page, so every write changes the page.

        .intel_syntax noprefix
        .code32
        .text
        .set PARAMS, 0x1000
        .set PORT_BATCH, 0x10
        .set PORT_IDLE, 0x11

start:
        mov esi, PARAMS
outer:
        mov ecx, [esi + 0x04]           # batch size
        test ecx, ecx
        jz idle
        cmp dword ptr [esi + 0x08], 0   # no ranges: nothing to dirty
        je idle
        mov ebx, [esi + 0x0c]           # current range
        mov edx, [esi + 0x10]           # offset inside it
page:
        mov edi, [esi + 0x100 + ebx * 8]
        add edi, edx
        shl edi, 12                     # page address
        mov eax, [esi + 0x18]           # counter (low word)
        mov ebp, eax
        and ebp, 0x3ff
        mov [edi + ebp * 4], eax
        add dword ptr [esi + 0x18], 1
        adc dword ptr [esi + 0x1c], 0
        inc edx
        cmp edx, [esi + 0x104 + ebx * 8]
        jb 1f
        xor edx, edx
        inc ebx
        cmp ebx, [esi + 0x08]
        jb 1f
        xor ebx, ebx
1:
        dec ecx
        jnz page
        mov [esi + 0x0c], ebx
        mov [esi + 0x10], edx
        out PORT_BATCH, al
        jmp outer
idle:
        add dword ptr [esi + 0x18], 1
        adc dword ptr [esi + 0x1c], 0
        out PORT_IDLE, al
        jmp outer
