//! Builds `program/main.rs` into `$OUT_DIR/ferry-linux-guest`: a static x86-64 Linux executable
//! (std, glibc linked statically with `-C target-feature=+crt-static`), compiled with a direct
//! `$RUSTC` invocation so that no RUSTFLAGS are needed for the workspace (the same pattern as
//! the `guest` crate's kernel).

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR not set"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR not set"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let program_dir = manifest_dir.join("program");
    // The pure logic shared with the test guest kernel (command line, verifier, disk log).
    let kernel_dir = manifest_dir.join("../guest/kernel");
    let main_rs = program_dir.join("main.rs");
    let exe = out_dir.join("ferry-linux-guest");

    println!("cargo:rerun-if-changed=build.rs");
    for dir in [&program_dir] {
        println!("cargo:rerun-if-changed={}", dir.display());
        for file in files(dir) {
            println!("cargo:rerun-if-changed={}", file.display());
        }
    }
    for f in ["cmdline.rs", "verify_logic.rs", "disklog.rs"] {
        println!("cargo:rerun-if-changed={}", kernel_dir.join(f).display());
    }

    let output = Command::new(&rustc)
        .arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg("--crate-name=ferry_linux_guest")
        .arg("--target=x86_64-unknown-linux-gnu")
        .args(["-C", "target-feature=+crt-static"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "opt-level=2"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "strip=symbols"])
        .args(["-C", "debug-assertions=off"])
        .args(["-C", "overflow-checks=off"])
        .args(["-C", "codegen-units=1"])
        .args(["-D", "warnings"])
        .arg("-o")
        .arg(&exe)
        .arg(&main_rs)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_BOOTSTRAP")
        .output()
        .unwrap_or_else(|e| panic!("failed to run {rustc:?} to build ferry-linux-guest: {e}"));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building ferry-linux-guest ({}) with {:?} failed ({}); rustc's output is above",
            main_rs.display(),
            rustc,
            output.status
        );
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=ferry-linux-guest: {line}");
    }
}

/// Every file below `dir` (sorted).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("read_dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
