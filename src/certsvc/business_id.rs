//! The Finnish business ID (Y-tunnus): seven digits, a hyphen and a check digit.

use std::fmt;
use std::str::FromStr;

/// A business ID whose format and check digit are valid, e.g. `1234567-1`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BusinessId(String);

/// Why a string is not a business ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusinessIdError {
    /// Not `NNNNNNN-C`.
    #[error("{0:?} is not a business ID: expected seven digits, a hyphen and a check digit, like 1234567-1")]
    Format(String),
    /// The check digit does not match the digits.
    #[error("{value:?} is not a valid business ID: its check digit should be {expected}")]
    CheckDigit {
        /// What was given.
        value: String,
        /// The check digit the seven digits call for, or "none (no valid business ID has these digits)".
        expected: String,
    },
}

const WEIGHTS: [u32; 7] = [7, 9, 10, 5, 8, 4, 2];

impl BusinessId {
    /// The ID as written, `NNNNNNN-C`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The check digit for seven digits; `None` when the remainder is 1 (no such ID is issued).
fn check_digit(digits: &[u32]) -> Option<u32> {
    let sum: u32 = digits.iter().zip(WEIGHTS).map(|(d, w)| d * w).sum();
    match sum % 11 {
        0 => Some(0),
        1 => None,
        r => Some(11 - r),
    }
}

impl FromStr for BusinessId {
    type Err = BusinessIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let b = t.as_bytes();
        let shape_ok = b.len() == 9
            && b[..7].iter().all(u8::is_ascii_digit)
            && b[7] == b'-'
            && b[8].is_ascii_digit();
        if !shape_ok {
            return Err(BusinessIdError::Format(s.to_string()));
        }
        let digits: Vec<u32> = b[..7].iter().map(|c| u32::from(c - b'0')).collect();
        let given = u32::from(b[8] - b'0');
        match check_digit(&digits) {
            Some(c) if c == given => Ok(BusinessId(t.to_string())),
            Some(c) => Err(BusinessIdError::CheckDigit {
                value: s.to_string(),
                expected: c.to_string(),
            }),
            None => Err(BusinessIdError::CheckDigit {
                value: s.to_string(),
                expected: "none (no valid business ID has these digits)".into(),
            }),
        }
    }
}

impl fmt::Display for BusinessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        // 0245437-2 is the Tax Administration's own business ID; 1572860-0 has remainder 0.
        for ok in ["0245437-2", "1234567-1", "1572860-0", " 0245437-2 "] {
            let id: BusinessId = ok.parse().unwrap();
            assert_eq!(id.to_string(), ok.trim());
        }
    }

    #[test]
    fn wrong_check_digit_names_the_right_one() {
        let e = "0245437-3".parse::<BusinessId>().unwrap_err();
        assert_eq!(
            e,
            BusinessIdError::CheckDigit {
                value: "0245437-3".into(),
                expected: "2".into()
            }
        );
    }

    #[test]
    fn remainder_one_is_never_valid() {
        // 0000001: 1*2 = 2 ... find digits with sum % 11 == 1: 0000006 -> 12 % 11 = 1.
        for c in 0..=9 {
            let s = format!("0000006-{c}");
            assert!(matches!(
                s.parse::<BusinessId>(),
                Err(BusinessIdError::CheckDigit { .. })
            ));
        }
    }

    #[test]
    fn bad_shapes() {
        for bad in [
            "",
            "1234567",
            "12345671",
            "123456-71",
            "1234567-",
            "abcdefg-1",
            "1234567-12",
        ] {
            assert!(matches!(
                bad.parse::<BusinessId>(),
                Err(BusinessIdError::Format(_))
            ));
        }
    }
}
