/*
 * Small helpers shared by the C tests: checks that print what they verify, a
 * scratch directory, and `qemu-img check`.
 *
 * Each test prints one line per check and exits non-zero at the first failure,
 * leaving its scratch directory behind for inspection.
 */
#ifndef COWDISK_TESTUTIL_H
#define COWDISK_TESTUTIL_H

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cowdisk.h"

#define TU_PATH 1024
#define TU_CMD (4 * TU_PATH)

static char tu_scratch[512];
static int tu_checks;

static inline void tu_fail(const char *file, int line, const char *fmt, ...)
    __attribute__((noreturn, format(printf, 3, 4)));

static inline void tu_fail(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "FAIL %s:%d: ", file, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    if (tu_scratch[0])
        fprintf(stderr, "     scratch directory kept: %s\n", tu_scratch);
    exit(1);
}

#define FAIL(...) tu_fail(__FILE__, __LINE__, __VA_ARGS__)

/* Prints the heading of a group of checks. */
#define SECTION(name) printf("\n# %s\n", name)

/* Checks a condition; `what` says what is being verified. */
#define CHECK(cond, what)                                                         \
    do {                                                                          \
        tu_checks++;                                                              \
        if (!(cond))                                                              \
            FAIL("%s (condition `%s` is false)", what, #cond);                    \
        printf("ok   %s\n", what);                                                \
    } while (0)

/* Checks that a cowdisk call returned `expected` (0 or a negative errno). */
#define CHECK_RC(call, expected, what)                                            \
    do {                                                                          \
        int rc_ = (call);                                                         \
        int want_ = (expected);                                                   \
        tu_checks++;                                                              \
        if (rc_ != want_)                                                         \
            FAIL("%s: `%s` returned %d (%s), expected %d (%s); last error: \"%s\"", \
                 what, #call, rc_, cowdisk_strerror(rc_), want_,                   \
                 cowdisk_strerror(want_), cowdisk_last_error());                  \
        if (want_ != 0) {                                                         \
            const char *msg_ = cowdisk_last_error();                              \
            if (msg_ == NULL || msg_[0] == '\0')                                  \
                FAIL("%s: cowdisk_last_error() is empty after a failure", what);  \
            printf("ok   %s -> %d: %s\n", what, rc_, msg_);                       \
        } else {                                                                  \
            printf("ok   %s\n", what);                                            \
        }                                                                         \
    } while (0)

/* Checks that a call failed (any negative errno) and left a message. */
#define CHECK_FAILS(call, what)                                                   \
    do {                                                                          \
        int rc_ = (call);                                                         \
        tu_checks++;                                                              \
        if (rc_ >= 0)                                                             \
            FAIL("%s: `%s` returned %d, expected a negative errno", what, #call,  \
                 rc_);                                                            \
        const char *msg_ = cowdisk_last_error();                                  \
        if (msg_ == NULL || msg_[0] == '\0')                                      \
            FAIL("%s: cowdisk_last_error() is empty after a failure", what);      \
        printf("ok   %s -> %d (%s): %s\n", what, rc_, cowdisk_strerror(rc_), msg_); \
    } while (0)

/* Creates the scratch directory (under $TMPDIR or /tmp) and returns its path. */
static inline const char *tu_make_scratch(const char *test_name) {
    const char *tmp = getenv("TMPDIR");
    if (tmp == NULL || tmp[0] == '\0')
        tmp = "/tmp";
    snprintf(tu_scratch, sizeof tu_scratch, "%s/cowdisk-%s-XXXXXX", tmp, test_name);
    if (mkdtemp(tu_scratch) == NULL) {
        tu_scratch[0] = '\0';
        FAIL("mkdtemp in %s: %s", tmp, strerror(errno));
    }
    printf("scratch directory: %s\n", tu_scratch);
    return tu_scratch;
}

/* Joins the scratch directory and a file name into `out`. */
static inline char *tu_path(char *out, size_t out_len, const char *name) {
    snprintf(out, out_len, "%s/%s", tu_scratch, name);
    return out;
}

/* Removes the scratch directory after a successful run. */
static inline void tu_finish(const char *test_name) {
    char cmd[TU_CMD];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tu_scratch);
    if (system(cmd) != 0)
        fprintf(stderr, "warning: could not remove %s\n", tu_scratch);
    printf("\nPASS %s: %d checks\n", test_name, tu_checks);
}

/* Runs `qemu-img check` on an image and fails unless it reports no errors and no
 * leaks (exit status 0). */
static inline void tu_qemu_img_check(const char *image) {
    char cmd[TU_CMD];
    snprintf(cmd, sizeof cmd, "qemu-img check -f qcow2 '%s' >'%s.check' 2>&1", image,
             image);
    int status = system(cmd);
    tu_checks++;
    if (status != 0) {
        snprintf(cmd, sizeof cmd, "cat '%s.check' >&2", image);
        if (system(cmd) != 0)
            fprintf(stderr, "(could not show qemu-img output)\n");
        FAIL("qemu-img check %s is not clean (wait status %d; exit code 1 = check "
             "failed, 2 = corruptions, 3 = leaks, 127 = qemu-img missing)",
             image, status);
    }
    printf("ok   qemu-img check reports no errors and no leaks in %s\n", image);
}

/* Runs `qemu-img compare` between a qcow2 image and a raw file; fails unless QEMU
 * reads identical contents. */
static inline void tu_qemu_img_compare(const char *image, const char *raw) {
    char cmd[TU_CMD];
    snprintf(cmd, sizeof cmd,
             "qemu-img compare -q -f qcow2 -F raw '%s' '%s' >'%s.compare' 2>&1", image,
             raw, image);
    int status = system(cmd);
    tu_checks++;
    if (status != 0) {
        snprintf(cmd, sizeof cmd, "cat '%s.compare' >&2", image);
        if (system(cmd) != 0)
            fprintf(stderr, "(could not show qemu-img output)\n");
        FAIL("qemu-img compare: QEMU reads %s differently from the expected contents "
             "in %s (wait status %d)",
             image, raw, status);
    }
    printf("ok   qemu-img compare: QEMU reads %s exactly as expected\n", image);
}

/* Writes `len` bytes to a new host file. */
static inline void tu_write_file(const char *path, const void *data, size_t len) {
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        FAIL("fopen %s: %s", path, strerror(errno));
    if (len > 0 && fwrite(data, 1, len, f) != len)
        FAIL("fwrite %s: %s", path, strerror(errno));
    if (fclose(f) != 0)
        FAIL("fclose %s: %s", path, strerror(errno));
}

/* Reads a whole host file into a malloc'ed buffer; stores its length in *len. */
static inline unsigned char *tu_read_file(const char *path, size_t *len) {
    struct stat st;
    if (stat(path, &st) != 0)
        FAIL("stat %s: %s", path, strerror(errno));
    unsigned char *buf = malloc(st.st_size ? (size_t)st.st_size : 1);
    if (buf == NULL)
        FAIL("out of memory");
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        FAIL("fopen %s: %s", path, strerror(errno));
    if (st.st_size > 0 && fread(buf, 1, (size_t)st.st_size, f) != (size_t)st.st_size)
        FAIL("fread %s", path);
    fclose(f);
    *len = (size_t)st.st_size;
    return buf;
}

/* Returns the offset of the first byte where a and b differ, or -1. */
static inline long long tu_first_diff(const unsigned char *a, const unsigned char *b, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (a[i] != b[i])
            return (long long)i;
    return -1;
}

#endif /* COWDISK_TESTUTIL_H */
