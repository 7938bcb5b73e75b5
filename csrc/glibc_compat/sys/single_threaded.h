/* frozennorm's stand-in for glibc's <sys/single_threaded.h> (see glibc_compat_flags in
 * setup.py). glibc 2.32 added the variable __libc_single_threaded, and libstdc++'s headers
 * read it wherever this header exists, which makes the extension need GLIBC_2.32 although
 * torch needs only 2.28. Here it is a constant "not known to be single-threaded":
 * libstdc++ then always uses atomic reference counts, as it does on glibc < 2.32. */
#ifndef FROZENNORM_GLIBC_COMPAT_SINGLE_THREADED_H
#define FROZENNORM_GLIBC_COMPAT_SINGLE_THREADED_H

static const char __libc_single_threaded = 0;

#endif
