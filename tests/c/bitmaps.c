/*
 * C API test of persistent dirty bitmaps: add (default, disabled, 512-byte
 * granularity), writes set the bits of the enabled ones, list (dirty_bytes, short
 * struct_size), extents (also a few at a time), enable/disable, clear, merge (same
 * and other image), remove, errors; close, reopen and check what persisted; a
 * bitmap in use on disk reads as inconsistent; bitmaps added by `qemu-img bitmap`
 * are listed and kept, and qemu-img checks every image.
 */
#include <stddef.h>

#include "testutil.h"

#define KIB 1024ull
#define MIB (1ull << 20)
#define DISK_SIZE (4 * MIB)
#define MAX_BITMAPS 8

static cowdisk *open_flags(const char *path, uint32_t flags) {
    cowdisk_open_opts o;
    memset(&o, 0, sizeof o);
    o.struct_size = sizeof o;
    o.flags = flags;
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(path, &o, &img), 0, "cowdisk_open");
    return img;
}

/* Lists the bitmaps of `img` into `out` (MAX_BITMAPS entries); returns how many. */
static size_t list(cowdisk *img, cowdisk_bitmap_info *out) {
    memset(out, 0x5A, MAX_BITMAPS * sizeof *out);
    out[0].struct_size = sizeof *out;
    size_t count = 0;
    CHECK_RC(cowdisk_bitmap_list(img, out, MAX_BITMAPS, &count), 0, "cowdisk_bitmap_list");
    CHECK(count <= MAX_BITMAPS, "no more bitmaps than the array holds");
    return count;
}

/* The entry named `name` in a list of `n`; fails when absent. */
static const cowdisk_bitmap_info *find(const cowdisk_bitmap_info *l, size_t n, const char *name) {
    for (size_t i = 0; i < n; i++)
        if (strcmp(l[i].name, name) == 0)
            return &l[i];
    FAIL("bitmap '%s' is not listed", name);
}

static uint64_t dirty_bytes(cowdisk *img, const char *name) {
    cowdisk_bitmap_info l[MAX_BITMAPS];
    size_t n = list(img, l);
    return find(l, n, name)->dirty_bytes;
}

struct run {
    uint64_t start, length;
    int dirty;
};

/* Checks that the extents of bitmap `name` over the whole disk are exactly `want`
 * (`nwant` runs), fetching them `per_call` at a time. */
static void check_runs(cowdisk *img, const char *name, const struct run *want, size_t nwant,
                       size_t per_call, const char *what) {
    cowdisk_extent ext[16];
    size_t got = 0;
    uint64_t at = 0;
    while (at < DISK_SIZE) {
        size_t count = 0;
        memset(ext, 0x5A, sizeof ext);
        int rc = cowdisk_bitmap_extents(img, name, at, DISK_SIZE - at, ext, per_call, &count);
        if (rc != 0)
            FAIL("%s: cowdisk_bitmap_extents at %llu returned %d: %s", what,
                 (unsigned long long)at, rc, cowdisk_last_error());
        if (count == 0 || count > per_call)
            FAIL("%s: %zu extents at %llu (at most %zu asked)", what, count,
                 (unsigned long long)at, per_call);
        for (size_t i = 0; i < count; i++) {
            if (ext[i].start != at)
                FAIL("%s: extent starts at %llu, expected %llu", what,
                     (unsigned long long)ext[i].start, (unsigned long long)at);
            if (ext[i].offset != 0 || ext[i].depth != 0 ||
                (ext[i].flags != 0 && ext[i].flags != COWDISK_EXTENT_DIRTY))
                FAIL("%s: extent %llu has offset %llu, depth %u, flags %#x", what,
                     (unsigned long long)at, (unsigned long long)ext[i].offset,
                     ext[i].depth, ext[i].flags);
            int dirty = ext[i].flags == COWDISK_EXTENT_DIRTY;
            if (got >= nwant)
                FAIL("%s: more extents than the %zu expected", what, nwant);
            if (ext[i].start != want[got].start || ext[i].length != want[got].length ||
                dirty != want[got].dirty)
                FAIL("%s: extent %zu is [%llu, +%llu) %s, expected [%llu, +%llu) %s", what,
                     got, (unsigned long long)ext[i].start,
                     (unsigned long long)ext[i].length, dirty ? "dirty" : "clean",
                     (unsigned long long)want[got].start,
                     (unsigned long long)want[got].length, want[got].dirty ? "dirty" : "clean");
            got++;
            at += ext[i].length;
        }
    }
    tu_checks++;
    if (got != nwant)
        FAIL("%s: %zu extents, expected %zu", what, got, nwant);
    printf("ok   %s\n", what);
}

static int have_qemu_img(void) {
    return system("qemu-img --version >/dev/null 2>&1") == 0;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("bitmaps");
    char image[TU_PATH], other[TU_PATH], copy[TU_PATH], cmd[TU_CMD];
    tu_path(image, sizeof image, "bitmaps.qcow2");
    tu_path(other, sizeof other, "other.qcow2");
    tu_path(copy, sizeof copy, "copy.qcow2");
    int qemu = have_qemu_img();
    unsigned char *buf = malloc(64 * KIB);
    if (buf == NULL)
        FAIL("out of memory");
    memset(buf, 0xC5, 64 * KIB);

    SECTION("add");
    CHECK_RC(cowdisk_create(image, DISK_SIZE, NULL), 0, "create a 4 MiB image");
    cowdisk *img = open_flags(image, 0);
    size_t count = 99;
    CHECK_RC(cowdisk_bitmap_list(img, NULL, 0, &count), 0, "count the bitmaps");
    CHECK(count == 0, "a new image has no bitmaps");
    CHECK_RC(cowdisk_bitmap_add(img, "a", 0, 0), 0, "add 'a' (default granularity)");
    CHECK_RC(cowdisk_bitmap_add(img, "b", 0, COWDISK_BITMAP_ADD_DISABLED), 0,
             "add 'b' disabled");
    CHECK_RC(cowdisk_bitmap_add(img, "fine", 512, 0), 0, "add 'fine' (512-byte granularity)");
    CHECK_RC(cowdisk_bitmap_add(img, "a", 0, 0), -EINVAL, "a second 'a' is refused");
    CHECK_RC(cowdisk_bitmap_add(img, "odd", 1000, 0), -EINVAL,
             "a granularity that is not a power of two is refused");
    CHECK_RC(cowdisk_bitmap_add(img, "tiny", 256, 0), -EINVAL,
             "a granularity below 512 is refused");
    CHECK_RC(cowdisk_bitmap_add(img, "", 0, 0), -EINVAL, "an empty name is refused");
    CHECK_RC(cowdisk_bitmap_add(img, "flags", 0, 2), -EINVAL, "unknown add flags are refused");
    CHECK_RC(cowdisk_bitmap_add(img, NULL, 0, 0), -EINVAL, "a NULL name is refused");
    CHECK_RC(cowdisk_bitmap_add(NULL, "x", 0, 0), -EINVAL, "a NULL handle is refused");
    char long_name[1100];
    memset(long_name, 'n', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    CHECK_RC(cowdisk_bitmap_add(img, long_name, 0, 0), -EINVAL,
             "a name longer than 1023 bytes is refused");
    long_name[1023] = '\0';
    CHECK_RC(cowdisk_bitmap_add(img, long_name, 0, 0), 0, "a 1023-byte name is accepted");

    SECTION("list");
    cowdisk_bitmap_info l[MAX_BITMAPS];
    size_t n = list(img, l);
    CHECK(n == 4, "four bitmaps");
    CHECK(strcmp(l[0].name, "a") == 0 && strcmp(l[1].name, "b") == 0 &&
              strcmp(l[2].name, "fine") == 0 && strcmp(l[3].name, long_name) == 0,
          "listed in the order they were added, long name whole");
    CHECK(l[0].struct_size == sizeof l[0], "struct_size written back");
    CHECK(l[0].flags == COWDISK_BITMAP_ENABLED && l[0].granularity == 64 * KIB,
          "'a' is enabled, granularity 64 KiB (the cluster size)");
    CHECK(l[1].flags == 0 && l[1].granularity == 64 * KIB, "'b' is disabled");
    CHECK(l[2].flags == COWDISK_BITMAP_ENABLED && l[2].granularity == 512,
          "'fine' has granularity 512");
    CHECK(l[0].dirty_bytes == 0 && l[1].dirty_bytes == 0 && l[2].dirty_bytes == 0,
          "new bitmaps are clean");
    cowdisk_bitmap_info two[2];
    memset(two, 0x5A, sizeof two);
    two[0].struct_size = sizeof two[0];
    CHECK_RC(cowdisk_bitmap_list(img, two, 1, &count), 0, "list into a short array");
    CHECK(count == 4 && strcmp(two[0].name, "a") == 0, "count is the total, first entry written");
    CHECK(two[1].struct_size == 0x5A5A5A5Au, "nothing written past max");
    /* An older caller's struct without dirty_bytes and name: 16 bytes per element. */
    unsigned char small[3 * 16 + 8];
    memset(small, 0x5A, sizeof small);
    uint32_t size16 = 16;
    memcpy(small, &size16, sizeof size16);
    CHECK_RC(cowdisk_bitmap_list(img, (cowdisk_bitmap_info *)(void *)small, 3, &count), 0,
             "list with struct_size 16");
    uint64_t g;
    memcpy(&g, small + 2 * 16 + 8, sizeof g);
    CHECK(count == 4 && g == 512, "third element at stride 16 has granularity 512");
    CHECK(small[3 * 16] == 0x5A && small[3 * 16 + 7] == 0x5A, "nothing written past 3 * 16 bytes");
    CHECK_RC(cowdisk_bitmap_list(img, NULL, 1, &count), -EINVAL, "NULL out with max > 0");
    CHECK_RC(cowdisk_bitmap_list(img, l, 1, NULL), -EINVAL, "NULL count");
    l[0].struct_size = 4;
    CHECK_RC(cowdisk_bitmap_list(img, l, 1, &count), -EINVAL, "struct_size 4 is refused");
    CHECK_RC(cowdisk_bitmap_remove(img, long_name), 0, "remove the long-named bitmap");

    SECTION("writes set the bits of enabled bitmaps");
    CHECK_RC(cowdisk_pwrite(img, buf, 4 * KIB, MIB + 512), 0, "write 4 KiB at 1 MiB + 512");
    CHECK(dirty_bytes(img, "a") == 64 * KIB, "'a': the one 64 KiB granule written is dirty");
    CHECK(dirty_bytes(img, "b") == 0, "'b' (disabled) stays clean");
    CHECK(dirty_bytes(img, "fine") == 4 * KIB, "'fine': exactly the 4 KiB written");
    const struct run fine1[] = {
        {0, MIB + 512, 0}, {MIB + 512, 4 * KIB, 1}, {MIB + 512 + 4 * KIB, DISK_SIZE - MIB - 512 - 4 * KIB, 0}};
    check_runs(img, "fine", fine1, 3, 16, "'fine' extents: clean, the 4 KiB written, clean");
    check_runs(img, "fine", fine1, 3, 1, "the same, one extent per call");
    const struct run a1[] = {{0, MIB, 0}, {MIB, 64 * KIB, 1}, {MIB + 64 * KIB, 3 * MIB - 64 * KIB, 0}};
    check_runs(img, "a", a1, 3, 16, "'a' extents: the 64 KiB granule");
    const struct run all_clean[] = {{0, DISK_SIZE, 0}};
    check_runs(img, "b", all_clean, 1, 16, "'b' extents: one clean run");

    cowdisk_extent ext[4];
    CHECK_RC(cowdisk_bitmap_extents(img, "fine", MIB, 1024, ext, 4, &count), 0,
             "extents of a 1 KiB range");
    CHECK(count == 2 && ext[0].start == MIB && ext[0].length == 512 && ext[0].flags == 0 &&
              ext[1].start == MIB + 512 && ext[1].length == 512 &&
              ext[1].flags == COWDISK_EXTENT_DIRTY,
          "clamped to the range asked");
    CHECK_RC(cowdisk_bitmap_extents(img, "fine", DISK_SIZE, 512, ext, 4, &count), 0,
             "extents at the virtual size");
    CHECK(count == 0, "none at the end");
    CHECK_RC(cowdisk_bitmap_extents(img, "fine", DISK_SIZE + 512, 512, ext, 4, &count), -EINVAL,
             "extents past the end");
    CHECK_RC(cowdisk_bitmap_extents(img, "fine", 0, DISK_SIZE, ext, 0, &count), -EINVAL,
             "max_extents 0");
    CHECK_RC(cowdisk_bitmap_extents(img, "fine", 0, DISK_SIZE, NULL, 4, &count), -EINVAL,
             "NULL extents");
    CHECK_RC(cowdisk_bitmap_extents(img, "fine", 0, DISK_SIZE, ext, 4, NULL), -EINVAL,
             "NULL count");
    CHECK_RC(cowdisk_bitmap_extents(img, "nope", 0, DISK_SIZE, ext, 4, &count), -ENOENT,
             "extents of a missing bitmap");
    CHECK_RC(cowdisk_bitmap_extents(img, NULL, 0, DISK_SIZE, ext, 4, &count), -EINVAL,
             "extents with a NULL name");

    SECTION("enable, disable");
    CHECK_RC(cowdisk_bitmap_enable(img, "b", 1), 0, "enable 'b'");
    CHECK_RC(cowdisk_pwrite(img, buf, 64 * KIB, 2 * MIB), 0, "write 64 KiB at 2 MiB");
    CHECK(dirty_bytes(img, "b") == 64 * KIB, "'b' records it");
    CHECK_RC(cowdisk_bitmap_enable(img, "b", 0), 0, "disable 'b'");
    CHECK_RC(cowdisk_write_zeroes(img, 3 * MIB, 64 * KIB, 0), 0, "write zeroes at 3 MiB");
    CHECK(dirty_bytes(img, "b") == 64 * KIB, "'b' no longer records");
    CHECK(dirty_bytes(img, "a") == 3 * 64 * KIB, "'a' records writes and zeroes");
    n = list(img, l);
    CHECK(find(l, n, "b")->flags == 0, "'b' is listed disabled");
    CHECK_RC(cowdisk_bitmap_enable(img, "nope", 1), -ENOENT, "enable a missing bitmap");

    SECTION("merge");
    CHECK_RC(cowdisk_bitmap_merge(img, "fine", NULL, "b"), 0, "merge 'b' into 'fine'");
    CHECK(dirty_bytes(img, "fine") == 4 * KIB + 64 * KIB + 64 * KIB,
          "'fine' has its bits, those of 'b' and the zeroes at 3 MiB");
    CHECK(dirty_bytes(img, "b") == 64 * KIB, "the source is unchanged");
    CHECK_RC(cowdisk_create(other, DISK_SIZE, NULL), 0, "create a second image");
    cowdisk *img2 = open_flags(other, 0);
    CHECK_RC(cowdisk_bitmap_add(img2, "o", 4096, 0), 0, "add 'o' to it");
    CHECK_RC(cowdisk_pwrite(img2, buf, 4 * KIB, 0), 0, "write 4 KiB at 0 there");
    CHECK_RC(cowdisk_bitmap_merge(img, "b", img2, "o"), 0, "merge 'o' of the other image into 'b'");
    const struct run b2[] = {{0, 64 * KIB, 1}, {64 * KIB, 2 * MIB - 64 * KIB, 0},
                             {2 * MIB, 64 * KIB, 1}, {2 * MIB + 64 * KIB, 2 * MIB - 64 * KIB, 0}};
    check_runs(img, "b", b2, 4, 16, "'b' covers the 4 KiB of 'o' with one 64 KiB granule");
    CHECK_RC(cowdisk_bitmap_merge(img, "b", img2, "b"), -ENOENT, "merge from a missing source");
    CHECK_RC(cowdisk_bitmap_merge(img, "nope", NULL, "a"), -ENOENT, "merge into a missing target");
    CHECK_RC(cowdisk_bitmap_merge(img, "b", NULL, NULL), -EINVAL, "merge with a NULL source name");
    CHECK_RC(cowdisk_close(img2), 0, "close the second image");

    SECTION("clear, remove");
    CHECK_RC(cowdisk_bitmap_clear(img, "a"), 0, "clear 'a'");
    CHECK(dirty_bytes(img, "a") == 0, "'a' is clean");
    check_runs(img, "a", all_clean, 1, 16, "'a' extents: one clean run");
    CHECK_RC(cowdisk_pwrite(img, buf, 512, 0), 0, "write 512 bytes at 0");
    CHECK(dirty_bytes(img, "a") == 64 * KIB, "'a' records writes after the clear");
    CHECK_RC(cowdisk_bitmap_add(img, "tmp", 0, 0), 0, "add 'tmp'");
    CHECK_RC(cowdisk_bitmap_remove(img, "tmp"), 0, "remove 'tmp'");
    CHECK_RC(cowdisk_bitmap_remove(img, "tmp"), -ENOENT, "remove it again");
    CHECK_RC(cowdisk_bitmap_clear(img, "tmp"), -ENOENT, "clear a removed bitmap");
    n = list(img, l);
    CHECK(n == 3, "three bitmaps left");
    CHECK_RC(cowdisk_close(img), 0, "close stores the bitmaps");
    if (qemu) {
        tu_qemu_img_check(image);
        tu_qemu_img_check(other);
        snprintf(cmd, sizeof cmd,
                 "qemu-img info --output=json '%s' | grep -q '\"name\": \"fine\"'", image);
        CHECK(system(cmd) == 0, "qemu-img info lists the bitmap 'fine'");
    }

    SECTION("reopen: the bitmaps persisted");
    img = open_flags(image, COWDISK_OPEN_READONLY);
    n = list(img, l);
    CHECK(n == 3, "three bitmaps");
    const cowdisk_bitmap_info *a = find(l, n, "a"), *b = find(l, n, "b"), *f = find(l, n, "fine");
    CHECK(a->flags == COWDISK_BITMAP_ENABLED && a->dirty_bytes == 64 * KIB, "'a' enabled, 64 KiB dirty");
    CHECK(b->flags == 0 && b->dirty_bytes == 128 * KIB, "'b' disabled, 128 KiB dirty");
    CHECK(f->flags == COWDISK_BITMAP_ENABLED && f->granularity == 512 &&
              f->dirty_bytes == 4 * KIB + 128 * KIB + 512,
          "'fine' enabled, granularity 512, its bits");
    check_runs(img, "b", b2, 4, 16, "'b' extents as before the close");
    CHECK_RC(cowdisk_bitmap_add(img, "ro", 0, 0), -EROFS, "add on a read-only handle");
    CHECK_RC(cowdisk_bitmap_clear(img, "a"), -EROFS, "clear on a read-only handle");
    CHECK_RC(cowdisk_close(img), 0, "close the read-only handle");

    SECTION("in use on disk: inconsistent");
    img = open_flags(image, COWDISK_OPEN_DROP_BITMAPS);
    CHECK(dirty_bytes(img, "a") == 64 * KIB, "COWDISK_OPEN_DROP_BITMAPS keeps readable bitmaps");
    snprintf(cmd, sizeof cmd, "cp '%s' '%s'", image, copy);
    CHECK(system(cmd) == 0, "copy the image while it is open read-write");
    CHECK_RC(cowdisk_close(img), 0, "close the original");
    img = open_flags(copy, 0);
    n = list(img, l);
    CHECK(n == 3, "the copy has three bitmaps");
    CHECK(find(l, n, "a")->flags == (COWDISK_BITMAP_ENABLED | COWDISK_BITMAP_INCONSISTENT) &&
              find(l, n, "a")->dirty_bytes == 0,
          "'a' of the copy is inconsistent (in use when copied)");
    CHECK(find(l, n, "b")->flags == COWDISK_BITMAP_INCONSISTENT, "so is 'b'");
    CHECK_RC(cowdisk_bitmap_clear(img, "a"), -ENOTSUP, "an inconsistent bitmap cannot be cleared");
    CHECK_RC(cowdisk_bitmap_extents(img, "a", 0, DISK_SIZE, ext, 4, &count), -ENOTSUP,
             "nor read");
    CHECK_RC(cowdisk_bitmap_remove(img, "a"), 0, "but it can be removed");
    CHECK_RC(cowdisk_close(img), 0, "close the copy");
    if (qemu)
        tu_qemu_img_check(copy);

    SECTION("bitmaps of qemu-img");
    if (!qemu) {
        printf("skip qemu-img not found\n");
    } else {
        char q[TU_PATH];
        tu_path(q, sizeof q, "qemu.qcow2");
        snprintf(cmd, sizeof cmd,
                 "qemu-img create -q -f qcow2 '%s' 4M && qemu-img bitmap --add -g 65536 '%s' qb "
                 "&& qemu-img bitmap --add --disable '%s' qd",
                 q, q, q);
        CHECK(system(cmd) == 0, "qemu-img creates an image with bitmaps 'qb' and 'qd'");
        img = open_flags(q, 0);
        n = list(img, l);
        CHECK(n == 2, "cowdisk lists two bitmaps");
        CHECK(strcmp(l[0].name, "qb") == 0 && l[0].flags == COWDISK_BITMAP_ENABLED &&
                  l[0].granularity == 65536 && l[0].dirty_bytes == 0,
              "'qb': enabled, 64 KiB granularity, clean");
        CHECK(strcmp(l[1].name, "qd") == 0 && l[1].flags == 0, "'qd': disabled");
        CHECK_RC(cowdisk_pwrite(img, buf, 64 * KIB, MIB), 0, "write 64 KiB at 1 MiB");
        CHECK_RC(cowdisk_close(img), 0, "close");
        tu_qemu_img_check(q);
        snprintf(cmd, sizeof cmd, "qemu-img bitmap --add '%s' qn && qemu-img bitmap --merge qb '%s' qn",
                 q, q);
        CHECK(system(cmd) == 0, "qemu-img adds 'qn' and merges 'qb' into it");
        img = open_flags(q, COWDISK_OPEN_READONLY);
        n = list(img, l);
        CHECK(n == 3 && find(l, n, "qb")->dirty_bytes == 64 * KIB &&
                  find(l, n, "qn")->dirty_bytes == 64 * KIB && find(l, n, "qd")->dirty_bytes == 0,
              "the bits cowdisk stored are what qemu-img merged");
        const struct run q1[] = {{0, MIB, 0}, {MIB, 64 * KIB, 1}, {MIB + 64 * KIB, 3 * MIB - 64 * KIB, 0}};
        check_runs(img, "qn", q1, 3, 16, "'qn' extents: the 64 KiB written");
        CHECK_RC(cowdisk_close(img), 0, "close");
    }

    free(buf);
    tu_finish("bitmaps");
    return 0;
}
