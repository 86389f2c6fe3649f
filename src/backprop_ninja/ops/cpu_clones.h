/*
 * The functions marked CLONED are compiled for x86-64-v4, x86-64-v3 and a portable default, and
 * one copy is picked at load time. The portable copy is much slower (docs/speed.md), so each C
 * library exports a function that returns runs_x86_64_v3(), and its Python side asks it first.
 */
#ifndef BACKPROP_NINJA_CPU_CLONES_H
#define BACKPROP_NINJA_CPU_CLONES_H

/* One copy of each hot function for x86-64 with AVX-512 (x86-64-v4), one with AVX2 and FMA
   (x86-64-v3), one for any x86-64; the best one the CPU can run is picked once at load time.
   Elsewhere, one portable copy. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define X86_64_V3_CLONES 1
#define CLONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define X86_64_V3_CLONES 0
#define CLONED
#endif

/* 1 where the CLONED functions run their AVX2 or AVX-512 copy, 0 where they run the portable one. */
static inline int runs_x86_64_v3(void) {
#if X86_64_V3_CLONES
    __builtin_cpu_init();
    return __builtin_cpu_supports("x86-64-v3") != 0;  /* a non-zero mask, not 1 */
#else
    return 0;
#endif
}

#endif
