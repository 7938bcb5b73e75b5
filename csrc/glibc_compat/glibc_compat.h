/* Force-included into every frozennorm source (see glibc_compat_flags in setup.py): keeps
 * the extension's glibc requirement at torch's (2.28), whatever glibc builds it.
 *
 * glibc 2.29 gave exp, exp2, log, log2 and pow new symbol versions (the same results,
 * without the old error-handling wrapper); a library linked on a newer glibc then needs
 * GLIBC_2.29. These lines bind the calls to the versions every glibc since the
 * architecture's first one exports. A function a source file does not call adds nothing.
 * (The other GLIBC_2.32 need, __libc_single_threaded, is handled by sys/single_threaded.h
 * beside this file.) */
#ifndef FROZENNORM_GLIBC_COMPAT_H
#define FROZENNORM_GLIBC_COMPAT_H

#if defined(__linux__) && !defined(__CUDA_ARCH__)
#include <features.h> /* defines __GLIBC__ */
#endif
#if defined(__linux__) && defined(__GLIBC__) && !defined(__CUDA_ARCH__)
#if defined(__x86_64__)
#define FROZENNORM_GLIBC_BASE "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define FROZENNORM_GLIBC_BASE "GLIBC_2.17"
#endif
#ifdef FROZENNORM_GLIBC_BASE
__asm__(".symver exp,exp@" FROZENNORM_GLIBC_BASE);
__asm__(".symver exp2,exp2@" FROZENNORM_GLIBC_BASE);
__asm__(".symver log,log@" FROZENNORM_GLIBC_BASE);
__asm__(".symver log2,log2@" FROZENNORM_GLIBC_BASE);
__asm__(".symver pow,pow@" FROZENNORM_GLIBC_BASE);
#endif
#endif

#endif
