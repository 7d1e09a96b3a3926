//! The Tax Administration's public certificate authorities: which environment issued a
//! certificate, the chains that complete a leaf, and the chains that sign the certificate
//! service's responses. Embedded as data (see the source notes beside each PEM).

use clap::ValueEnum;

/// A Tax Administration environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// The customer test environment (`pkiws-testi.vero.fi`, `api-test.vero.fi`).
    Test,
    /// Production (`pkiws.vero.fi`, `api.vero.fi`).
    Production,
}

impl Environment {
    /// The value the certificate service expects in `Environment`.
    pub fn service_value(self) -> &'static str {
        match self {
            Environment::Test => "TEST",
            Environment::Production => "PRODUCTION",
        }
    }

    /// `test` or `production`.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Test => "test",
            Environment::Production => "production",
        }
    }
}

impl std::fmt::Display for Environment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
