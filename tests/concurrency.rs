//! Many threads on one handle: interleaved 512-byte sectors written into the same fresh
//! clusters (and into clusters shared with a qemu-img snapshot) are all kept.

mod common;

use common::*;
use cowdisk::{CreateOptions, Image, OpenOptions};
use std::sync::Arc;

const THREADS: u64 = 8;

fn sector(thread: u64, index: u64) -> Vec<u8> {
    let mut v = vec![0u8; 512];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (thread as u8).wrapping_mul(37) ^ (index as u8) ^ (i as u8);
    }
    v
}

/// Thread t writes sectors t, t+8, t+16 … of the first `sectors` sectors.
fn hammer(img: &Arc<Image>, sectors: u64) {
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut i = t;
                while i < sectors {
                    img.write_at(&sector(t, i), i * 512).unwrap();
                    i += THREADS;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let mut all = vec![0u8; (sectors * 512) as usize];
    img.read_at(&mut all, 0).unwrap();
    for i in 0..sectors {
        let got = &all[(i * 512) as usize..((i + 1) * 512) as usize];
        assert!(
            got == sector(i % THREADS, i).as_slice(),
            "sector {i} lost or mixed"
        );
    }
}

#[test]
fn interleaved_sectors_into_fresh_clusters() {
    // Many rounds: races show up as lost or mixed sectors in some of them.
    for round in 0..24 {
        let s = Scratch::new("conc");
        let p = s.path("c.qcow2");
        let cs = [512u32, 4096, 65536][round % 3];
        Image::create(
            &p,
            64 << 20,
            &CreateOptions {
                cluster_size: cs,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let img = Arc::new(Image::open(&p, &OpenOptions::default()).unwrap());
        hammer(&img, 4096);
        Arc::try_unwrap(img).ok().unwrap().close().unwrap();
        qemu_check_clean(&p);
    }
}

#[test]
fn interleaved_sectors_into_snapshot_shared_clusters() {
    let s = Scratch::new("conc-snap");
    let p = s.path("c.qcow2");
    Image::create(&p, 64 << 20, &CreateOptions::default()).unwrap();
    run_ok(
        "qemu-io",
        &["-c", "write -P 0x3c 0 4M", p.to_str().unwrap()],
    );
    run_ok(
        "qemu-img",
        &["snapshot", "-c", "before", p.to_str().unwrap()],
    );
    let img = Arc::new(Image::open(&p, &OpenOptions::default()).unwrap());
    hammer(&img, 4096);
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    qemu_check_clean(&p);
    run_ok(
        "qemu-img",
        &["snapshot", "-a", "before", p.to_str().unwrap()],
    );
    run_ok(
        "qemu-io",
        &["-r", "-c", "read -P 0x3c 0 4M", p.to_str().unwrap()],
    );
}
