/*
 * ap_trampoline.S: where application processors start. The BSP copies the bytes between
 * ap_trampoline_start and ap_trampoline_end to AP_BASE (0x8000) and sends INIT and SIPI with
 * vector 0x08; each AP wakes in real mode at 0800:0000, climbs to protected and long mode
 * (with the BSP's page tables, whose address the BSP stores in the copy), counts itself, sets
 * its bit in ap_mask, reports a SYNC ucall carrying its APIC ID, and halts, unless the BSP set
 * ap_entry: then it calls ap_entry(cpu number, BSP = 0) at ring 0 on its own 4 KiB stack first.
 * Its 64-bit part is not copied: the far jump into long mode lands at secondary_startup_64 in the
 * program's text, the name the VMM looks for under --monitor to take each AP over there
 * (boot/program.py), as Linux's trampoline enters Linux at a function of that name.
 */
    .file "ap_trampoline.S"
#define AP_BASE 0x8000
#define REL(symbol) (AP_BASE + (symbol) - ap_trampoline_start)
#define UCALL_SIZE 168

    .section .rodata
    .globl ap_trampoline_start, ap_trampoline_end, ap_cr3_offset
    .set ap_cr3_offset, ap_cr3 - ap_trampoline_start
    .code16
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_pointer - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax                              /* PE */
    movl %eax, %cr0
    ljmpl $0x08, $REL(ap_protected)

    .code32
ap_protected:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl REL(ap_cr3), %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x20, %eax                           /* PAE */
    movl %eax, %cr4
    movl $0xc0000080, %ecx                    /* EFER.LME, and NXE as the BSP has it (program.py) */
    rdmsr
    orl $0x900, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000000, %eax                     /* PG */
    movl %eax, %cr0
    ljmpl $0x18, $secondary_startup_64        /* the program is linked below 4 GiB */
    .align 8
ap_gdt:
    .quad 0
    .quad 0x00cf9a000000ffff                  /* 0x08: 32-bit code */
    .quad 0x00cf92000000ffff                  /* 0x10: data */
    .quad 0x00af9a000000ffff                  /* 0x18: 64-bit code */
ap_gdt_pointer:
    .word 4 * 8 - 1
    .long REL(ap_gdt)
ap_cr3:
    .long 0
ap_trampoline_end:


    .text
    .code64
    .globl secondary_startup_64
    .type secondary_startup_64, @function
secondary_startup_64:
    movl $0xfee00020, %ecx                    /* LAPIC ID register (above 2 GiB: no disp32) */
    movl (%rcx), %ebx
    shrl $24, %ebx
    lock btsq %rbx, ap_mask                   /* the mask first: the BSP reads it once all arrived */
    movl $1, %eax
    lock xaddl %eax, ap_arrived               /* eax: how many came before this one */
    movl %eax, %r12d
    imull $UCALL_SIZE, %eax, %eax
    leaq ap_ucalls(%rax), %rdi                /* this AP's own ucall block */
    movl $1, (%rdi)                           /* SYNC */
    movq %rbx, 8(%rdi)                        /* args[0] = APIC ID */
    movl %edi, %eax
    movw $0x1000, %dx
    outl %eax, %dx
    movq ap_entry, %rax
    testq %rax, %rax
    jz 1f
    leal 1(%r12), %edi                        /* cpu number: the BSP is 0 */
    movl %edi, %ecx
    shll $12, %ecx
    leaq ap_stacks(%rcx), %rsp                /* the top of stack number edi - 1 */
    call *%rax
1:  cli
    hlt
    jmp 1b
    .size secondary_startup_64, . - secondary_startup_64

    .data
    .globl ap_arrived, ap_mask, ap_entry
    .align 8
ap_arrived:
    .long 0
    .align 8
ap_mask:
    .quad 0
ap_entry:
    .quad 0
    .bss
    .align 16
ap_ucalls:
    .skip 64 * UCALL_SIZE
    .align 4096
ap_stacks:
    .skip 64 * 4096
