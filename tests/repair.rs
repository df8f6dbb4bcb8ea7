//! Lazy refcounts: an image QEMU left dirty (killed mid-run) has stale refcounts; a
//! read-write open rebuilds them, after which qemu-img check is clean and the data is
//! intact. A read-only open leaves the image untouched.

mod common;

use common::*;
use cowdisk::{Image, OpenOptions};

#[test]
fn dirty_lazy_refcount_image_is_repaired_on_read_write_open() {
    let s = Scratch::new("repair");
    let p = s.path("lazy.qcow2");
    let ps = p.to_str().unwrap();
    run_ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            ps,
            "64M",
        ],
    );
    run_ok("qemu-img", &["snapshot", "-c", "s1", ps]);
    // qemu-io kills itself after writing: refcounts stay in its cache, the dirty bit stays.
    // (A compressed write flushes QEMU's caches, so it goes first.)
    let (code, _, _) = run(
        "qemu-io",
        &[
            "-c",
            "write -c -P 9 20M 64k",
            "-c",
            "write -P 7 0 3M",
            "-c",
            "write -P 8 10M 64k",
            "-c",
            "sigraise 9",
            ps,
        ],
    );
    assert_ne!(code, 0, "qemu-io should have been killed");
    let (code, _, _) = run("qemu-img", &["check", ps]);
    assert_eq!(code, 2, "the killed image should have stale refcounts");
    let before = std::fs::read(&p).unwrap();

    // Read-only: no repair, nothing written, data readable.
    let img = Image::open(
        &p,
        &OpenOptions {
            read_only: true,
            ..OpenOptions::default()
        },
    )
    .unwrap();
    assert!(img.info().dirty);
    let mut buf = vec![0u8; 4096];
    img.read_at(&mut buf, 10 << 20).unwrap();
    assert!(buf.iter().all(|&b| b == 8));
    drop(img);
    assert!(
        std::fs::read(&p).unwrap() == before,
        "a read-only open changed the file"
    );

    // Read-write: repaired on open.
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    assert!(!img.info().dirty);
    img.write_at(&[1u8; 70000], 5 << 20).unwrap();
    img.close().unwrap();
    qemu_check_clean(&p);
    run_ok(
        "qemu-io",
        &[
            "-r",
            "-c",
            "read -P 7 0 3M",
            "-c",
            "read -P 8 10M 64k",
            "-c",
            "read -P 9 20M 64k",
            "-c",
            "read -P 1 5M 70000",
            ps,
        ],
    );
    run_ok("qemu-img", &["snapshot", "-a", "s1", ps]);
    qemu_check_clean(&p);
}
