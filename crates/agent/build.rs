//! Builds the web console (web/, TypeScript + Preact through Vite) from source and embeds
//! its files in the agent: `OUT_DIR/console_files.rs` lists them for `console.rs`. The npm
//! packages come from `scripts/install-deps.sh` (`npm ci` in web/, lockfile committed); no
//! prebuilt bundle is committed and nothing is fetched at run time.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let web = manifest.join("../../web");
    for f in [
        "src",
        "public",
        "index.html",
        "package.json",
        "package-lock.json",
        "vite.config.ts",
        "tsconfig.json",
    ] {
        println!("cargo:rerun-if-changed={}", web.join(f).display());
    }
    let bin = web.join("node_modules/.bin");
    if !bin.join("vite").exists() || !bin.join("tsc").exists() {
        panic!(
            "the web console's npm packages are missing ({}): run scripts/install-deps.sh, \
             which runs `npm ci` in web/ (Node.js and npm from the machine)",
            bin.display()
        );
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("console");
    run(&web, &bin.join("tsc"), &["--noEmit", "-p", "."]);
    run(
        &web,
        &bin.join("vite"),
        &[
            "build",
            "--logLevel",
            "warn",
            "--emptyOutDir",
            "--outDir",
            out.to_str().expect("OUT_DIR is not UTF-8"),
        ],
    );
    let mut files = Vec::new();
    collect(&out, &out, &mut files);
    files.sort();
    if !files.iter().any(|(n, _)| n == "index.html") {
        panic!("the console build made no index.html in {}", out.display());
    }
    let mut src = String::from(
        "/// The console's files: (path under the root, MIME type, bytes).\n\
         pub static FILES: &[(&str, &str, &[u8])] = &[\n",
    );
    for (name, path) in &files {
        let mime = match Path::new(name).extension().and_then(|e| e.to_str()) {
            Some("html") => "text/html; charset=utf-8",
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            Some("png") => "image/png",
            Some("json") => "application/json",
            _ => "application/octet-stream",
        };
        src.push_str(&format!(
            "    ({name:?}, {mime:?}, include_bytes!({:?})),\n",
            path.display().to_string()
        ));
    }
    src.push_str("];\n");
    let gen = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("console_files.rs");
    std::fs::write(&gen, src).expect("write console_files.rs");
}

fn run(dir: &Path, cmd: &Path, args: &[&str]) {
    let o = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (is Node.js installed?)", cmd.display()));
    if !o.status.success() {
        panic!(
            "web console build failed: {} {}: {}\n{}\n{}",
            cmd.display(),
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

fn collect(root: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let p = e.expect("read_dir").path();
        if p.is_dir() {
            collect(root, &p, files);
        } else {
            let name = p
                .strip_prefix(root)
                .expect("under root")
                .to_str()
                .expect("UTF-8 file name")
                .to_string();
            files.push((name, p));
        }
    }
}
