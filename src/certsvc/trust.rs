//! The Tax Administration's chains this module needs, from [`crate::vero_ca`] (embedded data).

use rustls::pki_types::CertificateDer;

use crate::vero_ca::{self, Environment};

/// The roots the certificate service's response signatures chain to in `env`.
pub fn service_signers(env: Environment) -> Vec<CertificateDer<'static>> {
    vero_ca::service_signers(env)
}

/// The CAs between the service's signing certificate and [`service_signers`] (the service is
/// not documented to send them in KeyInfo).
pub fn service_intermediates(env: Environment) -> Vec<CertificateDer<'static>> {
    vero_ca::service_intermediates(env)
}

/// The leaf followed by its issuing and intermediate CAs, as `cert.pem` should hold them.
pub fn complete_chain(leaf: &CertificateDer<'_>) -> Vec<CertificateDer<'static>> {
    vero_ca::complete_chain(leaf)
}
