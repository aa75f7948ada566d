//! Record format of the disk log (`ferry.workload=disk-log`).
//!
//! Pure code with no dependencies: compiled into the guest kernel (ring 3) and, through a
//! `#[path]` module in `src/lib.rs`, into the host unit tests of the `guest` crate.
//!
//! The log is a sequence of 512-byte records starting at sector 0: record `seq` (1, 2, 3, ...)
//! lives in sector `seq - 1`. A record is 64 little-endian u64 words:
//! - word 0 = the 8 ASCII bytes `FERRYLOG`
//! - word 1 = `seq`
//! - word 2 = [`checksum`] of the whole record with word 2 skipped
//! - words 3..63 = [`payload_word`]`(seq, j)`
//!
//! The checksum is one lane of `h = rotl((h ^ w) * M, 27)` (odd M) over words 0, 1, 3..63 and
//! a final bijective mix. Every step is a bijection of the state for a fixed word and injective
//! in the word for a fixed state, so any change confined to one word (e.g. any flipped byte)
//! always changes the checksum.
//!
//! The end of the log is the first all-zero sector (a fresh disk reads as zeros).

/// Bytes per record = bytes per virtio-blk sector.
pub const RECORD_SIZE: usize = 512;
const WORDS: usize = RECORD_SIZE / 8;
/// Word 0 of every record.
pub const MAGIC: [u8; 8] = *b"FERRYLOG";
const SUM_WORD: usize = 2;
const SEED: u64 = 0x6a09_e667_f3bc_c908;
const MUL: u64 = 0x9e37_79b9_7f4a_7c15;

#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
fn word(rec: &[u8; RECORD_SIZE], j: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&rec[j * 8..j * 8 + 8]);
    u64::from_le_bytes(b)
}

/// Payload word `j` (3..63) of record `seq`.
#[inline]
pub fn payload_word(seq: u64, j: usize) -> u64 {
    fmix64(seq.wrapping_mul(MUL) ^ (j as u64).wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ 0x5eed)
}

/// Checksum over every word of `rec` except word 2.
pub fn checksum(rec: &[u8; RECORD_SIZE]) -> u64 {
    let mut h = SEED;
    for j in (0..WORDS).filter(|&j| j != SUM_WORD) {
        h = (h ^ word(rec, j)).wrapping_mul(MUL).rotate_left(27);
    }
    fmix64(h)
}

/// Writes the complete record `seq` into `rec`.
pub fn make_record(rec: &mut [u8; RECORD_SIZE], seq: u64) {
    rec[0..8].copy_from_slice(&MAGIC);
    rec[8..16].copy_from_slice(&seq.to_le_bytes());
    rec[16..24].fill(0);
    for j in 3..WORDS {
        rec[j * 8..j * 8 + 8].copy_from_slice(&payload_word(seq, j).to_le_bytes());
    }
    let sum = checksum(rec);
    rec[16..24].copy_from_slice(&sum.to_le_bytes());
}

/// What a sector of the log holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sector {
    /// All zero: the end of the log.
    Empty,
    /// The intact record `sector + 1`.
    Valid,
    /// Anything else (the reason, for tests and diagnostics).
    Corrupt(Bad),
}

/// Why a non-zero sector is not the record it should be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bad {
    Magic,
    Seq,
    Checksum,
    Payload,
}

/// Classifies sector `sector` (0-based) of the log.
pub fn check_sector(rec: &[u8; RECORD_SIZE], sector: u64) -> Sector {
    if rec.iter().all(|&b| b == 0) {
        return Sector::Empty;
    }
    if rec[0..8] != MAGIC {
        return Sector::Corrupt(Bad::Magic);
    }
    let seq = word(rec, 1);
    if seq != sector.wrapping_add(1) {
        return Sector::Corrupt(Bad::Seq);
    }
    if word(rec, SUM_WORD) != checksum(rec) {
        return Sector::Corrupt(Bad::Checksum);
    }
    if (3..WORDS).any(|j| word(rec, j) != payload_word(seq, j)) {
        return Sector::Corrupt(Bad::Payload);
    }
    Sector::Valid
}

/// Result of scanning the log from sector 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// Still scanning: `last` valid records so far.
    Running { last: u64 },
    /// Found the end (an all-zero sector, or the end of the disk): `last` valid records.
    End { last: u64 },
    /// Sector `at` is neither zero nor the right record.
    Corrupt { at: u64 },
}

impl Scan {
    pub const START: Scan = Scan::Running { last: 0 };

    /// Feeds the next batch of sectors (`first` = index of the first one, which must equal the
    /// number of valid records so far); `capacity` = sectors on the disk.
    pub fn feed(self, first: u64, sectors: &[[u8; RECORD_SIZE]], capacity: u64) -> Scan {
        let Scan::Running { mut last } = self else {
            return self;
        };
        debug_assert_eq!(first, last);
        for (i, rec) in sectors.iter().enumerate() {
            let s = first + i as u64;
            match check_sector(rec, s) {
                Sector::Empty => return Scan::End { last },
                Sector::Valid => last = s + 1,
                Sector::Corrupt(_) => return Scan::Corrupt { at: s },
            }
        }
        if last >= capacity {
            Scan::End { last }
        } else {
            Scan::Running { last }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64) -> [u8; RECORD_SIZE] {
        let mut r = [0u8; RECORD_SIZE];
        make_record(&mut r, seq);
        r
    }

    #[test]
    fn layout() {
        let r = rec(7);
        assert_eq!(&r[0..8], b"FERRYLOG");
        assert_eq!(u64::from_le_bytes(r[8..16].try_into().unwrap()), 7);
        assert_eq!(
            u64::from_le_bytes(r[16..24].try_into().unwrap()),
            checksum(&r)
        );
        assert_ne!(rec(7), rec(8));
        assert_eq!(check_sector(&r, 6), Sector::Valid);
        assert_eq!(check_sector(&r, 7), Sector::Corrupt(Bad::Seq));
        assert_eq!(check_sector(&[0; RECORD_SIZE], 0), Sector::Empty);
    }

    #[test]
    fn every_byte_flip_is_detected() {
        let good = rec(12345);
        for i in 0..RECORD_SIZE {
            for bit in [0x01u8, 0x80, 0xff] {
                let mut r = good;
                r[i] ^= bit;
                assert!(
                    matches!(check_sector(&r, 12344), Sector::Corrupt(_)),
                    "byte {i} ^ {bit:#x}"
                );
                if i >= 24 {
                    // payload damage is caught by the checksum already
                    assert_eq!(check_sector(&r, 12344), Sector::Corrupt(Bad::Checksum));
                }
            }
        }
        let mut r = good;
        r[0] = b'X';
        assert_eq!(check_sector(&r, 12344), Sector::Corrupt(Bad::Magic));
        // a self-consistent record with the wrong payload
        let mut r = good;
        r[100] ^= 1;
        let sum = checksum(&r);
        r[16..24].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(check_sector(&r, 12344), Sector::Corrupt(Bad::Payload));
        // a single stray non-zero byte in an otherwise empty sector
        let mut r = [0u8; RECORD_SIZE];
        r[511] = 1;
        assert_eq!(check_sector(&r, 0), Sector::Corrupt(Bad::Magic));
    }

    #[test]
    fn scan() {
        let disk: Vec<[u8; RECORD_SIZE]> = (1..=10).map(rec).collect();
        let zero = [0u8; RECORD_SIZE];
        // empty disk
        assert_eq!(Scan::START.feed(0, &[zero; 4], 100), Scan::End { last: 0 });
        // log of 10 then zeros, fed in batches of 4
        let mut all = disk.clone();
        all.extend([zero; 6]);
        let mut s = Scan::START;
        for (b, chunk) in all.chunks(4).enumerate() {
            if let Scan::Running { .. } = s {
                s = s.feed(b as u64 * 4, chunk, 100);
            }
        }
        assert_eq!(s, Scan::End { last: 10 });
        // full disk: capacity reached without a zero sector
        assert_eq!(Scan::START.feed(0, &disk, 10), Scan::End { last: 10 });
        assert_eq!(
            Scan::START.feed(0, &disk[..8], 10),
            Scan::Running { last: 8 }
        );
        // corruption in the middle
        let mut bad = disk.clone();
        bad[5][300] ^= 4;
        assert_eq!(Scan::START.feed(0, &bad, 100), Scan::Corrupt { at: 5 });
        // a record in the wrong place
        let mut bad = disk.clone();
        bad.swap(2, 3);
        assert_eq!(Scan::START.feed(0, &bad, 100), Scan::Corrupt { at: 2 });
        // terminal states stay
        assert_eq!(
            Scan::Corrupt { at: 1 }.feed(7, &disk, 100),
            Scan::Corrupt { at: 1 }
        );
    }
}
