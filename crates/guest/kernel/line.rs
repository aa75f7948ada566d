//! One output line on COM1, assembled in a local buffer and written under the serial lock.

use core::fmt;

/// Longest line (without the `\n`); longer content is truncated.
pub const LINE_MAX: usize = 200;

pub struct Line {
    buf: [u8; LINE_MAX + 1],
    len: usize,
}

impl Line {
    pub fn new() -> Self {
        Line {
            buf: [0; LINE_MAX + 1],
            len: 0,
        }
    }

    /// Appends bytes; anything but printable ASCII becomes `?`.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        for &c in b {
            if self.len == LINE_MAX {
                break;
            }
            self.buf[self.len] = if c.is_ascii_graphic() || c == b' ' {
                c
            } else {
                b'?'
            };
            self.len += 1;
        }
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends `v` in decimal.
    pub fn dec(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 20];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.bytes(&tmp[i..])
    }

    /// Appends `v` in lowercase hexadecimal without prefix or leading zeros.
    pub fn hex(&mut self, mut v: u64) -> &mut Self {
        let mut tmp = [0u8; 16];
        let mut i = tmp.len();
        loop {
            i -= 1;
            tmp[i] = b"0123456789abcdef"[(v & 15) as usize];
            v >>= 4;
            if v == 0 {
                break;
            }
        }
        self.bytes(&tmp[i..])
    }

    /// Appends `\n` and writes the line to COM1 atomically with respect to other CPUs.
    pub fn send(&mut self) {
        self.buf[self.len] = b'\n';
        crate::rt::serial_write(&self.buf[..=self.len]);
        self.len = 0;
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.str(s);
        Ok(())
    }
}
