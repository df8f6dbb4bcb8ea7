//! `cowdisk info`: facts about an image, like `qemu-img info`, as text or JSON.

use crate::parse::human_size;
use crate::parse::FormatArg;
use crate::{io_message, CliError, CliResult, Context, PathContext};
use clap::{Args, ValueEnum};
use cowdisk::image::BackingInfo;
use cowdisk::image::BitmapInfo;
use cowdisk::{EncryptionInfo, Image, ImageInfo, OpenOptions, SnapshotInfo};
use serde_json::{json, Map, Value};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Output formats of `cowdisk info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text like `qemu-img info`.
    Human,
    /// JSON with qemu-img's key names.
    Json,
}

/// Arguments of `cowdisk info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    secret: crate::secret::SecretArgs,
    #[command(flatten)]
    format: FormatArg,
    /// Output format.
    #[arg(long = "output", value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Also show full information about every image of the backing chain (JSON: an
    /// array with one object per image, nearest first, like qemu-img).
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    #[command(flatten)]
    share: crate::parse::ShareArg,
    /// The image to inspect.
    #[arg(value_name = "FILE")]
    file: std::path::PathBuf,
}

/// Everything printed about one image of a chain.
enum Entry {
    /// A qcow2 image: its filename, its facts, its snapshots, and the part of the
    /// chain below it as far as it could be opened.
    Qcow2 {
        /// The name the image was opened by.
        filename: String,
        /// The facts the library reports.
        info: Box<ImageInfo>,
        /// The internal snapshots, in table order.
        snapshots: Vec<SnapshotInfo>,
        /// The persistent dirty bitmaps, in directory order, or why they could not
        /// be read.
        bitmaps: Result<Vec<BitmapInfo>, String>,
        /// The image file on the host.
        file: HostFile,
        /// The backing file name resolved against the image's folder, as qemu-img's
        /// `full-backing-filename`.
        full_backing: Option<String>,
        /// The backing chain below this image, nearest first, or why it could not
        /// be opened.
        chain: Result<Vec<BackingInfo>, String>,
    },
    /// A raw image of a backing chain.
    Raw {
        /// The name the file was found by.
        filename: String,
        /// The file on the host (its length is the virtual size).
        file: HostFile,
    },
}

/// What `stat` says about an image file: qemu-img's `file` child.
#[derive(Debug, Clone, Copy, Default)]
struct HostFile {
    /// File length in bytes, rounded up to whole 512-byte sectors as QEMU's block
    /// layer reports it.
    length: u64,
    /// Bytes allocated on the host (what qemu-img calls "disk size"), when known.
    allocated: Option<u64>,
}

impl HostFile {
    /// Stats `path`; zeros when it cannot be stat'ed.
    fn stat(path: &Path) -> HostFile {
        match std::fs::metadata(path) {
            Ok(m) => HostFile {
                length: m.len().div_ceil(512) * 512,
                allocated: Some(m.blocks() * 512),
            },
            Err(_) => HostFile::default(),
        }
    }
}

/// The most backing files `--backing-chain` walks (a loop guard).
const MAX_CHAIN: usize = 64;

/// What [`open_info`] collects: the facts, the snapshots and the bitmaps.
type Facts = (
    ImageInfo,
    Vec<SnapshotInfo>,
    Result<Vec<BitmapInfo>, String>,
);

/// Opens one image read-only and collects its facts, snapshots and bitmaps.
fn open_info(path: &Path, follow_backing: bool, share: bool) -> CliResult<Facts> {
    let options = OpenOptions {
        read_only: true,
        follow_backing,
        force_share: share,
        metadata_only: true,
        ..OpenOptions::default()
    };
    let image = Image::open(path, &options).path_context("open", path)?;
    let info = image.info();
    let snapshots = image
        .snapshots()
        .path_context("read the snapshots of", path)?;
    let bitmaps = image.bitmaps().map_err(|e| e.to_string());
    image
        .close()
        .context(|| format!("could not close '{}'", path.display()))?;
    Ok((info, snapshots, bitmaps))
}

/// qemu-img's `full-backing-filename`: a relative backing name joined to the folder
/// of the image that names it.
fn full_backing_name(image: &Path, backing: &str) -> PathBuf {
    let b = Path::new(backing);
    if b.is_absolute() {
        return b.to_path_buf();
    }
    match image.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b),
        _ => b.to_path_buf(),
    }
}

/// The format of a backing file: the one stored in the image, else probed from the
/// file's first bytes (qcow2 magic, or raw).
fn backing_format(path: &Path, stored: Option<&str>) -> CliResult<String> {
    if let Some(f) = stored {
        return Ok(f.to_string());
    }
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| {
        CliError(format!(
            "could not open '{}': {}",
            path.display(),
            io_message(&e)
        ))
    })?;
    let n = file.read(&mut magic).unwrap_or(0);
    Ok(if n == 4 && magic == *b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
    .to_string())
}

/// The entry of the qcow2 image at `path`. The chain below it is followed only for
/// the `cowdisk` extension object; an image whose backing file cannot be opened is
/// still shown, as qemu-img does.
fn qcow2_entry(path: &Path, share: bool) -> CliResult<Entry> {
    let (info, snapshots, bitmaps) = open_info(path, false, share)?;
    let chain = if info.backing_file.is_some() {
        open_info(path, true, share)
            .map(|(i, _, _)| i.backing_chain)
            .map_err(|e| e.0)
    } else {
        Ok(Vec::new())
    };
    let full_backing = info
        .backing_file
        .as_deref()
        .map(|b| full_backing_name(path, b).to_string_lossy().into_owned());
    Ok(Entry::Qcow2 {
        filename: path.to_string_lossy().into_owned(),
        file: HostFile::stat(path),
        info: Box::new(info),
        snapshots,
        bitmaps,
        full_backing,
        chain,
    })
}

/// Runs `cowdisk info`.
pub fn run(args: InfoArgs) -> CliResult {
    args.format.check()?;
    let share = args.share.force_share;
    let mut entries = vec![qcow2_entry(&args.file, share)?];
    if args.backing_chain {
        while let Some(Entry::Qcow2 {
            filename: parent,
            info,
            full_backing: Some(next),
            ..
        }) = entries.last()
        {
            if entries.len() > MAX_CHAIN {
                return Err(CliError(format!(
                    "the backing chain of '{}' is longer than {MAX_CHAIN} images",
                    args.file.display()
                )));
            }
            let next = PathBuf::from(next);
            if let Err(e) = std::fs::metadata(&next) {
                return Err(CliError(format!(
                    "could not open backing file '{}' of '{parent}': {}",
                    next.display(),
                    io_message(&e)
                )));
            }
            let format = backing_format(&next, info.backing_format.as_deref())?;
            if format == "qcow2" {
                entries.push(qcow2_entry(&next, share)?);
            } else {
                entries.push(Entry::Raw {
                    filename: next.to_string_lossy().into_owned(),
                    file: HostFile::stat(&next),
                });
            }
        }
    }
    match args.output {
        OutputFormat::Json => {
            let value = if args.backing_chain {
                Value::Array(entries.iter().map(entry_json).collect())
            } else {
                entry_json(&entries[0])
            };
            let text = serde_json::to_string_pretty(&value)
                .map_err(|e| CliError(format!("could not format JSON: {e}")))?;
            println!("{text}");
        }
        OutputFormat::Human => {
            let texts: Vec<String> = entries.iter().map(entry_human).collect();
            print!("{}", texts.join("\n"));
        }
    }
    Ok(())
}

/// The qcow2 compat level string of a version.
fn compat(version: u32) -> &'static str {
    if version >= 3 {
        "1.1"
    } else {
        "0.10"
    }
}

/// The JSON object of one backing-chain member as listed under
/// `cowdisk.backing-chain`.
fn chain_member_json(b: &BackingInfo) -> Value {
    json!({
        "filename": b.filename,
        "format": b.format,
        "virtual-size": b.virtual_size,
    })
}

/// qemu-img's `children` array: the `file` child, the host file under the image.
fn children_json(filename: &str, file: &HostFile) -> Value {
    let mut child = Map::new();
    child.insert("children".into(), json!([]));
    child.insert("virtual-size".into(), json!(file.length));
    child.insert("filename".into(), json!(filename));
    child.insert("format".into(), json!("file"));
    if let Some(a) = file.allocated {
        child.insert("actual-size".into(), json!(a));
    }
    child.insert(
        "format-specific".into(),
        json!({ "type": "file", "data": {} }),
    );
    child.insert("dirty-flag".into(), json!(false));
    json!([{ "name": "file", "info": Value::Object(child) }])
}

/// One entry of qemu-img's `snapshots` array.
fn snapshot_json(s: &SnapshotInfo) -> Value {
    let mut obj = Map::new();
    obj.insert("id".into(), json!(s.id));
    obj.insert("name".into(), json!(s.name));
    obj.insert("vm-state-size".into(), json!(s.vm_state_size));
    obj.insert("date-sec".into(), json!(s.date_sec));
    obj.insert("date-nsec".into(), json!(s.date_nsec));
    obj.insert(
        "vm-clock-sec".into(),
        json!(s.vm_clock_nsec / 1_000_000_000),
    );
    obj.insert(
        "vm-clock-nsec".into(),
        json!(s.vm_clock_nsec % 1_000_000_000),
    );
    if s.icount != -1 {
        obj.insert("icount".into(), json!(s.icount));
    }
    Value::Object(obj)
}

/// The JSON object of one image: qemu-img's keys, plus cowdisk's own facts in one
/// `cowdisk` object.
fn entry_json(entry: &Entry) -> Value {
    match entry {
        Entry::Raw { filename, file } => {
            let mut obj = Map::new();
            obj.insert("children".into(), children_json(filename, file));
            obj.insert("virtual-size".into(), json!(file.length));
            obj.insert("filename".into(), json!(filename));
            obj.insert("format".into(), json!("raw"));
            if let Some(a) = file.allocated {
                obj.insert("actual-size".into(), json!(a));
            }
            obj.insert("dirty-flag".into(), json!(false));
            Value::Object(obj)
        }
        Entry::Qcow2 {
            filename,
            info,
            snapshots,
            bitmaps,
            file,
            full_backing,
            chain,
        } => {
            let mut data = Map::new();
            data.insert("compat".into(), json!(compat(info.version)));
            data.insert(
                "compression-type".into(),
                json!(info.compression_type.name()),
            );
            if info.version >= 3 {
                data.insert("lazy-refcounts".into(), json!(info.lazy_refcounts));
            }
            if let Some(list) = bitmaps_json(bitmaps) {
                data.insert("bitmaps".into(), list);
            }
            data.insert("refcount-bits".into(), json!(info.refcount_bits));
            if let Some(e) = encrypt_json(info) {
                data.insert("encrypt".into(), e);
            }
            if info.version >= 3 {
                data.insert("corrupt".into(), json!(info.corrupt));
                data.insert("extended-l2".into(), json!(false));
            }
            let mut obj = Map::new();
            obj.insert("children".into(), children_json(filename, file));
            if !snapshots.is_empty() {
                obj.insert(
                    "snapshots".into(),
                    Value::Array(snapshots.iter().map(snapshot_json).collect()),
                );
            }
            obj.insert("virtual-size".into(), json!(info.virtual_size));
            obj.insert("filename".into(), json!(filename));
            obj.insert("cluster-size".into(), json!(info.cluster_size));
            obj.insert("format".into(), json!("qcow2"));
            obj.insert(
                "actual-size".into(),
                json!(file.allocated.unwrap_or(info.host_size)),
            );
            if info.encryption.is_some() {
                obj.insert("encrypted".into(), json!(true));
            }
            obj.insert(
                "format-specific".into(),
                json!({ "type": "qcow2", "data": Value::Object(data) }),
            );
            if let Some(b) = &info.backing_file {
                obj.insert("backing-filename".into(), json!(b));
            }
            if let Some(f) = full_backing {
                obj.insert("full-backing-filename".into(), json!(f));
            }
            if let Some(f) = &info.backing_format {
                obj.insert("backing-filename-format".into(), json!(f));
            }
            obj.insert("dirty-flag".into(), json!(info.dirty));
            let mut ours = Map::new();
            ours.insert("version".into(), json!(info.version));
            ours.insert("host-size".into(), json!(info.host_size));
            match chain {
                Ok(chain) => {
                    ours.insert(
                        "backing-chain".into(),
                        Value::Array(chain.iter().map(chain_member_json).collect()),
                    );
                }
                Err(why) => {
                    ours.insert("backing-chain-error".into(), json!(why));
                }
            }
            match bitmaps {
                Ok(list) if !list.is_empty() => {
                    let ours_list: Vec<Value> = list
                        .iter()
                        .map(|b| {
                            let mut o = Map::new();
                            o.insert("name".into(), json!(b.name));
                            o.insert("inconsistent".into(), json!(b.inconsistent));
                            if !b.inconsistent {
                                o.insert("dirty-bytes".into(), json!(b.dirty_bytes));
                            }
                            Value::Object(o)
                        })
                        .collect();
                    ours.insert("bitmaps".into(), Value::Array(ours_list));
                }
                Ok(_) => {}
                Err(why) => {
                    ours.insert("bitmaps-error".into(), json!(why));
                }
            }
            obj.insert("cowdisk".into(), Value::Object(ours));
            Value::Object(obj)
        }
    }
}

/// The text of one image, laid out like `qemu-img info`.
fn entry_human(entry: &Entry) -> String {
    let size_line = |bytes: u64| format!("{} ({bytes} bytes)", human_size(bytes));
    let mut out = String::new();
    let child = |out: &mut String, filename: &str, file: &HostFile| {
        *out += "Child node '/file':\n";
        *out += &format!("    filename: {filename}\n");
        *out += "    protocol type: file\n";
        *out += &format!("    file length: {}\n", size_line(file.length));
        if let Some(a) = file.allocated {
            *out += &format!("    disk size: {}\n", human_size(a));
        }
    };
    match entry {
        Entry::Raw { filename, file } => {
            out += &format!("image: {filename}\n");
            out += "file format: raw\n";
            out += &format!("virtual size: {}\n", size_line(file.length));
            if let Some(a) = file.allocated {
                out += &format!("disk size: {}\n", human_size(a));
            }
            child(&mut out, filename, file);
        }
        Entry::Qcow2 {
            filename,
            info,
            snapshots,
            bitmaps,
            file,
            full_backing,
            chain,
        } => {
            out += &format!("image: {filename}\n");
            out += "file format: qcow2\n";
            out += &format!("virtual size: {}\n", size_line(info.virtual_size));
            out += &format!(
                "disk size: {}\n",
                human_size(file.allocated.unwrap_or(info.host_size))
            );
            if info.encryption.is_some() {
                out += "encrypted: yes\n";
            }
            out += &format!("cluster_size: {}\n", info.cluster_size);
            if let Some(b) = &info.backing_file {
                match full_backing {
                    Some(full) if full != b => {
                        out += &format!("backing file: {b} (actual path: {full})\n")
                    }
                    _ => out += &format!("backing file: {b}\n"),
                }
            }
            if let Some(f) = &info.backing_format {
                out += &format!("backing file format: {f}\n");
            }
            if !snapshots.is_empty() {
                out += "Snapshot list:\n";
                out += &snapshot_table(snapshots);
            }
            if info.dirty {
                out += "cleanly shut down: no\n";
            }
            out += "Format specific information:\n";
            out += &format!("    compat: {}\n", compat(info.version));
            out += &format!("    compression type: {}\n", info.compression_type.name());
            if info.version >= 3 {
                out += &format!("    lazy refcounts: {}\n", info.lazy_refcounts);
            }
            if let Some(Value::Array(list)) = bitmaps_json(bitmaps) {
                out += "    bitmaps:\n";
                for (i, b) in list.iter().enumerate() {
                    out += &format!("        [{i}]:\n");
                    out += "            flags:\n";
                    for (j, f) in b["flags"].as_array().into_iter().flatten().enumerate() {
                        out += &format!("                [{j}]: {}\n", f.as_str().unwrap_or(""));
                    }
                    out += &format!("            name: {}\n", b["name"].as_str().unwrap_or(""));
                    out += &format!("            granularity: {}\n", b["granularity"]);
                }
            }
            out += &format!("    refcount bits: {}\n", info.refcount_bits);
            if let Some(Value::Object(e)) = encrypt_json(info) {
                out += "    encrypt:\n";
                let ordered = qemu_encrypt_order(e);
                human_object(&mut out, ordered.iter().map(|(k, v)| (k, v)), 8);
            }
            if info.version >= 3 {
                out += &format!("    corrupt: {}\n", info.corrupt);
                out += "    extended l2: false\n";
            }
            child(&mut out, filename, file);
            if let Ok(chain) = chain {
                if !chain.is_empty() {
                    out += "Backing chain:\n";
                    for (depth, member) in chain.iter().enumerate() {
                        out += &format!(
                            "    [{}] {}: {}, virtual size {}\n",
                            depth + 1,
                            member.filename,
                            member.format,
                            size_line(member.virtual_size)
                        );
                    }
                }
            }
        }
    }
    out
}

/// `format-specific.data.bitmaps` as `qemu-img info` shows it: flags (`in-use`
/// before `auto`), name and granularity of each bitmap; `None` (the key left out)
/// when there are none or they could not be read.
fn bitmaps_json(bitmaps: &Result<Vec<BitmapInfo>, String>) -> Option<Value> {
    let list = bitmaps.as_ref().ok().filter(|l| !l.is_empty())?;
    Some(Value::Array(
        list.iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.inconsistent {
                    flags.push("in-use");
                }
                if b.enabled {
                    flags.push("auto");
                }
                json!({ "flags": flags, "name": b.name, "granularity": b.granularity })
            })
            .collect(),
    ))
}

/// The snapshot table of `qemu-img info`, as `cowdisk snapshot -l` prints it.
fn snapshot_table(snapshots: &[SnapshotInfo]) -> String {
    let mut out = crate::snapshot::header_row() + "\n";
    for s in snapshots {
        out += &crate::snapshot::format_row(s);
        out += "\n";
    }
    out
}

/// `format-specific.data.encrypt` as `qemu-img info` shows it.
fn encrypt_json(info: &ImageInfo) -> Option<Value> {
    Some(match info.encryption.as_ref()? {
        EncryptionInfo::LegacyAes => json!({ "format": "aes" }),
        EncryptionInfo::Luks(luks) => luks.to_json(),
    })
}

/// The order in which `qemu-img info` prints the keys of a LUKS `encrypt` object (the
/// order of QEMU's hash table, fixed by the key names); other keys follow.
const QEMU_ENCRYPT_ORDER: &[&str] = &[
    "ivgen-alg",
    "detached-header",
    "hash-alg",
    "cipher-alg",
    "uuid",
    "ivgen-hash-alg",
    "format",
    "cipher-mode",
    "slots",
    "payload-offset",
    "master-key-iters",
];

/// The `encrypt` object's entries in `qemu-img info`'s text order.
fn qemu_encrypt_order(mut e: Map<String, Value>) -> Vec<(String, Value)> {
    let mut ordered = Vec::new();
    for key in QEMU_ENCRYPT_ORDER {
        if let Some(v) = e.remove(*key) {
            ordered.push((key.to_string(), v));
        }
    }
    ordered.extend(e);
    ordered
}

/// Writes a JSON object the way `qemu-img info` prints format-specific data: keys
/// with spaces for dashes, lists of objects as `[i]:` entries.
fn human_object<'a>(
    out: &mut String,
    obj: impl IntoIterator<Item = (&'a String, &'a Value)>,
    indent: usize,
) {
    let pad = " ".repeat(indent);
    for (key, value) in obj {
        let key = key.replace('-', " ");
        match value {
            Value::Array(items) => {
                *out += &format!("{pad}{key}:\n");
                for (i, item) in items.iter().enumerate() {
                    *out += &format!("{pad}    [{i}]:\n");
                    if let Value::Object(o) = item {
                        human_object(out, o, indent + 8);
                    }
                }
            }
            Value::Object(o) => {
                *out += &format!("{pad}{key}:\n");
                human_object(out, o, indent + 4);
            }
            Value::String(s) => *out += &format!("{pad}{key}: {s}\n"),
            other => *out += &format!("{pad}{key}: {other}\n"),
        }
    }
}
