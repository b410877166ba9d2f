/*
 * monitor.h: what the VMM and the in-guest monitor share (boot/monitor.py writes the handoff).
 *
 * The monitor (docs/monitor.md) runs a bare-metal program's ring-0 code deprivileged in ring 3 on
 * hosts without VT-x/AMD-V. VMware's VMM reserved the top 4 MB of the guest's address space; this
 * one takes one PML4 slot, 509: a hole in Linux's layout, between its cpu_entry_area and its ESPFIX
 * stacks, and out of its KASLR's reach (Documentation/arch/x86/x86_64/mm.rst). Not the hole Linux
 * leaves for a hypervisor (slots 256 to 271): a PVM host keeps at least slot 256 for itself, and
 * ring 3 cannot run there. The slot's first 4 MiB are the monitor, its 256th GiB on its map of
 * guest RAM (so RAM must end below 256 GiB). Its pages are the top 4 MiB of guest RAM below the PCI hole.
 */
#ifndef MONITOR_H
#define MONITOR_H

#define MONITOR_BASE 0xfffffe8000000000 /* PML4 slot 509 (no suffix: monitor.S uses it too) */
#define MONITOR_SLOT 509
#define MONITOR_SIZE 0x400000UL
#define HIGH_RAM_BASE 0x100000000UL    /* where RAM above the PCI hole starts (memory/layout.py RAM_ABOVE_4G) */
#define DIRECT_MAP_LIMIT (256UL << 30) /* its map of guest RAM: the slot's upper half (boot/monitor.py) */
#define HANDOFF_MAGIC 0x31524f54494e4f4dUL /* "MONITOR1" */
#define HANDOFF_COUNTER(kind) (8 * (20 + (kind))) /* counters[kind], after the 20 fixed words (struct handoff) */

/* The pv page: the monitor's functions for a paravirtual Linux's interrupt flag (pv_ops.irq), MSR
 * writes (pv_ops.cpu.write_msr), user GS loads (pv_ops.cpu.load_gs_index), CR2 reads and CR3 loads
 * (pv_ops.mmu.read_cr2 and write_cr3), IRETQ to itself and return from a system call, which the VMM
 * points the kernel at before it runs (boot/paravirt.py).
 * One page of the monitor's, mapped read-only at PV_BASE in its kernel's shadows: the top 2 MiB of the
 * address space, a hole in Linux's layout within reach of its text's 32-bit calls (Linux patches each
 * call site into a direct call). */
#define PV_BASE 0xffffffffffe00000
/* After the pv page, and mapped as it is: the code cache, where the VMM puts the translated sites of a
 * kernel without PARAVIRT_XXL (boot/translator.py; boot/monitor.py CODE_CACHE_SIZE) */
#define PV_CODE_CACHE_SIZE 0x10000
#define PV_SIZE (0x1000 + PV_CODE_CACHE_SIZE)
#define PV_SAVE_FL 0x00      /* offsets in the page: keep in step with boot/monitor.py PV_FUNCTIONS */
#define PV_IRQ_DISABLE 0x20
#define PV_IRQ_ENABLE 0x40
#define PV_READ_CR2 0x60
#define PV_WRITE_CR3 0x70
#define PV_SAFE_HALT 0x80
#define PV_SYSRET 0x90 /* the kernel's return from a system call, jumped to from after its SYSRETQ (boot/paravirt.py) */
#define PV_HALT 0xa0
#define PV_WRITE_MSR 0xc0
#define PV_WRITE_MSR_TRAP 0xe0 /* not the kernel's: msr_gate's way to the trapping WRMSR */
#define PV_LOAD_GS_INDEX 0x100
#define PV_LOAD_GS_INDEX_AGAIN 0x120 /* not the kernel's: gs_gate's way back after an interrupt */
#define PV_WRITE_MSR_U64 0x140 /* write_msr(u32 msr, u64 value), Linux 7.2's form; the one above (msr, low, high) 6.12's */
#define PV_IRET 0x160 /* the kernel's IRETQ to itself, jumped to from early_xen_iret_patch (boot/paravirt.py) */
#define PV_INVLPG 0x260 /* invlpg(u64 address): a translated INVLPG's (boot/translator.py), not a pv_ops member */
#define PV_IRET_POP_RDI 0x280 /* the same return for a kernel without early_xen_iret_patch, jumped to from
                                 * restore_regs_and_return_to_kernel's last POP and its skip of orig_ax */
#define PV_WRITE_MSR_DONE 0x2a0 /* not the kernel's: msr_gate's way back from a write done, after an interrupt */
/* The RFLAGS bits an IRETQ of the guest's kernel may set (CF PF AF ZF SF TF DF OF AC; its IF is the
 * virtual one), and the two every real RFLAGS of the guest's has: bit 1 and IF. */
#define RFLAGS_STATUS 0x40dd5
#define RFLAGS_FIXED 0x2
#define RFLAGS_IF 0x200
/* The MSRs msr_gate writes for the kernel (monitor.S), and where it counts them: the handoff's
 * counters[COUNT_MSR_GATE] (monitor.c checks the offset against the struct). */
#define MSR_FS_BASE 0xc0000100u
#define MSR_GS_BASE 0xc0000101u
#define MSR_KERNEL_GS_BASE 0xc0000102u
#define MSR_TSC_DEADLINE 0x6e0u
#define HANDOFF_MSR_GATE_COUNT HANDOFF_COUNTER(27)
/* The x2APIC's EOI register, which general_protection_entry writes at once (monitor.S) with the TSC
 * deadline, counting them at counters[COUNT_WRMSR_RING0]. */
#define MSR_X2APIC_EOI 0x80bu
#define MSR_X2APIC_LVT_TIMER 0x832u
/* The x2APIC's ICR, and an INIT (its delivery mode, level asserted) to the CPU in its high half, or to
 * all but this one (its shorthand): before the guest sends one, the monitor names the CPU on
 * AP_INIT_PORT (all ones for all), so that the VMM takes that CPU over again where it next enters
 * the kernel (vmm/x86/ap_start.py): a CPU the guest brings back online comes up through its
 * trampoline again, and an INIT has reset its copy of the monitor. An INIT through the xAPIC's
 * page is a store the monitor never sees: so a Linux's AP also names itself there when it halts
 * with interrupts off (parked until an INIT or an NMI, as Linux's offline CPU is). */
#define MSR_X2APIC_ICR 0x830u
#define ICR_DELIVERY_MODE 0x700ul
#define ICR_INIT 0x500ul
#define ICR_LEVEL_ASSERT 0x4000ul
#define ICR_SHORTHAND 0xc0000ul
#define ICR_ALL_BUT_SELF 0xc0000ul
#define AP_INIT_PORT 0x1008
#define AP_INIT_ALL 0xffffffffu
#define MSR_APIC_BASE 0x1bu
#define MSR_KVM_PV_EOI_EN 0x4b564d04u /* KVM's paravirtual EOI (Documentation/virt/kvm/x86/msr.rst), which the monitor keeps */
#define HANDOFF_WRMSR_RING0_COUNT HANDOFF_COUNTER(28)
/* Where pv_iret counts its kernel's IRETQs to itself (counters[COUNT_IRETQ_GATE]), and
 * pv_deliver_held the held interrupts it delivers (COUNT_INTERRUPTS, COUNT_HELD_GATE). */
#define HANDOFF_IRETQ_GATE_COUNT HANDOFF_COUNTER(30)
#define HANDOFF_INTERRUPTS_COUNT HANDOFF_COUNTER(2)
#define HANDOFF_HELD_GATE_COUNT HANDOFF_COUNTER(31)
/* Where gs_gate counts the GS loads it made a trip into ring 0 for (counters[COUNT_GS_GATE]) and
 * those it left to the kernel's ring 3 (COUNT_GS_NATIVE), and msr_gate the base writes it did there
 * (COUNT_MSR_NATIVE). */
#define HANDOFF_GS_GATE_COUNT HANDOFF_COUNTER(34)
#define HANDOFF_GS_NATIVE_COUNT HANDOFF_COUNTER(35)
#define HANDOFF_MSR_NATIVE_COUNT HANDOFF_COUNTER(36)
/* Where pv_deliver_held counts the interrupts it delivers with the guest's EOI flag set
 * (counters[COUNT_PV_EOI]). */
#define HANDOFF_PV_EOI_COUNT HANDOFF_COUNTER(37)
/* PKRU's two bits for key 0 (access and write disabled), and key0_return's fields (monitor.c), which
 * key0_allow reads (monitor.S). */
#define PKRU_KEY0 3
#define KEY0_RAX 0
#define KEY0_RCX 8
#define KEY0_RDX 16
#define KEY0_RFLAGS 24
#define KEY0_RIP 32

/* The vectors monitor_event sees for a SYSCALL (syscall_gate) and for the kernel's return from one
 * (sysret_gate): above the CPU's 256. */
#define SYSCALL_EVENT 256
#define SYSRET_EVENT 257

/* Which shadow the CPU is on (user_root_loaded): the kernel's, the user mode's, or the kernel's
 * again, loaded by the trampoline at an event from user mode, until the body has seen it. Whether
 * an event came from the guest's user mode is which shadow it came on, whatever CS says. */
#define ON_KERNEL_ROOT 0
#define ON_USER_ROOT 1
#define LEFT_USER_ROOT 2

/* The real GDT: the guest's own descriptors at their own indexes, 0 to GUEST_GDT_ENTRIES - 1 (its
 * kernel's with DPL 3, so that they run in ring 3), then the monitor's. */
#define GUEST_GDT_ENTRIES 32
#define TSS_SELECTOR 0x100 /* entries 32 and 33 */
#define MONITOR_CS 0x110   /* ring 0 */
#define MONITOR_DS 0x118
#define BODY_CS 0x123      /* the body, in ring 3 */
#define BODY_SS 0x12b
#define LOADED_CS 0x133    /* the guest's CS and SS as it loaded them, kept across its LGDT */
#define LOADED_SS 0x13b
/* The guest's user segments again, at USER_ALIASES + their index: the selectors its user mode runs on.
 * A PVM host runs a ring-3 IRETQ to the host's own user selectors (0x33 and 0x2b, which Linux uses
 * too) natively, without a trap, and then goes on reporting the CS it last saw; to selectors of the
 * monitor's own it traps and keeps count. */
#define USER_ALIASES 40
#define GDT_ENTRIES 72

/* The body's calls into ring 0 (ring0_call's first argument). monitor.S serves CR3, INVLPG, WRMSR and
 * RDMSR itself, in a few instructions: a kernel's context switches, TLB flushes and timer and
 * interrupt-controller MSRs make them the frequent ones. */
#define SERVICE_CR3 0
#define SERVICE_INVLPG 1
#define SERVICE_CR0 2
#define SERVICE_CR4 3
#define SERVICE_CR8 4
#define SERVICE_READ_CR8 5
#define SERVICE_RDMSR 6
#define SERVICE_WRMSR 7
#define SERVICE_SWAPGS 8
#define SERVICE_WAIT 9
#define SERVICE_HALT 10
#define SERVICE_TRIPLE_FAULT 11
#define SERVICE_XSETBV 12

/* A kernel without PARAVIRT_XXL: its PUSHF and POPF, which in ring 3 show the real IF and leave it, made
 * by the VMM into PUSH ES and POP ES, invalid in 64-bit mode: their #UD is the monitor's to emulate. */
#define PUSHF_TRAP 0x06
#define POPF_TRAP 0x07

#ifndef __ASSEMBLER__

/* Trap kinds counted in the handoff page (bench and --stats read them; keep in step with
 * boot/monitor.py MONITOR_COUNTERS). */
enum {
    COUNT_EVENTS,      /* every trap into the monitor from the guest (the gates' entries are not) */
    COUNT_EXCEPTIONS,  /* exceptions reflected to the guest's IDT */
    COUNT_INTERRUPTS,  /* interrupts reflected to the guest's IDT */
    COUNT_DEFERRED,    /* interrupts held: the guest's virtual IF was clear, or the monitor busy */
    COUNT_CLI, COUNT_STI, COUNT_HLT, COUNT_IRETQ, COUNT_MOV_CR, COUNT_RDMSR, COUNT_WRMSR,
    COUNT_DESCRIPTOR,  /* lgdt, lidt, ltr */
    COUNT_INVLPG, COUNT_WBINVD,
    COUNT_SHADOW_FILL,  /* shadow page-table entries made from the guest's */
    COUNT_SHADOW_FLUSH, /* shadows emptied: CR3 loads, or the pool used up */
    COUNT_SYSCALL, COUNT_SYSRET, COUNT_SWAPGS,
    COUNT_RING0,       /* the body's calls into ring 0 (ring0_call): what it could not do in ring 3 */
    COUNT_SEGMENT,     /* lretq and mov to SS: its kernel's own segment loads */
    COUNT_SHADOW_CHECK, /* CR3 loads of the same tables: the shadows checked against them, kept */
    COUNT_XSETBV, COUNT_MOV_DR,
    COUNT_INT_N,       /* INT n from ring 3, which this host turns into #UD, delivered as the CPU would */
    COUNT_OWN_FILL,    /* the monitor's own accesses to guest memory the shadow lacked: filled by ring 0 */
    COUNT_PORT_MAP,    /* the guest's I/O bitmap copied for its user mode, at a port access (unfence_ports) */
    COUNT_MSR_GATE,    /* its kernel's MSR writes that ring 0 did through msr_gate, without a trap */
    COUNT_WRMSR_RING0, /* its kernel's trapped WRMSRs of a timer interrupt's MSRs, done by ring 0 at once */
    COUNT_IRETQ_AT_SWAPGS, /* of the IRETQs, those to user mode emulated at the SWAPGS before them */
    COUNT_IRETQ_GATE,  /* its kernel's IRETQs to itself done in the pv page, natively (pv_iret), not counted as IRETQs */
    COUNT_HELD_GATE,   /* of the interrupts, those held that irq_enable delivered in the pv page, natively (pv_deliver_held) */
    COUNT_CR3_GATE,    /* its kernel's CR3 loads through pv_ops.mmu.write_cr3 (cr3_gate), without a trap; not counted as MOV CRs */
    COUNT_SYSRET_GATE, /* its kernel's SWAPGS and SYSRETQ done through sysret_gate, without the SWAPGS's trap (counted as both) */
    COUNT_GS_GATE,     /* its kernel's GS loads that ring 0 did through gs_gate, without a trap */
    COUNT_GS_NATIVE,   /* its kernel's GS loads that gs_gate left to its ring 3 (fsgsbase_native): no trip */
    COUNT_MSR_NATIVE,  /* its kernel's writes of the user mode's FS and GS bases that msr_gate did in its ring 3: no trip */
    COUNT_PV_EOI,      /* its LAPIC timer's interrupts that ring 0 EOI'd as they came, delivered with its paravirtual EOI flag set */
    COUNT_SWAPGS_NATIVE, /* of its SWAPGS, those the body did in ring 3 (leave_swapping_gs), without ring 0 */
    COUNT_KEY0,        /* PKRUs the guest wrote that denied key 0, which every page has here: key 0 allowed again */
    COUNT_PUSHF, COUNT_POPF, /* a kernel without PARAVIRT_XXL: its PUSHFs and POPFs, made to trap (flag_traps) */
    COUNT_INVLPG_GATE, /* its INVLPGs translated (boot/translator.py), done through invlpg_gate without a trap */
    COUNT_KINDS
};

/* At MONITOR_BASE: what the VMM hands over, then the counters. All fields are 64-bit. */
struct handoff {
    unsigned long magic;
    unsigned long guest_rip, guest_rsp, guest_rdi, guest_rsi, guest_rdx; /* the program's entry */
    unsigned long guest_limit;   /* guest RAM below the monitor: the only memory it reads or writes for the guest */
    unsigned long physical_base; /* where the monitor's pages are in guest-physical memory */
    unsigned long guest_gdt_base, guest_gdt_limit, guest_tr; /* the descriptor tables the VMM built */
    unsigned long guest_cr3;     /* the program's page tables (the monitor starts on its own) */
    unsigned long guest_cs, guest_ss; /* its kernel's segments at the entry */
    unsigned long guest_iret_site; /* a paravirtual Linux's return to user mode: its IRETQ, made a UD2 (or 0) */
    unsigned long high_ram_end;    /* the end of guest RAM above 4 GiB, or 0 */
    unsigned long high_ram_pds;    /* the VMM's page directories that map it, one a GiB from 4 GiB, in the monitor's pages */
    unsigned long guest_sysret_site; /* a paravirtual Linux's SWAPGS before its SYSRETQ, made a jump towards PV_SYSRET (or 0) */
    unsigned long monitor_end;     /* where the pages of every vCPU's copy of the monitor end (they begin at guest_limit) */
    unsigned long flag_traps;      /* 1: the VMM made a kernel's PUSHFs PUSHF_TRAP and its POPFs POPF_TRAP (boot/flag_sites.py) */
    unsigned long counters[COUNT_KINDS];
    /* The last event the guest's IDT could not take (the first of its chain), for the VMX's report of
     * a triple fault: its vector, the fault that stopped its delivery, the guest's RIP and CR2 then. */
    unsigned long failed_vector, failed_fault, failed_rip, failed_cr2;
};

#endif /* __ASSEMBLER__ */
#endif
