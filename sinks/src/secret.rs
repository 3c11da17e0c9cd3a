//! One type for every secret of the configuration (the PostgreSQL password, RabbitMQ's
//! `password`, the contents of `*_password_file` files), so that none of them can reach a log
//! line, a debug print or an error message by accident.
//!
//! Invariant: only [`Secret::expose`] hands the text out; `Debug` prints `"<redacted>"`, and
//! there is no `Display`.

use serde::Deserialize;
use std::fmt;
use std::path::{Path, PathBuf};

/// A secret that never shows up in logs or debug output.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

/// A secret file the configuration names could not be read.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {key} {}: check the path and permissions", path.display())]
pub struct SecretFileError {
    /// The configuration key that names the file, e.g. `source.password_file`.
    key: String,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The first line of `file`, which configuration key `key` names. Read whenever it is
    /// needed (at every connect, for PostgreSQL), so that mounted secrets can rotate.
    pub fn from_file(file: &Path, key: &str) -> Result<Secret, SecretFileError> {
        let text = std::fs::read_to_string(file).map_err(|source| SecretFileError {
            key: key.to_owned(),
            path: file.to_owned(),
            source,
        })?;
        Ok(Secret(text.lines().next().unwrap_or_default().to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_secret_file_gives_its_first_line_and_a_missing_one_names_its_key() {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        writeln!(file, "s3cret\nsecond line").unwrap();
        let secret = Secret::from_file(file.path(), "sinks.out.password_file").unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(format!("{secret:?}"), "\"<redacted>\"");
        let err = Secret::from_file(Path::new("/nonexistent/pw"), "sinks.out.password_file")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read sinks.out.password_file /nonexistent/pw"),
            "{err}"
        );
    }
}
