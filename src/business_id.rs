//! The Finnish business ID (Y-tunnus): seven digits, a hyphen and a check digit. Organisations
//! are named by it: one identity per business ID.

use std::fmt;
use std::str::FromStr;

/// A business ID whose check digit is right, such as `1234567-1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BusinessId([u8; 9]);

/// Why a text is not a business ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusinessIdError {
    /// Not `NNNNNNN-N`.
    #[error("{0:?} is not a business ID: expected seven digits, a hyphen and a check digit (like 0737546-2)")]
    Shape(String),
    /// The check digit does not match the digits.
    #[error("{0:?} is not a business ID: its check digit should be {1}")]
    CheckDigit(String, char),
    /// No check digit can make the digits valid (remainder 1).
    #[error("{0:?} is not a business ID: no business ID has these seven digits")]
    NoCheckDigit(String),
}

const WEIGHTS: [u32; 7] = [7, 9, 10, 5, 8, 4, 2];

/// The check digit for seven digits, or None when the remainder is 1 (such IDs are not issued).
fn check_digit(digits: &[u8]) -> Option<u8> {
    let sum: u32 = digits
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    match sum % 11 {
        0 => Some(b'0'),
        1 => None,
        r => Some(b'0' + (11 - r) as u8),
    }
}

impl FromStr for BusinessId {
    type Err = BusinessIdError;

    /// Parses `NNNNNNN-N`, checking the check digit (weights 7, 9, 10, 5, 8, 4, 2; modulo 11).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let b = s.as_bytes();
        let shape_ok = b.len() == 9
            && b[..7].iter().all(u8::is_ascii_digit)
            && b[7] == b'-'
            && b[8].is_ascii_digit();
        if !shape_ok {
            return Err(BusinessIdError::Shape(s.chars().take(40).collect()));
        }
        match check_digit(&b[..7]) {
            None => Err(BusinessIdError::NoCheckDigit(s.to_owned())),
            Some(c) if c != b[8] => Err(BusinessIdError::CheckDigit(s.to_owned(), c as char)),
            Some(_) => {
                let mut out = [0u8; 9];
                out.copy_from_slice(b);
                Ok(BusinessId(out))
            }
        }
    }
}

impl BusinessId {
    /// The ID as text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and a hyphen are ever stored.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for BusinessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for BusinessId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids_pass_and_wrong_check_digits_fail() {
        // Public IDs: the Tax Administration (0245458-3), Nokia (0112038-9), Kela (0246246-0).
        for ok in ["0245458-3", "0112038-9", "0246246-0"] {
            assert_eq!(
                ok.parse::<BusinessId>().map(|b| b.to_string()),
                Ok(ok.to_owned())
            );
        }
        assert_eq!(
            "0245458-4".parse::<BusinessId>(),
            Err(BusinessIdError::CheckDigit("0245458-4".into(), '3'))
        );
        for bad in [
            "",
            "0245458",
            "02454583",
            "0245458-",
            "024545-83",
            "a245458-3",
            "0245458-33",
            " 0245458-3",
        ] {
            assert!(
                matches!(bad.parse::<BusinessId>(), Err(BusinessIdError::Shape(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn remainder_one_has_no_check_digit() {
        // 1000001: 7 + 2 = 9 -> r 9 -> 2; search for a remainder-1 prefix instead of hard-coding.
        let prefix = (0..10_000_000u32)
            .map(|n| format!("{n:07}"))
            .find(|p| check_digit(p.as_bytes()).is_none())
            .unwrap_or_default();
        let any = format!("{prefix}-0");
        assert!(matches!(
            any.parse::<BusinessId>(),
            Err(BusinessIdError::NoCheckDigit(_))
        ));
    }
}
