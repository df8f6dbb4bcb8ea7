//! Replays every input in `fuzz/regressions/` through the fuzzing harness (the same
//! code the cargo-fuzz targets run): each once made cowdisk panic, hang or allocate
//! without bound, and must not any more.

#[path = "../fuzz/harness.rs"]
mod harness;

#[test]
fn fuzz_regressions_replay() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("fuzz/regressions")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_none_or(|e| e != "md"))
        .collect();
    inputs.sort();
    for path in &inputs {
        let data = std::fs::read(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // Inputs found by the header target start with "header-".
        let start = std::time::Instant::now();
        if name.starts_with("header-") {
            harness::open_only(&data);
        } else {
            harness::run(&data);
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{name} took {:?}",
            start.elapsed()
        );
    }
    eprintln!("{} fuzz regressions replayed", inputs.len());
}
