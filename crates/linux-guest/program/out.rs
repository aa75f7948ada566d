//! Console output: one `write(2)` per line on standard output, so lines from different CPUs
//! never interleave (a tty, a pipe and a regular file all keep a small write whole).

use std::fmt::Write as _;
use std::fs::File;
use std::io::Write as _;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;

/// Longest line without the `\n`, as in the test guest; longer content is truncated.
pub const LINE_MAX: usize = 200;

/// Held while a line is written: a last line (`exit_after_line`) keeps it until the process
/// is gone, so that no other CPU's line follows it.
static CONSOLE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Writes `args` plus `\n` as one line. Anything but printable ASCII becomes `?`.
pub fn write_line(args: std::fmt::Arguments<'_>) {
    let _held = CONSOLE.lock().unwrap_or_else(|e| e.into_inner());
    write_unlocked(args);
}

/// Writes a last line and ends the process with `code` before any other line can be written.
pub fn exit_after_line(args: std::fmt::Arguments<'_>, code: i32) -> ! {
    let _held = CONSOLE.lock().unwrap_or_else(|e| e.into_inner());
    write_unlocked(args);
    std::process::exit(code)
}

fn write_unlocked(args: std::fmt::Arguments<'_>) {
    let mut s = String::with_capacity(80);
    let _ = s.write_fmt(args);
    let mut b: Vec<u8> = s
        .bytes()
        .take(LINE_MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == b' ' {
                c
            } else {
                b'?'
            }
        })
        .collect();
    b.push(b'\n');
    // SAFETY: fd 1 stays open for the life of the process; ManuallyDrop never closes it.
    let mut out = ManuallyDrop::new(unsafe { File::from_raw_fd(1) });
    // A console write is not retried beyond what write_all does: output is best effort.
    let _ = out.write_all(&b);
}

/// `line!("fmt", args...)`: one console line.
macro_rules! line {
    ($($t:tt)*) => { $crate::out::write_line(format_args!($($t)*)) };
}
pub(crate) use line;
