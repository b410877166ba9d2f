/*
 * pvh.S: a second way in, for other VMMs. The Xen PVH boot protocol (XEN_ELFNOTE_PHYS32_ENTRY),
 * which QEMU's -kernel, Firecracker and cloud-hypervisor support, enters a 64-bit ELF in 32-bit
 * protected mode with paging off and EBX = struct hvm_start_info. This stub builds the same
 * environment worldswitch's VMM provides (boot/longmode.py: GDT, TSS with I/O bitmap, 4 GiB
 * identity map, user-accessible) and joins the normal entry path, so that bench/ can run the
 * very same guest binaries under QEMU.
 */
    .file "pvh.S"

    .section .note.Xen, "a"
    .align 4
    .long 4                  /* name size */
    .long 4                  /* descriptor size */
    .long 18                 /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

#define TSS_SIZE (0x68 + 8192 + 1)

    .code32
    .section .text.pvh, "ax"
pvh_start32:
    cli
    cld
    movl %ebx, %esi                       /* start_info, kept for the 64-bit side */

    /* Identity map of 4 GiB with 2 MiB pages: PML4 -> PDPT -> 4 page directories. */
    movl $pvh_pdpt, %eax
    orl $7, %eax
    movl %eax, pvh_pml4
    movl $pvh_pd, %eax
    orl $7, %eax
    xorl %ecx, %ecx
1:  movl %eax, pvh_pdpt(,%ecx,8)
    addl $0x1000, %eax
    incl %ecx
    cmpl $4, %ecx
    jne 1b
    xorl %ecx, %ecx
2:  movl %ecx, %eax
    shll $21, %eax
    orl $0x87, %eax                       /* present, writable, user, 2 MiB */
    movl %eax, pvh_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax                        /* bits 32+ of the physical address */
    movl %eax, pvh_pd+4(,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jne 2b

    /* The TSS: RSP0, an I/O bitmap that allows every port, its base in the GDT. */
    movl $pvh_stack_top, pvh_tss+4
    movw $0x68, pvh_tss+0x66
    movb $0xff, pvh_tss+TSS_SIZE-1
    movl $pvh_tss, %eax
    movw %ax, pvh_gdt+0x28+2
    shrl $16, %eax
    movb %al, pvh_gdt+0x28+4
    movb %ah, pvh_gdt+0x28+7

    movl $pvh_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax                      /* PAE, OSFXSR, OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xc0000080, %ecx                /* EFER */
    rdmsr
    orl $0x901, %eax                      /* SCE, LME, NXE */
    wrmsr
    movl %cr0, %eax
    orl $0x80050033, %eax                 /* PG, AM, WP, NE, ET, MP, PE */
    movl %eax, %cr0
    lgdt pvh_gdt_pointer
    ljmp $0x08, $pvh_start64

    .code64
pvh_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movw $0x28, %ax
    ltr %ax
    movq $pvh_stack_top, %rsp
    movl %esi, %edi
    call pvh_boot_info                    /* fills ws_args, ws_ram_size, ws_vcpus */
    jmp runtime_start

    .section .rodata
    .align 8
pvh_gdt_pointer:
    .word 7 * 8 - 1
    .long pvh_gdt

    .data
    .align 16
pvh_gdt:
    .quad 0
    .quad 0x00af9a000000ffff              /* ring-0 code, 64-bit */
    .quad 0x00cf92000000ffff              /* ring-0 data */
    .quad 0x00cff2000000ffff              /* ring-3 data */
    .quad 0x00affa000000ffff              /* ring-3 code, 64-bit */
    .quad 0x0000890000000000 | (TSS_SIZE - 1) /* TSS, base filled in above */
    .quad 0

    .bss
    .align 4096
pvh_pml4:
    .skip 4096
pvh_pdpt:
    .skip 4096
pvh_pd:
    .skip 4 * 4096
pvh_tss:
    .skip TSS_SIZE
    .align 16
pvh_stack:
    .skip 16384
pvh_stack_top:
