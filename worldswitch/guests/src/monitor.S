/*
 * monitor.S: the monitor's entry from the VMM, its ring-0 trampoline, the entry and exit of its
 * body, and the few instructions that need a fault fix-up or an exact order (docs/monitor.md).
 *
 * The VMM enters monitor_start in 64-bit ring 0 on its own GDT (boot/program.py's state). The
 * monitor installs its GDT, IDT and TSS and leaves for the program's entry in ring 3. From then on
 * every exception and interrupt reaches its stub (event_stub_N) in ring 0, on the TSS stack, through
 * an interrupt gate. Ring 0 is emulated on the hosts the monitor is for, at about a microsecond an
 * instruction, so it does as little as it can there: an event from the guest is handed, in seven
 * instructions (nine for an interrupt), to the monitor's body, which runs natively in ring 3 on the
 * event's stack (body_entry); ring 0 itself serves only the body's own events (a page fault on guest
 * memory, an interrupt while it runs) and the privileged operations it asks for (ring0_call).
 */
    .file "monitor.S"
#include "monitor.h"
#define MONITOR_RIP_WORD 20         /* RIP's bits 32-47, in a frame at (%rsp) */
#define MONITOR_RIP_BITS ((MONITOR_BASE >> 32) & 0xffff) /* there in the monitor's first 4 GiB, nowhere else */
#define BODY_RFLAGS 0x202
#define EVENT_STACK_SIZE 0x4000
#define EVENT_STACKS_FLIP 0xc000    /* the two event stacks' tops, XORed */
#define TSS_RSP0 tss + 4
#define EVENT_FRAME (8 * 7)         /* vector, error code, RIP, CS, RFLAGS, RSP, SS */
#define RING0_UNANSWERED -1         /* ring0_call's RAX until ring 0 answers; no service answers it */
    .code64
    .section .text.start, "ax"
    .globl monitor_start
monitor_start:
    leaq monitor_stack_top(%rip), %rsp
    leaq event_stacks(%rip), %rdi
    call body_entry_frame
    leaq event_stacks + EVENT_STACK_SIZE(%rip), %rdi
    call body_entry_frame
    call monitor_init               /* tables built and loaded; returns the code selector */
    leaq 1f(%rip), %rcx
    pushq %rax
    pushq %rcx
    lretq                           /* CS = the monitor's own ring-0 code segment */
1:  movl $MONITOR_DS, %eax
    movw %ax, %ss
    movw %ax, %ds
    movw %ax, %es
    subq $8 * 22, %rsp              /* a frame (struct frame) for the first entry into the guest */
    movq %rsp, %rdi
    call monitor_first_frame
    jmp event_return

/* The trampoline, one copy per vector (frame.inc's error-code list): the vector, then the way into
 * the body for an event from the guest, or to ring0_event for the monitor's own. */
    .text
    .altmacro
    .include "frame.inc"

    .macro monitor_stub vector
    .align 64
event_stub_\vector:
    error_code_of \vector
    .if .Lhas_error_code == 0
    pushq $0
    .endif
    pushq $\vector
    .if \vector >= 32
    cmpl $\vector, early_eoi_vector(%rip) /* the guest's LAPIC timer, under its paravirtual EOI */
    je early_eoi
    .endif
    cmpw $MONITOR_RIP_BITS, MONITOR_RIP_WORD(%rsp)  /* RIP in the monitor: its own event, in the body or in ring 0 */
    je ring0_event
    cmpb $ON_KERNEL_ROOT, user_root_loaded(%rip) /* from user mode, on its shadow: the body's is the kernel's */
    jne to_body_from_user
    xorq $EVENT_STACKS_FLIP, TSS_RSP0(%rip)
    andq $-EVENT_STACK_SIZE, %rsp
    iretq
    .endm

    .set vector, 0
    .rept 256
    monitor_stub %vector
    .set vector, vector + 1
    .endr

/* The two event stacks: ring 0 takes an event from ring 3 on the one TSS.RSP0 names, and the body
 * then runs on it, below the event's frame, while RSP0 names the other one, for the body's own events
 * (a page fault on guest memory, an interrupt, a call into ring 0). The next event from the guest
 * finds the body done and takes the other stack in turn. The stacks are 64 KiB aligned, so that their
 * tops differ in bits 14 and 15 only (monitor.ld checks it): one XOR turns RSP0 from one to the other.
 * The lowest five words of each are an IRETQ frame into the body, on the event's frame at its top
 * (body_entry_frame): the trampoline's way out is two instructions. Each instruction here costs about
 * a microsecond where ring 0 is emulated; a stub is seven of them, and an interrupt's two more (the
 * look for the timer whose EOI is ring 0's: early_eoi). */

/* The guest's LAPIC timer interrupt, where its kernel takes KVM's paravirtual EOI (early_eoi_vector,
 * monitor.c): EOI'd here as it comes, and delivered with the guest's flag set, so that the kernel
 * skips its own EOI, a trapped WRMSR and a trip of its own. The APIC delivers only above the
 * highest vector in service, so this EOI is this interrupt's. Then as from the stub. */
early_eoi:
    pushq %rax
    pushq %rcx
    pushq %rdx
    movl $MSR_X2APIC_EOI, %ecx
    xorl %eax, %eax
    xorl %edx, %edx
    wrmsr
    popq %rdx
    popq %rcx
    popq %rax
    cmpw $MONITOR_RIP_BITS, MONITOR_RIP_WORD(%rsp)
    je ring0_event
    cmpb $ON_KERNEL_ROOT, user_root_loaded(%rip)
    jne to_body_from_user
    jmp to_body_from_kernel

to_body:                                /* from the guest's page fault, int3 and SYSCALL: into the body */
    cmpb $ON_KERNEL_ROOT, user_root_loaded(%rip)
    je to_body_from_kernel
to_body_from_user:                      /* an event from user mode: the kernel's shadow, then the body */
    pushq %rax
    movq kernel_root_cr3(%rip), %rax
    movq %rax, %cr3
    popq %rax
    movb $LEFT_USER_ROOT, user_root_loaded(%rip)
to_body_from_kernel:
    xorq $EVENT_STACKS_FLIP, TSS_RSP0(%rip)
    andq $-EVENT_STACK_SIZE, %rsp
    iretq

/* The page fault's own entry (the IDT's vector 14): its address, which only ring 0 can read, for
 * the body. The CPU pushed the error code. */
    .globl page_fault_entry
page_fault_entry:
    pushq $14
    cmpw $MONITOR_RIP_BITS, MONITOR_RIP_WORD(%rsp)
    je ring0_event
    pushq %rax
    movq %cr2, %rax
    movq %rax, event_cr2(%rip)
    popq %rax
    jmp to_body

/* int3's own entry (the IDT's vector 3). Most int3s are the monitor's own, each known by its address
 * (RIP's low half: the monitor's base has none): the way out to user mode, a SYSCALL's gate, the
 * body's calls (ring0_call; ring 0 serves them below), msr_gate's and gs_gate's. Of the calls a
 * CR3 load (cr3_gate: 17,000 a boot of Debian 12's kernel, nearly all of its calls) is served here
 * at once, without the list of services. The guest's own int3 goes to the body, as from any stub. */
    .globl breakpoint_entry
breakpoint_entry:
    pushq $0
    pushq $3
    cmpw $MONITOR_RIP_BITS, MONITOR_RIP_WORD(%rsp)
    jne to_body
    cmpl $(leave_return - MONITOR_BASE), 16(%rsp)
    je leave_to_user
    cmpl $(syscall_gate_return - MONITOR_BASE), 16(%rsp)
    je syscall_entry
    cmpl $(ring0_return - MONITOR_BASE), 16(%rsp)
    jne msr_gate_event
    cmpq $SERVICE_CR3, %rdi
    jne ring0_service
    movq %rsi, %cr3
    jmp ring0_answered

/* The #GP's own entry (the IDT's vector 13). A WRMSR of the guest's kernel to the TSC deadline, or
 * of 0 to the x2APIC's EOI, is done here at once: Linux makes both at each timer interrupt (7.2 with
 * WRMSRs of its own, not through pv_ops), and through the body each was an event and then a call
 * into ring 0; here it is the event alone (KVM keeps the same two writes on its fast path out of a
 * VM exit, handle_fastpath_set_msr_irqoff). The monitor keeps nothing of either. Not in the pv page,
 * whose WRMSR is where msr_gate sends the kernel so that its event delivers an interrupt held. A
 * write the CPU refuses (the EOI in xAPIC mode) goes on to the body (own_event sends it to
 * fast_wrmsr_refused), which refuses it to the kernel as any; so does an instruction ring 0 could not
 * read (fast_wrmsr_unread). */
    .globl general_protection_entry, fast_wrmsr_fetch, fast_wrmsr_unread, fast_wrmsr_at, fast_wrmsr_refused
general_protection_entry:
    pushq $13
    cmpw $MONITOR_RIP_BITS, MONITOR_RIP_WORD(%rsp)
    je ring0_event
    cmpb $ON_KERNEL_ROOT, user_root_loaded(%rip)
    jne to_body_from_user
    cmpl $MSR_X2APIC_EOI, %ecx          /* ECX first: most of the kernel's #GPs are no WRMSR, and the */
    ja to_body_from_kernel              /* ECX of most lies above both (a SYSCALL's return address): */
    jb 2f                               /* two instructions more than the other stubs' way */
    testl %eax, %eax                    /* an EOI's value must be 0 */
    jnz to_body_from_kernel
    testl %edx, %edx
    jnz to_body_from_kernel
    jmp 1f
2:  cmpl $MSR_TSC_DEADLINE, %ecx
    jne to_body_from_kernel
1:  pushq %rax
    movq 24(%rsp), %rax                 /* the kernel's RIP: it has just fetched the instruction there */
    cmpq $PV_BASE, %rax
    jae fast_wrmsr_unread
fast_wrmsr_fetch:                       /* a fault here (a 0F at the end of the lower half) is the body's */
    cmpw $0x300f, (%rax)                /* 0F 30: WRMSR, with no prefix */
    jne fast_wrmsr_unread
    popq %rax
fast_wrmsr_at:
    wrmsr
    addq $2, 16(%rsp)                   /* the kernel's RIP, past it */
    lock incq handoff + HANDOFF_WRMSR_RING0_COUNT(%rip)
    addq $16, %rsp
    iretq
fast_wrmsr_unread:
    popq %rax
fast_wrmsr_refused:
    jmp to_body_from_kernel

/* void body_entry_frame(u64 *stack): the IRETQ frame at the bottom of an event stack. */
body_entry_frame:
    leaq body_entry(%rip), %rax
    movq %rax, (%rdi)
    movq $BODY_CS, 8(%rdi)
    movq $BODY_RFLAGS, 16(%rdi)
    leaq EVENT_STACK_SIZE - EVENT_FRAME(%rdi), %rax
    movq %rax, 24(%rdi)
    movq $BODY_SS, 32(%rdi)
    ret

/* The body's call into ring 0 (int3 at ring0_call; ring 0 makes the same call for the MSRs): a
 * SWAPGS, an INVLPG, an MSR write or read here (a CR3 load at breakpoint_entry), the rest in C.
 * ring0_call is a function call: RAX, RCX and RDX are the caller's to lose. An MSR the CPU refuses
 * is a #GP at wrmsr_at or rdmsr_at, which own_event sends to msr_refused: the call answers 1 (0 when
 * done). */
    .globl wrmsr_at, rdmsr_at, msr_refused
ring0_service:
    cmpq $SERVICE_SWAPGS, %rdi
    jne 1f
    swapgs                              /* the monitor never uses GS: the CPU's swap is the guest's */
    jmp ring0_answered
1:  cmpq $SERVICE_INVLPG, %rdi
    jne 2f
    invlpg (%rsi)
    jmp ring0_answered
2:  cmpq $SERVICE_WRMSR, %rdi
    jne 3f
    movl %esi, %ecx
    movq %rdx, %rax
    shrq $32, %rdx
wrmsr_at:
    wrmsr
    jmp ring0_answered
3:  cmpq $SERVICE_RDMSR, %rdi
    jne ring0_event
    movl %esi, %ecx
    movq %rdx, %r8                      /* where the value goes, in the body's memory */
rdmsr_at:
    rdmsr
    shlq $32, %rdx
    movl %eax, %eax
    orq %rdx, %rax
    movq %rax, (%r8)
ring0_answered:
    xorl %eax, %eax                     /* the answer: ring0_call's RAX is no longer RING0_UNANSWERED */
    addq $16, %rsp
    iretq
msr_refused:
    movl $1, %eax
    addq $16, %rsp
    iretq
/* msr_gate's int3, from the guest's kernel, whose registers are live here: an MSR of those it may
 * write without the monitor's look (the FS and GS bases, the TSC deadline, the x2APIC's EOI) is written, on the path
 * of the body's own writes; any other is refused, and msr_gate traps with it instead. */
msr_gate_event:
    cmpl $(msr_gate_return - MONITOR_BASE), 16(%rsp)
    jne gs_gate_event
    cmpl $MSR_FS_BASE, %edi
    jb 6f
    cmpl $MSR_KERNEL_GS_BASE, %edi
    jb 7f
    ja 6f
    movb $0, kernel_gs_msr_known(%rip)  /* (monitor.c) */
    jmp 7f
6:  cmpl $MSR_TSC_DEADLINE, %edi
    je 7f
    cmpl $MSR_X2APIC_EOI, %edi          /* of 0, as general_protection_entry writes it: a translated */
    jne msr_refused                     /* WRMSR's (boot/translator.py), which would else trap after */
    testl %esi, %esi                    /* this trip; refused (xAPIC mode), it still traps there */
    jnz msr_refused
    testl %edx, %edx
    jnz msr_refused
7:  movl %edi, %ecx
    movl %esi, %eax                     /* EDX holds the high half already */
    jmp wrmsr_at
/* gs_gate's int3: the user mode's GS loaded with the kernel's selector (EDI). A selector the CPU
 * refuses (#GP at gs_load_at, own_event) loads the null one instead, as Linux's own fix-up does. */
    .globl gs_load_at, gs_load_refused
gs_gate_event:
    cmpl $(gs_gate_return - MONITOR_BASE), 16(%rsp)
    jne ring0_event
    swapgs                              /* no swap is ever owed while the guest's kernel runs */
    movb $0, kernel_gs_msr_known(%rip)  /* what the load gave is there (monitor.c) */
gs_load_at:
    movl %edi, %gs
1:  swapgs
    xorl %eax, %eax
    addq $16, %rsp
    iretq
gs_load_refused:
    xorl %eax, %eax
    movl %eax, %gs
    jmp 1b
/* Every other event of the monitor's own, and the body's calls ring 0 does not serve above: in C. */
ring0_event:
    push_registers
    movq %rsp, %rdi
    cld
    call monitor_ring0_event
event_return:
    pop_registers
    addq $16, %rsp
    iretq

/* The way into the guest's user mode, from the body's int3 at its exit, with the guest's registers
 * loaded and the body's stack at the guest's IRETQ frame (body_window): onto the user mode's shadow,
 * where the monitor's pages are ring 0's, and out through that frame. */
leave_to_user:
    cmpb $0, owed_user_gs(%rip)         /* the user mode's GS base the kernel wrote in ring 3 (msr_gate, gs_gate) */
    je 0f
    pushq %rax
    pushq %rcx
    pushq %rdx
    movl $MSR_KERNEL_GS_BASE, %ecx
    movq owed_user_gs_base(%rip), %rax
    movq %rax, %rdx
    shrq $32, %rdx
    wrmsr
    movb $0, owed_user_gs(%rip)
    popq %rdx
    popq %rcx
    popq %rax
0:  cmpb $0, pending_swapgs(%rip)       /* the return's SWAPGS (monitor.c): here, not a call of its own */
    je 1f
    swapgs
    movb $0, pending_swapgs(%rip)
1:  pushq %rax
    movq user_root_cr3(%rip), %rax
    movq %rax, %cr3
    popq %rax
    movb $ON_USER_ROOT, user_root_loaded(%rip)
    movq 40(%rsp), %rsp                 /* the int3's frame's RSP: the body's, at the guest's frame */
    iretq

/* A SYSCALL from the guest: the gate's int3 (below), on the event stack RSP0 names, as for any
 * event from the guest. Its frame is made the one a SYSCALL would have (RCX the return address, R11
 * RFLAGS, the stack the guest's own); monitor_event finishes it for the guest. */
syscall_entry:
    cmpb $0, entry_swapgs(%rip)         /* Linux's entry's SWAPGS, as the SYSCALL is delivered (monitor.c) */
    je 1f
    swapgs
    movb $0, kernel_gs_msr_known(%rip)  /* the user mode's base is there (monitor.c) */
1:  movq $SYSCALL_EVENT, (%rsp)
    movq %rcx, 16(%rsp)                 /* RIP: where the SYSCALL returns */
    movq $0, 24(%rsp)                   /* CS and SS: the SYSCALL sets them (monitor_event) */
    movq %r11, 32(%rsp)                 /* RFLAGS */
    movq $0, 48(%rsp)
    jmp to_body

/* The body, in ring 3: the guest's registers saved below the event's frame (struct trap_frame,
 * at body_frame), the event handled in C, then the way back to the guest. An interrupt while the
 * body runs is held by ring 0, which sets leave_again; one between the last look at leave_again
 * and the IRETQ (body_window) is sent back to body_exit, so that no interrupt waits for the guest's
 * next trap (Xen's 32-bit PV guests fixed up the same window). */
    .globl body_entry, body_exit, body_window, body_window_end
body_entry:
    push_registers
    movq %rsp, body_frame(%rip)
    movq %rsp, %rdi
    cld
    call monitor_event
body_exit:
    movq body_frame(%rip), %rsp
    movq %rsp, %rdi
    cld
    call monitor_leave
body_window:
    cmpb $0, leave_again(%rip)
    jne body_exit
    testl %eax, %eax
    pop_registers                       /* natively, either way: POP and LEA leave the flags */
    leaq 16(%rsp), %rsp
    jnz 1f
    iretq                               /* to the guest's kernel: natively */
1:  int3                                /* to its user mode: through ring 0 (leave_to_user), where */
leave_return:                           /* each instruction is emulated */
    jmp 1b                              /* only where the host dropped the int3 (ring0_call) */
body_window_end:

/* pv_ops.cpu.write_msr(u32 msr, u32 low, u32 high), from the guest's kernel (the pv page jumps here, so
 * that ring 0 knows this int3 by its address): Linux writes the FS base at a context switch, which
 * as a trapping WRMSR is an event and then a call into ring 0; here it is one trip into ring 0. What
 * ring 0 refuses (another MSR, or one the CPU refused) goes to the WRMSR in the pv page, which traps
 * and is emulated as any. An interrupt between msr_gate and msr_gate_end is held and sends the
 * kernel to that WRMSR too (own_event), whose event delivers it, unless ring 0 has answered that it
 * wrote (RAX 0 after msr_gate_return): then to a trapping CR8 read, and back, since a second EOI
 * would end an interrupt still in service. EDI, ESI and EDX are kept to the end for that WRMSR. The
 * int3's retry is ring0_call's.
 * Where ring 3 may write the bases itself (fsgsbase_native, monitor.c), the user mode's two take no
 * trip: the FS base is written with WRFSBASE (the kernel never uses FS), and the GS base, which is
 * KERNEL_GS_BASE while the kernel runs, behind SWAPGS, is owed (owe_user_gs). A non-canonical base
 * takes the trip, where the CPU refuses it. */
    .globl msr_gate, msr_gate_end
msr_gate:
    cmpb $0, fsgsbase_native(%rip)
    je 0f
    cmpl $MSR_FS_BASE, %edi
    je 1f
    cmpl $MSR_KERNEL_GS_BASE, %edi
    jne 0f
1:  movl %edx, %eax
    shlq $32, %rax
    movl %esi, %ecx
    orq %rcx, %rax                      /* RAX: the base */
    movq %rax, %rcx
    shlq $16, %rcx
    sarq $16, %rcx
    cmpq %rcx, %rax
    jne 0f                              /* not canonical */
    lock incq handoff + HANDOFF_MSR_NATIVE_COUNT(%rip)
    cmpl $MSR_FS_BASE, %edi
    jne owe_user_gs
    wrfsbase %rax
    ret
0:  movq $RING0_UNANSWERED, %rax
1:  int3
    .globl msr_gate_return
msr_gate_return:                        /* RAX 0 from here to owe_user_gs: written (own_event) */
    cmpq $RING0_UNANSWERED, %rax
    je 1b
    testl %eax, %eax
    jnz 2f
    lock incq handoff + HANDOFF_MSR_GATE_COUNT(%rip)
    ret
2:  movabsq $(PV_BASE + PV_WRITE_MSR_TRAP), %rax
    jmp *%rax
/* The user mode's GS base (RAX), owed to KERNEL_GS_BASE until ring 0 next swaps or leaves for user
 * mode (leave_to_user; settle_user_gs, monitor.c, where the body swaps, reads or writes it). */
    .globl owe_user_gs
owe_user_gs:
    movq %rax, owed_user_gs_base(%rip)
    movb $1, owed_user_gs(%rip)
    ret
msr_gate_end:

/* pv_ops.cpu.load_gs_index(u16 selector), from the guest's kernel: the user mode's GS selector (and
 * with it its base, the descriptor's) loaded between two SWAPGS, which as traps are four events; an
 * AMD CPU's kernel does two of these at nearly every context switch (X86_BUG_NULL_SEG: __USER_DS, then
 * the null selector, so that the base is zeroed). Here it is one trip into ring 0 (gs_gate_event),
 * known by its address as msr_gate's is. An interrupt between gs_gate and gs_gate_end is held and
 * sends the kernel to a trapping CR8 read in the pv page (own_event), whose event delivers it, and
 * back into gs_gate: the load is then done again, as loads may be.
 * Where ring 3 may read and write the bases itself (fsgsbase_native), there is no trip: the kernel's
 * ring 3 loads the selector, and the base the load gave (or, for a null selector on a CPU that
 * keeps the base then, none) is owed to the user mode's, while the kernel's own is put back. Between
 * the load and that, the kernel's base is lost: an interrupt there has ring 0 put it back from RAX
 * (own_event), and a selector the CPU refuses loads the null one instead, as Linux's own fix-up does. */
    .globl gs_gate, gs_gate_end, gs_gate_load, gs_gate_base_back
gs_gate:
    cmpb $0, fsgsbase_native(%rip)
    je 0f
    rdgsbase %rax                       /* the kernel's own base */
gs_gate_load:
    movl %edi, %gs
    lock incq handoff + HANDOFF_GS_NATIVE_COUNT(%rip)
    testl $0xfffc, %edi                 /* a null selector: index 0, any RPL */
    jnz 1f
    cmpb $0, null_gs_keeps_base(%rip)
    jne 2f
1:  rdgsbase %rcx                       /* the base this load gave */
    movq %rcx, owed_user_gs_base(%rip)
    movb $1, owed_user_gs(%rip)
2:  wrgsbase %rax
gs_gate_base_back:
    ret
0:  movq $RING0_UNANSWERED, %rax
1:  int3
gs_gate_return:
    cmpq $RING0_UNANSWERED, %rax
    je 1b
    lock incq handoff + HANDOFF_GS_GATE_COUNT(%rip)
    ret
gs_gate_end:

/* pv_ops.mmu.write_cr3(u64 cr3), from the guest's kernel (the pv page jumps here): the CR3 load its
 * MOV would have trapped for, done by the body's C in the kernel's ring 3 as a function call (as
 * traps, a context switch's each, they were most of a boot's events). Here, not in the pv page,
 * so that an interrupt while it runs is ring 0's to hold (own_event), as one in the body is, not an
 * event of the kernel's. On a stack of the monitor's: a new address space's shadow does not map the
 * kernel's stack yet, and the monitor's own access to it would be filled by ring 0, emulated; so
 * after the load the kernel's stack is not touched here (the return address is taken first). An
 * interrupt held from cr3_gate_look on sends the kernel back there (own_event), so that where its
 * virtual IF is set irq_enable delivers what was held before the kernel goes on. */
    .globl cr3_gate, cr3_gate_look, cr3_gate_end
cr3_gate:
    leaq monitor_cr3_gate(%rip), %rax
/* The same way for a translated INVLPG (boot/translator.py: invlpg(u64 address), by the C ABI as
 * write_cr3): monitor_invlpg_gate, which asks ring 0 for nothing where no shadow maps the page. */
c_gate:
    popq %rsi                           /* the return address (RSI is the callee's to lose) */
    leaq cr3_gate_stack_top(%rip), %rcx
    movq %rsp, -8(%rcx)                 /* the kernel's RSP as the return leaves it */
    movq %rsi, -16(%rcx)
    leaq -16(%rcx), %rsp                /* 16-byte aligned, as a call wants */
    call *%rax
    movq (%rsp), %rsi
    movq 8(%rsp), %rsp
cr3_gate_look:
    cmpq $0, virtual_if(%rip)
    jne 1f
    jmp *%rsi
1:  movabsq $(PV_BASE + pv_cr3_held - pv_page), %rax
    jmp *%rax
cr3_gate_end:
    .globl invlpg_gate
invlpg_gate:
    leaq monitor_invlpg_gate(%rip), %rax
    jmp c_gate

/* The kernel's return from a system call (entry_SYSRETQ_unsafe_stack: SWAPGS, the VERW its
 * CLEAR_CPU_BUFFERS may be, SYSRETQ), whose SWAPGS the VMM made a jump, through the padding after the
 * SYSRETQ, to the pv page's PV_SYSRET, which jumps here with every register the kernel's: its user mode's, RSP, RCX and R11 included. The
 * SWAPGS's #GP was an event through ring 0; here the body is entered without ring 0, as an event of
 * its own (SYSRET_EVENT), on the event stack TSS.RSP0 does not name, as from the trampoline: ring 0
 * takes the body's own events (an interrupt meanwhile, held) on the one it names. The body does what
 * it did at that #GP, and leaves for user mode through ring 0, as from any event. */
    .globl sysret_gate
sysret_gate:
    movq %rax, sysret_rax(%rip)
    movq TSS_RSP0(%rip), %rax
    xorq $EVENT_STACKS_FLIP, %rax       /* the top of the body's stack */
    movq %rsp, -16(%rax)                /* the frame's RSP */
    leaq -EVENT_FRAME(%rax), %rsp
    movq $SYSRET_EVENT, (%rsp)
    movq $0, 8(%rsp)                    /* the error code; RIP, CS and SS are the body's to set */
    pushfq
    popq 32(%rsp)                       /* RFLAGS (popped after RSP is back at the frame) */
    movq sysret_rax(%rip), %rax
    jmp body_entry

/* The real LSTAR. This host's KVM leaves a SYSCALL from guest ring 3 in ring 3, at the LSTAR, on the
 * shadow the guest was on: a user process's shows it this page alone of the monitor's. So the gate
 * is one int3, into ring 0 (syscall_entry). */
    .section .gate, "ax"
    .balign 4096
    .globl syscall_gate
syscall_gate:
    int3
syscall_gate_return:
    jmp syscall_gate                    /* only where the host dropped the int3 (ring0_call) */
    .balign 4096, 0xcc
    .text

/* u64 ring0_call(u64 service, u64 a, u64 b): what the body cannot do in ring 3 (privileged(), in
 * monitor.c, run by monitor_ring0_event).
 * int3's gate is the one ring 3 may raise; from this site, ring 0 takes it as a call.
 * This host's KVM can drop an int3 from ring 3: its trap advances RIP past it and queues the #BP, and
 * KVM_GET_VCPU_EVENTS leaves a queued software exception out (VT-x and AMD-V keep RIP on the int3,
 * so there it would come again). A snapshot taken in that instant restores the vCPU after the int3
 * with no #BP to come (docs/pvm.md, section 8). So every int3 of the monitor's is followed by its
 * retry: here the answer ring 0 always gives in RAX, the others a jump back (a second int3 after one
 * that was taken is never reached: leave_to_user and syscall_entry do not return there). */
    .globl ring0_call, ring0_return
ring0_call:
    movq $RING0_UNANSWERED, %rax
1:  int3
ring0_return:
    cmpq $RING0_UNANSWERED, %rax
    je 1b
    ret

/* int fsgsbase_swap(u64 base, u64 *was): the FS base written with WRFSBASE in the body's ring 3, the
 * one it replaced read with RDFSBASE into *was: 1, or 0 where ring 3 may not (a #UD at
 * fsgsbase_swap_at, which own_event sends to fsgsbase_refused). */
    .globl fsgsbase_swap, fsgsbase_swap_at, fsgsbase_refused
fsgsbase_swap:
fsgsbase_swap_at:
    rdfsbase %rax
    wrfsbase %rdi
    movq %rax, (%rsi)
    movl $1, %eax
    ret
fsgsbase_refused:
    xorl %eax, %eax
    ret

/* The monitor's ring-3 code where a PKRU the guest wrote denies key 0, which every page has here,
 * the monitor's own too (KVM's shadow paging gives none a key): the first access faults, and
 * own_event sends the code here, having kept its RAX, RCX, RDX, RFLAGS and RIP in key0_return.
 * Ring 0 cannot write PKRU itself (this host emulates it, and its emulator knows no WRPKRU), and
 * nothing here may touch memory before the WRPKRU: the guest's PKRU is kept in RDX's high half
 * (WRPKRU ignores it), key 0's two bits cleared in EAX. Then key0_found, for the body (monitor.c,
 * key0_denied_access), the registers and the flags back, and the code retried. */
    .globl key0_allow, key0_allow_end
key0_allow:
    xorl %ecx, %ecx
    rdpkru                              /* EAX: the guest's PKRU; EDX: 0 */
    movq %rax, %rdx
    shlq $32, %rdx
    andl $~PKRU_KEY0, %eax
    wrpkru
    shrq $32, %rdx
    movl %edx, key0_found(%rip)
    movq key0_return + KEY0_RAX(%rip), %rax
    movq key0_return + KEY0_RCX(%rip), %rcx
    movq key0_return + KEY0_RDX(%rip), %rdx
    leaq -128(%rsp), %rsp               /* clear of any red zone */
    pushq key0_return + KEY0_RFLAGS(%rip)
    popfq
    leaq 128(%rsp), %rsp
    jmp *key0_return + KEY0_RIP(%rip)
key0_allow_end:

    .section .rodata
    .align 8
    .globl event_stubs
event_stubs:
    trap_stub_table event_stub_
    .globl error_code_vectors
error_code_vectors:
    error_code_table

/* The pv page (monitor.h PV_*): a paravirtual Linux's interrupt flag, as Xen's PV guests keep an
 * event mask. The kernel calls these at PV_BASE + the offsets, in its ring 3; they run there, so they
 * name the monitor's data by absolute address, never RIP-relative. The virtual IF is a word of the
 * monitor's (virtual_if: RFLAGS_IF or 0), which the kernel reads and writes without a trap; an
 * enable that finds an interrupt held delivers it here too (pv_deliver_held), and traps only where
 * that is not the common case (its STI, which the monitor emulates and then delivers); so do the
 * halts. save_fl, irq_disable and irq_enable follow Linux's callee-save convention: only RAX may
 * change. */
    .section .pv, "ax"
    .balign 4096
    .globl pv_page
pv_page:
    .org pv_page + PV_SAVE_FL, 0xcc
    movabsq $virtual_if, %rax
    movq (%rax), %rax
    ret
    .org pv_page + PV_IRQ_DISABLE, 0xcc
    movabsq $virtual_if, %rax
    movq $0, (%rax)
    ret
    .org pv_page + PV_IRQ_ENABLE, 0xcc
pv_irq_enable:
    movabsq $virtual_if, %rax
    movq $0x200, (%rax)                 /* from here an interrupt is delivered at once, not held */
    call pv_any_held
    jne 1f
    ret
1:  jmp pv_deliver_held
    .org pv_page + PV_READ_CR2, 0xcc   /* the guest's CR2, which the body set at its page fault */
    movabsq $guest_cr2, %rax
    movq (%rax), %rax
    ret
    .org pv_page + PV_WRITE_CR3, 0xcc
    movabsq $cr3_gate, %rax
    jmp *%rax
    .org pv_page + PV_SAFE_HALT, 0xcc
    sti                                 /* the monitor takes STI; HLT as one: no wake-up lost between */
    hlt
    ret
    .org pv_page + PV_SYSRET, 0xcc      /* every register the kernel's (its user mode's): through memory */
    jmp *1f(%rip)
1:  .quad sysret_gate
    .org pv_page + PV_HALT, 0xcc
    hlt
    ret
    .org pv_page + PV_WRITE_MSR, 0xcc
    movabsq $msr_gate, %rax
    jmp *%rax
    .org pv_page + PV_WRITE_MSR_TRAP, 0xcc
    movl %edi, %ecx
    movl %esi, %eax
    wrmsr                               /* traps: the body emulates it, as any of the kernel's */
    ret
    .org pv_page + PV_LOAD_GS_INDEX, 0xcc
    movabsq $gs_gate, %rax
    jmp *%rax
    .org pv_page + PV_LOAD_GS_INDEX_AGAIN, 0xcc
    movq %cr8, %rax                     /* traps: the interrupt held in gs_gate is delivered at its event */
    movabsq $gs_gate, %rax              /* (Linux's own SWAPGS, MOV, SWAPGS would need its IF kept off) */
    jmp *%rax
    .org pv_page + PV_WRITE_MSR_U64, 0xcc
    movq %rsi, %rdx                     /* the value as the halves msr_gate and WRMSR take: ESI, EDX */
    shrq $32, %rdx
    movabsq $msr_gate, %rax
    jmp *%rax
/* The kernel's IRETQ to itself (restore_regs_and_return_to_kernel: the VMM points its jump at
 * early_xen_iret_patch here, as Xen PV points it at xen_iret), with the IRETQ's frame at RSP and
 * every register the kernel's. A frame with the kernel's own segments (iret_kernel_cs and _ss, or a
 * null SS) is made the real one, ring 3 to ring 3, and this IRETQ runs natively: the return that
 * was an event. The virtual IF is set before the held interrupts are looked at, as in irq_enable:
 * one that comes after the look is delivered at once, here. Any other frame, or one that sets IF
 * with an interrupt held, is left as it is, and the IRETQ at 3: traps (#GP: its CS has RPL 0) and
 * is emulated, which also delivers what was held. */
    .org pv_page + PV_IRET, 0xcc
    pushq %rax                          /* the frame: RIP 8(%rsp), CS 16, RFLAGS 24, RSP 32, SS 40 */
    movabsq $iret_kernel_cs, %rax
    movq (%rax), %rax
    cmpq %rax, 16(%rsp)
    jne 3f
    movabsq $iret_kernel_ss, %rax
    movq (%rax), %rax
    cmpq %rax, 40(%rsp)
    je 1f
    cmpq $0, 40(%rsp)
    jne 3f
1:  movabsq $virtual_if, %rax
    testl $RFLAGS_IF, 24(%rsp)
    jz 2f
    movq $RFLAGS_IF, (%rax)
    call pv_any_held
    jne 3f
    jmp 4f
2:  movq $0, (%rax)
4:  orq $3, 16(%rsp)                    /* CS: the kernel's, whose descriptor has DPL 3 (mirror_gdt) */
    cmpq $0, 40(%rsp)
    je 5f
    orq $3, 40(%rsp)
    jmp 6f
5:  movq $BODY_SS, 40(%rsp)             /* the null SS: the monitor's flat one (monitor.c NULL_SS) */
6:  andq $RFLAGS_STATUS, 24(%rsp)
    orq $(RFLAGS_FIXED | RFLAGS_IF), 24(%rsp)
    movabsq $(handoff + HANDOFF_IRETQ_GATE_COUNT), %rax
    lock incq (%rax)
    movabsq $iret_kernel_cs, %rax       /* the segments it returns to, as it sees them */
    pushq (%rax)
    movabsq $kernel_cs_view, %rax
    popq (%rax)
    movq 40(%rsp), %rax
    cmpq $BODY_SS, %rax
    jne 7f
    xorl %eax, %eax
7:  andq $~3, %rax
    pushq %rax
    movabsq $kernel_ss_view, %rax
    popq (%rax)
    popq %rax
    iretq
3:  popq %rax
    iretq

    .org pv_page + PV_INVLPG, 0xcc
    movabsq $invlpg_gate, %rax
    jmp *%rax
/* A kernel built without CONFIG_XEN_PV has no early_xen_iret_patch: its return to itself is POP_REGS,
 * a skip of pt_regs' orig_ax, then the IRETQ made a UD2. The VMM makes the last POP and the skip (five
 * bytes: POP %RDI; ADD $8, %RSP) a jump here, which does them and goes on as pv_iret does. */
    .org pv_page + PV_IRET_POP_RDI, 0xcc
    popq %rdi
    leaq 8(%rsp), %rsp                  /* orig_ax; the flags are the frame's at the IRETQ */
    jmp pv_page + PV_IRET
    .org pv_page + PV_WRITE_MSR_DONE, 0xcc
    movq %cr8, %rax                     /* traps: the interrupt held in msr_gate after its write is */
    ret                                 /* delivered at its event (an EOI must not be written twice) */

/* ZF clear if an interrupt is held (RAX lost), for irq_enable and pv_iret. */
pv_any_held:
    movabsq $held, %rax
    cmpq $0, (%rax)
    jne 1f
    cmpq $0, 8(%rax)
    jne 1f
    cmpq $0, 16(%rax)
    jne 1f
    cmpq $0, 24(%rax)
1:  ret

/* irq_enable found an interrupt held: it is delivered here, in the kernel's ring 3, as the body's
 * deliver() would at a trapped STI: the highest vector held, through the guest's IDT, on the current
 * stack, with the frame an interrupt of irq_enable's caller just after its return would have (RIP
 * the return address, RSP above it, IF set, CS and SS those the kernel runs on as it sees them:
 * kernel_cs_view and kernel_ss_view; RAX was irq_enable's to lose), the virtual IF cleared as an
 * interrupt gate clears it. It is cleared first, so nothing is delivered meanwhile and what arrives
 * is held. Only the common case is done here: a present interrupt gate with no IST whose selector is
 * the code segment the kernel runs on, so that CS does not change. Anything else goes the way it
 * went before: STI, which traps, and the body delivers. Registers are kept 96 bytes below the
 * return address, under where the frame goes. */
    .macro pv_held_scratch_restore
    movq (%rsp), %rcx
    movq 8(%rsp), %rdx
    movq 16(%rsp), %rsi
    movq 24(%rsp), %rdi
    .endm
pv_deliver_held:
    leaq -96(%rsp), %rsp                /* the return address at 96(%rsp) */
    movq %rcx, (%rsp)
    movq %rdx, 8(%rsp)
    movq %rsi, 16(%rsp)
    movq %rdi, 24(%rsp)
    movabsq $virtual_if, %rax
    movq $0, (%rax)
    movabsq $(held + 24), %rsi          /* the highest vector held: from the last word down */
    movl $192, %edx
1:  bsrq (%rsi), %rcx
    jnz 2f
    subq $8, %rsi
    subl $64, %edx
    jns 1b
    jmp 8f                              /* delivered meanwhile, before IF was cleared: look again */
2:  addl %ecx, %edx                     /* EDX: the vector */
    movabsq $guest_idt, %rax
    movl %edx, %ecx
    shll $4, %ecx
    leaq 15(%rcx), %rdi
    cmpq 8(%rax), %rdi                  /* beyond the IDT's limit */
    ja 7f
    addq (%rax), %rcx                   /* RCX: the gate */
    movq (%rcx), %rdi                   /* its low half */
    movq %rdi, %rax
    shrq $32, %rax
    andl $0x8f07, %eax                  /* present, type, IST */
    cmpl $0x8e00, %eax                  /* present, a 64-bit interrupt gate, no IST */
    jne 7f
    movq %rdi, %rax
    shrq $16, %rax
    movzwl %ax, %eax                    /* its selector */
    movabsq $kernel_cs_view, %rsi
    cmpq (%rsi), %rax                   /* the segment the kernel runs on: no CS changes */
    jne 7f
    movabsq $kernel_ss_view, %rsi
    movq (%rsi), %rsi
    movq %rsi, 32(%rsp)                 /* the frame's SS */
    movl 8(%rcx), %eax                  /* the handler: offset 63..32 */
    shlq $32, %rax
    movq %rdi, %rsi
    shrq $48, %rsi
    shlq $16, %rsi                      /* 31..16 */
    orq %rsi, %rax
    movzwl %di, %esi                    /* 15..0 */
    orq %rsi, %rax
    movl %edx, %ecx                     /* taken from the held set */
    shrl $6, %ecx
    movabsq $held, %rsi
    leaq (%rsi,%rcx,8), %rsi
    movl %edx, %ecx
    andl $63, %ecx
    lock btrq %rcx, (%rsi)
    jnc 8f                              /* taken meanwhile: look again */
    movabsq $early_eoi_vector, %rcx
    cmpl (%rcx), %edx
    jne 9f
    movabsq $pv_eoi_flag, %rcx          /* ring 0 EOI'd it: the kernel's EOI is skipped (monitor.c) */
    movq (%rcx), %rcx
    lock orb $1, (%rcx)
    movabsq $(handoff + HANDOFF_PV_EOI_COUNT), %rcx
    lock incq (%rcx)
9:
    leaq 104(%rsp), %rsi                 /* the RSP irq_enable's caller returns with */
    movq %rsi, %rdi
    andq $-16, %rdi                     /* the CPU aligns the stack, then pushes five words */
    subq $40, %rdi                      /* RDI: the frame, at or above 56(%rsp) */
    movq 96(%rsp), %rcx
    movq %rcx, (%rdi)                   /* RIP: the return address */
    movabsq $kernel_cs_view, %rcx
    movq (%rcx), %rcx
    movq %rcx, 8(%rdi)                  /* CS */
    movq $(RFLAGS_FIXED | RFLAGS_IF), 16(%rdi)
    movq %rsi, 24(%rdi)                 /* RSP */
    movq 32(%rsp), %rcx
    movq %rcx, 32(%rdi)                 /* SS */
    movq %rax, 32(%rsp)                 /* the handler, and the frame, for after the registers */
    movq %rdi, 40(%rsp)
    movabsq $(handoff + HANDOFF_INTERRUPTS_COUNT), %rax
    lock incq (%rax)
    movabsq $(handoff + HANDOFF_HELD_GATE_COUNT), %rax
    lock incq (%rax)
    pv_held_scratch_restore
    movq 32(%rsp), %rax
    movq 40(%rsp), %rsp
    jmp *%rax
7:  pv_held_scratch_restore             /* not the common case: the trap's way */
    leaq 96(%rsp), %rsp
    sti                                 /* traps: emulated, then what was held is delivered */
    ret
8:  pv_held_scratch_restore
    leaq 96(%rsp), %rsp
    jmp pv_irq_enable
/* cr3_gate's way back with its virtual IF set: the return address back on the kernel's stack (a
 * fault on it here is the kernel's event), and irq_enable, which delivers what was held, if anything,
 * and returns. */
pv_cr3_held:
    pushq %rsi
    jmp pv_irq_enable
    .balign 4096, 0xcc                  /* int3 between and after them */
/* The code cache: a kernel's translated sites (boot/translator.py), which call the functions above.
 * The VMM writes it into each copy; INT3 where it has not. */
    .globl pv_code_cache
pv_code_cache:
    .fill PV_CODE_CACHE_SIZE, 1, 0xcc

/* int xcr_write(u32 index, u64 value): 0, or 1 if the CPU refused with #GP (the event handler
 * moves RIP from xcr_write_at to xcr_refused). The MSRs are ring0_event's, on its own path. */
    .text
    .globl xcr_write, xcr_write_at, xcr_refused
xcr_write:
    movl %edi, %ecx
    movl %esi, %eax
    movq %rsi, %rdx
    shrq $32, %rdx
xcr_write_at:
    xsetbv
    xorl %eax, %eax
    ret
xcr_refused:
    movl $1, %eax
    ret

/* int guest_copy(void *to, const void *from, u64 length): 0, or 1 if a page fault on guest memory
 * found nothing the guest's tables give (the event handler moves RIP from guest_copy_at to
 * guest_copy_failed; a fault the shadow can fill is retried where it happened). */
    .globl guest_copy, guest_copy_at, guest_copy_failed
guest_copy:
    movq %rdx, %rcx
guest_copy_at:
    rep movsb
    xorl %eax, %eax
    ret
guest_copy_failed:
    movl $1, %eax
    ret

/* void wait_for_interrupt(void): the guest halted with its virtual IF set. STI's one-instruction
 * shadow covers HLT, so an interrupt that is already waiting wakes it rather than being taken
 * before it; the interrupt's entry marks it pending (monitor_event, from ring 0). */
    .globl wait_for_interrupt
wait_for_interrupt:
    sti
    hlt
    cli
    ret

/* void triple_fault(void): an event the guest's IDT cannot take, even as a double fault. The CPU
 * shuts down as it would have without the monitor: no IDT at all, and an exception in ring 0. */
    .globl triple_fault
triple_fault:
    lidt no_idt(%rip)
    ud2

/* void halt_forever(void): the guest halted with its virtual IF clear, as a CPU does. */
    .globl halt_forever
halt_forever:
    cli
1:  hlt
    jmp 1b

    .section .rodata
    .align 16
no_idt:
    .word 0
    .quad 0

    .bss
    .balign 65536
    .globl event_stacks, monitor_stack_top
event_stacks:
    .skip EVENT_STACK_SIZE
monitor_stack_top:                      /* the first; the VMM's entry runs on it too */
    .skip EVENT_STACK_SIZE
    .skip 4096                          /* cr3_gate's: the body's C, called from the kernel */
cr3_gate_stack_top:
    .align 8
body_frame:                             /* the event the body handles: its struct trap_frame */
    .skip 8
sysret_rax:                             /* sysret_gate's one scratch word */
    .skip 8
