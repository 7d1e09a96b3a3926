//! The log lines' timestamp: the same text as tracing-subscriber's default timer
//! (`2026-11-25T22:52:37.123456Z`), with the date and time of day made once a second rather
//! than on every line. At info level every request writes an access line, and the calendar
//! arithmetic and nine formatted numbers were about a tenth of that line's cost.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;

/// UTC time with microseconds, as tracing-subscriber's `SystemTime` timer writes it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Utc;

/// `YYYY-MM-DDTHH:MM:SS` of one second since the Unix epoch.
type Prefix = [u8; 19];

thread_local! {
    /// The last second this thread wrote, and its text.
    static LAST: Cell<Option<(u64, Prefix)>> = const { Cell::new(None) };
}

impl FormatTime for Utc {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now();
        let Ok(since) = now.duration_since(UNIX_EPOCH) else {
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        };
        let secs = since.as_secs();
        let prefix = match LAST.get() {
            Some((s, p)) if s == secs => p,
            _ => match prefix_of(secs) {
                Some(p) => {
                    LAST.set(Some((secs, p)));
                    p
                }
                // Past year 9999: the default timer's own format.
                None => return tracing_subscriber::fmt::time::SystemTime.format_time(w),
            },
        };
        // The prefix is made of ASCII digits and separators only.
        w.write_str(std::str::from_utf8(&prefix).map_err(|_| fmt::Error)?)?;
        let mut micros = since.subsec_micros();
        let mut tail = *b".000000Z";
        for d in tail[1..7].iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        w.write_str(std::str::from_utf8(&tail).map_err(|_| fmt::Error)?)
    }
}

/// The date and time of day of `secs`, for years up to 9999.
fn prefix_of(secs: u64) -> Option<Prefix> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    if t.year() > 9999 {
        return None;
    }
    let mut s = String::with_capacity(19);
    write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
    .ok()?;
    s.as_bytes().try_into().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn same_text_as_the_default_timer_for_a_given_second() {
        for secs in [
            0u64,
            951_782_400,
            1_764_110_000,
            4_102_444_799,
            253_402_300_799,
        ] {
            let ours = String::from_utf8(prefix_of(secs).unwrap().to_vec()).unwrap();
            let theirs = time::OffsetDateTime::from_unix_timestamp(secs as i64)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            assert_eq!(ours, theirs[..19], "{secs}");
        }
        assert!(prefix_of(253_402_300_800).is_none());
    }

    #[test]
    fn writes_date_time_and_microseconds() {
        let stamp = |timer: &dyn FormatTime| {
            let mut s = String::new();
            timer.format_time(&mut Writer::new(&mut s)).unwrap();
            s
        };
        let before = stamp(&tracing_subscriber::fmt::time::SystemTime);
        let ours = stamp(&Utc);
        let after = stamp(&tracing_subscriber::fmt::time::SystemTime);
        assert_eq!(ours.len(), before.len(), "{ours} {before}");
        assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
        assert!(
            ours[..19] == before[..19] || ours[..19] == after[..19],
            "{ours} {before}"
        );
        assert!(before <= ours && ours <= after, "{before} {ours} {after}");
    }
}
