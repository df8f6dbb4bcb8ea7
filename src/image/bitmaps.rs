//! Persistent dirty bitmaps of an open image, kept the way QEMU keeps them:
//!
//! - open: the directory and every bitmap table are read and validated; the bits of
//!   the bitmaps not marked in use are loaded into memory. A read-write open then
//!   marks them in use on disk — autoclear bit cleared (synced), directory rewritten
//!   in place (synced), autoclear bit set again (synced) — so that no crash leaves a
//!   bitmap that claims to be consistent while writes it does not record land;
//! - every guest write, write-zeroes, discard and compressed write sets the bits of
//!   the enabled bitmaps, in memory;
//! - close: changed bitmaps are written to new clusters (data, then table), a new
//!   directory with `in_use` cleared goes to new clusters, the refcounts are flushed,
//!   the header is switched to the new directory (synced), then the old clusters are
//!   freed. A crash before the switch leaves the bitmaps in use (inconsistent, as
//!   QEMU's would be) and at most leaked clusters.
//!
//! Bitmaps already in use at open (a crash, or another writer) are inconsistent:
//! kept as they are on disk, never updated, and reported so; they can only be removed.

use super::meta::Meta;
use super::overlap::Kind;
use super::Image;
use crate::bitmap::{DirtyBitmap, DirtyChunk};
use crate::error::{Error, Result};
use crate::format::bitmap::{
    self as codec, BitmapsExtension, DirEntry, TableEntry, AUTOCLEAR_BITMAPS, FLAG_AUTO,
    FLAG_IN_USE,
};
use crate::{corrupt, invalid};

/// A persistent dirty bitmap, as [`Image::bitmaps`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Its name, unique in the image.
    pub name: String,
    /// Bytes one bit covers.
    pub granularity: u64,
    /// Whether writes set its bits (QEMU's `auto` flag).
    pub enabled: bool,
    /// It was marked in use when the image was opened (a crash, or another program
    /// has the image open): its bits cannot be trusted, and it is kept as it is.
    pub inconsistent: bool,
    /// Bytes covered by set bits (0 for an inconsistent bitmap, whose bits are not read).
    pub dirty_bytes: u64,
}

/// One run of a bitmap's state, as [`Image::dirty_extents`] returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyExtent {
    /// Guest offset of the first byte.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Whether the range changed since the bitmap was started (or cleared).
    pub dirty: bool,
}

/// The table a bitmap has on disk and what it references.
#[derive(Debug, Clone)]
struct StoredTable {
    offset: u64,
    size: u32,
    entries: Vec<TableEntry>,
}

/// One bitmap of the image.
#[derive(Debug)]
struct Bitmap {
    name: String,
    enabled: bool,
    inconsistent: bool,
    granularity_bits: u32,
    /// The bits (empty for an inconsistent bitmap).
    dirty: DirtyBitmap,
    /// Its table on disk, if it has been stored.
    stored: Option<StoredTable>,
    /// The bits differ from the stored table.
    changed: bool,
}

/// What a store wrote before switching the header to it.
#[derive(Default)]
struct Staged {
    /// Bitmaps given a new table, with the table each had before.
    replaced: Vec<(usize, Option<StoredTable>)>,
    /// The new directory: (offset, bytes).
    directory: Option<(u64, u64)>,
    /// Entries of the new directory.
    nb_bitmaps: u32,
}

/// The bitmaps of an open image.
#[derive(Debug, Default)]
pub(crate) struct Bitmaps {
    list: Vec<Bitmap>,
    /// The directory on disk: (offset, bytes).
    directory: Option<(u64, u64)>,
    /// A read-write open marked the bitmaps in use on disk: close must store them.
    marked_in_use: bool,
    /// The directory must be rewritten at close (bitmaps added, removed, flags changed).
    directory_changed: bool,
    /// Tables of removed bitmaps, freed once the directory without them is stored.
    removed: Vec<StoredTable>,
    /// Why the bitmaps could not be read (read-only and check opens go on without).
    pub(crate) error: Option<String>,
}

impl Bitmaps {
    /// Whether the image has no bitmaps (in memory).
    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Whether close has anything to write.
    fn needs_store(&self) -> bool {
        self.marked_in_use
            || self.directory_changed
            || !self.removed.is_empty()
            || self.list.iter().any(|b| b.changed)
    }

    /// Every host range the bitmaps reference: (offset, bytes, what).
    pub(crate) fn clusters(&self, cluster_size: u64) -> Vec<(u64, u64, Kind)> {
        let mut out = Vec::new();
        if let Some((offset, len)) = self.directory {
            out.push((offset, len, Kind::BitmapDirectory));
        }
        for b in &self.list {
            if let Some(t) = &b.stored {
                out.push((t.offset, t.size as u64 * 8, Kind::BitmapTable));
                for e in &t.entries {
                    if let TableEntry::Data(off) = e {
                        out.push((*off, cluster_size, Kind::BitmapData));
                    }
                }
            }
        }
        out
    }
}

/// QEMU's default granularity: the cluster size, within 4 KiB..64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

impl Meta {
    fn bitmap_index(&self, name: &str) -> Result<usize> {
        if let Some(e) = &self.bitmaps.error {
            return Err(Error::Unsupported(format!(
                "the image's bitmaps cannot be used: {e}"
            )));
        }
        self.bitmaps
            .list
            .iter()
            .position(|b| b.name == name)
            .ok_or_else(|| Error::NotFound(format!("no bitmap named '{name}'")))
    }

    fn usable_bitmap(&mut self, name: &str) -> Result<&mut Bitmap> {
        let i = self.bitmap_index(name)?;
        let b = &mut self.bitmaps.list[i];
        if b.inconsistent {
            return Err(Error::Unsupported(format!(
                "bitmap '{name}' is inconsistent (it was in use when the image was opened) \
                 and cannot be used; remove it"
            )));
        }
        Ok(b)
    }

    /// Reads the directory and every table, and the bits of the consistent bitmaps.
    fn read_bitmaps(&mut self, ext: BitmapsExtension) -> Result<Bitmaps> {
        let cs = self.cluster_size;
        let file = self.file_len.max(self.host_end);
        let mut dir = vec![0u8; ext.directory_size as usize];
        self.storage
            .read_at(&mut dir, ext.directory_offset)
            .map_err(Meta::io_err(format!(
                "reading the bitmap directory at {:#x}",
                ext.directory_offset
            )))?;
        let entries = codec::parse_directory(&dir, ext.nb_bitmaps, cs, self.header.size, file)?;
        let mut list = Vec::with_capacity(entries.len());
        for e in entries {
            let what = format!("bitmap '{}'", e.name);
            let mut raw = vec![0u8; e.table_size as usize * 8];
            self.storage
                .read_at(&mut raw, e.table_offset)
                .map_err(Meta::io_err(format!("reading the table of {what}")))?;
            let table: Vec<TableEntry> = raw
                .chunks_exact(8)
                .enumerate()
                .map(|(i, c)| {
                    let v = u64::from_be_bytes(c.try_into().expect("8 bytes"));
                    codec::decode_entry(v, cs, file, i).map_err(|err| match err {
                        Error::Corrupt(m) => corrupt!("{what}: {m}"),
                        other => other,
                    })
                })
                .collect::<Result<_>>()?;
            let inconsistent = e.flags & FLAG_IN_USE != 0;
            let mut dirty = DirtyBitmap::new(e.granularity_bits, self.header.size, cs);
            if !inconsistent {
                let mut cluster = vec![0u8; cs as usize];
                for (i, t) in table.iter().enumerate().take(dirty.nchunks() as usize) {
                    let chunk = match *t {
                        TableEntry::Zeros => continue,
                        TableEntry::Ones => DirtyChunk::Ones,
                        TableEntry::Data(off) => {
                            self.storage
                                .read_at(&mut cluster, off)
                                .map_err(Meta::io_err(format!(
                                    "reading the data of {what} at {off:#x}"
                                )))?;
                            DirtyChunk::Data(cluster.clone())
                        }
                    };
                    dirty.load_chunk(i as u64, chunk);
                }
            }
            list.push(Bitmap {
                name: e.name,
                enabled: e.flags & FLAG_AUTO != 0,
                inconsistent,
                granularity_bits: e.granularity_bits,
                dirty,
                stored: Some(StoredTable {
                    offset: e.table_offset,
                    size: e.table_size,
                    entries: table,
                }),
                changed: false,
            });
        }
        Ok(Bitmaps {
            list,
            directory: Some((ext.directory_offset, ext.directory_size)),
            ..Bitmaps::default()
        })
    }

    /// Loads the bitmaps at open. An image whose bitmaps cannot be read opens
    /// read-only (or to be checked) without them; a read-write open fails unless
    /// `drop_bitmaps`, which gives them up as a program without bitmap support would.
    pub(crate) fn load_bitmaps(&mut self, drop_bitmaps: bool) -> Result<()> {
        let Some(ext) = self.header.bitmaps else {
            return Ok(());
        };
        match self.read_bitmaps(ext) {
            Ok(b) => {
                self.bitmaps = b;
                Ok(())
            }
            Err(e) if self.read_only || self.check_mode || drop_bitmaps => {
                self.bitmaps.error = Some(e.to_string());
                Ok(())
            }
            Err(e) => Err(e.with_note(
                "the image's persistent bitmaps cannot be kept; open it read-only, or \
                 accept losing them (OpenOptions::drop_bitmaps, COWDISK_OPEN_DROP_BITMAPS)",
            )),
        }
    }

    /// The directory entries as the disk should hold them; `in_use` marks every
    /// bitmap in use (an open image), otherwise only the inconsistent ones.
    fn directory_entries(&self, in_use: bool) -> Vec<DirEntry> {
        self.bitmaps
            .list
            .iter()
            .filter_map(|b| {
                let t = b.stored.as_ref()?;
                let mut flags = if b.enabled { FLAG_AUTO } else { 0 };
                if in_use || b.inconsistent {
                    flags |= FLAG_IN_USE;
                }
                Some(DirEntry {
                    table_offset: t.offset,
                    table_size: t.size,
                    flags,
                    granularity_bits: b.granularity_bits,
                    name: b.name.clone(),
                })
            })
            .collect()
    }

    /// A read-write open: clears the autoclear bits we do not maintain and marks the
    /// consistent bitmaps in use (QEMU's order, see the module comment).
    pub(crate) fn claim_autoclear(&mut self) -> Result<()> {
        let keep = if self.bitmaps.error.is_none() && self.header.bitmaps.is_some() {
            AUTOCLEAR_BITMAPS
        } else {
            0
        };
        let mark = self.bitmaps.list.iter().any(|b| !b.inconsistent);
        if self.header.autoclear_features & !keep == 0 && !mark {
            return Ok(());
        }
        let old = self.header.clone();
        self.header.autoclear_features = 0;
        if keep == 0 {
            // Bitmaps we cannot keep are dropped; their clusters leak, as with QEMU.
            self.header.bitmaps = None;
            self.bitmaps = Bitmaps::default();
        }
        self.switch_header(&old)?;
        self.sync()?;
        if mark {
            let (offset, _) = self.bitmaps.directory.expect("bitmaps have a directory");
            let bytes = codec::serialize_directory(&self.directory_entries(true));
            self.write_host_as(
                Kind::BitmapDirectory as u16,
                "bitmap directory",
                &bytes,
                offset,
            )?;
            self.sync()?;
            self.bitmaps.marked_in_use = true;
        }
        if keep != 0 {
            let old = self.header.clone();
            self.header.autoclear_features = keep;
            self.switch_header(&old)?;
            self.sync()?;
        }
        Ok(())
    }

    /// Sets the bits of guest bytes `[offset, offset + len)` in every enabled bitmap.
    pub(crate) fn mark_dirty(&mut self, offset: u64, len: u64) {
        for b in &mut self.bitmaps.list {
            if b.enabled && !b.inconsistent {
                b.dirty.mark(offset, len);
                b.changed = true;
            }
        }
    }

    /// Whether a resize to `new_size` keeps every bitmap (QEMU refuses with
    /// inconsistent bitmaps); then resizes them.
    pub(crate) fn check_bitmaps_resizable(&self, new_size: u64) -> Result<()> {
        if let Some(e) = &self.bitmaps.error {
            return Err(Error::Unsupported(format!(
                "cannot resize an image whose bitmaps cannot be read: {e}"
            )));
        }
        for b in &self.bitmaps.list {
            if b.inconsistent {
                return Err(Error::Unsupported(format!(
                    "cannot resize: bitmap '{}' is inconsistent; remove it first",
                    b.name
                )));
            }
            codec::check_geometry(&b.name, new_size, b.granularity_bits, self.cluster_size)?;
        }
        Ok(())
    }

    /// Resizes the bitmaps after the image's size changed (checked before).
    pub(crate) fn resized_bitmaps(&mut self, new_size: u64) {
        for b in &mut self.bitmaps.list {
            b.dirty.resize(new_size);
            b.changed = true;
        }
    }

    /// Writes one bitmap's bits and table to new clusters; on failure frees what it
    /// allocated.
    fn store_table(&mut self, i: usize) -> Result<StoredTable> {
        let cs = self.cluster_size;
        let dirty = &self.bitmaps.list[i].dirty;
        let n = dirty.nchunks();
        let chunks: Vec<(u64, DirtyChunk)> = dirty
            .dirty_chunks()
            .into_iter()
            .map(|c| (c, dirty.chunk(c)))
            .collect();
        let mut entries = vec![TableEntry::Zeros; n as usize];
        let mut allocated: Vec<(u64, u64)> = Vec::new();
        let result = (|| -> Result<u64> {
            for (c, chunk) in chunks {
                match chunk {
                    DirtyChunk::Zeros => {}
                    DirtyChunk::Ones => entries[c as usize] = TableEntry::Ones,
                    DirtyChunk::Data(mut bytes) => {
                        let off = self.alloc_clusters(1)?;
                        allocated.push((off, 1));
                        bytes.resize(cs as usize, 0);
                        self.write_host("bitmap data", &bytes, off)?;
                        entries[c as usize] = TableEntry::Data(off);
                    }
                }
            }
            let mut table: Vec<u8> = entries
                .iter()
                .flat_map(|&e| codec::encode_entry(e).to_be_bytes())
                .collect();
            let clusters = (table.len() as u64).div_ceil(cs).max(1);
            let off = self.alloc_clusters(clusters)?;
            allocated.push((off, clusters));
            table.resize((clusters * cs) as usize, 0);
            self.write_host("bitmap table", &table, off)?;
            Ok(off)
        })();
        match result {
            Ok(offset) => Ok(StoredTable {
                offset,
                size: n as u32,
                entries,
            }),
            Err(e) => {
                for (off, count) in allocated {
                    self.free_later(off, count);
                }
                Err(e)
            }
        }
    }

    /// Stores the bitmaps (see the module comment); nothing to do when none changed
    /// and none was marked in use.
    pub(crate) fn store_bitmaps(&mut self) -> Result<()> {
        if self.read_only || !self.bitmaps.needs_store() || self.bitmaps.error.is_some() {
            return Ok(());
        }
        let mut staged = Staged::default();
        let switched = self
            .stage_bitmaps(&mut staged)
            // Refcounts and data durable before the header points at them.
            .and_then(|()| self.flush_metadata())
            .and_then(|()| self.switch_bitmaps_header(&staged));
        if let Err(e) = switched {
            // Unless the header write left the disk in doubt, the old state stands.
            if !self.in_doubt {
                self.abandon_staged(staged);
            }
            return Err(e);
        }
        // Switched: the old directory and the replaced tables are garbage now (freed
        // by the metadata flush below, after a barrier).
        let cs = self.cluster_size;
        if let Some((off, len)) = self.bitmaps.directory.take() {
            self.free_later(off, len.div_ceil(cs));
        }
        for t in staged.replaced.iter().filter_map(|(_, t)| t.as_ref()) {
            self.free_stored(t);
        }
        for t in std::mem::take(&mut self.bitmaps.removed) {
            self.free_stored(&t);
        }
        self.bitmaps.directory = staged.directory;
        self.bitmaps.marked_in_use = false;
        self.bitmaps.directory_changed = false;
        for b in &mut self.bitmaps.list {
            b.changed = false;
        }
        self.rebuild_metadata_index();
        self.flush_metadata()
    }

    /// Writes new tables for the changed bitmaps and the new directory (in_use
    /// cleared) to new clusters, recording in `staged` what it did.
    fn stage_bitmaps(&mut self, staged: &mut Staged) -> Result<()> {
        for i in 0..self.bitmaps.list.len() {
            let b = &self.bitmaps.list[i];
            if b.inconsistent || (!b.changed && b.stored.is_some()) {
                continue;
            }
            let table = self.store_table(i)?;
            let old = self.bitmaps.list[i].stored.replace(table);
            staged.replaced.push((i, old));
        }
        let entries = self.directory_entries(false);
        staged.nb_bitmaps = entries.len() as u32;
        if entries.is_empty() {
            return Ok(());
        }
        let bytes = codec::serialize_directory(&entries);
        if bytes.len() as u64 > codec::MAX_DIRECTORY_SIZE {
            return Err(invalid!("the bitmap directory would exceed 64 MiB"));
        }
        let cs = self.cluster_size;
        let clusters = (bytes.len() as u64).div_ceil(cs);
        let off = self.alloc_clusters(clusters)?;
        staged.directory = Some((off, bytes.len() as u64));
        let mut padded = bytes;
        padded.resize((clusters * cs) as usize, 0);
        self.write_host("bitmap directory", &padded, off)
    }

    /// Points the header at the staged directory (or drops the extension when no
    /// bitmap is left); on failure `switch_header` restores the header in memory.
    fn switch_bitmaps_header(&mut self, staged: &Staged) -> Result<()> {
        let old = self.header.clone();
        match staged.directory {
            Some((offset, size)) => {
                self.header.bitmaps = Some(BitmapsExtension {
                    nb_bitmaps: staged.nb_bitmaps,
                    directory_size: size,
                    directory_offset: offset,
                });
                self.header.autoclear_features |= AUTOCLEAR_BITMAPS;
            }
            None => {
                self.header.bitmaps = None;
                self.header.autoclear_features &= !AUTOCLEAR_BITMAPS;
            }
        }
        self.switch_header(&old)
    }

    /// Undoes a store that did not switch: the bitmaps get their old tables back and
    /// the clusters written for the new ones are freed.
    fn abandon_staged(&mut self, staged: Staged) {
        for (i, old) in staged.replaced {
            if let Some(new) = std::mem::replace(&mut self.bitmaps.list[i].stored, old) {
                self.free_stored(&new);
            }
        }
        if let Some((off, len)) = staged.directory {
            self.free_later(off, len.div_ceil(self.cluster_size));
        }
    }

    /// Frees a stored table and its data clusters (at the next metadata flush).
    fn free_stored(&mut self, t: &StoredTable) {
        let cs = self.cluster_size;
        for e in &t.entries {
            if let TableEntry::Data(off) = e {
                self.free_later(*off, 1);
            }
        }
        self.free_later(t.offset, (t.size as u64 * 8).div_ceil(cs));
    }
}

impl Image {
    /// The image's persistent dirty bitmaps, in directory order. Fails when the
    /// bitmaps could not be read (the message says why).
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        let meta = self.lock()?;
        if let Some(e) = &meta.bitmaps.error {
            return Err(Error::Unsupported(format!(
                "the image's bitmaps cannot be used: {e}"
            )));
        }
        Ok(meta
            .bitmaps
            .list
            .iter()
            .map(|b| BitmapInfo {
                name: b.name.clone(),
                granularity: 1 << b.granularity_bits,
                enabled: b.enabled,
                inconsistent: b.inconsistent,
                dirty_bytes: if b.inconsistent {
                    0
                } else {
                    b.dirty.dirty_bytes()
                },
            })
            .collect())
    }

    /// Adds an empty bitmap of `granularity` bytes per bit (0: QEMU's default, the
    /// cluster size within 4 KiB..64 KiB; a power of two from 512 B to 2 GiB),
    /// tracking writes when `enabled`. Stored on disk when the image is closed.
    pub fn bitmap_add(&self, name: &str, granularity: u64, enabled: bool) -> Result<()> {
        self.modify("adding a bitmap", |meta| {
            let g = if granularity == 0 {
                default_granularity(meta.cluster_size)
            } else {
                granularity
            };
            if !g.is_power_of_two() {
                return Err(invalid!("bitmap granularity {g} is not a power of two"));
            }
            let bits = g.trailing_zeros();
            codec::check_geometry(name, meta.header.size, bits, meta.cluster_size)?;
            if meta.header.version < 3 {
                return Err(Error::Unsupported(
                    "persistent bitmaps need a version 3 image (amend -o compat=1.1)".into(),
                ));
            }
            if let Some(e) = &meta.bitmaps.error {
                return Err(Error::Unsupported(format!(
                    "the image's bitmaps cannot be used: {e}"
                )));
            }
            if meta.bitmaps.list.iter().any(|b| b.name == name) {
                return Err(invalid!("a bitmap named '{name}' already exists"));
            }
            if meta.bitmaps.list.len() as u32 >= codec::MAX_BITMAPS {
                return Err(invalid!(
                    "the image has {} bitmaps already",
                    codec::MAX_BITMAPS
                ));
            }
            let dir: usize = meta
                .bitmaps
                .list
                .iter()
                .map(|b| codec::entry_size(b.name.len()))
                .sum::<usize>()
                + codec::entry_size(name.len());
            if dir as u64 > codec::MAX_DIRECTORY_SIZE {
                return Err(invalid!("the bitmap directory would exceed 64 MiB"));
            }
            let dirty = DirtyBitmap::new(bits, meta.header.size, meta.cluster_size);
            meta.bitmaps.list.push(Bitmap {
                name: name.to_string(),
                enabled,
                inconsistent: false,
                granularity_bits: bits,
                dirty,
                stored: None,
                changed: true,
            });
            meta.bitmaps.directory_changed = true;
            Ok(())
        })
    }

    /// Removes a bitmap (inconsistent ones too); its clusters are freed at close.
    pub fn bitmap_remove(&self, name: &str) -> Result<()> {
        self.modify("removing a bitmap", |meta| {
            let i = meta.bitmap_index(name)?;
            let b = meta.bitmaps.list.remove(i);
            if let Some(t) = b.stored {
                meta.bitmaps.removed.push(t);
            }
            meta.bitmaps.directory_changed = true;
            Ok(())
        })
    }

    /// Clears every bit of a bitmap (a new checkpoint starts).
    pub fn bitmap_clear(&self, name: &str) -> Result<()> {
        self.modify("clearing a bitmap", |meta| {
            let b = meta.usable_bitmap(name)?;
            b.dirty.clear();
            b.changed = true;
            Ok(())
        })
    }

    /// Makes a bitmap track writes (`true`) or stop tracking them (`false`).
    pub fn bitmap_set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.modify("changing a bitmap", |meta| {
            let b = meta.usable_bitmap(name)?;
            b.enabled = enabled;
            meta.bitmaps.directory_changed = true;
            Ok(())
        })
    }

    /// A copy of a bitmap's bits (to merge into a bitmap of another image).
    pub fn bitmap_contents(&self, name: &str) -> Result<DirtyBitmap> {
        let mut meta = self.lock()?;
        Ok(meta.usable_bitmap(name)?.dirty.clone())
    }

    /// Sets in bitmap `name` every bit `source` has set (any granularity), like
    /// `qemu-img bitmap --merge`; both must cover disks of the same size, as QEMU
    /// requires.
    pub fn bitmap_merge(&self, name: &str, source: &DirtyBitmap) -> Result<()> {
        self.modify("merging a bitmap", |meta| {
            let size = meta.header.size;
            if source.size() != size {
                return Err(invalid!(
                    "bitmaps of disks of different sizes ({} and {size} bytes) cannot be merged",
                    source.size()
                ));
            }
            let b = meta.usable_bitmap(name)?;
            b.dirty.merge(source);
            b.changed = true;
            Ok(())
        })
    }

    /// The dirty and clean runs of bitmap `name` over `[offset, offset + len)`
    /// (clamped to the virtual size), at most `limit` of them: what changed since the
    /// bitmap was started, for a backup that copies only that.
    pub fn dirty_extents(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        limit: usize,
    ) -> Result<Vec<DirtyExtent>> {
        let mut meta = self.lock()?;
        let size = meta.header.size;
        if offset > size {
            return Err(invalid!(
                "dirty extents at offset {offset} past the virtual size {size}"
            ));
        }
        let b = meta.usable_bitmap(name)?;
        Ok(b.dirty
            .extents(offset, len, limit.max(1))
            .into_iter()
            .map(|(start, length, dirty)| DirtyExtent {
                start,
                length,
                dirty,
            })
            .collect())
    }
}
