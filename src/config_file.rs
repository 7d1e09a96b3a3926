//! `--config PATH`: `run`'s settings from a TOML file, keys spelled like the long flags.
//!
//! Precedence is flags > environment > file > defaults. clap fills every unset flag with its
//! default, which would hide the file, so the command line is parsed twice: the first parse says
//! (through `ArgMatches::value_source`) which settings the command line or the environment gave;
//! the file's other settings become `--key=value` arguments put in front of the user's own, and
//! the second parse turns the lot into [`Cli`] with clap's own checks. A repeatable setting is
//! taken whole from one place: the file's list applies only when neither flags nor environment
//! gave any. `run` and `check` (which takes run's flags) both read it. Apart from the caller's
//! `read`, everything here is pure.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::parser::ValueSource;
use clap::{ArgAction, Args, CommandFactory, FromArgMatches};
use toml::Value;

use crate::cli::{Cli, RunArgs};

/// Which settings came from the config file, so later errors can say where to fix them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromFile {
    /// The file as `--config` named it.
    pub file: String,
    /// Keys of the file that took effect (those the flags and the environment left unset).
    pub keys: Vec<String>,
}

impl FromFile {
    /// `message` (an error about flags), with the file and key named for each flag the file set.
    pub fn explain(&self, message: &str) -> String {
        let named: Vec<&str> = self
            .keys
            .iter()
            .filter(|k| mentions_flag(message, k))
            .map(String::as_str)
            .collect();
        if named.is_empty() {
            return message.to_owned();
        }
        let keys: Vec<String> = named.iter().map(|k| format!("{k:?}")).collect();
        let plural = if keys.len() == 1 { "" } else { "s" };
        format!(
            "{message} (set by key{plural} {} in {})",
            keys.join(", "),
            self.file
        )
    }
}

/// Whether `message` names `--key` as a whole flag (so `--listen` is not found in `--listen-mode`).
fn mentions_flag(message: &str, key: &str) -> bool {
    let flag = format!("--{key}");
    message.match_indices(&flag).any(|(i, _)| {
        !message[i + flag.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
    })
}

/// A config file that cannot be used; the message names the file and, where there is one, the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigFileError {
    /// The file could not be read.
    #[error("cannot read the config file {file}: {reason}")]
    Read {
        /// The file as `--config` named it.
        file: String,
        /// What the operating system said.
        reason: String,
    },
    /// The file is not TOML, or a key or value in it is wrong.
    #[error("{file}: {message}")]
    Invalid {
        /// The file as `--config` named it.
        file: String,
        /// What is wrong, naming the key.
        message: String,
    },
}

/// Why the command line and config file did not make a [`Cli`].
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// clap's own: a bad flag, or `--help` / `--version` (print it with `exit()`).
    #[error(transparent)]
    Clap(#[from] clap::Error),
    /// The config file.
    #[error(transparent)]
    File(#[from] ConfigFileError),
}

/// Parses `argv` (program name first) and merges the file `--config` names, read with `read`.
pub fn parse(
    argv: Vec<OsString>,
    read: impl FnOnce(&Path) -> std::io::Result<String>,
) -> Result<(Cli, Option<FromFile>), ParseError> {
    let first = Cli::command().try_get_matches_from(&argv)?;
    let (run, insert_at) = match first.subcommand() {
        Some((name @ ("run" | "check"), m)) => {
            // With args_conflicts_with_subcommands nothing comes before the subcommand's name.
            let at = argv
                .iter()
                .skip(1)
                .position(|a| a == name)
                .map_or(1, |i| i + 2);
            (m, at)
        }
        Some(_) => return Ok((from_matches(first)?, None)),
        None => (&first, 1),
    };
    let Some(path) = run.get_one::<PathBuf>("config").cloned() else {
        return Ok((from_matches(first)?, None));
    };
    let file = path.display().to_string();
    let text = read(&path).map_err(|e| ConfigFileError::Read {
        file: file.clone(),
        reason: e.to_string(),
    })?;
    let given = |id: &str| {
        matches!(
            run.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let (extra, keys) = file_args(&file, &text, given)?;
    let mut merged = argv;
    merged.splice(insert_at..insert_at, extra);
    let cli = from_matches(Cli::command().try_get_matches_from(merged)?)?;
    Ok((cli, Some(FromFile { file, keys })))
}

fn from_matches(mut m: clap::ArgMatches) -> Result<Cli, clap::Error> {
    Cli::from_arg_matches_mut(&mut m).map_err(|e| e.format(&mut Cli::command()))
}

/// How a setting's value is written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// true or false (a flag without a value).
    Switch,
    /// An array of strings (a repeatable flag).
    List,
    /// One string or number.
    Single,
}

/// `run`'s settings: (key = long flag, clap id, kind), `config` itself left out.
fn settings() -> Vec<(String, String, Kind)> {
    let cmd = RunArgs::augment_args(clap::Command::new("vero-proxy"));
    cmd.get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            let kind = match a.get_action() {
                ArgAction::SetTrue => Kind::Switch,
                ArgAction::Append => Kind::List,
                _ => Kind::Single,
            };
            Some((long.to_owned(), a.get_id().to_string(), kind))
        })
        .filter(|(key, _, _)| key != "config")
        .collect()
}

/// The settings in `text` (the TOML of `file`) as `--key=value` arguments, leaving out those for
/// which `given(clap id)` says the flags or the environment already set them; with the keys used.
pub fn file_args(
    file: &str,
    text: &str,
    given: impl Fn(&str) -> bool,
) -> Result<(Vec<OsString>, Vec<String>), ConfigFileError> {
    let invalid = |message: String| ConfigFileError::Invalid {
        file: file.to_owned(),
        message,
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        invalid(format!("not valid TOML: {}", e.to_string().trim_end()))
    })?;
    let settings = settings();
    // Values are checked by clap's own parsers, without the environment, one key at a time so
    // the error names the key.
    let checker = RunArgs::augment_args(clap::Command::new("vero-proxy"))
        .mut_args(|a| a.env(None))
        .no_binary_name(true);
    let mut args = Vec::new();
    let mut keys = Vec::new();
    for (key, value) in &table {
        let Some((_, id, kind)) = settings.iter().find(|(k, _, _)| k == key) else {
            return Err(invalid(unknown_key(key, &settings)));
        };
        let values = values_of(key, *kind, value).map_err(invalid)?;
        let flags: Vec<String> = match kind {
            Kind::Switch if values.first().is_some_and(|v| v == "true") => vec![format!("--{key}")],
            Kind::Switch => vec![],
            _ => values.iter().map(|v| format!("--{key}={v}")).collect(),
        };
        if let Err(e) = checker.clone().try_get_matches_from(&flags) {
            return Err(invalid(format!("key {key:?}: {}", clap_reason(&e))));
        }
        if given(id) {
            continue;
        }
        keys.push(key.clone());
        args.extend(flags.into_iter().map(OsString::from));
    }
    Ok((args, keys))
}

/// The value of `key` as flag values, or what is wrong with its type.
fn values_of(key: &str, kind: Kind, value: &Value) -> Result<Vec<String>, String> {
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        // TOML reads `0o660` as 432 and `0660` not at all: a mode must be a string.
        Value::Integer(i) if key != "listen-mode" => Some(i.to_string()),
        _ => None,
    };
    match (kind, value) {
        (Kind::Switch, Value::Boolean(b)) => Ok(vec![b.to_string()]),
        (Kind::Switch, other) => Err(format!(
            "key {key:?} takes true or false, not {}",
            with_article(other.type_str())
        )),
        (Kind::List, Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(format!(
                    "key {key:?} takes a list of strings; one item is {}",
                    with_article(other.type_str())
                )),
            })
            .collect(),
        (Kind::List, Value::String(s)) => Ok(vec![s.clone()]),
        (Kind::List, other) => Err(format!(
            "key {key:?} takes a list of strings, as in {key} = [\"...\", \"...\"], not {}",
            with_article(other.type_str())
        )),
        (Kind::Single, v) => scalar(v).map(|s| vec![s]).ok_or_else(|| {
            let want = if key == "listen-mode" {
                "a string, as in listen-mode = \"0660\""
            } else {
                "one string or number"
            };
            format!(
                "key {key:?} takes {want}, not {}",
                with_article(v.type_str())
            )
        }),
    }
}

/// "a string", "an integer": a TOML type named in a message.
fn with_article(type_str: &str) -> String {
    let article = if type_str.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {type_str}")
}

/// The part of a clap value error a person needs, without clap's usage lines or the value itself
/// (a header value may be a secret).
fn clap_reason(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    match e.kind() {
        ErrorKind::InvalidValue => match e.get(ContextKind::ValidValue) {
            Some(ContextValue::Strings(valid)) => {
                format!("not a valid value; use one of: {}", valid.join(", "))
            }
            _ => "not a valid value".to_owned(),
        },
        ErrorKind::ValueValidation => match std::error::Error::source(e) {
            Some(inner) => format!("not a valid value ({inner})"),
            None => "not a valid value".to_owned(),
        },
        _ => "not a valid value".to_owned(),
    }
}

/// The message for a key that is not a `run` setting, with the nearest one when there is one.
fn unknown_key(key: &str, settings: &[(String, String, Kind)]) -> String {
    if key == "config" {
        return "\"config\" cannot be set in a config file (it names the file itself)".to_owned();
    }
    // People also write keys as struct fields or environment variables.
    let lower = key.to_ascii_lowercase();
    let normal = lower
        .trim_start_matches("--")
        .trim_start_matches("vero_proxy_")
        .replace('_', "-");
    let near = settings
        .iter()
        .map(|(k, _, _)| (strsim::damerau_levenshtein(k, &normal), k))
        .filter(|(d, _)| *d <= 3)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k);
    let mut msg = format!("unknown key {key:?}");
    if let Some(k) = near {
        msg.push_str(&format!(" (did you mean {k}?)"));
    }
    if normal.contains("password") && !normal.ends_with("-file") {
        msg.push_str(
            "; a password never goes in the config file: name a file that holds it with \
             pkcs12-password-file or key-password-file, or set VERO_PROXY_PKCS12_PASSWORD",
        );
    }
    msg
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn args_of(text: &str, given: &[&str]) -> Vec<String> {
        let (args, _) = file_args("f.toml", text, |id| given.contains(&id)).unwrap();
        args.into_iter().map(|a| a.into_string().unwrap()).collect()
    }

    fn error_of(text: &str) -> String {
        file_args("vero-proxy.toml", text, |_| false)
            .unwrap_err()
            .to_string()
    }

    fn parse_with(argv: &[&str], text: &str) -> Result<(Cli, Option<FromFile>), ParseError> {
        let text = text.to_owned();
        parse(argv.iter().map(OsString::from).collect(), move |_| Ok(text))
    }

    #[test]
    fn keys_become_flags_of_the_same_name() {
        let a = args_of(
            r#"
            max-upstream-concurrency = 20
            upstream = "test"
            allow-remote-clients = true
            allow-remote-admin = false
            add-header = ["A: 1", "B: @/run/b"]
            allowed-host = "app.internal"
            "#,
            &[],
        );
        for want in [
            "--max-upstream-concurrency=20",
            "--upstream=test",
            "--allow-remote-clients",
            "--add-header=A: 1",
            "--add-header=B: @/run/b",
            "--allowed-host=app.internal",
        ] {
            assert!(a.contains(&want.to_owned()), "{want} missing from {a:?}");
        }
        assert!(!a.iter().any(|x| x.contains("allow-remote-admin")), "{a:?}");
    }

    #[test]
    fn settings_given_elsewhere_are_left_out() {
        let (args, keys) = file_args(
            "f.toml",
            "listen = \"127.0.0.1:1\"\nadd-header = [\"A: 1\"]\nupstream = \"test\"",
            |id| id == "listen" || id == "add_headers",
        )
        .unwrap();
        assert_eq!(args, vec![OsString::from("--upstream=test")]);
        assert_eq!(keys, vec!["upstream".to_owned()]);
    }

    #[test]
    fn file_fills_defaults_and_flags_win() {
        let text = r#"
            listen = "127.0.0.1:1111"
            admin-listen = "127.0.0.1:2222"
            add-header = ["From-File: 1"]
            max-upstream-concurrency = 7
            upstream-protocol = "http1"
        "#;
        for argv in [
            &[
                "vero-proxy",
                "--config",
                "f.toml",
                "--listen",
                "127.0.0.1:3333",
            ][..],
            &[
                "vero-proxy",
                "run",
                "--config",
                "f.toml",
                "--listen",
                "127.0.0.1:3333",
            ][..],
            &[
                "vero-proxy",
                "check",
                "--config",
                "f.toml",
                "--listen",
                "127.0.0.1:3333",
            ][..],
        ] {
            let (cli, from) = parse_with(argv, text).unwrap();
            let run = match cli.command {
                Some(crate::cli::Command::Run(r)) => *r,
                Some(crate::cli::Command::Check(c)) => c.run,
                _ => cli.run,
            };
            assert_eq!(run.listen, "127.0.0.1:3333", "{argv:?}");
            assert_eq!(run.admin_listen, "127.0.0.1:2222", "{argv:?}");
            assert_eq!(run.add_headers, vec!["From-File: 1".to_owned()]);
            assert_eq!(run.max_upstream_concurrency, 7);
            assert_eq!(run.upstream_protocol, crate::cli::UpstreamProtocol::Http1);
            assert!(run.config.is_some());
            let from = from.unwrap();
            assert!(from.keys.contains(&"admin-listen".to_owned()));
            assert!(!from.keys.contains(&"listen".to_owned()));
        }
    }

    #[test]
    fn a_repeatable_flag_replaces_the_files_whole_list() {
        let (cli, _) = parse_with(
            &["vero-proxy", "--config", "f.toml", "--add-header", "A: cli"],
            "add-header = [\"A: file\", \"B: file\"]",
        )
        .unwrap();
        assert_eq!(cli.run.add_headers, vec!["A: cli".to_owned()]);
    }

    #[test]
    fn without_config_nothing_is_read() {
        let (cli, from) = parse(
            vec!["vero-proxy".into(), "--upstream".into(), "test".into()],
            |_| panic!("no file to read"),
        )
        .unwrap();
        assert_eq!(cli.run.upstream.as_deref(), Some("test"));
        assert!(from.is_none());
    }

    #[test]
    fn unknown_keys_are_named_with_the_file_and_a_suggestion() {
        let e = error_of("max-upstream-concurency = 50");
        assert_eq!(
            e,
            "vero-proxy.toml: unknown key \"max-upstream-concurency\" \
             (did you mean max-upstream-concurrency?)"
        );
        assert!(error_of("max_upstream_concurrency = 50")
            .contains("did you mean max-upstream-concurrency?"));
        assert!(error_of("allowed-hosts = []").contains("did you mean allowed-host?"));
        assert!(error_of("config = \"other.toml\"").contains("\"config\" cannot be set"));
        assert!(error_of("help = true").contains("unknown key \"help\""));
        assert!(error_of("[run]\nlisten = \"x\"").contains("unknown key \"run\""));
    }

    #[test]
    fn a_password_key_is_refused_without_echoing_it() {
        let e = error_of("pkcs12-password = \"hunter2\"");
        assert!(e.contains("unknown key \"pkcs12-password\""), "{e}");
        assert!(e.contains("pkcs12-password-file"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn bad_values_and_types_name_the_key_and_the_file() {
        for (text, needle) in [
            (
                "max-upstream-concurrency = \"lots\"",
                "key \"max-upstream-concurrency\"",
            ),
            (
                "max-upstream-concurrency = -1",
                "key \"max-upstream-concurrency\"",
            ),
            ("upstream-protocol = \"http3\"", "auto, http1, http2"),
            (
                "allow-remote-clients = \"yes\"",
                "key \"allow-remote-clients\" takes true or false",
            ),
            (
                "add-header = [1]",
                "key \"add-header\" takes a list of strings",
            ),
            (
                "listen = [\"a\"]",
                "key \"listen\" takes one string or number",
            ),
            ("listen-mode = 0o660", "listen-mode = \"0660\""),
            ("renewal-warning-days = 1.5", "key \"renewal-warning-days\""),
            ("listen = ", "not valid TOML"),
        ] {
            let e = error_of(text);
            assert!(e.starts_with("vero-proxy.toml: "), "{text}: {e}");
            assert!(e.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn unreadable_file_is_named() {
        let e = parse(
            vec!["vero-proxy".into(), "--config".into(), "/nope.toml".into()],
            |_| Err(std::io::Error::from(std::io::ErrorKind::NotFound)),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nope.toml"), "{e}");
    }

    #[test]
    fn errors_about_flags_say_which_came_from_the_file() {
        let from = FromFile {
            file: "vero.toml".into(),
            keys: vec!["listen".into(), "upstream".into()],
        };
        assert_eq!(
            from.explain("--listen 0.0.0.0:1 is not loopback; pass --allow-remote-clients"),
            "--listen 0.0.0.0:1 is not loopback; pass --allow-remote-clients \
             (set by key \"listen\" in vero.toml)"
        );
        assert_eq!(from.explain("--listen-mode is odd"), "--listen-mode is odd");
        assert!(from
            .explain("--upstream and --listen")
            .ends_with("(set by keys \"listen\", \"upstream\" in vero.toml)"));
    }

    #[test]
    fn the_shipped_example_names_every_setting_and_all_are_valid() {
        let example = include_str!("../vero-proxy.example.toml");
        // Uncomment `# key = value` lines, so the defaults shown are checked too.
        let all: String = example
            .lines()
            .map(|l| {
                let t = l.trim_start_matches("# ");
                if t.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit())
                }) {
                    t
                } else {
                    l
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let (_, keys) = file_args("example", &all, |_| false).unwrap();
        for (key, _, _) in settings() {
            assert!(keys.contains(&key), "the example does not show {key}");
        }
        // As shipped it is valid too.
        file_args("example", example, |_| false).unwrap();
    }
}
