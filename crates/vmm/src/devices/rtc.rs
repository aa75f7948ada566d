//! The CMOS real-time clock (MC146818) at ports 0x70 (index) and 0x71 (data).
//!
//! The clock runs on the host's wall clock (UTC) plus an offset in whole seconds that a guest
//! write of the time sets, so a guest that sets its clock keeps that setting, also across a
//! snapshot or a migration (the offset travels; the destination's own wall clock supplies
//! "now"). Registers:
//! - 0x00-0x09 and the century at 0x32: the time, in BCD or binary and in 12 or 24 hour mode as
//!   register B says; the alarm bytes 0x01/0x03/0x05 are plain storage.
//! - A: divider and rate are stored; UIP reads 1 during the last 244 µs of every second (as a
//!   real part signals an update about to happen), never while register B's SET bit halts
//!   updates.
//! - B: SET freezes the clock (the time registers then hold the time latched at that moment and
//!   take the guest's writes; clearing SET starts the clock from them); DM (binary) and 24/12
//!   select the format; the interrupt-enable bits are stored.
//! - C: interrupt flags: always 0, no interrupt is ever raised (periodic, alarm and
//!   update-ended interrupts are not implemented; IRQ 8 stays quiet).
//! - D: VRT (valid RAM and time) always set.
//! - 0x0E-0x7F: battery-backed RAM, readable and writable.
//!
//! Bit 7 of the index port (NMI disable on a PC) is ignored.

use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Index port.
pub const RTC_INDEX: u16 = 0x70;
/// Data port.
pub const RTC_DATA: u16 = 0x71;
/// Bytes of CMOS (clock registers + RAM).
pub const CMOS_SIZE: usize = 128;

const REG_SEC: u8 = 0x00;
const REG_MIN: u8 = 0x02;
const REG_HOUR: u8 = 0x04;
const REG_WDAY: u8 = 0x06;
const REG_MDAY: u8 = 0x07;
const REG_MON: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// Century register (the FADT names it: [`crate::acpi::CMOS_CENTURY`]).
const REG_CENTURY: u8 = crate::acpi::CMOS_CENTURY;

const A_UIP: u8 = 0x80;
const B_SET: u8 = 0x80;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const D_VRT: u8 = 0x80;
/// How long before each second UIP reads 1 (the MC146818's update cycle warning).
const UIP_WINDOW_NS: u32 = 244_000;

/// A broken-down UTC time.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RtcTime {
    pub year: i64,
    /// 1..=12
    pub month: u8,
    /// 1..=31
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

// Days since 1970-01-01 of a civil date, and back (H. Hinnant's algorithms).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u8, u8) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

impl RtcTime {
    /// The time `secs` seconds after the Unix epoch.
    pub fn from_unix(secs: i64) -> RtcTime {
        let (year, month, day) = civil_from_days(secs.div_euclid(86_400));
        let s = secs.rem_euclid(86_400);
        RtcTime {
            year,
            month,
            day,
            hour: (s / 3600) as u8,
            minute: (s / 60 % 60) as u8,
            second: (s % 60) as u8,
        }
    }

    /// Seconds since the Unix epoch (out-of-range fields are clamped into range first).
    pub fn to_unix(&self) -> i64 {
        let month = self.month.clamp(1, 12) as i64;
        let day = self.day.clamp(1, 31) as i64;
        days_from_civil(self.year.clamp(0, 9999), month, day) * 86_400
            + self.hour.min(23) as i64 * 3600
            + self.minute.min(59) as i64 * 60
            + self.second.min(59) as i64
    }

    /// Day of the week, 1 = Sunday.
    pub fn weekday(&self) -> u8 {
        // 1970-01-01 was a Thursday (5).
        ((self.to_unix().div_euclid(86_400) + 4).rem_euclid(7) + 1) as u8
    }
}

/// What travels in snapshots and migrations.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RtcState {
    /// The selected register (0..=127).
    pub index: u8,
    /// All 128 bytes (registers A, B and the RAM are meaningful; the clock bytes are computed).
    pub cmos: Vec<u8>,
    /// Guest time minus host UTC, in seconds.
    pub offset_secs: i64,
    /// The time the clock holds while register B's SET bit halts it.
    pub latched: Option<RtcTime>,
}

impl Default for RtcState {
    /// A freshly powered-on clock: 24-hour BCD mode, 32.768 kHz divider, host time.
    fn default() -> RtcState {
        let mut cmos = vec![0u8; CMOS_SIZE];
        cmos[REG_A as usize] = 0x26;
        cmos[REG_B as usize] = B_24H;
        cmos[REG_D as usize] = D_VRT;
        RtcState {
            index: 0,
            cmos,
            offset_secs: 0,
            latched: None,
        }
    }
}

/// Why saved RTC state was refused.
#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    #[error("RTC state: {0}")]
    Invalid(String),
}

impl RtcState {
    /// Checks state that came from outside.
    pub fn validate(&self) -> Result<(), RtcError> {
        if self.cmos.len() != CMOS_SIZE {
            return Err(RtcError::Invalid(format!(
                "{} bytes of CMOS (expected {CMOS_SIZE})",
                self.cmos.len()
            )));
        }
        if self.index as usize >= CMOS_SIZE {
            return Err(RtcError::Invalid(format!("index {:#x}", self.index)));
        }
        // A guest clock more than ~10000 years off the host's is not a clock.
        if self.offset_secs.unsigned_abs() > 10_000 * 366 * 86_400 {
            return Err(RtcError::Invalid(format!(
                "offset of {} s",
                self.offset_secs
            )));
        }
        if let Some(t) = &self.latched {
            if !(0..=9999).contains(&t.year) {
                return Err(RtcError::Invalid(format!("latched year {}", t.year)));
            }
        }
        Ok(())
    }
}

/// The CMOS RTC.
#[derive(Debug)]
pub struct Rtc {
    s: RtcState,
}

impl Default for Rtc {
    fn default() -> Self {
        Rtc::new()
    }
}

fn host_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4).min(9) * 10 + (v & 0x0f).min(9)
}

impl Rtc {
    /// A freshly powered-on clock.
    pub fn new() -> Rtc {
        Rtc {
            s: RtcState::default(),
        }
    }

    /// A clock continuing from saved (validated) state.
    pub fn restore(s: &RtcState) -> Result<Rtc, RtcError> {
        s.validate()?;
        Ok(Rtc { s: s.clone() })
    }

    /// Its state.
    pub fn save(&self) -> RtcState {
        self.s.clone()
    }

    fn b(&self) -> u8 {
        self.s.cmos[REG_B as usize]
    }

    fn now_time(&self, now: Duration) -> RtcTime {
        match self.s.latched {
            Some(t) => t,
            None => {
                // The CMOS shows four digits of year (century and year registers): a clock
                // run past 9999 rolls over to 0000, as such a counter does; a latched time
                // stays one a saved state can hold (found by fuzzing: latching 10000 made
                // the VM's state unrestorable).
                let mut t = RtcTime::from_unix(now.as_secs() as i64 + self.s.offset_secs);
                t.year = t.year.rem_euclid(10_000);
                t
            }
        }
    }

    fn encode(&self, v: u8) -> u8 {
        if self.b() & B_DM_BINARY != 0 {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.b() & B_DM_BINARY != 0 {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, h: u8) -> u8 {
        if self.b() & B_24H != 0 {
            return self.encode(h);
        }
        let pm = if h >= 12 { 0x80 } else { 0 };
        let h12 = match h % 12 {
            0 => 12,
            x => x,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.b() & B_24H != 0 {
            return self.decode(v);
        }
        let h12 = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 {
            h12 + 12
        } else {
            h12
        }
    }

    /// The value of register `reg` at host time `now`.
    pub fn read_reg(&self, reg: u8, now: Duration) -> u8 {
        let t = self.now_time(now);
        match reg {
            REG_SEC => self.encode(t.second),
            REG_MIN => self.encode(t.minute),
            REG_HOUR => self.encode_hour(t.hour),
            REG_WDAY => self.encode(t.weekday()),
            REG_MDAY => self.encode(t.day),
            REG_MON => self.encode(t.month),
            REG_YEAR => self.encode(t.year.rem_euclid(100) as u8),
            REG_CENTURY => self.encode((t.year.div_euclid(100)).clamp(0, 99) as u8),
            REG_A => {
                let a = self.s.cmos[REG_A as usize] & !A_UIP;
                let updating =
                    self.s.latched.is_none() && now.subsec_nanos() >= 1_000_000_000 - UIP_WINDOW_NS;
                if updating {
                    a | A_UIP
                } else {
                    a
                }
            }
            REG_C => 0,
            REG_D => D_VRT,
            r => self.s.cmos[(r & 0x7f) as usize],
        }
    }

    /// A guest write of `v` to register `reg` at host time `now`.
    pub fn write_reg(&mut self, reg: u8, v: u8, now: Duration) {
        match reg {
            REG_SEC | REG_MIN | REG_HOUR | REG_MDAY | REG_MON | REG_YEAR | REG_CENTURY => {
                let running = self.s.latched.is_none();
                let mut t = self.now_time(now);
                match reg {
                    REG_SEC => t.second = self.decode(v).min(59),
                    REG_MIN => t.minute = self.decode(v).min(59),
                    REG_HOUR => t.hour = self.decode_hour(v).min(23),
                    REG_MDAY => t.day = self.decode(v).clamp(1, 31),
                    REG_MON => t.month = self.decode(v).clamp(1, 12),
                    REG_YEAR => t.year = t.year.div_euclid(100) * 100 + self.decode(v) as i64 % 100,
                    _ => t.year = self.decode(v) as i64 % 100 * 100 + t.year.rem_euclid(100),
                }
                if running {
                    // Updates are not halted: the clock goes on from the new time at once.
                    self.s.offset_secs = t.to_unix() - now.as_secs() as i64;
                } else {
                    self.s.latched = Some(t);
                }
            }
            // The day of the week follows from the date.
            REG_WDAY => {}
            REG_A => self.s.cmos[REG_A as usize] = v & !A_UIP,
            REG_B => {
                let was_set = self.b() & B_SET != 0;
                let set = v & B_SET != 0;
                if set && !was_set {
                    self.s.latched = Some(self.now_time(now));
                }
                self.s.cmos[REG_B as usize] = v;
                if !set && was_set {
                    if let Some(t) = self.s.latched.take() {
                        self.s.offset_secs = t.to_unix() - now.as_secs() as i64;
                    }
                }
            }
            REG_C | REG_D => {}
            r => self.s.cmos[(r & 0x7f) as usize] = v,
        }
    }

    /// `in` from the index (reads back the index) or data port.
    pub fn pio_read(&mut self, port: u16) -> u8 {
        match port {
            RTC_INDEX => self.s.index,
            _ => self.read_reg(self.s.index, host_now()),
        }
    }

    /// `out` to the index or data port.
    pub fn pio_write(&mut self, port: u16, v: u8) {
        match port {
            RTC_INDEX => self.s.index = v & 0x7f,
            _ => self.write_reg(self.s.index, v, host_now()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(r: &mut Rtc, reg: u8) -> u8 {
        r.pio_write(RTC_INDEX, reg | 0x80); // NMI-disable bit set, as Linux does
        r.pio_read(RTC_DATA)
    }

    fn write(r: &mut Rtc, reg: u8, v: u8) {
        r.pio_write(RTC_INDEX, reg);
        r.pio_write(RTC_DATA, v);
    }

    /// Reads the clock as Linux's mc146818_get_time does: wait out UIP, read all, decode.
    fn guest_time(r: &mut Rtc) -> i64 {
        while read(r, REG_A) & A_UIP != 0 {}
        let b = read(r, REG_B);
        let d = |v: u8| if b & B_DM_BINARY != 0 { v } else { from_bcd(v) };
        let hour_raw = read(r, REG_HOUR);
        let hour = if b & B_24H != 0 {
            d(hour_raw)
        } else {
            d(hour_raw & 0x7f) % 12 + if hour_raw & 0x80 != 0 { 12 } else { 0 }
        };
        let t = RtcTime {
            second: d(read(r, REG_SEC)),
            minute: d(read(r, REG_MIN)),
            hour,
            day: d(read(r, REG_MDAY)),
            month: d(read(r, REG_MON)),
            year: d(read(r, REG_CENTURY)) as i64 * 100 + d(read(r, REG_YEAR)) as i64,
        };
        t.to_unix()
    }

    #[test]
    fn civil_conversions() {
        assert_eq!(RtcTime::from_unix(0).year, 1970);
        let t = RtcTime::from_unix(1_795_000_000); // 2026-11-18T11:06:40Z
        assert_eq!(
            (t.year, t.month, t.day, t.hour, t.minute, t.second),
            (2026, 11, 18, 11, 6, 40)
        );
        assert_eq!(t.weekday(), 4, "a Wednesday");
        for s in [
            0i64,
            951_782_400,
            4_107_542_399,
            1_795_000_000,
            253_402_300_799,
        ] {
            assert_eq!(RtcTime::from_unix(s).to_unix(), s);
        }
        let leap = RtcTime::from_unix(951_782_400); // 2000-02-29
        assert_eq!((leap.month, leap.day), (2, 29));
    }

    #[test]
    fn time_within_a_second_of_the_host_in_bcd_and_binary_12_and_24_hours() {
        for b in [B_24H, B_24H | B_DM_BINARY, 0, B_DM_BINARY] {
            let mut r = Rtc::new();
            write(&mut r, REG_B, b);
            let host = host_now().as_secs() as i64;
            let got = guest_time(&mut r);
            assert!(
                (got - host).abs() <= 1,
                "mode B={b:#x}: rtc {got}, host {host}"
            );
        }
    }

    #[test]
    fn bcd_and_binary_encodings_at_a_known_time() {
        let now = Duration::from_secs(1_795_000_000) + Duration::from_millis(500); // 11:06:40
        let mut r = Rtc::new();
        assert_eq!(r.read_reg(REG_SEC, now), 0x40);
        assert_eq!(r.read_reg(REG_MIN, now), 0x06);
        assert_eq!(r.read_reg(REG_HOUR, now), 0x11);
        assert_eq!(r.read_reg(REG_MDAY, now), 0x18);
        assert_eq!(r.read_reg(REG_MON, now), 0x11);
        assert_eq!(r.read_reg(REG_YEAR, now), 0x26);
        assert_eq!(r.read_reg(REG_CENTURY, now), 0x20);
        assert_eq!(r.read_reg(REG_WDAY, now), 4);
        r.write_reg(REG_B, B_24H | B_DM_BINARY, now);
        assert_eq!(r.read_reg(REG_SEC, now), 40);
        assert_eq!(r.read_reg(REG_MDAY, now), 18);
        assert_eq!(r.read_reg(REG_CENTURY, now), 20);
        // 12-hour mode: 23:06 is 11 PM.
        let evening = now + Duration::from_secs(12 * 3600);
        r.write_reg(REG_B, B_DM_BINARY, evening);
        assert_eq!(r.read_reg(REG_HOUR, evening), 0x80 | 11);
        r.write_reg(REG_B, 0, evening);
        assert_eq!(r.read_reg(REG_HOUR, evening), 0x80 | 0x11);
        // Midnight is 12 AM.
        let midnight = Duration::from_secs(1_795_046_400);
        assert_eq!(r.read_reg(REG_HOUR, midnight), 0x12);
    }

    #[test]
    fn guest_setting_the_time_keeps_an_offset() {
        let now = Duration::from_secs(1_795_000_000);
        let mut r = Rtc::new();
        // As Linux's mc146818_set_time: SET, write the fields, clear SET.
        r.write_reg(REG_B, B_24H | B_SET, now);
        let frozen = r.read_reg(REG_SEC, now + Duration::from_secs(5));
        assert_eq!(frozen, 0x40, "SET halts the clock");
        assert_eq!(
            r.read_reg(REG_A, now + Duration::from_nanos(999_999_999)) & A_UIP,
            0
        );
        r.write_reg(REG_YEAR, 0x30, now);
        r.write_reg(REG_MON, 0x01, now);
        r.write_reg(REG_MDAY, 0x02, now);
        r.write_reg(REG_HOUR, 0x03, now);
        r.write_reg(REG_MIN, 0x04, now);
        r.write_reg(REG_SEC, 0x05, now);
        r.write_reg(REG_B, B_24H, now);
        let set = RtcTime {
            year: 2030,
            month: 1,
            day: 2,
            hour: 3,
            minute: 4,
            second: 5,
        }
        .to_unix();
        assert_eq!(r.save().offset_secs, set - now.as_secs() as i64);
        // It runs on from there with the host clock.
        let later = now + Duration::from_secs(70);
        assert_eq!(r.read_reg(REG_MIN, later), 0x05);
        assert_eq!(r.read_reg(REG_SEC, later), 0x15);
        // A write without SET applies at once.
        r.write_reg(REG_HOUR, 0x23, later);
        assert_eq!(r.read_reg(REG_HOUR, later), 0x23);
        assert_eq!(r.read_reg(REG_MIN, later), 0x05);
    }

    /// Found by fuzzing (fuzz/crashes/device_state/rtc-year-10000): a clock set to the last
    /// second of 9999 rolls over to 0000, and a time latched after it still restores.
    #[test]
    fn the_clock_rolls_over_after_9999_and_its_state_restores() {
        let now = Duration::from_secs(1_795_000_000);
        let mut r = Rtc::new();
        r.write_reg(REG_B, B_24H | B_SET, now);
        for (reg, v) in [
            (REG_CENTURY, 0x99),
            (REG_YEAR, 0x99),
            (REG_MON, 0x12),
            (REG_MDAY, 0x31),
            (REG_HOUR, 0x23),
            (REG_MIN, 0x59),
            (REG_SEC, 0x59),
        ] {
            r.write_reg(reg, v, now);
        }
        r.write_reg(REG_B, B_24H, now);
        let later = now + Duration::from_secs(2);
        assert_eq!(r.read_reg(REG_CENTURY, later), 0x00);
        assert_eq!(r.read_reg(REG_YEAR, later), 0x00);
        assert_eq!(r.read_reg(REG_MON, later), 0x01);
        r.write_reg(REG_B, B_24H | B_SET, later);
        let saved = r.save();
        assert_eq!(saved.latched.map(|t| t.year), Some(0));
        Rtc::restore(&saved).unwrap();
    }

    #[test]
    fn update_in_progress_only_just_before_a_second() {
        let r = Rtc::new();
        let s = Duration::from_secs(1_795_000_000);
        assert_eq!(r.read_reg(REG_A, s) & A_UIP, 0);
        assert_eq!(r.read_reg(REG_A, s + Duration::from_millis(500)) & A_UIP, 0);
        assert_ne!(
            r.read_reg(REG_A, s + Duration::from_micros(999_900)) & A_UIP,
            0
        );
        assert_eq!(r.read_reg(REG_A, s) & 0x7f, 0x26);
        assert_eq!(r.read_reg(REG_D, s), D_VRT);
        assert_eq!(r.read_reg(REG_C, s), 0);
    }

    #[test]
    fn ram_nmi_bit_and_state_round_trip() {
        let mut r = Rtc::new();
        // Every RAM byte but the century (a clock register).
        let ram = || (14..128u8).filter(|i| *i != REG_CENTURY);
        for i in ram() {
            write(&mut r, i, i ^ 0x5a);
        }
        for i in ram() {
            assert_eq!(read(&mut r, i), i ^ 0x5a, "CMOS byte {i}");
        }
        r.pio_write(RTC_INDEX, 0x80 | 0x20);
        assert_eq!(r.pio_read(RTC_INDEX), 0x20, "NMI-disable bit ignored");
        let now = host_now();
        r.write_reg(REG_YEAR, 0x99, now); // the guest moves its clock to 2099
        let s = r.save();
        let bytes = bincode::serialize(&s).unwrap();
        let back: RtcState = bincode::deserialize(&bytes).unwrap();
        assert_eq!(back, s);
        let mut r2 = Rtc::restore(&back).unwrap();
        assert_eq!(r2.pio_read(RTC_INDEX), 0x20);
        assert_eq!(read(&mut r2, 0x30), 0x30 ^ 0x5a);
        assert_eq!(read(&mut r2, REG_YEAR), 0x99);
        assert_eq!(read(&mut r2, REG_CENTURY), 0x20);
        // Damaged state is refused.
        for bad in [
            RtcState {
                cmos: vec![0; 64],
                ..s.clone()
            },
            RtcState {
                index: 200,
                ..s.clone()
            },
            RtcState {
                offset_secs: i64::MIN,
                ..s.clone()
            },
        ] {
            assert!(Rtc::restore(&bad).is_err(), "{bad:?}");
        }
    }
}
