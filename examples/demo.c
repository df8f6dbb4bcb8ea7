/*
 * A tour of the cowdisk C API: create an image, write at an offset that is not
 * aligned to anything, read it back, show the image's facts, then reopen it
 * read-only and see a write refused.
 *
 * Build (from the repository root, after `make`):
 *   cc -Iinclude -o demo examples/demo.c -Ltarget/release -lcowdisk \
 *      -Wl,-rpath,$PWD/target/release
 * Run:
 *   ./demo /tmp/demo.qcow2
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowdisk.h"

/* Prints a failed call with cowdisk's message and exits. */
static void die(const char *call, int rc) {
    fprintf(stderr, "%s failed: %s (%d): %s\n", call, cowdisk_strerror(rc), rc,
            cowdisk_last_error());
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s IMAGE.qcow2   (the file must not exist yet)\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    const uint64_t size = 64ull << 20;
    int rc;

    printf("libcowdisk %s\n", cowdisk_version());

    /* 1. Create a 64 MiB image with QEMU's defaults (v3, 64 KiB clusters). */
    if ((rc = cowdisk_create(path, size, NULL)) != 0)
        die("cowdisk_create", rc);
    printf("created %s (64 MiB virtual)\n", path);

    /* 2. Open it read-write and write a message across a cluster boundary. */
    cowdisk *img = NULL;
    if ((rc = cowdisk_open(path, NULL, &img)) != 0)
        die("cowdisk_open", rc);

    const char message[] = "Hello from cowdisk! This sentence straddles two 64 KiB clusters.";
    const uint64_t offset = 65536 - 20;
    if ((rc = cowdisk_pwrite(img, message, sizeof message, offset)) != 0)
        die("cowdisk_pwrite", rc);
    printf("wrote %zu bytes at offset %llu\n", sizeof message, (unsigned long long)offset);

    /* And 1 MiB of a repeating byte pattern at 1 MiB + 3. */
    static unsigned char block[1 << 20];
    memset(block, 0xAB, sizeof block);
    if ((rc = cowdisk_pwrite(img, block, sizeof block, (1u << 20) + 3)) != 0)
        die("cowdisk_pwrite", rc);
    printf("wrote 1 MiB of 0xab at offset %u\n", (1u << 20) + 3);

    /* 3. Read both back. */
    char back[sizeof message];
    if ((rc = cowdisk_pread(img, back, sizeof back, offset)) != 0)
        die("cowdisk_pread", rc);
    printf("read back: \"%s\"\n", back);
    if (memcmp(back, message, sizeof message) != 0) {
        fprintf(stderr, "data mismatch!\n");
        return 1;
    }
    static unsigned char block_back[1 << 20];
    if ((rc = cowdisk_pread(img, block_back, sizeof block_back, (1u << 20) + 3)) != 0)
        die("cowdisk_pread", rc);
    if (memcmp(block_back, block, sizeof block) != 0) {
        fprintf(stderr, "data mismatch in the 1 MiB block!\n");
        return 1;
    }
    printf("read back 1 MiB of 0xab: identical\n");

    /* 4. Facts about the image. */
    cowdisk_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    if ((rc = cowdisk_get_info(img, &info)) != 0)
        die("cowdisk_get_info", rc);
    printf("info: qcow2 v%u, virtual size %llu bytes, cluster size %u, %u-bit refcounts, "
           "%llu bytes on the host\n",
           info.version, (unsigned long long)info.virtual_size, info.cluster_size,
           info.refcount_bits, (unsigned long long)info.host_size);

    /* 5. Errors are negative errno values with a message. */
    rc = cowdisk_pread(img, back, sizeof back, size - 4);
    printf("reading past the end: %d (%s): %s\n", rc, cowdisk_strerror(rc),
           cowdisk_last_error());

    /* close flushes and returns the flush status. */
    if ((rc = cowdisk_close(img)) != 0)
        die("cowdisk_close", rc);

    /* 6. Reopen read-only: reads work, writes are refused. */
    cowdisk_open_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.struct_size = sizeof opts;
    opts.flags = COWDISK_OPEN_READONLY;
    if ((rc = cowdisk_open(path, &opts, &img)) != 0)
        die("cowdisk_open (read-only)", rc);
    memset(back, 0, sizeof back);
    if ((rc = cowdisk_pread(img, back, sizeof back, offset)) != 0)
        die("cowdisk_pread", rc);
    printf("after reopening read-only: \"%s\"\n", back);
    rc = cowdisk_pwrite(img, "x", 1, 0);
    printf("writing to the read-only handle: %d (%s): %s\n", rc, cowdisk_strerror(rc),
           cowdisk_last_error());
    if ((rc = cowdisk_close(img)) != 0)
        die("cowdisk_close", rc);
    printf("closed\n");
    return 0;
}
