//! Generates the C header from the `ffi` module with cbindgen.
//!
//! The header is written to `$OUT_DIR/cowdisk.h`; `make` copies it to `include/cowdisk.h`
//! (committed) and `make test` checks the two are identical.

fn main() {
    println!("cargo:rerun-if-changed=src/ffi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR");
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR");
    let config = cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml"))
        .expect("cbindgen.toml is readable");
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
