//! Copy-on-write costs the host what QEMU's merged COW costs it: a partial write into a
//! newly allocated cluster is ONE vectored write (head + data + tail); head and tail are
//! read with one request when they are at most 16 KiB apart, two otherwise; and when
//! they read as zero nothing is read at all. Counted with the fault/counting storage.

use std::sync::Arc;

use cowdisk::io::{FaultStorage, IoEvent, MemStorage, Storage};
use cowdisk::{CreateOptions, Image, OpenOptions};

const CS: u64 = 65536;

struct Setup {
    top: Image,
    top_io: Arc<FaultStorage>,
    base_io: Arc<FaultStorage>,
}

fn pattern(cluster: u64) -> Vec<u8> {
    (0..CS)
        .map(|i| (i as u8) ^ (cluster as u8).wrapping_mul(31))
        .collect()
}

/// A base image with data in clusters 0..8 (clusters 8.. unallocated) under an empty
/// top image whose L2 table and refcount block are already cached.
fn setup() -> Setup {
    let base_mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_on(base_mem.clone(), 4 << 20, &CreateOptions::default()).unwrap();
    let base = Image::open_storage(base_mem.clone(), &OpenOptions::default()).unwrap();
    for c in 0..8 {
        base.write_at(&pattern(c), c * CS).unwrap();
    }
    base.close().unwrap();
    let base_io = Arc::new(FaultStorage::new(base_mem));
    let ro = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let base = Image::open_storage(base_io.clone(), &ro).unwrap();

    let top_mem: Arc<dyn Storage> = Arc::new(MemStorage::new());
    Image::create_on(top_mem.clone(), 4 << 20, &CreateOptions::default()).unwrap();
    let top_io = Arc::new(FaultStorage::new(top_mem));
    let top = Image::open_storage_over(top_io.clone(), &OpenOptions::default(), base).unwrap();
    // Allocate the L2 table and warm every cache, then forget the I/O so far.
    top.write_at(&[1u8; 512], 60 * CS).unwrap();
    top.flush().unwrap();
    let mut warm = vec![0u8; 16 * CS as usize];
    top.read_at(&mut warm, 0).unwrap();
    top_io.take_log();
    base_io.take_log();
    Setup {
        top,
        top_io,
        base_io,
    }
}

fn reads(log: &[IoEvent]) -> Vec<(u64, u64)> {
    log.iter()
        .filter_map(|e| match e {
            IoEvent::Read { offset, len } => Some((*offset, *len)),
            _ => None,
        })
        .collect()
}

fn writes(log: &[IoEvent]) -> Vec<(u64, usize)> {
    log.iter()
        .filter_map(|e| match e {
            IoEvent::Write { len, pieces, .. } => Some((*len, *pieces)),
            _ => None,
        })
        .collect()
}

fn expect_cluster(top: &Image, cluster: u64, data_at: u64, data: &[u8], base: Option<Vec<u8>>) {
    let mut got = vec![0u8; CS as usize];
    top.read_at(&mut got, cluster * CS).unwrap();
    let mut want = base.unwrap_or_else(|| vec![0u8; CS as usize]);
    want[data_at as usize..data_at as usize + data.len()].copy_from_slice(data);
    assert!(got == want, "cluster {cluster} contents");
}

#[test]
fn close_cow_regions_are_read_once_and_written_with_the_data() {
    let s = setup();
    let data = vec![0xEEu8; 4096];
    s.top.write_at(&data, CS + 8192).unwrap(); // head 8 KiB, gap 4 KiB, tail 52 KiB
    let base_reads = reads(&s.base_io.take_log());
    let top_log = s.top_io.take_log();
    assert_eq!(
        base_reads.len(),
        1,
        "one read for head and tail: {base_reads:?}"
    );
    assert_eq!(base_reads[0].1, CS);
    assert!(reads(&top_log).is_empty(), "{top_log:?}");
    assert_eq!(
        writes(&top_log),
        vec![(CS, 3)],
        "one vectored write: {top_log:?}"
    );
    expect_cluster(&s.top, 1, 8192, &data, Some(pattern(1)));
}

#[test]
fn distant_cow_regions_are_read_separately() {
    let s = setup();
    let data = vec![0xDDu8; 20 * 1024];
    s.top.write_at(&data, 2 * CS + 4096).unwrap(); // gap 20 KiB > 16 KiB
    let base_reads = reads(&s.base_io.take_log());
    assert_eq!(base_reads.len(), 2, "{base_reads:?}");
    let lens: Vec<u64> = base_reads.iter().map(|r| r.1).collect();
    assert_eq!(lens, vec![4096, CS - 4096 - 20 * 1024]);
    assert_eq!(writes(&s.top_io.take_log()), vec![(CS, 3)]);
    expect_cluster(&s.top, 2, 4096, &data, Some(pattern(2)));
}

#[test]
fn cow_regions_that_read_as_zero_are_not_read() {
    let s = setup();
    let data = vec![0xCCu8; 1000];
    s.top.write_at(&data, 9 * CS + 3000).unwrap(); // unallocated in base too
    assert!(reads(&s.base_io.take_log()).is_empty());
    let top_log = s.top_io.take_log();
    assert!(reads(&top_log).is_empty(), "{top_log:?}");
    // The new cluster lies past the end of the file, which reads as zeros already:
    // only the guest data is written.
    assert_eq!(writes(&top_log), vec![(1000, 1)]);
    expect_cluster(&s.top, 9, 3000, &data, None);
}

#[test]
fn reused_clusters_get_zero_cow_in_the_same_write() {
    let s = setup();
    // Free the cluster written in setup (host cluster inside the file) and reuse it.
    s.top.discard(60 * CS, CS).unwrap();
    s.top.flush().unwrap();
    s.top_io.take_log();
    let data = vec![0x99u8; 1000];
    s.top.write_at(&data, 10 * CS + 3000).unwrap();
    let top_log = s.top_io.take_log();
    assert!(reads(&top_log).is_empty(), "{top_log:?}");
    assert_eq!(
        writes(&top_log),
        vec![(CS, 3)],
        "stale contents are overwritten with zeros"
    );
    expect_cluster(&s.top, 10, 3000, &data, None);
}

#[test]
fn only_the_region_with_data_is_read() {
    let s = setup();
    // Cluster 7 has base data; write to its very start: no head, only a tail to read.
    let data = vec![0xBBu8; 100];
    s.top.write_at(&data, 7 * CS).unwrap();
    let base_reads = reads(&s.base_io.take_log());
    assert_eq!(base_reads.len(), 1);
    assert_eq!(base_reads[0].1, CS - 100);
    assert_eq!(writes(&s.top_io.take_log()), vec![(CS, 2)]);
    expect_cluster(&s.top, 7, 0, &data, Some(pattern(7)));
}

#[test]
fn full_cluster_writes_need_no_cow() {
    let s = setup();
    let data = vec![0xAAu8; CS as usize];
    s.top.write_at(&data, 3 * CS).unwrap();
    assert!(reads(&s.base_io.take_log()).is_empty());
    let top_log = s.top_io.take_log();
    assert!(reads(&top_log).is_empty());
    assert_eq!(writes(&top_log), vec![(CS, 1)]);
}
