//! Page format and writer state of the integrity verifier (`ferry.workload=verify`).
//!
//! Pure code with no dependencies: compiled into the guest kernel (ring 3) and, through a
//! `#[path]` module in `src/lib.rs`, into the host unit tests of the `guest` crate.
//!
//! A verifier page (4 KiB = 512 little-endian u64 words) holding global WSS page index `i` and
//! generation `g` (never 0):
//! - word 0 = `i`
//! - word 1 = `g`
//! - word 2 = [`checksum`] of the whole page with word 2 skipped
//! - words 3..511 = `base + j * step` (wrapping), `(base, step)` = [`pattern_params`]`(i, g)`
//!
//! The checksum runs four independent lanes (words `j % 4`) of `h = rotl((h ^ w) * M, 27)` with
//! odd multipliers and finishes with a bijective mix per lane, XOR-combined. Every step is a
//! bijection of the lane state for a fixed word and injective in the word for a fixed state, so
//! ANY change confined to one 64-bit word (e.g. any single flipped byte or bit anywhere in the
//! page) always changes the checksum; larger changes are caught with probability 1 - 2^-64.

pub const PAGE_WORDS: usize = 512;
pub const WORD_INDEX: usize = 0;
pub const WORD_GEN: usize = 1;
pub const WORD_SUM: usize = 2;
pub const FIRST_PATTERN_WORD: usize = 3;

const LANE_SEED: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];
const LANE_MUL: [u64; 4] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0xd6e8_feb8_6659_fd93,
];

#[inline(always)]
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[inline(always)]
fn lane_step(h: u64, w: u64, lane: usize) -> u64 {
    (h ^ w).wrapping_mul(LANE_MUL[lane]).rotate_left(27)
}

/// Checksum over all words of `page` except word 2 (where it is stored).
#[inline]
pub fn checksum(page: &[u64; PAGE_WORDS]) -> u64 {
    let mut h = LANE_SEED;
    h[0] = lane_step(h[0], page[0], 0);
    h[1] = lane_step(h[1], page[1], 1);
    // word 2 (lane 2) is the checksum itself: skipped
    h[3] = lane_step(h[3], page[3], 3);
    let mut j = 4;
    while j < PAGE_WORDS {
        h[0] = lane_step(h[0], page[j], 0);
        h[1] = lane_step(h[1], page[j + 1], 1);
        h[2] = lane_step(h[2], page[j + 2], 2);
        h[3] = lane_step(h[3], page[j + 3], 3);
        j += 4;
    }
    fmix64(h[0])
        ^ fmix64(h[1]).rotate_left(16)
        ^ fmix64(h[2]).rotate_left(32)
        ^ fmix64(h[3]).rotate_left(48)
}

/// `(base, step)` of the linear pattern in words 3..511 of page `index`, generation `gen`.
#[inline]
pub fn pattern_params(index: u64, gen: u64) -> (u64, u64) {
    let base = fmix64(index ^ gen.rotate_left(32) ^ 0x5851_f42d_4c95_7f2d);
    let step =
        fmix64(index.wrapping_add(0x1405_7b7e_f767_814f) ^ gen.wrapping_mul(LANE_MUL[0])) | 1;
    (base, step)
}

/// Writes the complete verifier page `(index, gen)`.
#[inline]
pub fn fill_page(page: &mut [u64; PAGE_WORDS], index: u64, gen: u64) {
    let (base, step) = pattern_params(index, gen);
    page[WORD_INDEX] = index;
    page[WORD_GEN] = gen;
    page[WORD_SUM] = 0;
    for (j, w) in page.iter_mut().enumerate().skip(FIRST_PATTERN_WORD) {
        *w = base.wrapping_add((j as u64).wrapping_mul(step));
    }
    page[WORD_SUM] = checksum(page);
}

/// What a page claims to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Found {
    /// Word 0.
    pub index: u64,
    /// Word 1.
    pub gen: u64,
    /// Word 2 equals the recomputed checksum.
    pub checksum_ok: bool,
}

impl Found {
    /// True if this is the intact page `index` at generation `expected_gen`.
    pub fn is(&self, index: u64, expected_gen: u64) -> bool {
        self.checksum_ok && self.index == index && self.gen == expected_gen
    }
}

/// Reads the header of `page` and validates its checksum.
#[inline]
pub fn inspect(page: &[u64; PAGE_WORDS]) -> Found {
    Found {
        index: page[WORD_INDEX],
        gen: page[WORD_GEN],
        checksum_ok: checksum(page) == page[WORD_SUM],
    }
}

/// Writer state of one partition `[start, end)` (global page indices): pages `[start, pos)` hold
/// generation `gen`, pages `[pos, end)` hold `gen - 1`. After the initial fill (every page at
/// generation 1) the state is `gen = 2, pos = start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Writer {
    pub gen: u64,
    pub pos: u64,
}

impl Writer {
    /// State right after the initial fill of the partition starting at `start`.
    pub const fn after_init(start: u64) -> Self {
        Writer { gen: 2, pos: start }
    }

    /// Generation page `index` must hold in this state.
    #[inline]
    pub fn expected_gen(&self, index: u64) -> u64 {
        if index < self.pos {
            self.gen
        } else {
            self.gen - 1
        }
    }

    /// Call after page `self.pos` has been written with `self.gen`.
    #[inline]
    pub fn advance(&mut self, start: u64, end: u64) {
        self.pos += 1;
        if self.pos >= end {
            self.pos = start;
            self.gen += 1;
        }
    }
}

/// Access to the pages of the working set by global page index.
pub trait Pages {
    /// The page with global index `index` (only one borrowed at a time).
    fn page(&mut self, index: u64) -> &mut [u64; PAGE_WORDS];
}

/// The verifier of one partition `[start, end)` (global page indices, `start < end`).
///
/// Each [`Verifier::step`] does two things:
/// 1. The writer: before rewriting page `writer.pos` with `writer.gen` it checks that the page
///    still holds `gen - 1` (the version written one full cycle ago). So EVERY stale or damaged
///    page is caught at the latest when the writer comes back to it, wherever it is.
/// 2. The checker: checks page `check` against the generation the current writer state expects
///    (`i < pos ? gen : gen - 1`), repairs it on mismatch, and advances. It starts half a
///    partition ahead of the writer, so together they look at every page twice per cycle and a
///    damaged page is found within about half a cycle.
///
/// A sweep is `end - start` consecutive checker steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verifier {
    pub start: u64,
    pub end: u64,
    pub writer: Writer,
    /// Next page of the checker.
    pub check: u64,
    /// Checker steps done in the current sweep.
    pub checked: u64,
}

impl Verifier {
    /// State right after [`Verifier::init_page`] wrote every page of `[start, end)`.
    pub const fn after_init(start: u64, end: u64) -> Self {
        Verifier {
            start,
            end,
            writer: Writer::after_init(start),
            check: start + (end - start) / 2,
            checked: 0,
        }
    }

    /// Initial content (generation 1) of page `index`.
    #[inline]
    pub fn init_page<P: Pages>(pages: &mut P, index: u64) {
        fill_page(pages.page(index), index, 1);
    }

    /// One writer step and one checker step (see the type's doc). `corrupt(index, expected_gen,
    /// found)` is called for every page found wrong; the page is rewritten with its expected
    /// content afterwards (so each fault is reported once). Returns true when this step
    /// completed a sweep.
    #[inline]
    pub fn step<P: Pages, F: FnMut(u64, u64, Found)>(
        &mut self,
        pages: &mut P,
        mut corrupt: F,
    ) -> bool {
        let p = self.writer.pos;
        let expected = self.writer.expected_gen(p);
        let page = pages.page(p);
        let found = inspect(page);
        if !found.is(p, expected) {
            corrupt(p, expected, found);
        }
        fill_page(page, p, self.writer.gen);
        self.writer.advance(self.start, self.end);

        let c = self.check;
        let expected = self.writer.expected_gen(c);
        let page = pages.page(c);
        let found = inspect(page);
        if !found.is(c, expected) {
            corrupt(c, expected, found);
            fill_page(page, c, expected);
        }
        self.check = if c + 1 >= self.end { self.start } else { c + 1 };
        self.checked += 1;
        if self.checked >= self.end - self.start {
            self.checked = 0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(index: u64, gen: u64) -> [u64; PAGE_WORDS] {
        let mut p = [0u64; PAGE_WORDS];
        fill_page(&mut p, index, gen);
        p
    }

    fn as_bytes_mut(p: &mut [u64; PAGE_WORDS]) -> &mut [u8] {
        // SAFETY: u64 array reinterpreted as its bytes; u8 has no alignment or validity needs.
        unsafe { core::slice::from_raw_parts_mut(p.as_mut_ptr().cast::<u8>(), PAGE_WORDS * 8) }
    }

    #[test]
    fn fresh_page_is_valid() {
        for (i, g) in [
            (0, 1),
            (1, 1),
            (12345, 2),
            (u64::MAX, u64::MAX),
            (7, 1 << 40),
        ] {
            let p = page(i, g);
            assert!(inspect(&p).is(i, g));
            assert!(!inspect(&p).is(i, g.wrapping_add(1)));
            assert!(!inspect(&p).is(i.wrapping_add(1), g));
        }
    }

    #[test]
    fn every_single_byte_flip_is_detected() {
        let orig = page(4242, 17);
        for byte in 0..PAGE_WORDS * 8 {
            for flip in [0x01u8, 0x80, 0xff, 0x5a] {
                let mut p = orig;
                as_bytes_mut(&mut p)[byte] ^= flip;
                let f = inspect(&p);
                assert!(!f.is(4242, 17), "byte {byte} ^ {flip:#x} not detected");
            }
        }
    }

    #[test]
    fn swapped_words_and_zeroed_page_are_detected() {
        let orig = page(9, 3);
        for (a, b) in [(3, 4), (3, 7), (100, 101), (0, 1), (510, 511), (5, 9)] {
            let mut p = orig;
            p.swap(a, b);
            assert!(!inspect(&p).is(9, 3), "swap {a},{b}");
        }
        assert!(!inspect(&[0u64; PAGE_WORDS]).is(0, 0));
        assert!(!inspect(&[0u64; PAGE_WORDS]).checksum_ok);
    }

    #[test]
    fn other_pages_and_generations_differ() {
        let p = page(10, 5);
        assert!(!inspect(&page(10, 4)).is(10, 5));
        assert!(!inspect(&page(11, 5)).is(10, 5));
        assert_ne!(page(10, 4)[FIRST_PATTERN_WORD..], p[FIRST_PATTERN_WORD..]);
        assert_ne!(page(11, 5)[FIRST_PATTERN_WORD..], p[FIRST_PATTERN_WORD..]);
    }

    #[test]
    fn writer_expected_generation_and_wrap() {
        let (s, e) = (100u64, 104u64);
        let mut w = Writer::after_init(s);
        assert!((s..e).all(|i| w.expected_gen(i) == 1));
        w.advance(s, e); // wrote page 100 with gen 2
        assert_eq!(w, Writer { gen: 2, pos: 101 });
        assert_eq!(w.expected_gen(100), 2);
        assert_eq!(w.expected_gen(101), 1);
        w.advance(s, e);
        w.advance(s, e);
        w.advance(s, e); // wrote 103: wrap
        assert_eq!(w, Writer { gen: 3, pos: 100 });
        assert!((s..e).all(|i| w.expected_gen(i) == 2));
    }

    struct Mem {
        start: u64,
        pages: Vec<[u64; PAGE_WORDS]>,
    }

    impl Pages for Mem {
        fn page(&mut self, index: u64) -> &mut [u64; PAGE_WORDS] {
            &mut self.pages[(index - self.start) as usize]
        }
    }

    fn setup(s: u64, e: u64) -> (Mem, Verifier) {
        let mut m = Mem {
            start: s,
            pages: vec![[0u64; PAGE_WORDS]; (e - s) as usize],
        };
        for i in s..e {
            Verifier::init_page(&mut m, i);
        }
        (m, Verifier::after_init(s, e))
    }

    fn run(m: &mut Mem, v: &mut Verifier, steps: usize) -> (Vec<(u64, u64, Found)>, u64) {
        let mut reports = vec![];
        let mut sweeps = 0;
        for _ in 0..steps {
            if v.step(m, |i, e, f| reports.push((i, e, f))) {
                sweeps += 1;
            }
        }
        (reports, sweeps)
    }

    #[test]
    fn clean_run_reports_nothing() {
        for n in [1u64, 2, 3, 37, 64] {
            let (mut m, mut v) = setup(500, 500 + n);
            let (r, sweeps) = run(&mut m, &mut v, (7 * n + 5) as usize);
            assert!(r.is_empty(), "n={n}: {r:?}");
            assert_eq!(sweeps, 7 + 5 / n);
        }
    }

    /// A stale page (an older but self-consistent version: what a missed dirty page looks like
    /// after a migration) must be reported exactly once, whatever its position and whenever it
    /// is spliced in.
    #[test]
    fn stale_page_is_always_caught_once() {
        let (s, n) = (1000u64, 37u64);
        for victim in 0..n {
            for delay in [0usize, 1, 5, 18, 36] {
                let (mut m, mut v) = setup(s, s + n);
                run(&mut m, &mut v, (3 * n) as usize + delay);
                let old = m.pages[victim as usize];
                let (r, _) = run(&mut m, &mut v, n as usize + 3);
                assert!(r.is_empty());
                assert!(
                    inspect(&old).checksum_ok,
                    "the stale copy is self-consistent"
                );
                assert_ne!(
                    old, m.pages[victim as usize],
                    "the page was rewritten meanwhile"
                );
                m.pages[victim as usize] = old;
                let (r, _) = run(&mut m, &mut v, (3 * n) as usize);
                assert_eq!(r.len(), 1, "victim {victim} delay {delay}: {r:?}");
                let (i, expected, found) = r[0];
                assert_eq!(i, s + victim);
                assert!(found.checksum_ok && found.index == i && found.gen < expected);
                // caught within about half a cycle (plus one step)
            }
        }
    }

    #[test]
    fn stale_page_caught_within_half_a_cycle() {
        let (s, n) = (0u64, 64u64);
        for victim in 0..n {
            let (mut m, mut v) = setup(s, s + n);
            run(&mut m, &mut v, 200);
            let old = m.pages[victim as usize];
            run(&mut m, &mut v, n as usize);
            m.pages[victim as usize] = old;
            let mut steps = 0;
            let mut hit = false;
            while !hit {
                steps += 1;
                v.step(&mut m, |_, _, _| hit = true);
                assert!(
                    steps <= n / 2 + 1,
                    "victim {victim} took more than half a cycle"
                );
            }
        }
    }

    #[test]
    fn garbled_and_misplaced_pages_are_caught() {
        let (s, n) = (77u64, 40u64);
        let (mut m, mut v) = setup(s, s + n);
        run(&mut m, &mut v, 123);
        as_bytes_mut(&mut m.pages[3])[1234] ^= 0x10;
        m.pages[20] = m.pages[21];
        m.pages[30] = [0; PAGE_WORDS];
        let (r, _) = run(&mut m, &mut v, 2 * n as usize);
        let mut pages: Vec<u64> = r.iter().map(|x| x.0).collect();
        pages.sort();
        assert_eq!(pages, vec![s + 3, s + 20, s + 30]);
        let garbled = r.iter().find(|x| x.0 == s + 3).unwrap();
        assert!(!garbled.2.checksum_ok);
        let moved = r.iter().find(|x| x.0 == s + 20).unwrap();
        assert!(moved.2.checksum_ok && moved.2.index == s + 21);
        let (r, _) = run(&mut m, &mut v, 3 * n as usize);
        assert!(r.is_empty(), "repaired");
    }
}
