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
    for round in 0..rounds() * 4 {
        let s = Scratch::new("conc");
        let p = s.path("c.qcow2");
        let cs = [512u32, 4096, 65536][(round % 3) as usize];
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

// ---------------------------------------------------------------------------------
// Reads, writes, zeroes and discards racing on one handle. Every sector is stamped
// with its index and a version, so a reader can tell old data, new data, zeros and
// garbage (another sector's bytes, an unwritten or reused cluster) apart.
//
// A read racing an in-place write of the same sector may see part of the old and part
// of the new stamp: Linux copies page-cache data without locking out readers, and a
// disk gives no more than that either. So a sector is 32 units of 16 bytes, each a tag
// of the sector's index (no zero bytes) and the version: every unit must carry the
// sector's tag, whatever its version; only the end state must be exact.

const SECTOR: u64 = 512;
/// Writers of single sectors; writer t owns the sectors ≡ t (mod SECTOR_WRITERS) of the
/// first half of the disk.
const SECTOR_WRITERS: u64 = 6;
const DISK: u64 = 8 << 20;
/// The second half belongs to one writer of multi-cluster runs.
const BULK_START: u64 = DISK / 2;

/// The version the zapper's compressed writes carry.
const ZAPPED: u64 = u64::MAX - 1;
/// The version of data written compressed before a race.
const PREFILLED: u64 = u64::MAX;

/// The tag of sector `index`: 8 bytes derived from it, none of them 0.
fn tag(index: u64) -> [u8; 8] {
    let x = (index + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x.to_le_bytes().map(|b| b.max(1))
}

fn stamped(index: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(SECTOR as usize);
    for _ in 0..SECTOR / 16 {
        v.extend_from_slice(&tag(index));
        v.extend_from_slice(&version.to_le_bytes());
    }
    v
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Seen {
    /// All zeros.
    Zero,
    /// One whole stamp.
    Version(u64),
    /// Parts of this sector's stamps (and, where `zeros_ok`, zeros): a read that raced
    /// a write of the same sector.
    Torn,
    /// Anything else: bytes that never belonged to this sector.
    Garbage,
}

fn seen(index: u64, bytes: &[u8], zeros_ok: bool) -> Seen {
    if bytes.iter().all(|&b| b == 0) {
        return Seen::Zero;
    }
    let t = tag(index);
    let first = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    let mut whole = true;
    for unit in bytes.chunks(16) {
        for (k, &b) in unit[..8].iter().enumerate() {
            if b != t[k] && !(zeros_ok && b == 0) {
                return Seen::Garbage;
            }
        }
        whole &= unit[..8] == t && unit[8..] == first.to_le_bytes();
    }
    if whole {
        Seen::Version(first)
    } else {
        Seen::Torn
    }
}

/// Where a garbage sector's units came from, for the failure message.
fn describe(index: u64, bytes: &[u8]) -> String {
    let units: Vec<String> = bytes
        .chunks(16)
        .map(|u| {
            let v = u64::from_le_bytes(u[8..].try_into().unwrap());
            if u[..8] == tag(index) {
                format!("v{v}")
            } else if u.iter().all(|&b| b == 0) {
                "0".into()
            } else {
                format!("foreign({:02x?}, v{v})", &u[..8])
            }
        })
        .collect();
    // Runs of equal units as "n× unit".
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < units.len() {
        let n = units[i..].iter().take_while(|u| **u == units[i]).count();
        out.push(format!("{n}× {}", units[i]));
        i += n;
    }
    out.join(", ")
}

/// Creates an empty image of the race's size.
fn create_disk(p: &std::path::Path, cs: u32) {
    let opts = CreateOptions {
        cluster_size: cs,
        ..CreateOptions::default()
    };
    Image::create(p, DISK, &opts).unwrap();
}

/// Sector `index` of a whole-disk buffer.
fn sector_of(all: &[u8], index: u64) -> &[u8] {
    &all[(index * SECTOR) as usize..((index + 1) * SECTOR) as usize]
}

/// Rounds of each race (`COWDISK_STRESS_ROUNDS`, default 6; `make stress` runs many).
fn rounds() -> u64 {
    std::env::var("COWDISK_STRESS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

/// What the racing threads do besides writing stamped sectors.
#[derive(Clone, Copy, PartialEq)]
enum Race {
    /// Readers only: every sector reads as its old or its new stamp.
    Reads,
    /// Readers plus a thread issuing write_zeroes and discard: sectors may also read
    /// as zeros.
    ZeroesAndDiscards,
}

/// Runs the writers (single sectors in the first half, multi-cluster runs in the
/// second), two readers and, for `Race::ZeroesAndDiscards`, a zapper, on one handle.
/// Returns the last version each sector was given (0: not written).
fn race(img: &Arc<Image>, race: Race, seed: u64, ops: u64) -> Vec<u64> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sectors = DISK / SECTOR;
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for t in 0..SECTOR_WRITERS {
        let img = img.clone();
        writers.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ ((t + 1) * 7919));
            let mut last = vec![(0u64, 0u64); 0];
            let owned = BULK_START / SECTOR / SECTOR_WRITERS;
            for op in 1..=ops {
                let index = rng.below(owned) * SECTOR_WRITERS + t;
                img.write_at(&stamped(index, op), index * SECTOR).unwrap();
                last.push((index, op));
            }
            last
        }));
    }
    {
        let img = img.clone();
        writers.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0xB01C);
            let mut last = Vec::new();
            let first = BULK_START / SECTOR;
            let span = (DISK - BULK_START) / SECTOR;
            for op in 1..=ops / 4 {
                let len = 1 + rng.below(300);
                let start = first + rng.below(span - len + 1);
                let mut data = Vec::with_capacity((len * SECTOR) as usize);
                for index in start..start + len {
                    data.extend_from_slice(&stamped(index, op));
                    last.push((index, op));
                }
                img.write_at(&data, start * SECTOR).unwrap();
            }
            last
        }));
    }
    let zapper = (race == Race::ZeroesAndDiscards).then(|| {
        let img = img.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0x2A9);
            while !stop.load(Ordering::Relaxed) {
                let len = (1 + rng.below(400)) * SECTOR;
                let off = rng.below((DISK - len) / SECTOR + 1) * SECTOR;
                // (No compressed writes with 512-byte clusters: too slow on the slow disk.)
                let kinds = if img.info().cluster_size >= 4096 {
                    4
                } else {
                    3
                };
                match rng.below(kinds) {
                    0 => img.discard(off, len).unwrap(),
                    1 => img.write_zeroes(off, len, true).unwrap(),
                    2 => img.write_zeroes(off, len, false).unwrap(),
                    _ => {
                        // Whole clusters released and written compressed again (new
                        // compressed data may land where freed compressed data was).
                        let cs = img.info().cluster_size as u64;
                        let at = off / cs * cs;
                        let n = (len / cs).clamp(1, 4).min((DISK - at) / cs);
                        img.discard(at, n * cs).unwrap();
                        let mut data = Vec::new();
                        for index in at / SECTOR..(at + n * cs) / SECTOR {
                            data.extend_from_slice(&stamped(index, ZAPPED));
                        }
                        // A writer may have taken a cluster meanwhile: then nothing is
                        // written (compressed writes need unallocated clusters).
                        let _ = img.write_compressed(&data, at);
                    }
                }
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        })
    });
    let readers: Vec<_> = (0..2)
        .map(|r| {
            let img = img.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (r + 100));
                let mut checked = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let len = 1 + rng.below(400);
                    let start = rng.below(sectors - len + 1);
                    let mut buf = vec![0u8; (len * SECTOR) as usize];
                    img.read_at(&mut buf, start * SECTOR).unwrap();
                    for (k, chunk) in buf.chunks(SECTOR as usize).enumerate() {
                        let index = start + k as u64;
                        match seen(index, chunk, race == Race::ZeroesAndDiscards) {
                            Seen::Garbage => panic!(
                                "reader saw garbage in sector {index} (seed {seed}): {}",
                                describe(index, chunk)
                            ),
                            Seen::Zero if race == Race::Reads => {
                                panic!("reader saw zeros in sector {index} (never zeroed)")
                            }
                            _ => checked += 1,
                        }
                    }
                }
                checked
            })
        })
        .collect();
    let mut last = vec![0u64; sectors as usize];
    for w in writers {
        for (index, op) in w.join().unwrap() {
            last[index as usize] = op;
        }
    }
    stop.store(true, Ordering::Relaxed);
    if let Some(z) = zapper {
        z.join().unwrap();
    }
    for r in readers {
        assert!(r.join().unwrap() > 0, "a reader checked nothing");
    }
    last
}

/// Opens the image for a race; `direct` uses O_DIRECT, otherwise every request goes
/// through a slow disk (each read sleeps 1 ms first, each write 0.05 ms), which widens the
/// window between planning a request and its I/O where races hide.
fn open_for_race(p: &std::path::Path, direct: bool) -> Arc<Image> {
    let opts = OpenOptions {
        direct,
        ..OpenOptions::default()
    };
    if direct {
        return Arc::new(Image::open(p, &opts).unwrap());
    }
    let file = cowdisk::io::FileStorage::open(p, true, false).unwrap();
    let slow = cowdisk::io::FaultStorage::new(Arc::new(file));
    slow.set_delays(
        std::time::Duration::from_micros(1000),
        std::time::Duration::from_micros(50),
    );
    Arc::new(Image::open_storage(Arc::new(slow), &opts).unwrap())
}

/// Readers racing allocating writes over a raw backing file and over clusters shared
/// with a snapshot see each sector's old or new stamp, never anything else; at the
/// end every sector holds its last stamp and qemu-img agrees.
fn reads_race_writes(s: &Scratch, cs: u32, direct: bool, seed: u64) {
    let sectors = DISK / SECTOR;
    let base = s.path("base.raw");
    let mut raw = Vec::with_capacity(DISK as usize);
    for index in 0..sectors {
        raw.extend_from_slice(&stamped(index, 0));
    }
    std::fs::write(&base, &raw).unwrap();
    let p = s.path("top.qcow2");
    Image::create(
        &p,
        DISK,
        &CreateOptions {
            cluster_size: cs,
            backing_file: Some(base.to_str().unwrap().into()),
            backing_format: Some("raw".into()),
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let img = open_for_race(&p, direct);
    // Clusters of the first quarter of each half become shared with a snapshot.
    let mut expected = vec![0u64; sectors as usize];
    for half in [0, BULK_START] {
        let mut data = Vec::new();
        for index in half / SECTOR..(half + DISK / 8) / SECTOR {
            data.extend_from_slice(&stamped(index, u64::MAX));
            expected[index as usize] = u64::MAX;
        }
        img.write_at(&data, half).unwrap();
    }
    img.snapshot_create("shared", &Default::default()).unwrap();
    let last = race(&img, Race::Reads, seed, 600);
    let all = read_all(&img);
    for index in 0..sectors {
        let want = if last[index as usize] > 0 {
            last[index as usize]
        } else {
            expected[index as usize]
        };
        let chunk = sector_of(&all, index);
        assert_eq!(
            seen(index, chunk, false),
            Seen::Version(want),
            "sector {index} (cluster size {cs}, seed {seed})"
        );
    }
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    qemu_check_clean(&p);
    assert!(qemu_read_raw(&p, s) == all, "qemu-img reads other data");
}

/// Writes racing discards and zeroes (with and without unmapping) and readers: every
/// sector reads as a stamp or zeros at any time, and at the end as its last stamp or
/// zeros; qemu-img check finds no leak and reads the same.
fn writes_race_zeroes(s: &Scratch, cs: u32, direct: bool, seed: u64) {
    let sectors = DISK / SECTOR;
    // Odd rounds start from a disk written compressed: writers then replace compressed
    // clusters, and readers decompress without the lock while clusters are released.
    // (Not with 512-byte clusters: 16 384 slow compressed reads per pass.)
    let prefilled = seed % 2 == 1 && cs >= 4096;
    let p = s.path("z.qcow2");
    create_disk(&p, cs);
    let img = open_for_race(&p, direct);
    if prefilled {
        let mut data = Vec::with_capacity(DISK as usize);
        for index in 0..sectors {
            data.extend_from_slice(&stamped(index, PREFILLED));
        }
        img.write_compressed(&data, 0).unwrap();
    }
    // Writes into compressed clusters decompress under the lock, slowly on the slow
    // disk: fewer of them.
    let ops = if prefilled { 150 } else { 600 };
    let last = race(&img, Race::ZeroesAndDiscards, seed, ops);
    let all = read_all(&img);
    for index in 0..sectors {
        let chunk = sector_of(&all, index);
        let got = seen(index, chunk, false);
        let want = match last[index as usize] {
            0 if prefilled => PREFILLED,
            v => v,
        };
        assert!(
            got == Seen::Zero
                || got == Seen::Version(ZAPPED)
                || (want > 0 && got == Seen::Version(want)),
            "sector {index}: {got:?}, last written version {want} (cluster size {cs}, seed {seed})"
        );
    }
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    qemu_check_clean(&p);
    assert!(qemu_read_raw(&p, s) == all, "qemu-img reads other data");
}

#[test]
fn readers_see_old_or_new_data_while_clusters_are_allocated() {
    let base = seed(0x5EED_0001);
    for round in 0..rounds() {
        let cs = [512u32, 4096, 65536][(round % 3) as usize];
        reads_race_writes(&Scratch::new("race-read"), cs, false, base + round);
    }
}

#[test]
fn writes_race_zeroes_and_discards() {
    let base = seed(0x5EED_0002);
    for round in 0..rounds() {
        let cs = [512u32, 4096, 65536][(round % 3) as usize];
        let t = std::time::Instant::now();
        writes_race_zeroes(&Scratch::new("race-zero"), cs, false, base + round);
        eprintln!("round {round}: {cs}-byte clusters, {:?}", t.elapsed());
    }
}

#[test]
fn races_with_o_direct() {
    let Some(s) = direct_scratch("race-direct") else {
        return;
    };
    let base = seed(0x5EED_0003);
    for round in 0..rounds().div_ceil(2) {
        let cs = [512u32, 65536][(round % 2) as usize];
        let dir = Scratch(s.path(&format!("r{round}")));
        std::fs::create_dir_all(&dir.0).unwrap();
        reads_race_writes(&dir, cs, true, base + round);
        writes_race_zeroes(&dir, cs, true, base + round);
    }
}

/// Threads writing (single sectors and multi-cluster runs) and flushing when the disk
/// "dies" at the n-th write, for n across the workload: qemu-img check finds no
/// corruption (leaks are allowed) and every sector reads as zeros or a whole stamp,
/// never another sector's bytes.
#[test]
fn crash_while_threads_write() {
    use cowdisk::io::{FaultStorage, FileStorage, Storage};
    let base = seed(0x5EED_0004);
    for (k, n) in [3u64, 10, 20, 40, 60, 100, 150, 250, 400, 600, 900]
        .into_iter()
        .enumerate()
    {
        let s = Scratch::new("race-crash");
        let p = s.path("c.qcow2");
        let cs = [4096u32, 65536][k % 2];
        create_disk(&p, cs);
        let file: Arc<dyn Storage> = Arc::new(FileStorage::open(&p, true, false).unwrap());
        let fault = Arc::new(FaultStorage::new(file));
        let img = Arc::new(Image::open_storage(fault.clone(), &OpenOptions::default()).unwrap());
        fault.fail_writes_after(n);
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let img = img.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng::new(base ^ (t + 1) ^ n);
                    for op in 1..=300u64 {
                        let len = if t == 0 { 1 + rng.below(300) } else { 1 };
                        let start = rng.below(DISK / SECTOR - len + 1);
                        let mut data = Vec::new();
                        for index in start..start + len {
                            data.extend_from_slice(&stamped(index, op));
                        }
                        let failed = img.write_at(&data, start * SECTOR).is_err()
                            || (op % 50 == 0 && img.flush().is_err());
                        if failed {
                            return true;
                        }
                    }
                    false
                })
            })
            .collect();
        let mut crashed = false;
        for t in threads {
            crashed |= t.join().unwrap();
        }
        assert!(crashed, "the disk never failed (write {n} of fewer)");
        drop(Arc::try_unwrap(img).ok().expect("threads ended"));
        let (code, out, err) = run("qemu-img", &["check", p.to_str().unwrap()]);
        assert!(
            code == 0 || code == 3,
            "crash at write {n}: qemu-img check exit {code}\n{out}{err}"
        );
        let img = Image::open(
            &p,
            &OpenOptions {
                read_only: true,
                ..OpenOptions::default()
            },
        )
        .unwrap();
        let all = read_all(&img);
        for index in 0..DISK / SECTOR {
            let chunk = sector_of(&all, index);
            let got = seen(index, chunk, false);
            assert!(
                matches!(got, Seen::Zero | Seen::Version(_)),
                "crash at write {n}: sector {index} holds {got:?}: {}",
                describe(index, chunk)
            );
        }
    }
}

/// Every kind of operation at once on one handle over a snapshot-shared disk: 4 KiB
/// writers, zeroers of single sectors and of cluster runs (with and without unmap),
/// a discarder, a compressed writer, readers, a thread growing the disk, and one
/// saving VM state and taking and deleting snapshots. No call may fail because of another thread's work (the
/// only refusal allowed is a compressed write meeting an allocated cluster), no read
/// may see another sector's bytes, and the image ends `qemu-img check`-clean with each
/// sector holding zeros, a compressed stamp or its last written stamp.
fn every_operation_at_once(s: &Scratch, cs: u32, seed: u64) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sectors = DISK / SECTOR;
    let p = s.path("all.qcow2");
    create_disk(&p, cs);
    let img = open_for_race(&p, false);
    let mut data = Vec::with_capacity(DISK as usize);
    for index in 0..sectors {
        data.extend_from_slice(&stamped(index, PREFILLED));
    }
    img.write_at(&data, 0).unwrap();
    img.snapshot_create("base", &Default::default()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // 4 KiB writers: writer t owns the 4 KiB blocks ≡ t (mod 4).
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ ((t + 1) * 31));
                let mut last = Vec::new();
                let blocks = DISK / 4096 / 4;
                for op in 1..=200u64 {
                    let block = rng.below(blocks) * 4 + t;
                    let first = block * 4096 / SECTOR;
                    let mut buf = Vec::with_capacity(4096);
                    for index in first..first + 4096 / SECTOR {
                        buf.extend_from_slice(&stamped(index, op));
                        last.push((index, op));
                    }
                    img.write_at(&buf, block * 4096).unwrap();
                }
                last
            })
        })
        .collect();
    let mut others = Vec::new();
    // Zeroers: two of single sectors, one of cluster runs.
    for z in 0..3u64 {
        let img = img.clone();
        let stop = stop.clone();
        others.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0x2E20 ^ z);
            while !stop.load(Ordering::Relaxed) {
                let (off, len) = if z < 2 {
                    (rng.below(sectors) * SECTOR, SECTOR)
                } else {
                    let cs = cs as u64;
                    let n = 1 + rng.below(4);
                    (rng.below(DISK / cs - n + 1) * cs, n * cs)
                };
                let unmap = rng.below(2) == 0;
                img.write_zeroes(off, len, unmap).unwrap();
            }
        }));
    }
    {
        // Discards and compressed writes of released clusters.
        let img = img.clone();
        let stop = stop.clone();
        others.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0xD15C);
            let cs = cs as u64;
            while !stop.load(Ordering::Relaxed) {
                let n = 1 + rng.below(3);
                let at = rng.below(DISK / cs - n + 1) * cs;
                img.discard(at, n * cs).unwrap();
                if rng.below(2) == 0 {
                    let mut data = Vec::new();
                    for index in at / SECTOR..(at + n * cs) / SECTOR {
                        data.extend_from_slice(&stamped(index, ZAPPED));
                    }
                    match img.write_compressed(&data, at) {
                        Ok(()) | Err(cowdisk::Error::InvalidArgument(_)) => {}
                        Err(e) => panic!("compressed write failed: {e}"),
                    }
                }
            }
        }));
    }
    {
        // VM state saved and recorded in snapshots; older snapshots deleted.
        let img = img.clone();
        let stop = stop.clone();
        others.push(std::thread::spawn(move || {
            let state = vec![0x5au8; 300_000];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                img.save_vmstate(&state, 0).unwrap();
                let opts = cowdisk::SnapshotOptions {
                    vm_state_size: state.len() as u64,
                    ..Default::default()
                };
                img.snapshot_create(&format!("s{n}"), &opts).unwrap();
                if n > 0 {
                    img.snapshot_delete(&format!("s{}", n - 1)).unwrap();
                }
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            assert!(n > 0, "no snapshot was taken");
        }));
    }
    {
        // The disk grows under everyone's feet (images with snapshots cannot shrink).
        let img = img.clone();
        let stop = stop.clone();
        others.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) && img.size() < DISK + (4 << 20) {
                img.resize(img.size() + 65536, false).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }));
    }
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let img = img.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = Rng::new(seed ^ (r + 200));
                while !stop.load(Ordering::Relaxed) {
                    let len = 1 + rng.below(64);
                    let start = rng.below(sectors - len + 1);
                    let mut buf = vec![0u8; (len * SECTOR) as usize];
                    img.read_at(&mut buf, start * SECTOR).unwrap();
                    for (k, chunk) in buf.chunks(SECTOR as usize).enumerate() {
                        let index = start + k as u64;
                        if seen(index, chunk, true) == Seen::Garbage {
                            panic!(
                                "reader saw garbage in sector {index} (seed {seed}): {}",
                                describe(index, chunk)
                            );
                        }
                    }
                }
            })
        })
        .collect();
    let mut last = vec![PREFILLED; sectors as usize];
    for w in writers {
        for (index, op) in w.join().unwrap() {
            last[index as usize] = op;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in others {
        t.join().unwrap();
    }
    for r in readers {
        r.join().unwrap();
    }
    let all = read_all(&img);
    assert!(
        all[DISK as usize..].iter().all(|&b| b == 0),
        "the grown part"
    );
    for index in 0..sectors {
        let got = seen(index, sector_of(&all, index), false);
        let want = last[index as usize];
        assert!(
            got == Seen::Zero || got == Seen::Version(ZAPPED) || got == Seen::Version(want),
            "sector {index}: {got:?}, last written version {want} (cluster size {cs}, seed {seed})"
        );
    }
    Arc::try_unwrap(img).ok().unwrap().close().unwrap();
    qemu_check_clean(&p);
    assert!(qemu_read_raw(&p, s) == all, "qemu-img reads other data");
}

#[test]
fn every_operation_races_every_other() {
    let base = seed(0x5EED_0005);
    for round in 0..rounds().div_ceil(2) {
        let cs = [4096u32, 65536][(round % 2) as usize];
        let t = std::time::Instant::now();
        every_operation_at_once(&Scratch::new("race-all"), cs, base + round);
        eprintln!("round {round}: {cs}-byte clusters, {:?}", t.elapsed());
    }
}
