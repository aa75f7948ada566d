//! Builds the Ferry test guest kernel (`kernel/main.rs`) into `$OUT_DIR/ferry-guest.elf`.
//!
//! The kernel is a `#![no_std] #![no_main]` binary for the host target (the only Rust target
//! available), compiled with a direct `$RUSTC` invocation and linked statically at 1 MiB by
//! `kernel/kernel.ld`. See the doc comment of `kernel/main.rs` for its design.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR not set"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR not set"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let kernel_dir = manifest_dir.join("kernel");
    let main_rs = kernel_dir.join("main.rs");
    let linker_script = kernel_dir.join("kernel.ld");
    let elf = out_dir.join("ferry-guest.elf");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", kernel_dir.display());
    for file in kernel_files(&kernel_dir) {
        println!("cargo:rerun-if-changed={}", file.display());
    }

    let output = Command::new(&rustc)
        .arg("--edition=2021")
        .arg("--crate-type=bin")
        .arg("--crate-name=ferry_guest")
        .arg("--target=x86_64-unknown-linux-gnu")
        .args(["-C", "panic=abort"])
        .args(["-C", "relocation-model=static"])
        .args(["-C", "opt-level=2"])
        .args(["-C", "debuginfo=0"])
        .args(["-C", "strip=debuginfo"])
        .args(["-C", "debug-assertions=off"])
        .args(["-C", "overflow-checks=off"])
        .args(["-C", "codegen-units=1"])
        .args(["-C", "force-unwind-tables=no"])
        .args(["-C", &format!("link-arg=-T{}", linker_script.display())])
        .args(["-C", "link-arg=-nostartfiles"])
        .args(["-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static"])
        .args(["-C", "link-arg=-no-pie"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .args(["-C", "link-arg=-Wl,-z,norelro"])
        .arg("-o")
        .arg(&elf)
        .arg(&main_rs)
        // Never let outer RUSTFLAGS-style settings or an incremental dir leak into the kernel.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTC_BOOTSTRAP")
        .output()
        .unwrap_or_else(|e| panic!("failed to run {rustc:?} to build the guest kernel: {e}"));

    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the Ferry guest kernel ({}) with {:?} failed ({}); rustc's output is above",
            main_rs.display(),
            rustc,
            output.status
        );
    }
    // rustc warnings about the kernel: show them to the developer.
    let stderr = String::from_utf8_lossy(&output.stderr);
    for line in stderr.lines().filter(|l| !l.trim().is_empty()) {
        println!("cargo:warning=guest kernel: {line}");
    }
}

/// Every file below `dir` (sorted), so cargo reruns this script when any of them changes.
fn kernel_files(dir: &Path) -> Vec<PathBuf> {
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
