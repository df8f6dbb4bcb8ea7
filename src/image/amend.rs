//! `amend`: changing an existing image's version (compat 0.10 / 1.1), its lazy
//! refcounts flag and its refcount width, like `qemu-img amend`, crash-safely:
//!
//! - a new refcount width is a new refcount structure written after the end of the
//!   file, switched to by the header write that also changes `refcount_order`;
//! - a downgrade first makes zero clusters plain data (each change keeps what the
//!   image reads, so a crash midway leaves a v3 image with the same contents), then
//!   rewrites the header as v2;
//! - an upgrade rewrites the snapshot table with full extra data first, then the
//!   header.

use super::meta::Meta;
use super::overlap::Kind;
use super::Image;
use crate::error::{Error, Result};
use crate::format::entry::{COMPRESSED, COPIED, OFFSET_MASK, ZERO};
use crate::format::header::{COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION, INCOMPAT_DIRTY};
use crate::format::refcount;
use crate::invalid;

/// What [`Image::amend`] changes; `None` leaves a setting as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1).
    pub version: Option<u32>,
    /// Lazy refcounts (v3 only).
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits: a power of two from 1 to 64 (v3 only, except 16).
    pub refcount_bits: Option<u32>,
}

impl Meta {
    fn amend(&mut self, o: &AmendOptions) -> Result<()> {
        let version = o.version.unwrap_or(self.header.version);
        if version != 2 && version != 3 {
            return Err(invalid!("unknown qcow2 version {version} (2 or 3)"));
        }
        let order = match o.refcount_bits {
            None => self.header.refcount_order,
            Some(bits) if bits.is_power_of_two() && bits <= 64 => bits.trailing_zeros(),
            Some(_) => {
                return Err(invalid!(
                    "Refcount width must be a power of two and may not exceed 64 bits"
                ))
            }
        };
        if o.refcount_bits.is_some() && order != 4 && version < 3 {
            return Err(invalid!(
                "Refcount widths other than 16 bits require compatibility level 1.1 or \
                 above (use compat=1.1 or greater)"
            ));
        }
        if o.lazy_refcounts == Some(true) && version < 3 {
            return Err(invalid!(
                "Lazy refcounts only supported with compatibility level 1.1 and above \
                 (use compat=1.1 or greater)"
            ));
        }
        if self.header.incompatible_features & INCOMPAT_DIRTY != 0 {
            return Err(Error::Unsupported(
                "the image is dirty (lazy refcounts); repair it with check -r all first".into(),
            ));
        }
        if version < self.header.version {
            self.downgrade_check(order)?;
        }
        self.flush_metadata()?;
        if version > self.header.version {
            self.upgrade()?;
        }
        if order != self.header.refcount_order {
            self.change_refcount_width(order)?;
        }
        if let Some(lazy) = o.lazy_refcounts.filter(|_| self.header.version >= 3) {
            let old = self.header.compatible_features;
            let new = if lazy {
                old | COMPAT_LAZY_REFCOUNTS
            } else {
                old & !COMPAT_LAZY_REFCOUNTS
            };
            if new != old {
                self.write_header_fields(80, &new.to_be_bytes(), &old.to_be_bytes())?;
                self.header.compatible_features = new;
                self.sync()?;
            }
        }
        if version < self.header.version {
            self.downgrade()?;
        }
        Ok(())
    }

    fn upgrade(&mut self) -> Result<()> {
        if !self.snapshots.entries.is_empty() {
            // v3 entries carry the large VM state size and the disk size: rewrite the
            // table (the codec writes full extra data) before the header says v3.
            let mut t = self.begin_txn()?;
            t.snapshots = Some(self.snapshots.entries.clone());
            self.commit_txn(t)?;
        }
        let old = self.header.clone();
        self.header.version = 3;
        self.header.refcount_order = 4;
        self.switch_header(&old)?;
        self.sync()
    }

    /// Refuses a downgrade QEMU refuses, before anything changes.
    fn downgrade_check(&mut self, order: u32) -> Result<()> {
        if order != 4 {
            return Err(invalid!("compat=0.10 requires refcount_bits=16"));
        }
        let size = self.header.size;
        if self
            .snapshots
            .entries
            .iter()
            .any(|s| s.vm_state_size > u32::MAX as u64 || s.disk_size != size)
        {
            return Err(Error::Unsupported(
                "Internal snapshots prevent downgrade of image".into(),
            ));
        }
        if self.header.bitmaps.is_some() || !self.bitmaps.is_empty() {
            // v2 has no autoclear bits: the bitmaps could not be kept consistent.
            return Err(Error::Unsupported(
                "Cannot downgrade an image with persistent bitmaps (remove them first)".into(),
            ));
        }
        let other = self.header.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
        if other != 0 {
            return Err(Error::Unsupported(format!(
                "Cannot downgrade an image with incompatible features {other:#x} set"
            )));
        }
        if self.header.compression_type != 0 && self.has_compressed_clusters()? {
            return Err(Error::Unsupported(
                "Cannot downgrade an image with zstd compression type and existing \
                 compressed clusters"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Every L2 table any L1 table (active or snapshot) reaches, once each.
    fn all_l2_tables(&mut self) -> Result<Vec<u64>> {
        let mut l1s = vec![self.l1.clone()];
        for s in self.snapshots.entries.clone() {
            let mut buf = vec![0u8; s.l1_size as usize * 8];
            self.storage
                .read_at(&mut buf, s.l1_table_offset)
                .map_err(Meta::io_err("reading a snapshot L1 table"))?;
            l1s.push(
                buf.chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            );
        }
        let mut tables: Vec<u64> = l1s
            .iter()
            .flatten()
            .map(|&e| e & OFFSET_MASK)
            .filter(|&t| t != 0)
            .collect();
        tables.sort_unstable();
        tables.dedup();
        Ok(tables)
    }

    fn read_entries(&self, table: u64) -> Result<Vec<u64>> {
        let mut buf = vec![0u8; self.cluster_size as usize];
        self.storage
            .read_at(&mut buf, table)
            .map_err(Meta::io_err(format!("reading L2 table at {table:#x}")))?;
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn has_compressed_clusters(&mut self) -> Result<bool> {
        for table in self.all_l2_tables()? {
            if self
                .read_entries(table)?
                .iter()
                .any(|e| e & COMPRESSED != 0)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Makes every zero cluster plain data or unallocated (v2 has no zero flag),
    /// keeping what each reads as, then rewrites the header as v2.
    fn downgrade(&mut self) -> Result<()> {
        if self.header.crypt_method != 0 {
            // Zero clusters would become encrypted zero data, per guest or host sector.
            return Err(crate::error::Error::Unsupported(
                "amending an encrypted image to compat=0.10".into(),
            ));
        }
        let cs = self.cluster_size;
        let backing = self.header.backing_file.is_some();
        for table in self.all_l2_tables()? {
            let mut entries = self.read_entries(table)?;
            let mut released = Vec::new();
            // Clusters allocated for plain zero clusters over a backing file are
            // reached by as many L1 paths as the table itself.
            let paths = self.refcount(table >> self.cluster_bits)?;
            for e in entries.iter_mut() {
                if *e & COMPRESSED != 0 || *e & ZERO == 0 {
                    continue;
                }
                let host = *e & OFFSET_MASK;
                let owned = host != 0 && self.refcount(host >> self.cluster_bits)? == 1;
                if owned {
                    // Preallocated zero cluster of its own: zero its data, drop the flag.
                    self.write_host("zeroed cluster", &vec![0u8; cs as usize], host)?;
                    *e &= !ZERO;
                    continue;
                }
                if host != 0 {
                    // Its host cluster still holds a snapshot's data: let go of it
                    // (once this table is written) and treat it as a plain zero.
                    for _ in 0..paths {
                        released.push(host);
                    }
                }
                if backing {
                    let new = self.alloc_clusters(1)?;
                    if paths > 1 {
                        self.set_refcount(new >> self.cluster_bits, paths)?;
                    }
                    self.write_host("zeroed cluster", &vec![0u8; cs as usize], new)?;
                    *e = new | if paths == 1 { COPIED } else { 0 };
                } else {
                    *e = 0;
                }
            }
            let changed = entries != self.read_entries(table)?;
            if changed {
                // Refcounts and zeroed data before the entries that point to them.
                self.write_dirty_refcount_blocks()?;
                self.sync()?;
                let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.write_host_as(
                    Kind::ActiveL2 as u16 | Kind::SnapshotL2 as u16,
                    "L2 table without zero clusters",
                    &bytes,
                    table,
                )?;
                self.l2_cache.remove(table);
                for host in released {
                    self.free_later(host, 1);
                }
            }
        }
        self.flush_metadata()?;
        let old = self.header.clone();
        self.header.version = 2;
        self.header.incompatible_features = 0;
        self.header.compatible_features = 0;
        self.header.autoclear_features = 0;
        self.header.compression_type = 0;
        self.header.unknown_header_bytes.clear();
        self.switch_header(&old)?;
        self.sync()
    }

    /// Rewrites the refcount structure with `1 << order`-bit refcounts.
    fn change_refcount_width(&mut self, order: u32) -> Result<()> {
        let file_clusters = self.host_end.div_ceil(self.cluster_size);
        let max = refcount::max_value(order);
        let mut counts = Vec::with_capacity(file_clusters as usize);
        for c in 0..file_clusters {
            let rc = self.refcount(c)?;
            if rc > max {
                return Err(invalid!(
                    "Cannot decrease refcount entry width to {} bits: Cluster at offset \
                     {:#x} has a refcount of {rc}",
                    1u32 << order,
                    c << self.cluster_bits
                ));
            }
            counts.push(rc);
        }
        // The old structure is not counted: it is free once the header switches.
        let old_table = self.header.refcount_table_offset >> self.cluster_bits;
        for c in old_table..old_table + self.header.refcount_table_clusters as u64 {
            if let Some(v) = counts.get_mut(c as usize) {
                *v = 0;
            }
        }
        for &e in &self.rc.table {
            if let Some(v) = counts
                .get_mut((e >> self.cluster_bits) as usize)
                .filter(|_| e != 0)
            {
                *v = 0;
            }
        }
        self.rebuild_refcounts_with(counts, order)
    }
}

impl Image {
    /// Changes the image's version, lazy refcounts flag or refcount width, as
    /// `qemu-img amend -o compat=…,lazy_refcounts=…,refcount_bits=…` does (and
    /// refusing what it refuses). Each change is crash-safe: a crash leaves either
    /// the old image or the new one, with the same data.
    pub fn amend(&self, opts: &AmendOptions) -> Result<()> {
        self.modify("amend", |meta| meta.amend(opts))
    }
}
