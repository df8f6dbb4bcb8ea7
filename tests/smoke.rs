mod common;
use common::*;
use cowdisk::{CreateOptions, Image, OpenOptions};

#[test]
fn smoke() {
    let s = Scratch::new("smoke");
    let p = s.path("a.qcow2");
    Image::create(&p, 64 << 20, &CreateOptions::default()).unwrap();
    qemu_check_clean(&p);
    let img = Image::open(&p, &OpenOptions::default()).unwrap();
    let data = vec![0xabu8; 100000];
    img.write_at(&data, 12345).unwrap();
    let mut back = vec![0u8; 100000];
    img.read_at(&mut back, 12345).unwrap();
    assert_eq!(back, data);
    img.close().unwrap();
    qemu_check_clean(&p);
    run_ok(
        "qemu-io",
        &["-r", "-c", "read -P 0xab 12345 100000", p.to_str().unwrap()],
    );
}
