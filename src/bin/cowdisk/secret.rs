//! The passphrase of encrypted images on the command line: `--secret-file FILE`, or
//! qemu-img's `--object secret,id=ID,file=FILE` / `--object secret,id=ID,data=TEXT`
//! (chosen with `-o encrypt.key-secret=ID` on create, or the only one given).

use crate::{CliError, CliResult};
use clap::Args;
use cowdisk::crypto::Secret;
use std::path::PathBuf;

/// Options giving the passphrase of encrypted images.
#[derive(Debug, Args, Default, Clone)]
pub struct SecretArgs {
    /// File holding the passphrase of an encrypted image: its whole contents, byte
    /// for byte (a trailing newline is part of it, as with QEMU's secret files).
    #[arg(long = "secret-file", value_name = "FILE")]
    secret_file: Option<PathBuf>,
    /// A qemu-img style secret object: `secret,id=ID,file=FILE` or
    /// `secret,id=ID,data=TEXT`. May be repeated.
    #[arg(long = "object", value_name = "OBJECT")]
    objects: Vec<String>,
}

/// One `--object secret,…`.
struct SecretObject {
    id: String,
    bytes: Vec<u8>,
}

fn parse_object(text: &str) -> CliResult<SecretObject> {
    let mut parts = text.split(',');
    let kind = parts.next().unwrap_or_default();
    let kind = kind.strip_prefix("qom-type=").unwrap_or(kind);
    if kind != "secret" {
        return Err(CliError(format!(
            "--object {kind}: only secret objects are supported"
        )));
    }
    let (mut id, mut bytes) = (None, None);
    for part in parts {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| CliError(format!("--object: '{part}' is not key=value")))?;
        match key {
            "id" => id = Some(value.to_string()),
            "data" => bytes = Some(value.as_bytes().to_vec()),
            "file" => {
                bytes = Some(std::fs::read(value).map_err(|e| {
                    CliError(format!(
                        "cannot read the secret file '{value}': {}",
                        crate::io_message(&e)
                    ))
                })?)
            }
            "format" if value == "raw" => {}
            _ => {
                return Err(CliError(format!(
                    "--object secret: unsupported property '{key}' (id, data, file)"
                )))
            }
        }
    }
    let id = id.ok_or_else(|| CliError("--object secret needs an id".to_string()))?;
    let bytes =
        bytes.ok_or_else(|| CliError(format!("--object secret,id={id} needs data= or file=")))?;
    Ok(SecretObject { id, bytes })
}

impl SecretArgs {
    /// The passphrase of a copy's source: `--secret-file`, or the secret object that
    /// is not the target's (`target_id`), or the only one given.
    pub fn source_secret(&self, target_id: Option<&str>) -> CliResult<Option<Secret>> {
        if self.secret_file.is_some() {
            return self.secret(None);
        }
        let objects = self
            .objects
            .iter()
            .map(|o| parse_object(o))
            .collect::<CliResult<Vec<_>>>()?;
        let mut others: Vec<SecretObject> = match target_id {
            Some(id) if objects.len() > 1 => objects.into_iter().filter(|o| o.id != id).collect(),
            _ => objects,
        };
        match others.len() {
            0 => Ok(None),
            1 => Ok(others.pop().map(|o| Secret::new(o.bytes))),
            _ => Err(CliError(
                "several secret objects: cannot tell which one opens the source".into(),
            )),
        }
    }

    /// The passphrase given, if any. `key_id` picks an `--object` by id (from
    /// `encrypt.key-secret=`); without it, the only object given is used.
    pub fn secret(&self, key_id: Option<&str>) -> CliResult<Option<Secret>> {
        let mut objects = self
            .objects
            .iter()
            .map(|o| parse_object(o))
            .collect::<CliResult<Vec<_>>>()?;
        if let Some(file) = &self.secret_file {
            if !objects.is_empty() {
                return Err(CliError(
                    "give the passphrase with --secret-file or --object, not both".into(),
                ));
            }
            let bytes = std::fs::read(file).map_err(|e| {
                CliError(format!(
                    "cannot read the secret file '{}': {}",
                    file.display(),
                    crate::io_message(&e)
                ))
            })?;
            return Ok(Some(Secret::new(bytes)));
        }
        match key_id {
            Some(id) => match objects.iter().position(|o| o.id == id) {
                Some(i) => Ok(Some(Secret::new(objects.swap_remove(i).bytes))),
                None => Err(CliError(format!(
                    "no secret object with id '{id}' was given"
                ))),
            },
            None if objects.len() > 1 => Err(CliError(
                "several secret objects: name one with -o encrypt.key-secret=ID".into(),
            )),
            None => Ok(objects.pop().map(|o| Secret::new(o.bytes))),
        }
    }
}
