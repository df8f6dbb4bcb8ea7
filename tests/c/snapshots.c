/*
 * C API test of internal snapshots and VM state: save_vmstate in small pieces,
 * finalize, snapshot_create with the state, list, goto (data and state come back),
 * delete, error cases; qemu-img lists our snapshots and checks every image.
 */
#include "testutil.h"

#define MIB (1ull << 20)
#define DISK_SIZE (8 * MIB)
#define STATE_SIZE (3 * MIB + 777)

static void fill(unsigned char *buf, size_t len, unsigned seed) {
    uint32_t x = seed * 2654435761u + 1u;
    for (size_t i = 0; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (unsigned char)x;
    }
}

static cowdisk *open_rw(const char *path) {
    cowdisk *img = NULL;
    CHECK_RC(cowdisk_open(path, NULL, &img), 0, "cowdisk_open read-write");
    return img;
}

int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    tu_make_scratch("snapshots");
    char image[TU_PATH];
    tu_path(image, sizeof image, "snap.qcow2");
    CHECK_RC(cowdisk_create(image, DISK_SIZE, NULL), 0, "create an 8 MiB image");

    unsigned char *disk_a = malloc(DISK_SIZE), *disk_b = malloc(DISK_SIZE);
    unsigned char *state = malloc(STATE_SIZE), *back = malloc(STATE_SIZE);
    if (!disk_a || !disk_b || !state || !back)
        FAIL("out of memory");
    fill(disk_a, DISK_SIZE, 1);
    fill(disk_b, DISK_SIZE, 2);
    fill(state, STATE_SIZE, 3);

    SECTION("savevm: state in small pieces, finalize, snapshot");
    cowdisk *img = open_rw(image);
    CHECK_RC(cowdisk_pwrite(img, disk_a, DISK_SIZE, 0), 0, "write disk contents A");
    size_t pos = 0, piece = 1;
    int rc = 0;
    while (pos < STATE_SIZE && rc == 0) {
        size_t n = piece < STATE_SIZE - pos ? piece : STATE_SIZE - pos;
        rc = cowdisk_save_vmstate(img, state + pos, n, pos);
        pos += n;
        piece = piece % 97 == 0 ? 4104 : piece + 13; /* tiny pieces and 4096+8 */
    }
    CHECK(rc == 0, "every save_vmstate succeeds");
    CHECK_RC(cowdisk_finalize_vmstate(img), 0, "finalize_vmstate writes everything");
    cowdisk_snapshot_opts opts;
    memset(&opts, 0, sizeof opts);
    opts.struct_size = sizeof opts;
    opts.vm_state_size = STATE_SIZE;
    opts.vm_clock_nsec = 42000000000ull;
    opts.icount = -1;
    CHECK_RC(cowdisk_snapshot_create(img, "first", &opts), 0, "snapshot with VM state");
    CHECK_RC(cowdisk_pwrite(img, disk_b, DISK_SIZE, 0), 0, "write disk contents B");
    CHECK_RC(cowdisk_snapshot_create(img, "second", NULL), 0, "disk-only snapshot");

    SECTION("list");
    size_t count = 99;
    CHECK_RC(cowdisk_snapshot_list(img, NULL, 0, &count), 0, "count only");
    CHECK(count == 2, "two snapshots");
    cowdisk_snapshot_info list[1];
    memset(list, 0x5A, sizeof list);
    list[0].struct_size = sizeof list[0];
    CHECK_RC(cowdisk_snapshot_list(img, list, 1, &count), 0, "list into a short array");
    CHECK(count == 2, "count says how many there are");
    CHECK(strcmp(list[0].id, "1") == 0 && strcmp(list[0].name, "first") == 0,
          "first entry is id 1 'first'");
    CHECK(list[0].vm_state_size == STATE_SIZE && list[0].vm_clock_nsec == 42000000000ull,
          "VM state size and clock recorded");
    CHECK(list[0].disk_size == DISK_SIZE && list[0].icount == -1, "disk size, no icount");
    CHECK(list[0].date_sec > 1600000000u, "date from the clock");
    CHECK_FAILS(cowdisk_snapshot_list(img, NULL, 1, &count), "NULL array with max > 0");
    CHECK_RC(cowdisk_close(img), 0, "close");
    tu_qemu_img_check(image);
    char cmd[TU_CMD];
    snprintf(cmd, sizeof cmd,
             "qemu-img info --output=json '%s' | grep -q '\"vm-state-size\": %llu'", image,
             (unsigned long long)STATE_SIZE);
    CHECK(system(cmd) == 0, "qemu-img info shows the VM state size");

    SECTION("loadvm: goto, then the state comes back");
    img = open_rw(image);
    CHECK_RC(cowdisk_snapshot_goto(img, "first"), 0, "goto 'first' by name");
    unsigned char *disk = malloc(DISK_SIZE);
    if (disk == NULL)
        FAIL("out of memory");
    CHECK_RC(cowdisk_pread(img, disk, DISK_SIZE, 0), 0, "read the disk");
    CHECK(tu_first_diff(disk, disk_a, DISK_SIZE) < 0, "disk is contents A again");
    memset(back, 0, STATE_SIZE);
    for (pos = 0; pos < STATE_SIZE; pos += 1000) {
        size_t n = STATE_SIZE - pos < 1000 ? STATE_SIZE - pos : 1000;
        rc = cowdisk_load_vmstate(img, back + pos, n, pos);
        if (rc != 0)
            break;
    }
    CHECK(rc == 0, "every load_vmstate succeeds");
    CHECK(tu_first_diff(back, state, STATE_SIZE) < 0, "VM state reads back byte-identical");
    CHECK_RC(cowdisk_snapshot_goto(img, "2"), 0, "goto by id");
    CHECK_RC(cowdisk_pread(img, disk, DISK_SIZE, 0), 0, "read the disk");
    CHECK(tu_first_diff(disk, disk_b, DISK_SIZE) < 0, "disk is contents B");

    SECTION("errors and delete");
    CHECK_RC(cowdisk_snapshot_goto(img, "nope"), -ENOENT, "goto an unknown snapshot");
    CHECK_RC(cowdisk_snapshot_delete(img, "nope"), -ENOENT, "delete an unknown snapshot");
    CHECK_RC(cowdisk_snapshot_create(img, NULL, NULL), -EINVAL, "NULL name");
    CHECK_RC(cowdisk_snapshot_create(NULL, "x", NULL), -EINVAL, "NULL handle");
    opts.struct_size = 4;
    CHECK_RC(cowdisk_snapshot_create(img, "x", &opts), -EINVAL, "bad struct_size");
    CHECK_RC(cowdisk_save_vmstate(img, NULL, 10, 0), -EINVAL, "NULL save buffer");
    CHECK_RC(cowdisk_snapshot_delete(img, "first"), 0, "delete 'first'");
    CHECK_RC(cowdisk_snapshot_delete(img, "1"), -ENOENT, "it is gone");
    CHECK_RC(cowdisk_snapshot_list(img, NULL, 0, &count), 0, "count");
    CHECK(count == 1, "one snapshot left");
    CHECK_RC(cowdisk_close(img), 0, "close");
    tu_qemu_img_check(image);

    SECTION("open a snapshot read-only");
    cowdisk_open_opts oo;
    memset(&oo, 0, sizeof oo);
    oo.struct_size = sizeof oo;
    oo.snapshot = "second";
    CHECK_RC(cowdisk_open(image, &oo, &img), -EINVAL, "a snapshot needs a read-only open");
    oo.flags = COWDISK_OPEN_READONLY;
    oo.snapshot = "nope";
    CHECK_RC(cowdisk_open(image, &oo, &img), -ENOENT, "an unknown snapshot");
    oo.snapshot = "second";
    CHECK_RC(cowdisk_open(image, &oo, &img), 0, "open snapshot 'second'");
    CHECK_RC(cowdisk_pread(img, disk, DISK_SIZE, 0), 0, "read it");
    CHECK(tu_first_diff(disk, disk_b, DISK_SIZE) < 0, "it shows contents B");
    CHECK_RC(cowdisk_pwrite(img, disk, 512, 0), -EROFS, "and refuses writes");
    CHECK_RC(cowdisk_close(img), 0, "close");

    free(disk);
    free(disk_a);
    free(disk_b);
    free(state);
    free(back);
    tu_finish("snapshots");
    return 0;
}
