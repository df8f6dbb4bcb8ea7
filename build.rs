//! Generates the C header from the `ffi` module with cbindgen.
//!
//! The header is written to `$OUT_DIR/cowdisk.h`; `make` copies it to `include/cowdisk.h`
//! (committed) and `make test` checks the two are identical.

fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    // The version macros come from the package version.
    println!("cargo:rerun-if-changed=Cargo.toml");
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR");
    let mut config = cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml"))
        .expect("cbindgen.toml is readable");
    config.after_includes = Some(version_macros());
    match cbindgen::Builder::new()
        // Only the ffi module is the ABI: parsing the whole crate would export every
        // internal `pub const` as a macro.
        .with_src(format!("{crate_dir}/src/ffi/mod.rs"))
        .with_config(config)
        .generate()
    {
        Ok(bindings) => {
            bindings.write_to_file(format!("{out_dir}/cowdisk.h"));
        }
        Err(e) => {
            // A syntax error in the crate is reported better by rustc itself.
            println!("cargo:warning=cbindgen could not generate the header: {e}");
        }
    }
}

/// The version macros of the header, from Cargo.toml's version (what
/// `cowdisk_version()` returns at run time).
fn version_macros() -> String {
    let v = |k: &str| std::env::var(k).expect("cargo sets the package version");
    format!(
        "\n/**\n * The version of cowdisk this header belongs to (`cowdisk_version()` gives the\n \
         * version of the library loaded at run time).\n */\n\
         #define COWDISK_VERSION_MAJOR {}\n\
         #define COWDISK_VERSION_MINOR {}\n\
         #define COWDISK_VERSION_PATCH {}\n\
         #define COWDISK_VERSION_STRING \"{}\"\n",
        v("CARGO_PKG_VERSION_MAJOR"),
        v("CARGO_PKG_VERSION_MINOR"),
        v("CARGO_PKG_VERSION_PATCH"),
        v("CARGO_PKG_VERSION"),
    )
}
