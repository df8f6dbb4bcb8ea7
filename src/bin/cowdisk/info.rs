//! `cowdisk info`: facts about an image, like `qemu-img info`, as text or JSON.

use crate::parse::human_size;
use crate::parse::FormatArg;
use crate::{CliError, CliResult, Context, PathContext};
use clap::{Args, ValueEnum};
use cowdisk::image::BackingInfo;
use cowdisk::{EncryptionInfo, Image, ImageInfo, OpenOptions};
use serde_json::{json, Map, Value};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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
    /// A qcow2 image: its filename, its facts, its allocated host size, and the part
    /// of the chain below it.
    Qcow2 {
        /// The name the image was opened by.
        filename: String,
        /// The facts the library reports.
        info: Box<ImageInfo>,
        /// Bytes allocated on the host.
        actual_size: u64,
        /// The backing chain below this image, nearest first.
        chain: Vec<BackingInfo>,
    },
    /// A raw image of a backing chain.
    Raw {
        /// The chain entry the library reported.
        backing: BackingInfo,
        /// Bytes allocated on the host, when the file could be stat'ed.
        actual_size: Option<u64>,
    },
}

/// Bytes allocated for a file on the host (what qemu-img calls "disk size").
fn allocated_size(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// Opens one image read-only and collects its facts.
fn open_info(path: &Path, follow_backing: bool, share: bool) -> CliResult<ImageInfo> {
    let options = OpenOptions {
        read_only: true,
        follow_backing,
        force_share: share,
        metadata_only: true,
        ..OpenOptions::default()
    };
    let image = Image::open(path, &options).path_context("open", path)?;
    let info = image.info();
    image
        .close()
        .context(|| format!("could not close '{}'", path.display()))?;
    Ok(info)
}

/// Runs `cowdisk info`.
pub fn run(args: InfoArgs) -> CliResult {
    args.format.check()?;
    let info = open_info(&args.file, true, args.share.force_share)?;
    let chain = info.backing_chain.clone();
    let mut entries = vec![Entry::Qcow2 {
        filename: args.file.to_string_lossy().into_owned(),
        actual_size: allocated_size(&args.file).unwrap_or(info.host_size),
        info: Box::new(info),
        chain: chain.clone(),
    }];
    if args.backing_chain {
        for (i, member) in chain.iter().enumerate() {
            let path = Path::new(&member.filename);
            entries.push(if member.format == "qcow2" {
                let info = open_info(path, false, args.share.force_share)?;
                Entry::Qcow2 {
                    filename: member.filename.clone(),
                    actual_size: allocated_size(path).unwrap_or(info.host_size),
                    info: Box::new(info),
                    chain: chain[i + 1..].to_vec(),
                }
            } else {
                Entry::Raw {
                    backing: member.clone(),
                    actual_size: allocated_size(path),
                }
            });
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

/// The JSON object of one backing-chain member as listed under `backing-chain`.
fn chain_member_json(b: &BackingInfo) -> Value {
    json!({
        "filename": b.filename,
        "format": b.format,
        "virtual-size": b.virtual_size,
    })
}

/// The JSON object of one image, with qemu-img's key names plus `backing-chain`.
fn entry_json(entry: &Entry) -> Value {
    match entry {
        Entry::Raw {
            backing,
            actual_size,
        } => {
            let mut obj = Map::new();
            obj.insert("filename".into(), json!(backing.filename));
            obj.insert("format".into(), json!(backing.format));
            obj.insert("virtual-size".into(), json!(backing.virtual_size));
            if let Some(a) = actual_size {
                obj.insert("actual-size".into(), json!(a));
            }
            obj.insert("dirty-flag".into(), json!(false));
            Value::Object(obj)
        }
        Entry::Qcow2 {
            filename,
            info,
            actual_size,
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
            data.insert("refcount-bits".into(), json!(info.refcount_bits));
            if let Some(e) = encrypt_json(info) {
                data.insert("encrypt".into(), e);
            }
            if info.version >= 3 {
                data.insert("corrupt".into(), json!(info.corrupt));
            }
            let mut obj = Map::new();
            obj.insert("filename".into(), json!(filename));
            obj.insert("format".into(), json!("qcow2"));
            obj.insert("virtual-size".into(), json!(info.virtual_size));
            obj.insert("actual-size".into(), json!(actual_size));
            obj.insert("cluster-size".into(), json!(info.cluster_size));
            obj.insert("dirty-flag".into(), json!(info.dirty));
            if info.nb_snapshots > 0 {
                obj.insert("snapshot-count".into(), json!(info.nb_snapshots));
            }
            if let Some(b) = &info.backing_file {
                obj.insert("backing-filename".into(), json!(b));
            }
            if let Some(first) = chain.first() {
                obj.insert("full-backing-filename".into(), json!(first.filename));
            }
            if let Some(f) = &info.backing_format {
                obj.insert("backing-filename-format".into(), json!(f));
            }
            obj.insert(
                "format-specific".into(),
                json!({ "type": "qcow2", "data": Value::Object(data) }),
            );
            if info.encryption.is_some() {
                obj.insert("encrypted".into(), json!(true));
            }
            obj.insert(
                "backing-chain".into(),
                Value::Array(chain.iter().map(chain_member_json).collect()),
            );
            Value::Object(obj)
        }
    }
}

/// The text of one image, laid out like `qemu-img info`.
fn entry_human(entry: &Entry) -> String {
    let size_line = |bytes: u64| format!("{} ({bytes} bytes)", human_size(bytes));
    let mut out = String::new();
    match entry {
        Entry::Raw {
            backing,
            actual_size,
        } => {
            out += &format!("image: {}\n", backing.filename);
            out += &format!("file format: {}\n", backing.format);
            out += &format!("virtual size: {}\n", size_line(backing.virtual_size));
            if let Some(a) = actual_size {
                out += &format!("disk size: {}\n", human_size(*a));
            }
        }
        Entry::Qcow2 {
            filename,
            info,
            actual_size,
            chain,
        } => {
            out += &format!("image: {filename}\n");
            out += "file format: qcow2\n";
            out += &format!("virtual size: {}\n", size_line(info.virtual_size));
            out += &format!("disk size: {}\n", human_size(*actual_size));
            if info.encryption.is_some() {
                out += "encrypted: yes\n";
            }
            out += &format!("cluster_size: {}\n", info.cluster_size);
            if let Some(b) = &info.backing_file {
                match chain.first() {
                    Some(first) if first.filename != *b => {
                        out += &format!("backing file: {b} (actual path: {})\n", first.filename)
                    }
                    _ => out += &format!("backing file: {b}\n"),
                }
            }
            if let Some(f) = &info.backing_format {
                out += &format!("backing file format: {f}\n");
            }
            if info.nb_snapshots > 0 {
                out += &format!("internal snapshots: {}\n", info.nb_snapshots);
            }
            if info.dirty {
                out += "dirty flag: true\n";
            }
            out += "Format specific information:\n";
            out += &format!("    compat: {}\n", compat(info.version));
            out += &format!("    compression type: {}\n", info.compression_type.name());
            if info.version >= 3 {
                out += &format!("    lazy refcounts: {}\n", info.lazy_refcounts);
            }
            out += &format!("    refcount bits: {}\n", info.refcount_bits);
            if let Some(Value::Object(e)) = encrypt_json(info) {
                out += "    encrypt:\n";
                human_object(&mut out, &e, 8);
            }
            if info.version >= 3 {
                out += &format!("    corrupt: {}\n", info.corrupt);
            }
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
    out
}

/// `format-specific.data.encrypt` as `qemu-img info` shows it.
fn encrypt_json(info: &ImageInfo) -> Option<Value> {
    Some(match info.encryption.as_ref()? {
        EncryptionInfo::LegacyAes => json!({ "format": "aes" }),
        EncryptionInfo::Luks(luks) => luks.to_json(),
    })
}

/// Writes a JSON object the way `qemu-img info` prints format-specific data: keys
/// with spaces for dashes, lists of objects as `[i]:` entries.
fn human_object(out: &mut String, obj: &Map<String, Value>, indent: usize) {
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
