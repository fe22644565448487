//! Yes/no environment variables (`HEAPCAP_ALLOW_UNSUPERVISED`, `HEAPCAP_HOOK_ALLOW_UNSUPERVISED`,
//! `HEAPCAP_HOOK_TIMING`): one reading for all of them.
//!
//! [`YES`] values mean yes and [`NO`] values, an empty value or none at all mean no, in any case
//! and with whitespace around. Anything else (`maybe`, `2`, `enabled`) is an error that says what
//! to write: whoever set the variable meant something, and neither guess is safe. Read as no, a
//! typo of yes would fail every container start with a message about heapcapd instead of about
//! the typo; read as yes, a typo could start containers without their quotas.

use std::ffi::OsStr;

/// What means yes.
pub const YES: [&str; 4] = ["1", "true", "yes", "on"];
/// What means no (as does an empty value, or the variable not being set).
pub const NO: [&str; 4] = ["0", "false", "no", "off"];

/// A yes/no variable that is neither.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FlagError {
    #[error(
        "{name}={value:?} is neither yes nor no: write 1, true, yes or on for yes; 0, false, no or off (or \
         leave it unset) for no"
    )]
    NeitherYesNorNo { name: String, value: String },
}

/// The value `value` of the variable `name` (`None`: not set) as a yes or a no.
pub fn parse(name: &str, value: Option<&OsStr>) -> Result<bool, FlagError> {
    let Some(value) = value else { return Ok(false) };
    let neither = || FlagError::NeitherYesNorNo { name: name.to_string(), value: value.to_string_lossy().into_owned() };
    let word = value.to_str().ok_or_else(neither)?.trim().to_ascii_lowercase();
    if YES.contains(&word.as_str()) {
        Ok(true)
    } else if word.is_empty() || NO.contains(&word.as_str()) {
        Ok(false)
    } else {
        Err(neither())
    }
}

/// The process's environment variable `name` as a yes or a no.
pub fn var(name: &str) -> Result<bool, FlagError> {
    parse(name, std::env::var_os(name).as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn flag(value: &str) -> Result<bool, FlagError> {
        parse("HEAPCAP_X", Some(value.as_ref()))
    }

    #[test]
    fn yes_and_no_in_any_case() {
        for yes in ["1", "true", "YES", " on ", "True\n"] {
            assert_eq!(flag(yes), Ok(true), "{yes:?}");
        }
        for no in ["", "  ", "0", "false", "No", "OFF"] {
            assert_eq!(flag(no), Ok(false), "{no:?}");
        }
        assert_eq!(parse("HEAPCAP_X", None), Ok(false), "unset is no");
    }

    #[test]
    fn anything_else_says_what_to_write() {
        for neither in ["maybe", "2", "enabled", "y", "1 0", "ja"] {
            let e = flag(neither).unwrap_err().to_string();
            assert!(e.starts_with(&format!("HEAPCAP_X={neither:?} is neither yes nor no")), "{e}");
            assert!(e.contains("write 1, true, yes or on for yes; 0, false, no or off"), "{e}");
        }
        let e = parse("HEAPCAP_X", Some(OsStr::from_bytes(b"\xffyes"))).unwrap_err();
        assert!(matches!(&e, FlagError::NeitherYesNorNo { value, .. } if value == "\u{fffd}yes"), "{e}");
    }
}
